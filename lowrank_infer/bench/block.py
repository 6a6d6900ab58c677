"""``bench block``: one decoder block's projections at decode token counts, alone and grouped.

A packed model runs q/k/v as one :func:`~lowrank_infer.kernels.lowrank_grouped_linear` (one
shrink over ``[V_q|V_k|V_v]``) and gate/up as one :func:`~lowrank_infer.kernels.lowrank_gated_linear`
(the activation and product fused in). This bench times what each such call replaces: every
projection alone (``single``), a group as separate calls (``separate``), and the group as one
op (``grouped``, ``gated``), each with the dense weights of the same shapes (a packed dense
model concatenates them: one GEMM for q/k/v, one for gate/up) and with every low-rank backend,
the Triton ones with programmatic dependent launch (PDL) off and on. Bandwidth is counted on
the weights alone (``U`` and ``V``, or ``W``), the bytes that bound a decode step, and compared
with a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lowrank_infer.bench.backends import TRITON_BACKENDS, running
from lowrank_infer.bench.kernels import layer_rank
from lowrank_infer.bench.operands import check_value
from lowrank_infer.bench.output import Column, add_speedups, markdown_table
from lowrank_infer.bench.roofline import Peaks
from lowrank_infer.bench.shapes import MODELS, layer_shapes
from lowrank_infer.bench.timing import free_memory, graph_or_eager_ms, median_ms, rotation_copies
from lowrank_infer.kernels import lowrank_gated_linear, lowrank_grouped_linear, lowrank_linear

__all__ = ["BlockSettings", "Unit", "block_units", "impls", "markdown_report", "run_block_bench"]

# Members of the groups a packed model fuses, and the form each takes as one op.
_GROUPS = {"qkv": (("q", "k", "v"), "grouped"), "gate_up": (("gate", "up"), "gated")}


@dataclass(frozen=True)
class Unit:
    """What one timed call computes.

    ``form`` is ``single`` (one projection), ``separate`` (a group's projections, one call each)
    or the group as one op: ``grouped`` (outputs concatenated) or ``gated`` (``silu(gate) * up``).
    """

    name: str  # a projection ("q/k/v/o": every projection of that shape) or a group ("qkv", "gate_up")
    form: str
    shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) of each projection
    ranks: tuple[int, ...]

    @property
    def gated(self) -> bool:
        """Whether the output is ``silu(first) * second``: gate/up, separate or as one op."""
        return self.name in _GROUPS and _GROUPS[self.name][1] == "gated"


def block_units(model: str, keep: float, multiple_of: int) -> list[Unit]:
    """The units of one decoder block of ``model``: each distinct projection shape alone, then q/k/v
    and gate/up as separate calls and as one op, at the uniform rank of ``keep``
    (:func:`~lowrank_infer.bench.kernels.layer_rank`).

    Raises:
        ValueError: an unknown model, or a rank that leaves a projection dense.
    """
    singles = layer_shapes([model])  # raises for an unknown model
    shapes = MODELS[model].layer_shapes()

    def rank(m: int, n: int) -> int:
        return layer_rank(m, n, keep, multiple_of)

    units = [Unit(s.layer, "single", ((s.m, s.n),), (rank(s.m, s.n),)) for s in singles]
    for name, (members, fused_form) in _GROUPS.items():
        group = tuple(shapes[member] for member in members)
        ranks = tuple(rank(m, n) for m, n in group)
        units += [Unit(name, form, group, ranks) for form in ("separate", fused_form)]
    return units


def impls(backends: list[str], pdl: list[bool]) -> list[tuple[str, bool | None]]:
    """``(backend, pdl)`` pairs to time: each Triton backend once per ``pdl`` setting, the others
    once with ``pdl`` None (PDL changes only the Triton kernels' launches)."""
    return [(name, flag) for name in backends for flag in (pdl if name in TRITON_BACKENDS else [None])]


@dataclass(frozen=True)
class BlockSettings:
    """What to time: ``units`` × token counts × (backend, PDL) pairs, on one device and dtype."""

    model: str
    keep: float
    units: list[Unit]
    tokens: list[int]
    impls: list[tuple[str, bool | None]]
    device: torch.device
    dtype: torch.dtype
    rep_ms: float


def run_block_bench(
    settings: BlockSettings, peaks: Peaks, on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """One row per (unit, tokens, backend, PDL): checked against float64, then timed.

    Adds ``speedup_vs_dense`` (the dense row of the same unit and form), ``speedup_vs_separate``
    (grouped and gated rows: the same backend's ``separate`` row) and ``pdl_gain`` (PDL-on rows:
    time with PDL off / time with it on).

    Args:
        settings: the grid to time.
        peaks: this run's measured device copy bandwidth, for ``copy_frac``.
        on_row: called with the rows so far after each case, e.g. to save them while a long run goes on.
    """
    dense = [impl for impl in settings.impls if impl[0] == "dense"]
    lowrank = [impl for impl in settings.impls if impl[0] != "dense"]
    rows: list[dict] = []
    for unit in settings.units:
        for tokens in settings.tokens:
            for group, low_rank in ((dense, False), (lowrank, True)):
                if group:
                    rows += _bench_case(unit, tokens, low_rank, group, settings, peaks)
                    if on_row is not None:
                        _add_ratios(rows)
                        on_row(rows)
    _add_ratios(rows)
    return rows


# ---------------------------------------------------------------- one case


def _members(unit: Unit, tokens: int, low_rank: bool, dtype: torch.dtype, device: torch.device):
    """Random ``x`` and each projection's weights: ``W`` or ``(U, Vt)``, scaled so that outputs are O(1).

    ``Vt`` is the ``[k, n]`` rank-major copy that ``LowRankLinear`` stores (``V = Vt.T``), so that
    a group's factors stack as a packed model's do.
    """
    n = unit.shapes[0][1]
    x = torch.randn(tokens, n, device=device, dtype=dtype)
    if not low_rank:
        return x, [torch.randn(m, n, device=device, dtype=dtype) / n**0.5 for m, n in unit.shapes]
    return x, [(torch.randn(m, k, device=device, dtype=dtype) / k**0.5,
                torch.randn(k, n, device=device, dtype=dtype) / n**0.5) for (m, n), k in zip(unit.shapes, unit.ranks)]


def _silu_mul(h: torch.Tensor, m: int) -> torch.Tensor:
    return F.silu(h[..., :m]) * h[..., m:]


def _call(unit: Unit, x: torch.Tensor, members: list) -> Callable[[], object]:
    """The timed call of ``unit`` on ``x``; a group's weights are concatenated here, untimed."""
    if unit.form in ("single", "separate"):
        if isinstance(members[0], torch.Tensor):
            ops = [lambda W=W: F.linear(x, W) for W in members]
        else:
            ops = [lambda U=U, V=Vt.T: lowrank_linear(x, U, V) for U, Vt in members]
        if unit.form == "single":
            return ops[0]
        if unit.gated:
            return lambda: F.silu(ops[0]()) * ops[1]()
        return lambda: [op() for op in ops]
    if isinstance(members[0], torch.Tensor):
        W = torch.cat(members)
        m = members[0].shape[0]
        return (lambda: _silu_mul(F.linear(x, W), m)) if unit.gated else (lambda: F.linear(x, W))
    Us = [U for U, _ in members]
    V = torch.cat([Vt for _, Vt in members]).T
    if unit.gated:
        return lambda: lowrank_gated_linear(x, V, Us[0], Us[1])
    return lambda: lowrank_grouped_linear(x, V, Us)


def _reference(unit: Unit, x: torch.Tensor, members: list) -> torch.Tensor:
    """``unit``'s output in float64, from the projections' own weights (no concatenation)."""
    x = x.double()
    ys = [x @ w.double().T if isinstance(w, torch.Tensor) else (x @ w[1].double().T) @ w[0].double().T
          for w in members]
    return F.silu(ys[0]) * ys[1] if unit.gated else torch.cat(ys, dim=-1)


def _joined(compute: Callable[[], object]) -> Callable[[], torch.Tensor]:
    """``compute`` with the list of a ``separate`` call's outputs concatenated, for the check."""

    def run() -> torch.Tensor:
        y = compute()
        return torch.cat(y, dim=-1) if isinstance(y, list) else y

    return run


def _weight_bytes(unit: Unit, low_rank: bool, elem_bytes: int) -> int:
    params = (sum(k * (m + n) for (m, n), k in zip(unit.shapes, unit.ranks)) if low_rank
              else sum(m * n for m, n in unit.shapes))
    return params * elem_bytes


def _bench_case(
    unit: Unit, tokens: int, low_rank: bool, group: list[tuple[str, bool | None]], settings: BlockSettings,
    peaks: Peaks,
) -> list[dict]:
    """Rows of the (backend, PDL) pairs in ``group``, which share one case's operands and reference."""
    weight_bytes = _weight_bytes(unit, low_rank, settings.dtype.itemsize)
    base = {"model": settings.model, "unit": unit.name, "form": unit.form, "tokens": tokens,
            "shapes": [list(shape) for shape in unit.shapes], "k": list(unit.ranks) if low_rank else None,
            "keep": settings.keep if low_rank else None, "weight_bytes": weight_bytes,
            "dtype": str(settings.dtype).removeprefix("torch.")}
    io_bytes = tokens * (unit.shapes[0][1] + sum(m for m, _ in unit.shapes)) * settings.dtype.itemsize
    copies = rotation_copies(weight_bytes + io_bytes) if settings.device.type == "cuda" else 1
    try:
        sets = [_members(unit, tokens, low_rank, settings.dtype, settings.device) for _ in range(copies)]
        ref = _reference(unit, *sets[0])
        calls = [_call(unit, x, members) for x, members in sets]
    except torch.cuda.OutOfMemoryError as err:
        return [_failed({**base, "backend": name, "pdl": pdl}, f"inputs: {err}") for name, pdl in group]
    rows = []
    for name, pdl in group:
        with running(name, pdl):
            rows.append(_bench_impl(calls, ref, {**base, "backend": name, "pdl": pdl}, settings, peaks))
    del sets, ref, calls
    free_memory(settings.device)
    return rows


def _bench_impl(calls: list[Callable[[], object]], ref: torch.Tensor, row: dict, settings: BlockSettings,
                peaks: Peaks) -> dict:
    """Check, then time, one (backend, PDL) pair (already switched to) on the operand copies' ``calls``."""
    failure = check_value(_joined(calls[0]), settings.dtype, ref)
    if failure is None:
        try:
            row["median_ms"], row["timer"] = _time(calls, row, settings)
        except Exception as err:  # noqa: BLE001 - a failed timing fails this row, not the run
            failure = f"timing: {type(err).__name__}: {err}"[:200]
    if failure is not None:
        row = _failed(row, failure)
    else:
        gbs = row["weight_bytes"] / row["median_ms"] / 1e6
        row.update(gbs=gbs, copy_frac=gbs / peaks.bandwidth_gbs, status="ok")
    _progress(row)
    return row


def _time(calls: list[Callable[[], object]], row: dict, settings: BlockSettings) -> tuple[float, str]:
    """``(median ms, timer name)`` of one call of ``row``'s case: on a GPU always CUDA-graph replays
    cycling through the operand copies, since every token count here is a decode step's."""
    if settings.device.type != "cuda":
        return median_ms(calls[0], settings.device, settings.rep_ms), "perf_counter"
    return graph_or_eager_ms(calls, settings.device, settings.rep_ms, _label(row))


def _failed(row: dict, reason: str) -> dict:
    return {**row, "median_ms": None, "timer": None, "gbs": None, "copy_frac": None, "status": f"failed: {reason}"}


def _label(row: dict) -> str:
    """``backend``, with ``+pdl`` when the row ran with programmatic dependent launch."""
    return row["backend"] + ("+pdl" if row.get("pdl") else "")


def _progress(row: dict) -> None:
    timing = f"{row['median_ms'] * 1e3:.1f} us" if row["median_ms"] is not None else row["status"]
    print(f"  {row['unit']} {row['form']} T={row['tokens']} {_label(row)}: {timing}", file=sys.stderr, flush=True)


def _add_ratios(rows: list[dict]) -> None:
    """``speedup_vs_dense`` on every row, ``speedup_vs_separate`` on grouped and gated rows and
    ``pdl_gain`` on PDL-on rows (else None)."""
    add_speedups(rows, ("unit", "form", "tokens"))
    keys = ("unit", "form", "tokens", "backend", "pdl")
    ms = {tuple(r[key] for key in keys): r["median_ms"] for r in rows}
    for row in rows:
        unit, form, tokens, backend, pdl = (row[key] for key in keys)
        separate = ms.get((unit, "separate", tokens, backend, pdl)) if form in ("grouped", "gated") else None
        pdl_off = ms.get((unit, form, tokens, backend, False)) if pdl else None
        here = row["median_ms"]
        row["speedup_vs_separate"] = separate / here if separate and here else None
        row["pdl_gain"] = pdl_off / here if pdl_off and here else None


# ---------------------------------------------------------------- report


def _ratio(v: float) -> str:
    return f"{v:.2f}"


_COLUMNS: list[Column] = [
    ("unit", "unit", str), ("form", "form", str), ("T", "tokens", str), ("k", "k", lambda v: "/".join(map(str, v))),
    ("backend", "impl", str), ("timer", "timer", str), ("us", "median_ms", lambda v: f"{v * 1e3:.1f}"),
    ("weights MB", "weight_bytes", lambda v: f"{v / 1e6:.1f}"), ("GB/s", "gbs", lambda v: f"{v:.0f}"),
    ("of copy", "copy_frac", lambda v: f"{v:.0%}"), ("x dense", "speedup_vs_dense", _ratio),
    ("x separate", "speedup_vs_separate", _ratio), ("PDL gain", "pdl_gain", _ratio), ("status", "status", str),
]


def _side_by_side(rows: list[dict]) -> tuple[list[dict], list[Column]]:
    """One line per (unit, form, T): each backend's time over dense, PDL gains, grouping gains
    and fractions of the copy bandwidth, as columns."""
    labels = list(dict.fromkeys(_label(r) for r in rows))
    lines: dict[tuple, dict] = {}
    for row in rows:
        line = lines.setdefault((row["unit"], row["form"], row["tokens"]),
                                {"unit": row["unit"], "form": row["form"], "tokens": row["tokens"], "k": None})
        label = _label(row)
        line["k"] = line["k"] or row["k"]
        line.update({f"ms {label}": row["median_ms"], f"x dense {label}": row["speedup_vs_dense"],
                     f"x separate {label}": row["speedup_vs_separate"], f"pdl {label}": row["pdl_gain"],
                     f"copy {label}": row["copy_frac"]})
    columns: list[Column] = [("unit", "unit", str), ("form", "form", str), ("T", "tokens", str),
                             ("k", "k", lambda v: "/".join(map(str, v)))]
    columns += [("dense us", "ms dense", lambda v: f"{v * 1e3:.1f}")] if "dense" in labels else []
    columns += [(f"{label} x dense", f"x dense {label}", _ratio) for label in labels if label != "dense"]
    columns += [(f"{label} PDL gain", f"pdl {label}", _ratio) for label in labels if label.endswith("+pdl")]
    columns += [(f"{label} x separate", f"x separate {label}", _ratio) for label in labels]
    columns += [(f"{label} of copy", f"copy {label}", lambda v: f"{v:.0%}") for label in labels]
    return list(lines.values()), columns


def markdown_report(document: dict) -> str:
    """The results of a ``bench block`` document: the ratios side by side, then every row."""
    env, peaks, settings = document["environment"], document["peaks"], document["settings"]
    rows = [{**row, "impl": _label(row)} for row in document["rows"]]
    head = [
        f"## lowrank-infer bench block: {settings['model']} at keep {settings['keep']} on {env['device_label']}, "
        f"{document['dtype']}", "",
        "One decoder block's projections: `single` alone, `separate` a group as one call per projection, "
        "`grouped` q/k/v as one `lowrank_grouped_linear`, `gated` gate/up as one `lowrank_gated_linear` "
        "(dense: the concatenated weight, one GEMM). x dense: dense time / this time, same unit and form; "
        "PDL gain: time without PDL / time with it; x separate: the separate calls' time / the one op's, "
        f"same backend. Bandwidth counts the weights' bytes (U and V, or W) against a device copy measured "
        f"in this run: {peaks['bandwidth_gbs']:.0f} GB/s (read + write). torch {env['torch']}, "
        f"triton {env['triton']}.", "",
        f"Command: `{document['command']}`", "",
    ]
    if document.get("partial"):
        head += ["Partial: the run stopped before its end (a time limit?); these are the rows it measured.", ""]
    head += ["### Ratios side by side", ""]
    lines, columns = _side_by_side(rows)
    return ("\n".join(head) + "\n" + markdown_table(lines, columns) + "\n\n### Every row\n\n"
            + markdown_table(rows, _COLUMNS))
