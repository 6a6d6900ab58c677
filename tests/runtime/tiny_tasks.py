"""A tiny offline lm-eval multiple-choice task over a local JSONL file, and its reference answers.

The reference log-likelihoods are computed here, in float64, straight from a model's logits:
what lm-eval must report for the same model if it ran that model and no other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TASK = "lowrank_tiny_mc"
ITEMS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five", "six"], "answer": 0},
    {"question": "Fire is", "choices": ["cold", "hot", "wet"], "answer": 1},
    {"question": "Ice is", "choices": ["hot", "cold", "dry"], "answer": 1},
    {"question": "A cat says", "choices": ["moo", "woof", "meow"], "answer": 2},
    {"question": "The sun rises in the", "choices": ["west", "north", "east"], "answer": 2},
]


def _context(item: dict) -> str:
    return f"Q: {item['question']}\nA:"


def write_task(folder: Path) -> Path:
    """Write the task YAML and its data under ``folder``; returns the folder (lm-eval's include path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    # json.dumps quotes paths safely for YAML; cache_dir keeps the datasets cache out of $HOME.
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    return folder


def reference_loglikelihoods(model, tokenizer) -> list[list[float]]:
    """log p(" " + choice | context) for every item and choice, summed over the choice's tokens."""
    result = []
    for item in ITEMS:
        context = tokenizer(_context(item), add_special_tokens=False).input_ids
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(_context(item) + " " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = model(ids[:, :-1]).logits.double().log_softmax(-1)[0]
            targets = ids[0, len(context):]
            scores.append(logprobs[len(context) - 1:].gather(-1, targets[:, None]).sum().item())
        result.append(scores)
    return result


def accuracy(loglikelihoods: list[list[float]]) -> float:
    """Share of items whose best-scoring choice is the answer (lm-eval's ``acc``)."""
    hits = [max(range(len(ll)), key=ll.__getitem__) == item["answer"] for ll, item in zip(loglikelihoods, ITEMS)]
    return sum(hits) / len(hits)


def sample_loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """The per-choice log-likelihoods lm-eval logged, in document order."""
    ordered = sorted(samples, key=lambda sample: int(sample["doc_id"]))
    return [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in ordered]
