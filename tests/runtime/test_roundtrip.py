"""Compress → save → load round trips on tiny random models of each supported architecture."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowrank_infer import LowRankLinear, dequantize, load_compressed, save_compressed
from lowrank_infer.allocation import RankPlan
from lowrank_infer.compress import compress, config_for
from lowrank_infer.hf_quantizer import QUANT_METHOD, REFUSAL
from lowrank_infer.report import model_size

from fresh_python import run_python
from tiny_models import ARCHS, tiny_model, tiny_tokenizer

IDS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def _compressed(arch, keep=0.6, method="uniform", model_id=""):
    model = tiny_model(arch)
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    result = compress(model, config_for(method, keep=keep), calib_ids=calib, model_id=model_id, progress=False)
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
        "print(sum(isinstance(x, lowrank_infer.LowRankLinear) for x in m.modules()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) == sum(l.rank is not None for l in model.config.quantization_config.plan.layers)


def test_plain_transformers_and_lm_eval_without_lowrank_infer_refuse(tmp_path):
    """Unregistered, transformers skips the unknown quant_method and would fill every factorized
    layer with random weights; the saved config makes it stop with what to do instead. lm-eval's
    ``--model hf`` backend (HFLM) stops too, on the quantization config it parses itself."""
    model, _ = _compressed("qwen2")
    path = save_compressed(model, tmp_path / "ck", tiny_tokenizer())
    code = (
        "import json, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "def error(load):\n"
        "    try:\n"
        "        load()\n"
        "    except ValueError as err:\n"
        "        return str(err)\n"
        f"plain = error(lambda: AutoModelForCausalLM.from_pretrained({str(path)!r}))\n"
        f"lm_eval = error(lambda: HFLM(pretrained={str(path)!r}, device='cpu'))\n"
        "print(json.dumps({'plain': plain, 'lm_eval': lm_eval, 'imported': 'lowrank_infer' in sys.modules}))\n"
    )
    result = run_python(code, tmp_path, LOWRANK_INFER_AUTOLOAD="0")
    assert not result["imported"]
    assert result["plain"] is not None and REFUSAL in result["plain"]
    assert "pip install lowrank-infer" in result["plain"] and "import lowrank_infer" in result["plain"]
    assert result["lm_eval"] is not None and "lowrank_infer" in result["lm_eval"]


def test_dequantized_model_reloads_in_plain_transformers(tmp_path):
    """dequantize + save_pretrained gives a dense checkpoint any tool loads without lowrank_infer,
    computing what the compressed model computed."""
    model, _ = _compressed("llama")
    with torch.no_grad():
        want = model(IDS).logits
    dequantize(model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    model.save_pretrained(tmp_path / "dense")
    code = (
        "import json, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m, info = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r}, output_loading_info=True)\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        "    save_file({'logits': m(ids).logits.contiguous()}, 'logits.safetensors')\n"
        "keys = {k: sorted(map(str, info[k])) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')}\n"
        "print(json.dumps({'keys': keys, 'dtype': str(m.dtype), 'imported': 'lowrank_infer' in sys.modules}))\n"
    )
    result = run_python(code, tmp_path, LOWRANK_INFER_AUTOLOAD="0")
    assert not result["imported"]
    assert result["keys"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert result["dtype"] == "torch.float32"
    got = load_file(tmp_path / "logits.safetensors")["logits"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _card_rows(text):
    """The two-column Markdown table rows of a model card: label -> value."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_model_card_has_hub_metadata_summary_metrics_and_usage(tmp_path):
    from huggingface_hub import ModelCard

    model, plan = _compressed("llama", keep=0.5, model_id="acme/tiny-llama")
    metrics = {"perplexity, wikitext2 test": 12.3456, "perplexity of the dense model": 10.5, "windows": 40}
    path = save_compressed(model, tmp_path / "tiny-0.5", metrics=metrics)
    card = ModelCard.load(path / "README.md")  # the Hub's own parser
    data = card.data.to_dict()
    assert data["base_model"] == "acme/tiny-llama" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and {"lowrank-infer", "svd"} <= set(data["tags"])
    rows, summary = _card_rows(card.text), plan.summary()
    assert rows["method"] == "uniform"
    assert float(rows["keep target (kept ÷ target-linear parameters)"]) == 0.5
    assert float(rows["keep achieved"]) == pytest.approx(summary["keep_achieved"], abs=5e-5)
    assert rows["target-linear parameters before"] == f"{summary['params_before']:,}"
    assert rows["target-linear parameters after"] == f"{summary['params_after']:,}"
    assert rows["whole-model parameters before"] == f"{model_size(tiny_model('llama'))['params']:,}"
    assert rows["whole-model parameters after"] == f"{model_size(model)['params']:,}"
    assert rows["perplexity, wikitext2 test"] == "12.3456" and rows["windows"] == "40"
    assert 'from_pretrained("tiny-0.5")' in card.text and "vllm serve tiny-0.5" in card.text


@pytest.mark.parametrize("model_id", ["", "smollm2-135m", "LOCAL_DIR"])
def test_model_card_names_no_base_model_that_is_not_a_hub_id(model_id, tmp_path):
    """A local directory, a CLI alias or nothing: no base_model rather than a wrong one."""
    from huggingface_hub import ModelCard

    model, _ = _compressed("llama", model_id=str(tmp_path) if model_id == "LOCAL_DIR" else model_id)
    data = ModelCard.load(save_compressed(model, tmp_path / "ck") / "README.md").data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    data = ModelCard.load(save_compressed(model, tmp_path / "ck2", base_model="acme/base") / "README.md").data.to_dict()
    assert data["base_model"] == "acme/base" and data["base_model_relation"] == "quantized"


def test_bad_metrics_are_refused_before_anything_is_written(tmp_path):
    model, _ = _compressed("llama")
    with pytest.raises(ValueError, match="must be a number or text"):
        save_compressed(model, tmp_path / "ck", metrics={"perplexity": [12.0]})
    assert list(tmp_path.iterdir()) == []


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
