"""Compress → save → load round trips on tiny random models of each supported architecture."""

import json
import subprocess
import sys

import pytest
import torch

from lowrank_infer import LowRankLinear, load_compressed, save_compressed
from lowrank_infer.allocation import RankPlan
from lowrank_infer.compress import compress, config_for
from lowrank_infer.hf_quantizer import QUANT_METHOD
from lowrank_infer.report import model_size

from tiny_models import ARCHS, tiny_model, tiny_tokenizer

IDS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def _compressed(arch, keep=0.6, method="uniform"):
    model = tiny_model(arch)
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    result = compress(model, config_for(method, keep=keep), calib_ids=calib, progress=False)
    return model, result.plan


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_gives_identical_logits(arch, tmp_path):
    model, plan = _compressed(arch)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        want = model(IDS).logits
    save_compressed(model, tmp_path / "ck", tiny_tokenizer())
    loaded = load_compressed(tmp_path / "ck")
    with torch.no_grad():
        got = loaded(IDS).logits
    assert (got - want).abs().max() <= 1e-5
    lowrank = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == {l.name: l.rank for l in plan.layers if l.rank is not None}
    assert model_size(loaded)["params"] == model_size(model)["params"]


def test_checkpoint_layout_is_hf_native_and_pickle_free(tmp_path):
    model, plan = _compressed("llama")
    path = save_compressed(model, tmp_path / "ck", tiny_tokenizer())
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert RankPlan.from_dict(config["quantization_config"]["rank_plan"]).ranks == plan.ranks
    assert RankPlan.load(path / "rank_plan.json").ranks == plan.ranks
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_parameter_count_matches_plan(tmp_path):
    dense = tiny_model("llama")
    model, plan = _compressed("llama")
    removed = plan.summary()["params_before"] - plan.summary()["params_after"]
    assert model_size(dense)["params"] - model_size(model)["params"] == removed


def test_plain_from_pretrained_loads_natively_after_import(tmp_path):
    model, _ = _compressed("qwen2")
    save_compressed(model, tmp_path / "ck")
    code = (
        "import sys, torch, lowrank_infer\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ck')!r})\n"
        "print(sum(type(x).__name__ == 'LowRankLinear' for x in m.modules()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) == sum(l.rank is not None for l in model.config.quantization_config.plan.layers)


def test_loaded_model_casts_like_a_dense_one(tmp_path):
    """The factors are plain floats: .half() / .float() work as on any model (transformers
    refuses them on quantized models), and the cast model computes what its loaded copy does."""
    model, _ = _compressed("llama")
    save_compressed(model, tmp_path / "ck")
    half = load_compressed(tmp_path / "ck").half()
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    back = half.float()
    want = load_compressed(tmp_path / "ck", dtype=torch.float16).float()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, want(IDS).logits)


def test_load_registers_itself_when_registration_is_missing(tmp_path, monkeypatch):
    from transformers.quantizers import auto

    model, _ = _compressed("llama")
    save_compressed(model, tmp_path / "ck")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD)
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, QUANT_METHOD)
    loaded = load_compressed(tmp_path / "ck")
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())


def test_checkpoint_missing_a_tensor_never_loads_as_random_dense(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _compressed("llama")
    path = save_compressed(model, tmp_path / "ck")
    tensors = load_file(path / "model.safetensors")
    dropped = next(k for k in tensors if k.endswith(".U"))
    del tensors[dropped]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match"):
        load_compressed(path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    model, _ = _compressed("llama")
    path = save_compressed(model, tmp_path / "ck")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_compressed(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a lowrank_infer checkpoint"):
        load_compressed(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a lowrank_infer checkpoint"):
        load_compressed(tmp_path / "dense")


def test_save_refuses_non_empty_dir_and_overwrites_on_request(tmp_path):
    model, _ = _compressed("llama")
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_compressed(model, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_compressed(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failed_save_leaves_nothing_behind(tmp_path):
    model, _ = _compressed("llama")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(model, tmp_path / "ck", BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_saving_an_uncompressed_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compress it first"):
        save_compressed(tiny_model("llama"), tmp_path / "ck")
