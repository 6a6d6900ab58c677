"""Run code in a fresh interpreter the way a user's program would: from a neutral folder.

From the repository root the checkout itself is on ``sys.path``, where a user's program sees only
the installed package: a check of what users see runs in a temporary folder. PYTHONPATH and
LOWRANK_INFER_* are dropped (a caller passes what it means to set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def neutral_env(**extra: str) -> dict[str, str]:
    """The current environment without PYTHON* and LOWRANK_INFER_* variables, offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LOWRANK_INFER"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **extra)
    return env


def run_python(code: str, cwd: Path, *, python: str = sys.executable, flags: tuple[str, ...] = (),
               timeout: float = 240, **env: str) -> dict:
    """Run ``code`` in a new interpreter (with ``flags``) in ``cwd``; it prints one JSON object last,
    returned here."""
    out = subprocess.run([python, *flags, "-c", code], cwd=cwd, env=neutral_env(**env), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"fresh interpreter failed ({out.returncode}):\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])
