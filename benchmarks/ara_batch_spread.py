"""How much ARA's plan depends on the order of its training rows, at one and two rows a step.

One analysis of SmolLM2-135M (32 windows of WikiText-2 validation for the whitening, 32 held-out
windows for ARA, keep 0.8, bfloat16), then ARA four times on the same spectra: batch 1 and 2,
row orders 0 and 1. Each plan's next-token loss on 12 other windows of the fitting part (the
whitened factors at the plan's ranks, before any compensation or healing), its dense-layer count,
and the mean absolute difference of the two orders' per-layer parameter ratios.

usage: python benchmarks/ara_batch_spread.py   (from the repository root; about 9 minutes on 2 cores)
"""

import time

import torch

import lowrank_infer.allocation.ara as ara
from lowrank_infer.compress import _plan_loss, analyze, config_for
from lowrank_infer.cost import layer_params
from lowrank_infer.data import calibration_ids, calibration_split
from lowrank_infer.models import load_model
from lowrank_infer.precision import autocast


def _ratio(layer) -> float:
    """A plan layer's parameters over its dense weight's (1 when dense)."""
    m, n = layer.out_features, layer.in_features
    return min(layer_params(m, n, layer.rank) / layer_params(m, n, None), 1.0)


def dist(a, b) -> float:
    """Mean over layers of the absolute difference of two plans' parameter ratios."""
    return sum(abs(_ratio(x) - _ratio(y)) for x, y in zip(a.layers, b.layers)) / len(a.layers)


def main():
    model, tok = load_model("smollm2-135m")[:2]
    fit, held = calibration_split("../shared/data/wikitext2/valid.tokens.txt", tok)
    calib = calibration_ids(fit, 32, 512, seed=0)
    select = calibration_ids(held, 32, 512, seed=5)
    evalids = calibration_ids(fit, 12, 512, seed=11)
    cfg = config_for("ara", keep=0.8, compute_dtype="bfloat16")
    _, spectra, _ = analyze(model, cfg, calib_ids=calib, select_ids=select, batch_size=32, progress=False)
    score = _plan_loss(model, spectra, evalids)
    plans = {}
    for batch, order in ((1, 0), (1, 1), (2, 0), (2, 1)):
        start = time.perf_counter()
        plan = ara.ara_plan(model, spectra, select, cfg.replace(seed=order, batch_size=batch), progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad(), autocast("bfloat16", torch.device("cpu")):
            loss = score(plan)
        plans[batch, order] = plan
        dense = sum(1 for layer in plan.layers if layer.rank is None)
        print(f"batch {batch} order {order}: ara {seconds:.0f}s  fit-window loss {loss:.4f}  dense {dense}", flush=True)
    print("order disagreement batch1:", round(dist(plans[1, 0], plans[1, 1]), 4),
          " batch2:", round(dist(plans[2, 0], plans[2, 1]), 4))

if __name__ == "__main__":
    main()
