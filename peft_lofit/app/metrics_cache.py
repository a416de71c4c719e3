"""The base model's metrics, computed once: cached on disk, keyed by what they depend on.

The base model's score on a split does not change between runs, so ``lofit run`` evaluates it once. The key is a
SHA-256 over the model's weights (every tensor's name, dtype, shape and bytes), the bytes of every data file the
evaluation reads (``Task.data_files``: contents, not paths), the evaluation settings (task, split, fold, limit, batch
size), the device and dtype, the torch version and the source of the task code; a change to any of them is a new
entry. Entries live in ``$PEFT_LOFIT_METRICS_CACHE``, else ``base_metrics/`` in the package cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..io import atomic_write_json, read_json_if_complete
from .default_model import cache_root

TASK_SOURCES = Path(__file__).parent / "tasks"


def metrics_cache_root() -> Path:
    return Path(os.environ.get("PEFT_LOFIT_METRICS_CACHE") or cache_root() / "base_metrics")


def _hash_weights(model: torch.nn.Module, digest) -> None:
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # (numel * itemsize,) raw bytes


def evaluation_key(model, task, settings: dict) -> str:
    """The cache key of evaluating ``model`` on ``task`` with ``settings`` (split, fold, limit, batch size, data)."""
    digest = hashlib.sha256()
    _hash_weights(model, digest)
    parameter = next(model.parameters())
    described = {
        **settings,
        "task": task.name,
        "device": str(parameter.device),
        "dtype": str(parameter.dtype),
        "torch": torch.__version__,
    }
    described.pop("data_dir", None)  # the files' contents below, not where they are
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    files = task.data_files(settings["split"], settings.get("data_dir"), settings.get("fold", 0))
    for path in [*files, *sorted(TASK_SOURCES.glob("*.py"))]:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def cached_evaluation(model, task, settings: dict, evaluate: Callable[[], dict], write: bool = True):
    """``(metrics, reused)``: the cached metrics for this key, or ``evaluate()`` stored under it (when ``write``)."""
    path = metrics_cache_root() / f"{evaluation_key(model, task, settings)}.json"
    cached = read_json_if_complete(path)  # None: no entry yet, or an unreadable one: evaluate again
    if cached is not None:
        return cached, True
    metrics = evaluate()
    if write:
        atomic_write_json(path, metrics)
    return metrics, False
