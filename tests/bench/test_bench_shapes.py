"""The model shape table and configs for --shape-only."""

import pytest

from lowrank_infer.bench.shapes import MODELS, LayerShape, hf_config, layer_shapes


def test_gqa_projection_shapes():
    llama3 = MODELS["llama3-8b"].layer_shapes()
    assert llama3["q"] == llama3["o"] == (4096, 4096) and llama3["k"] == llama3["v"] == (1024, 4096)
    assert llama3["gate"] == (14336, 4096) and llama3["down"] == (4096, 14336)
    assert MODELS["qwen2.5-7b"].layer_shapes()["k"] == (512, 3584)
    assert MODELS["qwen2.5-7b"].layer_shapes()["up"] == (18944, 3584)
    assert MODELS["smollm2-135m"].layer_shapes()["v"] == (192, 576)


def test_projections_sharing_a_shape_are_timed_once():
    assert layer_shapes(["llama2-7b"]) == [
        LayerShape("llama2-7b", "q/k/v/o", 4096, 4096), LayerShape("llama2-7b", "gate/up", 11008, 4096),
        LayerShape("llama2-7b", "down", 4096, 11008),
    ]
    assert [s.layer for s in layer_shapes(["llama3-8b"], ["k", "down"])] == ["k", "down"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'x' .*smollm2-135m"):
        layer_shapes(["x"])
    with pytest.raises(ValueError, match="unknown config 'gpt5'.*llama3-8b"):
        hf_config("gpt5")


def test_hf_config_from_name_and_from_file(tmp_path):
    config = hf_config("llama3-8b")
    assert (config.model_type, config.hidden_size, config.num_key_value_heads) == ("llama", 4096, 8)
    assert config.vocab_size == 128256
    assert hf_config("qwen2.5-7b").model_type == "qwen2"
    (tmp_path / "config.json").write_text(config.to_json_string())
    assert hf_config(str(tmp_path)).intermediate_size == 14336
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a transformers config.json"):
        hf_config(str(tmp_path / "bad.json"))
