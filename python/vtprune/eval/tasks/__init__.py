"""The tiny local lmms-eval tasks, written out as a task folder that lmms-eval's ``--include_path`` reads.

lmms-eval resolves a task's data file against the working directory, so the task YAMLs are written with the
absolute path of the packaged data (:func:`include_path`), next to a ``utils.py`` that re-exports
:mod:`vtprune.eval.tasks.tiny_task`:

    lmms-eval --include_path "$(python -m vtprune.eval.tasks)" --tasks vtprune_tiny_gen,vtprune_tiny_mc ...
"""

from __future__ import annotations

import json
import os
import tempfile

TASKS = ("vtprune_tiny_gen", "vtprune_tiny_mc")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vtprune_tiny.jsonl")

_COMMON = {"dataset_path": "json", "test_split": "train", "doc_to_visual": "!function utils.doc_to_visual",
           "doc_to_text": "!function utils.doc_to_text"}
_TASKS = {
    "vtprune_tiny_gen": {
        "output_type": "generate_until", "doc_to_target": "answer",
        "process_results": "!function utils.process_results",
        "generation_kwargs": {"max_new_tokens": 8, "until": ["\n"], "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": " Answer with one word."}},
    },
    "vtprune_tiny_mc": {
        "output_type": "multiple_choice", "doc_to_target": "!function utils.doc_to_target",
        "doc_to_choice": "!function utils.doc_to_choice",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": ""}},
    },
}


def _yaml(task: str) -> str:
    """One task's YAML (JSON values are YAML; ``!function`` tags stay unquoted)."""
    fields = {"task": task, **_COMMON, "dataset_kwargs": {"data_files": {"train": DATA}}, **_TASKS[task]}
    lines = []
    for key, value in fields.items():
        text = value if isinstance(value, str) and value.startswith("!function") else json.dumps(value)
        lines.append(f"{key}: {text}")
    return "\n".join(lines) + "\n"


def include_path(directory: str | os.PathLike | None = None) -> str:
    """Write the task folder (two YAMLs and ``utils.py``) into ``directory`` (default: a new temporary folder)
    and return its path, for lmms-eval's ``--include_path`` / ``TaskManager(include_path=...)``."""
    directory = str(directory) if directory is not None else tempfile.mkdtemp(prefix="vtprune-tasks-")
    os.makedirs(directory, exist_ok=True)
    for task in TASKS:
        with open(os.path.join(directory, f"{task}.yaml"), "w", encoding="utf-8") as f:
            f.write(_yaml(task))
    with open(os.path.join(directory, "utils.py"), "w", encoding="utf-8") as f:
        f.write("from vtprune.eval.tasks.tiny_task import *  # noqa: F401,F403\n")
    return directory
