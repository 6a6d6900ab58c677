"""Parameter and byte counts, checked against counts made by hand."""

from __future__ import annotations

import torch
from torch import nn

from lowrank_infer.allocation import UniformConfig
from lowrank_infer.compress import compress
from lowrank_infer.io import PLAN_FILE, save_compressed
from lowrank_infer.report import checkpoint_info, model_size
from lowrank_infer.allocation import RankPlan

from tiny_models import tiny_model


def test_model_size_counts_tied_weights_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)).to(torch.float16)
    model[1].weight = model[0].weight  # tied, as an LM head to its embeddings
    assert model_size(model) == {"params": 40, "bytes": 80}


def test_checkpoint_info_reads_sizes_from_the_file_headers(tmp_path):
    model = tiny_model("llama")
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    plan = compress(model, UniformConfig(keep=0.5, whiten=False), progress=False).plan
    save_compressed(model, tmp_path / "ck")
    info = checkpoint_info(tmp_path / "ck", RankPlan.load(tmp_path / "ck" / PLAN_FILE))
    kept = sum(l.params for l in plan.layers)
    full = sum(l.out_features * l.in_features for l in plan.layers)
    assert info["params_after"] == dense - full + kept
    assert info["params_before"] == dense
    assert info["bytes_after"] == 4 * info["params_after"]  # float32
    assert (info["target_params_before"], info["target_params_after"]) == (full, kept)
    assert info["layers"] == len(plan.layers) and info["dense_layers"] == 0
