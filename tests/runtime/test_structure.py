"""Finding decoder blocks and target linears, and swapping modules."""

from __future__ import annotations

import pytest
from torch import nn

from lowrank_infer import LowRankLinear
from lowrank_infer.structure import decoder_blocks, replace_module, target_linears, target_shapes

from tiny_models import ARCHS, tiny_model

LLAMA_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_are_the_list_of_num_hidden_layers(arch):
    model = tiny_model(arch)
    name, blocks = decoder_blocks(model)
    assert blocks is model.get_submodule(name) and len(blocks) == model.config.num_hidden_layers


def test_targets_are_the_linears_inside_the_blocks_in_model_order():
    model = tiny_model("llama")
    names = list(target_linears(model))
    want = [f"model.layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}" for i in range(2) for t in LLAMA_TYPES]
    assert names == want  # no lm_head, no embeddings
    assert target_shapes(model)["model.layers.0.self_attn.k_proj"] == (32, 64)  # GQA: 2 of 4 heads


def test_include_and_exclude_select_by_regex():
    model = tiny_model("llama")
    assert set(target_linears(model, include=[r"\.mlp\."], exclude=["down"])) == {
        f"model.layers.{i}.mlp.{t}" for i in range(2) for t in ("gate_proj", "up_proj")}
    with pytest.raises(ValueError, match="no target linears matched"):
        target_linears(model, include=["nothing-like-this"])
    with pytest.raises(ValueError, match="bad include/exclude pattern"):
        target_linears(model, include=["("])


def test_blocks_are_found_in_a_compressed_model_and_without_a_config():
    model = tiny_model("llama")
    for name, linear in target_linears(model).items():
        replace_module(model, name, LowRankLinear.from_linear(linear, 4))
    assert decoder_blocks(model)[0] == "model.layers"
    bare = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
    assert decoder_blocks(bare)[0] == "1"  # the longest list holding weights
    with pytest.raises(ValueError, match="no list of decoder blocks"):
        decoder_blocks(nn.Sequential(nn.ReLU()))


def test_replace_module_puts_the_new_module_at_the_qualified_name():
    model = tiny_model("llama")
    new = nn.Identity()
    replace_module(model, "model.layers.1.mlp.down_proj", new)
    assert model.model.layers[1].mlp.down_proj is new
