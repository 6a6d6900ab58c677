"""Run from a source checkout's root, ``import kernels`` must give what it gives elsewhere.

Python puts the working directory first on ``sys.path`` for ``python -m`` and ``python -c``, where
the checkout's kernels/ folder (``lowrank_infer.kernels`` once installed) would shadow Hugging Face's
``kernels`` package, which transformers ≥ 5.25 imports when it loads a model.
"""

from __future__ import annotations

from pathlib import Path

from fresh_python import run_python

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import kernels, kernels.layers
print(json.dumps({"mark": kernels.MARK, "layer": kernels.layers.LAYER, "file": kernels.__file__,
                  "imported_lowrank_infer": "lowrank_infer" in sys.modules}))
"""


def test_bare_kernels_import_reaches_the_installed_package(tmp_path):
    site = tmp_path / "site" / "kernels"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("MARK = 'installed'\n")
    (site / "layers.py").write_text("LAYER = 'installed layers'\n")
    out = run_python(PROBE, REPO, PYTHONPATH=str(site.parent))
    assert out == {"mark": "installed", "layer": "installed layers", "file": str(site / "__init__.py"),
                   "imported_lowrank_infer": False}


def test_bare_kernels_import_without_an_installed_package_is_an_empty_namespace():
    # -S: no site-packages, so nothing but the checkout could provide `kernels`. transformers' probe
    # (an import, when no distribution metadata names the package) reads "no __file__" as not installed.
    code = """
import importlib, json, sys
import kernels
try:
    importlib.import_module("kernels.triton_lowrank")
    submodule = "imported"
except ModuleNotFoundError as error:
    submodule = error.name
print(json.dumps({"file": getattr(kernels, "__file__", None), "public": sorted(n for n in vars(kernels) if n[0] != "_"),
                  "submodule": submodule, "imported_lowrank_infer": "lowrank_infer" in sys.modules}))
"""
    assert run_python(code, REPO, flags=("-S",)) == {"file": None, "public": [], "submodule": "kernels.triton_lowrank",
                                                     "imported_lowrank_infer": False}


def test_transformers_loads_a_model_from_the_checkout_root():
    # What `make test` and the benchmarks met with transformers 5.25: loading any model imported `kernels`.
    code = """
import json, transformers
from transformers import AutoModelForCausalLM, LlamaConfig
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=32)
model = AutoModelForCausalLM.from_config(config)
print(json.dumps({"layers": len(model.model.layers)}))
"""
    assert run_python(code, REPO) == {"layers": 1}
