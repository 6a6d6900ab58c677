"""Model surgery: which layers a plan may touch, and the errors for plans and factors that don't fit."""

import pytest
import torch
from torch import nn

from lowrank_infer import LowRankLinear
from lowrank_infer.allocation import LayerRank, PlanError, RankPlan, UniformConfig, uniform_plan
from lowrank_infer.compress import compress
from lowrank_infer.factorize import plain_svd
from lowrank_infer.structure import target_shapes
from lowrank_infer.surgery import apply_plan

from tiny_models import tiny_model

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _svd_factors(model):
    weights = {name: model.get_submodule(name).weight.detach() for name in target_shapes(model)}
    return lambda name, rank: plain_svd(weights[name], max_rank=rank).factors(rank)


def test_lm_head_is_not_a_target():
    model = tiny_model("llama")  # ties lm_head to the embeddings
    plan = RankPlan([LayerRank("lm_head", 128, 64, 4)], keep_target=0.5, method="custom")
    with pytest.raises(PlanError, match="'lm_head' is not a target linear"):
        apply_plan(model, plan, lambda name, rank: (torch.zeros(128, rank), torch.zeros(64, rank)))
    assert isinstance(model.lm_head, nn.Linear)


def test_compressing_a_compressed_model_is_refused():
    model = tiny_model("llama")
    compress(model, UniformConfig(keep=0.6, whiten=False), progress=False)
    with pytest.raises(ValueError, match=r"already compressed \(model\.layers\.0\.self_attn\.q_proj is a LowRankLinear\)"):
        compress(model, UniformConfig(keep=0.6, whiten=False), progress=False)


def test_factors_of_the_wrong_shape_name_the_layer():
    model = tiny_model("llama")
    plan = uniform_plan(target_shapes(model), 0.5)
    good = _svd_factors(model)

    def swapped(name, rank):
        U, V = good(name, rank)
        return (V, U) if name.endswith("k_proj") else (U, V)

    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj' are U \(64, \d+\), V \(32, \d+\)"):
        apply_plan(model, plan, swapped)


def test_a_plan_for_some_layers_leaves_the_others_dense():
    """A plan made for a subset (e.g. with --include mlp) compresses exactly that subset."""
    reference = tiny_model("llama")
    shapes = {n: s for n, s in target_shapes(reference).items() if ".mlp." in n}
    plan = uniform_plan(shapes, 0.5)
    model = tiny_model("llama")
    compress(model, UniformConfig(keep=0.5, whiten=False), plan=plan, progress=False)
    lowrank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == set(shapes)
    # The untouched layers are the original weights: q/k/v/o of block 0 equal the reference's.
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(model.get_submodule(f"model.layers.0.self_attn.{name}").weight,
                                   reference.get_submodule(f"model.layers.0.self_attn.{name}").weight)
    # And each low-rank layer is the best rank-k approximation of its reference weight.
    for name in shapes:
        W = reference.get_submodule(name).weight.detach().double()
        got = model.get_submodule(name).dense_weight().detach().double()
        sigma = torch.linalg.svdvals(W)
        assert torch.linalg.matrix_norm(W - got).item() == pytest.approx(sigma[plan[name].rank:].norm().item(), rel=1e-4)
