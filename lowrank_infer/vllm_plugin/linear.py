"""``LowRankLinearMethod``: a vLLM linear layer held as low-rank factors, dense rows, or both.

vLLM merges the checkpoint's q/k/v into one ``QKVParallelLinear`` and gate/up into one
``MergedColumnParallelLinear``. Each checkpoint linear keeps its own rank inside the merged
layer (a *slice*), and ARA leaves some slices dense, so a layer holds up to three parameters,
named like the checkpoint's tensors so that vLLM's loaders route ``<slice>.U`` to ``U``:

* ``U``: the low-rank slices' left factors ``[rows, k]``, flattened and concatenated (1-D,
  because the slices' ranks differ);
* ``V``: their right factors ``[in, k]`` side by side, ``[in, Σk]`` flattened;
* ``weight``: the dense slices' rows ``[rows, in]``, concatenated.

``V`` is one ``[in, Σk]`` matrix, the slices' right factors side by side, so that the low-rank
slices of a merged layer (which all read the layer's input) run one shrink over it and one
expand each (``lowrank_infer.kernels.lowrank_grouped_linear``); a layer with one low-rank slice
runs ``lowrank_infer.kernels.lowrank_linear``, and each stretch of adjacent dense slices one
``F.linear``. The outputs are concatenated in output order.

Tensor parallelism. A column-parallel layer (qkv, gate_up) holds, per output block (q, k, v;
gate, up), the block's rows of U that its rank owns, and all of V. A row-parallel layer
(o_proj, down_proj) holds the rows of V for its part of the input and all of U: its output
``(x_r @ V_r) @ Uᵀ`` is a partial sum, which the layer's all-reduce completes; vLLM hands the
bias to tensor-parallel rank 0 only, so it is added once. Both shard only what vLLM shards for
a dense layer, so any TP size that serves the dense model serves the compressed one.

With ``tp_sharding="full"`` (see :mod:`.sharding`) a column-parallel layer's low-rank slices
also split V's columns (k, zero-padded up to a multiple of the TP size) and hold U's columns
for the padded k; a row-parallel layer also splits U's rows. Dense slices shard as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

from lowrank_infer.allocation.plan import LayerRank, PlanError
from lowrank_infer.kernels import check_factors, lowrank_grouped_linear, lowrank_linear
from lowrank_infer.vllm_plugin.sharding import column_intermediates, fully_sharded_kind, row_output

__all__ = ["LowRankLinearMethod"]

_QKV_SHARDS = {"q": 0, "k": 1, "v": 2}


@dataclass(frozen=True)
class _Block:
    """One output block of a vLLM layer (q, k or v; gate or up; the whole layer) on this rank."""

    full: int  # rows in the checkpoint
    part: int  # rows this rank holds
    start: int  # first of them, counted in the slice's checkpoint tensor


@dataclass(frozen=True)
class _Slice:
    """One checkpoint linear inside a vLLM layer, or a stretch of adjacent dense ones."""

    name: str
    rank: int | None  # None: dense
    blocks: tuple[_Block, ...]
    out_offset: int  # first output column of the layer it produces
    offset: int  # into U (flattened) for a low-rank slice, into weight's rows for a dense one
    v_offset: int  # first column of V (low-rank slices only)
    u_cols: int = 0  # U's columns held: k, or k padded to a multiple of the TP size (fully sharded)
    v_cols: int = 0  # V's columns held: k, or this rank's share of the padded k (fully sharded)
    v_start: int = 0  # the first of them, counted in the checkpoint's V (columns past k are zeros)

    @property
    def rows(self) -> int:
        return sum(block.part for block in self.blocks)

    @property
    def full_rows(self) -> int:
        return sum(block.full for block in self.blocks)


@dataclass(frozen=True)
class _Input:
    """The input features (V's rows, weight's columns) this rank holds."""

    full: int
    part: int
    start: int


class LowRankLinearMethod(LinearMethodBase):
    """Holds one vLLM linear layer's slices as ``U``/``V`` factors or dense ``weight`` rows.

    Args:
        prefix: the vLLM layer's name, e.g. ``model.layers.0.self_attn.qkv_proj``.
        names: the checkpoint linears it holds, in output order (``q_proj``, ``k_proj``, ...).
        entries: each one's rank-plan entry; ``None`` for a linear the plan does not list
            (kept dense).
        tp_sharding: ``"half"`` or ``"full"`` (:mod:`lowrank_infer.vllm_plugin.sharding`).
    """

    def __init__(self, prefix: str, names: list[str], entries: list[LayerRank | None],
                 tp_sharding: str = "half") -> None:
        self.prefix = prefix
        self.names = names
        self.entries = entries
        self.tp_sharding = tp_sharding
        self._loaded: set[tuple[str, int]] = set()

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        # vLLM's loader for the layer would copy a whole tensor into a whole parameter; ours
        # route each checkpoint tensor into its slice of U, V or weight.
        extra_weight_attrs.pop("weight_loader")
        self._full = fully_sharded_kind(layer) if self.tp_sharding == "full" else None
        self._tp = (layer.tp_rank, layer.tp_size)
        self._input = _input_features(layer, input_size_per_partition)
        blocks = self._row_blocks(layer) if self._full == "row" else _output_blocks(layer, output_partition_sizes)
        self._slices = self._layout(blocks)
        self._runs = _merge_dense(self._slices)
        for name, size in self._parameter_sizes().items():
            param = Parameter(torch.empty(size, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(param, {**extra_weight_attrs, "weight_loader": partial(self._load, name)})
            layer.register_parameter(name, param)

    def _layout(self, blocks: list[tuple[int, int, int]]) -> list[_Slice]:
        """Each checkpoint linear's blocks and where its factors or rows sit in the parameters."""
        groups = _group_blocks(self.prefix, self.names, blocks)
        slices, out, u, v, w = [], 0, 0, 0, 0
        for name, entry, group in zip(self.names, self.entries, groups):
            rank = None if entry is None else entry.rank
            piece = _Slice(name, rank, group, out, w if rank is None else u, v, *self._rank_columns(rank))
            self._check_plan(piece, entry)
            slices.append(piece)
            out += piece.rows
            if rank is None:
                w += piece.rows
            else:
                u, v = u + piece.rows * piece.u_cols, v + piece.v_cols
        self._v_width = v
        if self._full == "row" and (len(slices) != 1 or slices[0].rank is None):
            # vLLM merges only column-parallel layers; apply() relies on one low-rank slice here.
            raise PlanError(f"{self.prefix}: a fully sharded row-parallel layer holds one low-rank linear, "
                            f"not {self.names} with ranks {[s.rank for s in slices]}")
        return slices

    def _rank_columns(self, rank: int | None) -> tuple[int, int, int]:
        """``(u_cols, v_cols, v_start)`` of a slice of rank ``rank`` on this rank."""
        if rank is None:
            return 0, 0, 0
        if self._full != "column":
            return rank, rank, 0
        # A rank k that the TP size does not divide is padded with zero columns (at most tp - 1):
        # zero columns of V give zero intermediates, which the zero columns of U ignore.
        tp_rank, tp_size = self._tp
        share = -(-rank // tp_size)
        return share * tp_size, share, tp_rank * share

    def _row_blocks(self, layer) -> list[tuple[int, int, int]]:
        """A fully sharded row-parallel layer's output block: its rank's ``m/tp`` rows of U."""
        tp_rank, tp_size = self._tp
        if layer.output_size % tp_size:
            raise PlanError(f"{self.prefix}: fully sharded tensor parallel splits its {layer.output_size} output "
                            f"rows over {tp_size} ranks, which does not divide them; serve it with "
                            f"tp_sharding 'half'")
        return [(layer.output_size, layer.output_size // tp_size, tp_rank)]

    def _check_plan(self, piece: _Slice, entry: LayerRank | None) -> None:
        if entry is not None and (entry.out_features, entry.in_features) != (piece.full_rows, self._input.full):
            raise PlanError(
                f"rank plan layer {piece.name!r} is {entry.out_features}x{entry.in_features} but the model "
                f"served by vLLM has {piece.full_rows}x{self._input.full} for it (in {self.prefix!r})")

    def _parameter_sizes(self) -> dict[str, int | tuple[int, int]]:
        lowrank = [s for s in self._slices if s.rank is not None]
        sizes: dict[str, int | tuple[int, int]] = {
            "U": sum(s.rows * s.u_cols for s in lowrank),
            "V": sum(self._input.part * s.v_cols for s in lowrank),
        }
        dense_rows = sum(s.rows for s in self._slices if s.rank is None)
        if dense_rows:
            sizes["weight"] = (dense_rows, self._input.part)
        return sizes

    def _load(self, kind: str, param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """vLLM's ``weight_loader``: copy this rank's part of checkpoint tensor ``<slice>.<kind>``."""
        index = self._slice_index(shard_id)
        piece = self._slices[index]
        if (kind == "weight") != (piece.rank is None):
            planned = "dense" if piece.rank is None else f"rank {piece.rank}"
            raise PlanError(f"checkpoint tensor {piece.name}.{kind} contradicts the rank plan ({planned})")
        expected = {"U": (piece.full_rows, piece.rank), "V": (self._input.full, piece.rank),
                    "weight": (piece.full_rows, self._input.full)}[kind]
        if tuple(loaded.shape) != expected:
            raise PlanError(f"checkpoint tensor {piece.name}.{kind} is {list(loaded.shape)} but the rank plan "
                            f"needs {list(expected)}")
        target, source = self._target(kind, piece, param.data), self._shard(kind, piece, loaded)
        if kind == "weight":
            target.copy_(source)
        else:
            _copy_columns(target, source, piece.v_start if kind == "V" else 0)
        self._loaded.add((kind, index))

    def _slice_index(self, shard_id) -> int:
        if shard_id is None and len(self._slices) == 1:
            return 0
        index = _QKV_SHARDS.get(shard_id, shard_id)
        if not isinstance(index, int) or not 0 <= index < len(self._slices):
            raise ValueError(f"{self.prefix}: no slice for shard id {shard_id!r} (slices: {self.names})")
        return index

    def _shard(self, kind: str, piece: _Slice, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the output blocks (U, weight) and part of the input (V, weight)."""
        if kind != "V":
            parts = [tensor.narrow(0, block.start, block.part) for block in piece.blocks]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        if kind != "U":
            tensor = tensor.narrow(1 if kind == "weight" else 0, self._input.start, self._input.part)
        return tensor

    def _target(self, kind: str, piece: _Slice, data: torch.Tensor) -> torch.Tensor:
        if kind == "weight":
            return data.narrow(0, piece.offset, piece.rows)
        if kind == "V":  # the slices' V side by side: one [in, Σk] matrix, for one shrink
            return self._all_v(data).narrow(1, piece.v_offset, piece.v_cols)
        return data.narrow(0, piece.offset, piece.rows * piece.u_cols).view(piece.rows, piece.u_cols)

    def _all_v(self, data: torch.Tensor) -> torch.Tensor:
        # Rank-major storage ([Σk, in] contiguous): the kernels read whole rows of Vᵀ.
        return data.view(self._v_width, self._input.part).T

    def process_weights_after_loading(self, layer) -> None:
        # vLLM checks that every parameter was loaded, but U is loaded once per low-rank slice:
        # a checkpoint missing k_proj.U would leave part of U uninitialized without this check.
        # Nothing loaded at all is vLLM's dummy load format (random weights), which is fine.
        missing = sorted(self._expected_tensors() - self._loaded)
        if self._loaded and missing:
            kind, index = missing[0]
            raise PlanError(f"checkpoint has no tensor {self.names[index]}.{kind} (needed by vLLM layer {self.prefix})")
        self._loaded.clear()
        for run in self._runs:
            if run.rank is not None and self._full != "column":  # column: U and V hold different k
                check_factors(*self._factors(layer, run))

    def _expected_tensors(self) -> set[tuple[str, int]]:
        kinds = lambda piece: ("weight",) if piece.rank is None else ("U", "V")  # noqa: E731
        return {(kind, i) for i, piece in enumerate(self._slices) for kind in kinds(piece)}

    def _factors(self, layer, run: _Slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self._target("U", run, layer.U), self._target("V", run, layer.V)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._full == "row":
            (run,) = self._runs
            block = run.blocks[0]
            return row_output(x, *self._factors(layer, run), block.start, block.full, bias)
        lowrank = [run for run in self._runs if run.rank is not None]
        if self._full == "column":
            widths = [run.v_cols for run in lowrank]
            gathered = dict(zip((run.name for run in lowrank),
                                column_intermediates(x, self._all_v(layer.V), widths, self._tp[1])))
            outputs = [self._apply_run(layer, x, run, bias, gathered.get(run.name)) for run in self._runs]
        elif len(lowrank) > 1:
            outputs = self._grouped(layer, x, bias, lowrank)
        else:
            outputs = [self._apply_run(layer, x, run, bias, None) for run in self._runs]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def _grouped(self, layer, x, bias, lowrank: list[_Slice]) -> list[torch.Tensor]:
        """Low-rank slices that read one input: one shrink over their V, one expand each."""
        Us = [self._target("U", run, layer.U) for run in lowrank]
        biases = None if bias is None else torch.cat([bias.narrow(0, run.out_offset, run.rows) for run in lowrank])
        y = lowrank_grouped_linear(x, self._all_v(layer.V), Us, biases)
        if len(lowrank) == len(self._runs):
            return [y]
        pieces = iter(y.split([run.rows for run in lowrank], dim=-1))
        return [next(pieces) if run.rank is not None else self._apply_run(layer, x, run, bias, None)
                for run in self._runs]

    def _apply_run(self, layer, x, run: _Slice, bias, z: torch.Tensor | None):
        run_bias = None if bias is None else bias.narrow(0, run.out_offset, run.rows)
        if run.rank is None:
            return F.linear(x, self._target("weight", run, layer.weight), run_bias)
        if z is not None:  # fully sharded column-parallel: the whole intermediate is already here
            return F.linear(z, self._target("U", run, layer.U), run_bias)
        return lowrank_linear(x, *self._factors(layer, run), run_bias)


def _copy_columns(target: torch.Tensor, source: torch.Tensor, start: int) -> None:
    """``target = source[:, start:start + width]``, zero where that runs past ``source`` (padding)."""
    count = max(0, min(target.shape[1], source.shape[1] - start))
    target[:, :count].copy_(source[:, start:start + count])
    target[:, count:].zero_()


def _output_blocks(layer, partition_sizes: list[int]) -> list[tuple[int, int, int]]:
    """``(full rows, rows on this rank, which part this rank holds)`` per output block."""
    if isinstance(layer, QKVParallelLinear):
        # With fewer key/value heads than ranks, vLLM replicates each k/v head on several ranks.
        kv_shard = layer.tp_rank // layer.num_kv_head_replicas
        fulls = (layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size,
                 layer.total_num_kv_heads * layer.v_head_size)
        return list(zip(fulls, partition_sizes, (layer.tp_rank, kv_shard, kv_shard)))
    if isinstance(layer, ColumnParallelLinear):
        fulls = getattr(layer, "output_sizes", [layer.output_size])
        return [(full, part, layer.tp_rank) for full, part in zip(fulls, partition_sizes)]
    return [(layer.output_size, layer.output_size, 0)]  # row-parallel and replicated: every row


def _input_features(layer, part: int) -> _Input:
    start = layer.tp_rank * part if isinstance(layer, RowParallelLinear) else 0
    return _Input(layer.input_size, part, start)


def _group_blocks(prefix: str, names: list[str], blocks: list[tuple[int, int, int]]) -> list[tuple[_Block, ...]]:
    """Assign output blocks to checkpoint linears: one each (q/k/v), or all to one (Phi-3's qkv_proj)."""
    if len(names) == 1:
        groups = [blocks]
    elif len(names) == len(blocks):
        groups = [[block] for block in blocks]
    else:
        raise PlanError(f"vLLM layer {prefix!r} has {len(blocks)} output blocks but merges "
                        f"{len(names)} checkpoint linears {names}")
    return [_blocks_of(group) for group in groups]


def _blocks_of(group: list[tuple[int, int, int]]) -> tuple[_Block, ...]:
    blocks, before = [], 0
    for full, part, shard in group:
        blocks.append(_Block(full, part, before + shard * part))
        before += full
    return tuple(blocks)


def _merge_dense(slices: list[_Slice]) -> list[_Slice]:
    """Adjacent dense slices as one: their rows are adjacent in ``weight`` and in the output."""
    runs: list[_Slice] = []
    for piece in slices:
        if piece.rank is None and runs and runs[-1].rank is None:
            last = runs[-1]
            runs[-1] = replace(last, name=f"{last.name}+{piece.name}", blocks=last.blocks + piece.blocks)
        else:
            runs.append(piece)
    return runs
