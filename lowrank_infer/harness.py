"""Run EleutherAI's LM Evaluation Harness (the ``lm_eval`` package) on a loaded model.

The model is loaded by lowrank_infer (a compressed checkpoint through ``load_compressed``, which
refuses incomplete checkpoints) and handed to lm-eval's ``HFLM`` as an object, so lm-eval never
loads weights itself. Tasks are lm-eval's own, or task YAMLs in ``include_path`` (which may
point at local JSON/JSONL data and so run offline).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from lowrank_infer.atomic import atomic_write_text

__all__ = ["lm_eval_results", "results_table", "write_results"]

INSTALL_HINT = 'the LM Evaluation Harness is not installed: pip install "lowrank-infer[eval]" (or pip install lm-eval)'


def _lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    return lm_eval


def lm_eval_results(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks``; lm-eval's result dict (``"results"`` per task).

    Args:
        model: a loaded causal LM (compressed or dense), already on its device.
        tokenizer: its tokenizer.
        tasks: lm-eval task or group names.
        include_path: a folder of extra task YAMLs.
        num_fewshot: few-shot examples per prompt (default: each task's own).
        limit: evaluate only this many documents per task (a fraction below 1: that share).
        batch_size: documents per forward pass.
        log_samples: also return every document's requests and responses under ``"samples"``.
    """
    if not tasks:
        raise ValueError("no tasks given (e.g. --tasks hellaswag,arc_easy)")
    lm_eval = _lm_eval()
    manager = lm_eval.tasks.TaskManager(include_path=None if include_path is None else str(include_path))
    # lm-eval reports an unknown name as a KeyError deep in task loading; say what to do instead.
    unknown = [task for task in tasks if task not in manager.all_tasks and not os.path.isfile(task)]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: list them with 'lm-eval ls tasks', or pass --include-path DIR with their YAMLs")
    lm = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
        log_samples=log_samples,
    )


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of the per-task metrics."""
    return _lm_eval().utils.make_table(results)


def write_results(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``results`` as JSON, atomically (lm-eval's encoder for its non-JSON values)."""
    atomic_write_text(path, json.dumps(results, indent=1, default=_lm_eval().utils.handle_non_serializable) + "\n")
