"""The whole LoFiT pipeline: localize, pick K heads, train offsets, evaluate base and adapted model, save.

Everything the command line does is a function here, so the same steps run from Python (see examples/).
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import save_adapter
from ..distributed import is_main_process
from ..io import atomic_write_json
from ..markdown import markdown_table
from ..timing import timed
from ..training.heads import HeadSelection, random_heads
from ..training.localize import localize
from ..training.trainers import train_adapter
from ..tuner import LoFiTConfig
from ..tuner.model import find_projections
from .default_model import DEFAULT_MODEL, describe_base_model, load_model_and_tokenizer
from .metrics_cache import cached_evaluation, metrics_cache_root
from .publish import write_model_card
from .search import run_search
from .settings import HEAD_CHOICES, PipelineSettings
from .tasks import get_task


def select_heads(settings: PipelineSettings, model, tokenizer, rows, output: Path, timings: dict):
    """The K heads for step 2 and the selection they came from (None for random heads); K and a head-selection file
    are checked against the model first."""
    per_layer = heads_per_layer(model)
    check_heads_fit(settings, per_layer)
    if settings.heads == "random":
        k = settings.k or max(1, round(settings.fraction * sum(per_layer)))
        return random_heads(per_layer, k, seed=settings.seed), None
    if settings.heads == "learned":
        with timed(timings, "localize_s"):
            selection = localize(
                model,
                tokenizer,
                rows,
                get_task(settings.task).objective,
                settings=settings.localize,
                metadata={"task": settings.task, "model": settings.model or DEFAULT_MODEL},
            )
    else:
        selection = HeadSelection.load(settings.heads)
    heads = selection.top(k=settings.k) if settings.k else selection.top(fraction=settings.fraction)
    if is_main_process():
        selection.save(output / "head_selection.json")
        selection.heatmap(output / "head_selection.png", title=f"{settings.task}: LoFiT head scores", k=len(heads))
    return heads, selection


def check_heads_fit(settings: PipelineSettings, per_layer: list[int]) -> None:
    """Fail before any training if K or a head-selection file does not fit the model."""
    total = sum(per_layer)
    if settings.k is not None and settings.k > total:
        raise ValueError(f"--k {settings.k} is more than the model's {total} heads.")
    if settings.heads not in HEAD_CHOICES:
        HeadSelection.load(settings.heads).check_fits(per_layer, str(settings.heads))


def heads_per_layer(model) -> list[int]:
    """Number of heads of each layer's output projection."""
    projections = find_projections(model, LoFiTConfig())
    return [projections[layer][1].num_heads for layer in sorted(projections)]


def with_best_trial(settings: PipelineSettings, search: dict) -> PipelineSettings:
    """A copy of ``settings`` with the search's winner: its heads (ranking of its lambda), K, learning rate, epochs."""
    best = search["best"]
    settings = copy.deepcopy(settings)
    settings.search, settings.heads, settings.k = None, search["head_selection"], best["k"]
    settings.localize.l1_lambda = best["l1"]
    settings.train.learning_rate, settings.train.epochs = best["learning_rate"], best["epochs"]
    return settings


def evaluate_base(settings: PipelineSettings, task, model, tokenizer) -> tuple[dict, bool]:
    """The base model's metrics on ``settings.evaluation()`` and whether they came from the on-disk cache
    (``metrics_cache``)."""
    evaluation = settings.evaluation()

    def evaluate() -> dict:
        return task.evaluate(model, tokenizer, batch_size=settings.eval_batch_size, desc="base model", **evaluation)

    if not settings.cache_base_metrics:
        return evaluate(), False
    key_settings = {**evaluation, "batch_size": settings.eval_batch_size}
    metrics, reused = cached_evaluation(model, task, key_settings, evaluate, write=is_main_process())
    if reused and is_main_process():
        print(
            f"Base model metrics on {settings.task} {settings.eval_split} reused from the cache "
            f"({metrics_cache_root()}); pass --no-metrics-cache to evaluate again."
        )
    return metrics, reused


def run_pipeline(settings: PipelineSettings, model=None, tokenizer=None) -> dict:
    """Run LoFiT end to end and write ``adapter/``, ``head_selection.json`` (+ PNG) and ``metrics.json``.

    Under ``torchrun`` / ``accelerate launch`` every process trains its shard of the data and evaluates (the
    evaluation is not sharded: each process scores the whole split and gets the same numbers); only the main process
    writes.
    """
    settings = copy.deepcopy(settings)  # the caller's settings stay as given (output folders and seeds are set below)
    torch.manual_seed(settings.seed)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    task = get_task(settings.task)
    rows = settings.train_rows()
    task.training_rows(settings.eval_split, data_dir=settings.data_dir, fold=settings.fold, limit=1)  # readable?
    timings: dict[str, float] = {}
    settings, model, tokenizer, searches = _searched(settings, model, tokenizer, timings)
    for step, name in ((settings.localize, "localize"), (settings.train, "train")):
        step.output_dir = str(output / "checkpoints" / name)
        step.seed = settings.seed
    heads, _ = select_heads(settings, model, tokenizer, rows, output, timings)

    evaluation = settings.evaluation()
    with timed(timings, "eval_base_s"):
        base_metrics, base_reused = evaluate_base(settings, task, model, tokenizer)

    config = LoFiTConfig(heads=heads, use_offset=True, use_scaling=settings.train_both_vectors, init_weights=True)
    with timed(timings, "train_s"):
        peft_model, _ = train_adapter(model, tokenizer, rows, task.objective, config, settings.train)
    with timed(timings, "eval_lofit_s"):
        lofit_metrics = task.evaluate(
            peft_model, tokenizer, batch_size=settings.eval_batch_size, desc="LoFiT model", **evaluation
        )

    # the id the card names: the loaded model's own path says more than settings.model for a model passed in
    name_or_path = getattr(model, "name_or_path", "")
    hub_id, weights_source = describe_base_model(name_or_path) if name_or_path else (None, None)
    results = {
        "task": settings.task,
        "model": settings.model or DEFAULT_MODEL,
        "base_model_id": settings.base_model_id or hub_id,
        "base_model_source": None if settings.base_model_id else weights_source,
        "heads": heads,
        "num_heads_selected": len(heads),
        "train_rows": len(rows),
        "trainable_parameters": peft_model.get_nb_trainable_parameters()[0],
        "base": base_metrics,
        "base_metrics_from_cache": base_reused,
        "lofit": lofit_metrics,
        **searches,
        "timings_s": {key: round(value, 1) for key, value in timings.items()},
        "settings": _jsonable(asdict(settings)),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if is_main_process():
        save_adapter(peft_model, output / "adapter")
        atomic_write_json(output / "metrics.json", results)
        publishable(output, results)
    return results


def _searched(settings: PipelineSettings, model, tokenizer, timings: dict):
    """Run the search the settings ask for and apply its winner; returns the settings, the model and tokenizer (loaded
    here when not given) and the search's record for ``metrics.json``."""
    if model is None:
        model, tokenizer = load_model_and_tokenizer(settings.model)
    if settings.search is None:
        return settings, model, tokenizer, {"search": None}
    with timed(timings, "search_s"):
        search = run_search(settings, settings.search, model, tokenizer)
    return with_best_trial(settings, search), model, tokenizer, {"search": search}


def publishable(output: Path, results: dict) -> None:
    """Make ``output/adapter`` a complete Hub repository: heads, metrics and a model card beside the weights."""
    adapter = output / "adapter"
    for name in ("head_selection.json", "head_selection.png", "metrics.json"):
        if (output / name).is_file():
            shutil.copyfile(output / name, adapter / name)
    write_model_card(adapter, results)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def results_table(results: dict) -> str:
    """A small Markdown table of base vs LoFiT on the task's metrics."""
    metrics = get_task(results["task"]).metrics
    rows = [
        ("base", *(f"{results['base'][m]:.3f}" for m in metrics), 0),
        (
            f"LoFiT (K = {results['num_heads_selected']})",
            *(f"{results['lofit'][m]:.3f}" for m in metrics),
            f"{results['trainable_parameters']:,}",
        ),
    ]
    return markdown_table(("model", *metrics, "trained numbers"), rows)
