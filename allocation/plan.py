"""The rank-plan format: which rank each target linear gets, and the parameter accounting.

Every allocator returns a :class:`RankPlan`; surgery and checkpoints consume it. One function,
:func:`layer_params`, counts what a layer costs so that every method and every report agree.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from lowrank_infer.atomic import atomic_write_text
from lowrank_infer.cost import layer_params, use_dense

FORMAT_VERSION = 1

__all__ = ["FORMAT_VERSION", "LayerRank", "PlanError", "RankPlan", "check_keep", "plan_from_ranks"]


class PlanError(ValueError):
    """A rank plan is malformed or does not match the model it is applied to."""


def check_keep(keep: float) -> float:
    """Return ``keep`` as a float, or raise when it is outside (0, 1]."""
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise PlanError(f"keep must be a number in (0, 1], got {keep!r}") from None
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise PlanError(f"keep must be in (0, 1] (fraction of target-linear parameters kept), got {keep}")
    return keep


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_from_dict(index: int, entry: Any) -> "LayerRank":
    """One ``layers`` entry; shapes must be JSON integers (64.9 is not silently cut to 64)."""
    if not isinstance(entry, Mapping) or not {"name", "out_features", "in_features", "rank"} <= entry.keys():
        raise PlanError(f"rank plan layer #{index} must be an object with name, out_features, in_features "
                        f"and rank, got {entry!r}")
    name = str(entry["name"])
    for key in ("out_features", "in_features"):
        if not _is_int(entry[key]):
            raise PlanError(f"layer {name!r}: {key} must be an integer, got {entry[key]!r}")
    return LayerRank(name, entry["out_features"], entry["in_features"], entry["rank"])


@dataclass
class LayerRank:
    """One target linear: its shape and its rank (``None`` = keep the dense weight)."""

    name: str
    out_features: int
    in_features: int
    rank: int | None

    def __post_init__(self) -> None:
        if self.out_features < 1 or self.in_features < 1:
            raise PlanError(f"layer {self.name!r}: shape must be positive, got {self.out_features}x{self.in_features}")
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise PlanError(f"layer {self.name!r}: rank must be a positive integer or null, got {self.rank!r}")
            # A rank at or past break-even is stored as dense so that every consumer agrees.
            if use_dense(self.out_features, self.in_features, self.rank):
                self.rank = None

    @property
    def params(self) -> int:
        return layer_params(self.out_features, self.in_features, self.rank)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class RankPlan:
    """A rank for every target linear under a global ``keep`` budget.

    ``keep_achieved`` = Σ kept / Σ m·n over the listed layers, kept = m·n for dense layers and
    k·(m+n) for low-rank ones.
    """

    layers: list[LayerRank]
    keep_target: float
    method: str
    model: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.keep_target = check_keep(self.keep_target)
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise PlanError(f"rank plan lists layer {dup!r} more than once")

    @property
    def keep_achieved(self) -> float:
        dense = sum(layer.dense_params for layer in self.layers)
        return sum(layer.params for layer in self.layers) / dense if dense else 1.0

    @property
    def ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.rank for layer in self.layers}

    def __getitem__(self, name: str) -> LayerRank:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def validate(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Check the plan against a model's target linears (name → (out_features, in_features)).

        Raises:
            PlanError: naming the first layer that is missing from the model or has another shape.
        """
        for layer in self.layers:
            if layer.name not in shapes:
                raise PlanError(f"rank plan layer {layer.name!r} is not a target linear of this model")
            if tuple(shapes[layer.name]) != (layer.out_features, layer.in_features):
                out_f, in_f = shapes[layer.name]
                raise PlanError(
                    f"rank plan layer {layer.name!r} is {layer.out_features}x{layer.in_features} "
                    f"but the model's is {out_f}x{in_f}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model": self.model,
            "method": self.method,
            "params": self.params,
            "keep_target": self.keep_target,
            "keep_achieved": round(self.keep_achieved, 6),
            "layers": [
                {"name": l.name, "out_features": l.out_features, "in_features": l.in_features, "rank": l.rank}
                for l in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankPlan":
        if not isinstance(data, Mapping):
            raise PlanError("a rank plan must be a JSON object")
        version = data.get("format_version")
        if not _is_int(version) or version != FORMAT_VERSION:
            raise PlanError(f"unsupported rank-plan format_version {version!r} (this library reads {FORMAT_VERSION})")
        missing = [key for key in ("method", "keep_target", "layers") if key not in data]
        if missing:
            raise PlanError(f"rank plan is missing {', '.join(missing)}")
        if not isinstance(data["layers"], list):
            raise PlanError("rank plan 'layers' must be a list")
        params = data.get("params", {})
        if not isinstance(params, Mapping):
            raise PlanError(f"rank plan 'params' must be a JSON object, got {params!r}")
        return cls(
            layers=[_layer_from_dict(i, entry) for i, entry in enumerate(data["layers"])],
            keep_target=data["keep_target"],
            method=str(data["method"]),
            model=str(data.get("model", "")),
            params=dict(params),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically (temporary file, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RankPlan":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"rank plan file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise PlanError(f"rank plan {path} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def summary(self) -> dict[str, Any]:
        """Counts for reports: low-rank and dense layers, parameters before/after."""
        return {
            "layers": len(self.layers),
            "dense_layers": sum(l.rank is None for l in self.layers),
            "params_before": sum(l.dense_params for l in self.layers),
            "params_after": sum(l.params for l in self.layers),
            "keep_achieved": self.keep_achieved,
        }


def plan_from_ranks(
    shapes: Mapping[str, tuple[int, int]],
    ranks: Mapping[str, int | None],
    *,
    keep: float,
    method: str,
    model: str = "",
    params: Mapping[str, Any] | None = None,
) -> RankPlan:
    """Build a plan from name → rank; ranks of 0 or below are raised to 1."""
    layers = []
    for name, (out_f, in_f) in shapes.items():
        rank = ranks[name]
        layers.append(LayerRank(name, out_f, in_f, None if rank is None else max(1, int(rank))))
    return RankPlan(layers, keep_target=keep, method=method, model=model, params=dict(params or {}))
