"""D-Rank with its Q/K → V share ``β`` chosen on calibration data.

The paper fixes ``β`` (0.3; its official code uses 0.1–0.2 per model), but the best value depends
on the model and the keep ratio. Measured on SmolLM2-135M (grouped-query attention, whitened on
WikiText-2): ``β = 0.3`` beat ``β = 0`` at keep 0.8 and lost to it — and to uniform allocation —
at keep 0.6. So, when the model and calibration tokens are at hand, every candidate ``β`` is
turned into a plan, the plan is applied to the model for a moment (factors truncated from the
spectra already computed), and the plan with the lowest language-model loss on the first
calibration windows wins. The candidates and their losses are recorded in the plan.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_infer.allocation.drank import drank_plan
from lowrank_infer.allocation.plan import RankPlan
from lowrank_infer.evaluate import summed_nll
from lowrank_infer.factorize import Spectrum

__all__ = ["BETA_CANDIDATES", "calibration_loss", "drank_auto_plan"]

BETA_CANDIDATES = (0.0, 0.1, 0.2, 0.3)


def calibration_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over the rows of ``ids`` ([rows, seq_len])."""
    total, tokens = summed_nll(model, ids, batch_size=batch_size)
    return total / tokens


def drank_auto_plan(
    model: nn.Module,
    spectra: Mapping[str, Spectrum],
    calib_ids: torch.Tensor,
    keep: float,
    *,
    model_id: str = "",
    candidates: Sequence[float] = BETA_CANDIDATES,
    samples: int = 8,
    multiple_of: int = 1,
    progress: bool = True,
) -> RankPlan:
    """The :func:`drank_plan` whose ``β`` (from ``candidates``) gives the lowest calibration loss.

    Args:
        model: the dense model the spectra were computed on (left unchanged on return).
        spectra: name → whitened :class:`Spectrum` of every target linear, factors kept.
        calib_ids: ``[samples, seq_len]`` calibration token ids; the first ``samples`` rows score.
        keep, model_id, multiple_of: as for :func:`drank_plan`.
        candidates: ``β`` values to try, each in [0, 1).

    Raises:
        ValueError: no candidates, ``samples < 1``, malformed ``calib_ids``, a non-finite loss.
    """
    from lowrank_infer.surgery import plan_applied  # surgery imports this package: no cycle at import time

    if not candidates:
        raise ValueError("drank_auto_plan needs at least one beta candidate")
    if samples < 1 or calib_ids.ndim != 2 or calib_ids.shape[1] < 2:
        raise ValueError(
            f"need samples >= 1 and calib_ids of shape [rows, seq_len >= 2]; got samples={samples}, "
            f"calib_ids {tuple(calib_ids.shape)}"
        )
    ids = calib_ids[:samples]
    training = model.training
    model.eval()
    scored = []
    try:
        for beta in tqdm(candidates, desc="D-Rank beta", unit="plan", disable=not progress):
            plan = drank_plan(spectra, keep, model_id=model_id, beta=beta, multiple_of=multiple_of)
            with plan_applied(model, plan, lambda name, rank: spectra[name].factors(rank)):
                loss = calibration_loss(model, ids)
            if not math.isfinite(loss):
                raise ValueError(f"D-Rank beta={beta}: calibration loss is {loss}")
            scored.append((loss, beta, plan))
    finally:
        model.train(training)
    loss, beta, plan = min(scored, key=lambda item: item[0])
    plan.params["beta_selection"] = {
        "candidates": [b for _, b, _ in scored],
        "calibration_loss": [round(l, 6) for l, _, _ in scored],
        "samples": int(ids.shape[0]),
        "tokens_per_sample": int(ids.shape[1]),
    }
    return plan
