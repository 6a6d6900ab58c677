"""The start-up hook a wheel install brings (lowrank_infer-autoload.pth): programs that never import
lowrank_infer — plain transformers, lm-eval's ``--model hf`` — load compressed checkpoints correctly.

Checked on the real artifact: the wheel is built from this checkout and installed into a throwaway
virtual environment that borrows this environment's packages (torch, transformers, lm-eval). The
finder's own rules are checked in this process, on a stand-in for ``transformers.quantizers``.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowrank_infer
from lowrank_infer import _hook  # installed as the top-level lowrank_infer_autoload

from fresh_python import run_python
from tiny_models import tiny_model, tiny_tokenizer
from tiny_tasks import TASK, reference_loglikelihoods, sample_loglikelihoods, write_task

REPO = Path(__file__).resolve().parents[2]
PTH = "lowrank_infer-autoload.pth"
IDS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def _build_wheel(tmp_path: Path) -> Path:
    # From a copy: building in the checkout would leave build/ and *.egg-info behind in it.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("lowrank_infer", "kernels", "allocation"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True,
    )
    return next((tmp_path / "dist").glob("*.whl"))


def _venv_with(wheel: Path, tmp_path: Path) -> str:
    """A new virtual environment with ``wheel`` installed; other packages come from this one."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # A path line only: .pth files in this environment (its editable install) do not run there.
    Path(purelib, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    assert (Path(purelib) / PTH).is_file()  # Python runs .pth files from site-packages at start-up
    return python


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model("llama")
    lowrank_infer.compress(model, lowrank_infer.UniformConfig(keep=0.5, whiten=False), progress=False)
    return model, lowrank_infer.save_compressed(model, tmp_path / "ck", tiny_tokenizer())


def test_installed_hook_loads_checkpoints_in_programs_that_never_import_lowrank_infer(checkpoint, tmp_path):
    model, path = checkpoint
    python = _venv_with(_build_wheel(tmp_path), tmp_path)
    tasks = write_task(tmp_path / "tasks")
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import json, sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoTokenizer\n"
        "lazy = 'lowrank_infer' not in sys.modules\n"  # the hook waits for model loading
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        "    save_file({'logits': m(ids).logits.contiguous()}, 'logits.safetensors')\n"
        "lowrank = sum(isinstance(x, sys.modules['lowrank_infer'].LowRankLinear) for x in m.modules())\n"
        "origin = sys.modules['lowrank_infer'].__file__\n"
        "from lm_eval.__main__ import cli_evaluate\n"
        f"sys.argv = ['lm_eval', '--model', 'hf', '--model_args', 'pretrained={path}', '--device', 'cpu',\n"
        f"            '--tasks', {TASK!r}, '--include_path', {str(tasks)!r}, '--output_path', 'out', '--log_samples']\n"
        "cli_evaluate()\n"
        "print(json.dumps({'lazy': lazy, 'lowrank': lowrank, 'origin': origin}))\n"
    )
    result = run_python(code, work, python=python)
    assert result["lazy"]
    assert result["origin"].startswith(str(tmp_path / "venv"))  # the wheel's copy, through its hook
    assert result["lowrank"] == sum(l.rank is not None for l in model.config.quantization_config.plan.layers)
    with torch.no_grad():
        want = model(IDS).logits
    torch.testing.assert_close(load_file(work / "logits.safetensors")["logits"], want, rtol=1e-5, atol=1e-5)
    samples = [json.loads(line) for line in next((work / "out").rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    got, expected = sample_loglikelihoods(samples), reference_loglikelihoods(model, tiny_tokenizer())
    assert len(got) == len(expected)
    for got_item, expected_item in zip(got, expected):
        assert got_item == pytest.approx(expected_item, abs=1e-4)


# The finder itself, in this process, on a stand-in for transformers.quantizers: fast and exact.


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A package ``standin_pkg.quantizers`` on sys.path, watched by the hook instead of transformers'."""
    (tmp_path / "standin_pkg" / "quantizers").mkdir(parents=True)
    (tmp_path / "standin_pkg" / "__init__.py").write_text("")
    (tmp_path / "standin_pkg" / "quantizers" / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_hook, "TRIGGER", "standin_pkg.quantizers")
    calls = []
    monkeypatch.setattr(_hook, "_register", lambda: calls.append(sys.modules["standin_pkg.quantizers"].VALUE))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    yield calls
    for name in ("standin_pkg.quantizers", "standin_pkg"):
        sys.modules.pop(name, None)


def test_hook_registers_once_after_the_watched_import_completes(stand_in, monkeypatch):
    monkeypatch.delenv(_hook.ENV, raising=False)
    _hook.install()
    _hook.install()  # idempotent
    assert sum(isinstance(f, _hook._Finder) for f in sys.meta_path) == 1
    import standin_pkg.quantizers as module

    assert stand_in == [42]  # ran after the module's code, once
    assert not any(isinstance(f, _hook._Finder) for f in sys.meta_path)  # gone: no cost afterwards
    assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__


def test_hook_can_be_switched_off(stand_in, monkeypatch):
    monkeypatch.setenv(_hook.ENV, "0")
    _hook.install()
    import standin_pkg.quantizers  # noqa: F401

    assert stand_in == []


def test_broken_lowrank_infer_warns_instead_of_breaking_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "lowrank_infer", None)  # `import lowrank_infer` now fails
    with pytest.warns(RuntimeWarning, match="will refuse lowrank_infer checkpoints"):
        _hook._register()
