"""The plugin is found through its entry point and reads the rank plan that checkpoints carry."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm", reason="needs vLLM, installed in a venv of its own: see tests/vllm_plugin/README.md")

from vllm.model_executor.layers.quantization import get_quantization_config  # noqa: E402
from vllm.plugins import load_general_plugins  # noqa: E402

from lowrank_infer.allocation import LayerRank, PlanError, RankPlan  # noqa: E402
from lowrank_infer.vllm_plugin import LowRankVllmConfig  # noqa: E402
from lowrank_infer.vllm_plugin.sharding import TP_SHARDING_ENV  # noqa: E402
from vllm_checkpoints import mixed_checkpoint  # noqa: E402


def test_entry_point_registers_the_quant_method():
    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "lowrank_infer"]
    assert plugin.value == "lowrank_infer.vllm_plugin:register"
    load_general_plugins()  # what every vLLM process does before reading a model's config
    assert get_quantization_config("lowrank_infer") is LowRankVllmConfig


def test_loading_the_plugin_twice_is_harmless():
    """vLLM loads plugins in every process it starts, and a user may call register() again."""
    from lowrank_infer.vllm_plugin import register

    load_general_plugins()
    register()
    register()
    assert get_quantization_config("lowrank_infer") is LowRankVllmConfig


def test_config_round_trips_a_saved_plan(tmp_path):
    path = mixed_checkpoint("llama", tmp_path / "ckpt")
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == LowRankVllmConfig.get_name()
    config = LowRankVllmConfig.from_config(qconfig)
    assert config.plan.to_dict() == qconfig["rank_plan"]
    assert any(rank is None for rank in config.plan.ranks.values())  # the plan has dense layers


def test_config_without_a_plan_is_refused():
    with pytest.raises(PlanError, match="rank_plan"):
        LowRankVllmConfig.from_config({"quant_method": "lowrank_infer"})


def test_config_with_a_broken_plan_is_refused():
    with pytest.raises(PlanError, match="format_version"):
        LowRankVllmConfig.from_config({"quant_method": "lowrank_infer", "rank_plan": {"format_version": 99}})


def _quantization_config(**extra) -> dict:
    plan = RankPlan([LayerRank("model.layers.0.mlp.up_proj", 8, 4, 2)], keep_target=0.8, method="uniform", model="t")
    return {"quant_method": "lowrank_infer", "rank_plan": plan.to_dict(), **extra}


def test_tp_sharding_comes_from_the_config_or_the_environment(monkeypatch):
    monkeypatch.delenv(TP_SHARDING_ENV, raising=False)
    assert LowRankVllmConfig.from_config(_quantization_config()).tp_sharding == "half"  # the default
    assert LowRankVllmConfig.from_config(_quantization_config(tp_sharding="full")).tp_sharding == "full"
    monkeypatch.setenv(TP_SHARDING_ENV, "full")
    assert LowRankVllmConfig.from_config(_quantization_config()).tp_sharding == "full"
    monkeypatch.setenv(TP_SHARDING_ENV, "half")  # the deployment's choice wins over the checkpoint's
    assert LowRankVllmConfig.from_config(_quantization_config(tp_sharding="full")).tp_sharding == "half"
    monkeypatch.setenv(TP_SHARDING_ENV, "")  # empty: unset
    assert LowRankVllmConfig.from_config(_quantization_config(tp_sharding="full")).tp_sharding == "full"


def test_bad_tp_sharding_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.delenv(TP_SHARDING_ENV, raising=False)
    with pytest.raises(ValueError, match=r"quantization_config\['tp_sharding'\] is 'fully', expected 'half' or 'full'"):
        LowRankVllmConfig.from_config(_quantization_config(tp_sharding="fully"))
    monkeypatch.setenv(TP_SHARDING_ENV, "FULL")
    with pytest.raises(ValueError, match=r"environment variable LOWRANK_INFER_TP_SHARDING is 'FULL', expected"):
        LowRankVllmConfig.from_config(_quantization_config())
    with pytest.raises(ValueError, match=r"tp_sharding is True"):
        LowRankVllmConfig(RankPlan.from_dict(_quantization_config()["rank_plan"]), tp_sharding=True)


def test_vllm_without_the_plugin_refuses_the_checkpoint_loudly(tmp_path):
    """Never random weights: with the plugin switched off, vLLM names the unknown method and stops."""
    import os
    import subprocess
    import sys

    path = mixed_checkpoint("llama", tmp_path / "ckpt")
    script = tmp_path / "load.py"
    script.write_text("import sys\nif __name__ == '__main__':\n    from vllm import LLM\n"
                      "    LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, max_model_len=64)\n")
    env = {**os.environ, "VLLM_PLUGINS": "no_such_plugin"}  # an allow-list that leaves ours out
    result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "Unknown quantization method: lowrank_infer" in result.stderr
