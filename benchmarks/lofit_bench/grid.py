"""The grid: every method on the same task, data, seeds, trainer and evaluation, one row per (method, seed, training
rows, K), written as it finishes."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from peft_lofit.app.default_model import load_model_and_tokenizer
from peft_lofit.app.pipeline import heads_per_layer
from peft_lofit.app.tasks import get_task
from peft_lofit.io import atomic_write_json, atomic_write_text
from peft_lofit.localize import localize
from peft_lofit.timing import timed
from peft_lofit.training import TrainSettings, train_adapter
from peft_lofit.training.heads import HeadSelection, random_heads, resolve_k

from .measure import PeakMemory, adapter_bytes, latency, relative_latency
from .methods import METHODS, train_settings
from .report import plot, results_table, summarize

ROW_FIELDS = (
    "method",
    "seed",
    "train_rows",
    "k",
    "trainable_parameters",
    "adapter_bytes",
    "localize_s",
    "train_s",
    "step_s",
    "steps",
    "localize_peak_memory_mb",
    "peak_memory_mb",
    "metrics",
    "latency",
)


def grid_train_settings(args, seed: int, learning_rate: float) -> TrainSettings:
    """The benchmark's trainer settings with the grid command's epochs and batch size; scratch in ``OUTPUT/tmp``."""
    return train_settings(
        learning_rate, epochs=args.epochs, batch_size=args.batch_size, seed=seed, folder=Path(args.output) / "tmp"
    )


def run_method(args, name: str, seed: int, train_limit: Optional[int], fraction: float, cache: dict) -> dict:
    """Train and measure one method; ``cache`` keeps localizations and base latency between calls."""
    method = METHODS[name]
    task = get_task(args.task)
    model, tokenizer = load_model_and_tokenizer(args.model)
    torch.manual_seed(seed)
    rows = task.training_rows("train", data_dir=args.data_dir, fold=args.fold, limit=train_limit)
    evaluate = dict(split="test", data_dir=args.data_dir, fold=args.fold, limit=args.eval_limit)
    row = dict.fromkeys(ROW_FIELDS)
    row.update(method=name, seed=seed, train_rows=len(rows))
    vocab = model.config.vocab_size
    measure = dict(prefill_shape=(8, args.prefill_tokens), decode_tokens=args.decode_tokens, repeats=args.repeats)
    if "base_latency" not in cache and not args.skip_latency:
        cache["base_latency"] = latency(model, vocab, **measure)
    if method.kind == "base":
        row.update(trainable_parameters=0, adapter_bytes=0, metrics=task.evaluate(model, tokenizer, **evaluate))
        base = cache.get("base_latency")
        row["latency"] = relative_latency(base, base, base)
        return row
    k = resolve_k(sum(heads_per_layer(model)), fraction=fraction)
    if method.kind == "computed":
        if args.task != "truthfulqa":
            raise ValueError(f"{name} is built from TruthfulQA true/false answers; use --task truthfulqa.")
        with timed(row, "train_s"), PeakMemory() as memory:
            peft_model = computed_adapter(name, model, tokenizer, args, k, train_limit, cache)
        row["steps"], row["k"] = 0, len(peft_model.peft_config["default"].heads)
    else:
        heads = None
        if method.is_lofit:
            heads = heads_for(method.heads, args, model, tokenizer, rows, task, seed, train_limit, k, cache, row)
            row["k"] = len(heads)
        settings = grid_train_settings(args, seed, getattr(args, method.learning_rate))
        config = method.peft_config(model, heads)
        with timed(row, "train_s"), PeakMemory() as memory:
            peft_model, trainer = train_adapter(model, tokenizer, rows, task.objective, config, settings)
        row["steps"] = trainer.state.global_step
        row["step_s"] = row["train_s"] / max(1, row["steps"])
    row["peak_memory_mb"] = memory.peak_mb
    row["trainable_parameters"] = peft_model.get_nb_trainable_parameters()[0]
    row["adapter_bytes"] = adapter_bytes(peft_model)
    row["metrics"] = task.evaluate(peft_model, tokenizer, desc=f"{name} seed {seed}", **evaluate)
    if not args.skip_latency:
        unmerged = latency(peft_model, vocab, **measure)
        peft_model.merge_adapter()
        merged = latency(peft_model, vocab, **measure)
        peft_model.unmerge_adapter()
        row["latency"] = relative_latency(cache["base_latency"], unmerged, merged)
    return row


def heads_for(source, args, model, tokenizer, rows, task, seed, train_limit, k, cache, row) -> list[list[int]]:
    """The K heads step 2 trains, by where a LoFiT method takes them from (``Method.heads``); localizations are kept
    in ``cache`` (and timed into ``row``)."""
    layout = heads_per_layer(model)
    if source == "random":
        return random_heads(layout, k, seed=seed)
    if source == "all":
        return [[layer, head] for layer, count in enumerate(layout) for head in range(count)]
    if source == "other":
        if not args.other_heads:
            raise ValueError("lofit_other_heads needs --other-heads: a head-selection JSON localized on another task.")
        selection = HeadSelection.load(args.other_heads)
        selection.check_fits(layout, args.other_heads)
        return selection.top(k)
    if source == "iti":
        return iti_probe_data(model, tokenizer, args, train_limit, cache)[0].top(k)
    key = "file" if args.head_selection else (seed, train_limit)
    if key not in cache:
        if args.head_selection:
            cache[key] = (HeadSelection.load(args.head_selection), None, None)
        else:
            settings = grid_train_settings(args, seed, args.localize_lr)
            settings.epochs, settings.l1_lambda = args.localize_epochs, args.l1
            seconds = {}
            with timed(seconds, "localize"), PeakMemory() as memory:
                selection = localize(model, tokenizer, rows, task.objective, settings)
            cache[key] = (selection, seconds["localize"], memory.peak_mb)
    selection, row["localize_s"], row["localize_peak_memory_mb"] = cache[key]
    return selection.top(k)


def iti_probe_data(model, tokenizer, args, limit: Optional[int], cache: dict):
    """ITI's probes on the first ``limit`` training / validation questions: (HeadSelection of validation accuracies,
    training activations, training labels), computed once per ``limit`` and kept in ``cache``."""
    if ("iti", limit) not in cache:
        cache["iti", limit] = _collect_iti_probes(model, tokenizer, args, limit)
    return cache["iti", limit]


def _collect_iti_probes(model, tokenizer, args, limit: Optional[int]):
    from peft_lofit import baselines
    from peft_lofit.app.tasks.truthfulqa import load_truthfulqa

    if args.task != "truthfulqa":
        raise ValueError("ITI probes are trained on TruthfulQA true/false answers; use --task truthfulqa.")
    train = load_truthfulqa("train", fold=args.fold, data_dir=args.data_dir)[: limit or None]
    val = load_truthfulqa("val", fold=args.fold, data_dir=args.data_dir)[: limit or None]
    (train_texts, train_y), (val_texts, val_y) = (
        baselines.truthfulqa_probe_texts(train),
        baselines.truthfulqa_probe_texts(val),
    )
    train_x = baselines.collect_head_activations(model, tokenizer, train_texts)
    val_x = baselines.collect_head_activations(model, tokenizer, val_texts)
    selection = baselines.probe_selection(train_x, train_y, val_x, val_y, metadata={"method": "iti"})
    return selection, train_x, train_y


def computed_adapter(method: str, model, tokenizer, args, k: int, limit: Optional[int], cache: dict):
    """ITI (top-k heads by probe accuracy, offsets alpha * sigma * theta) or RepE-style reading vectors, from the
    first ``limit`` training (and validation) questions."""
    from peft_lofit import baselines
    from peft_lofit.app.tasks.truthfulqa import load_truthfulqa

    if method == "iti":
        selection, train_x, train_y = iti_probe_data(model, tokenizer, args, limit, cache)
        offsets = baselines.iti_offsets(train_x, train_y, selection.top(k), args.iti_alpha)
        return baselines.adapter_with_offsets(model, offsets)
    train = load_truthfulqa("train", fold=args.fold, data_dir=args.data_dir)[: limit or None]
    true_texts = [f"Q: {q.question} A: {q.best_answer}" for q in train]
    false_texts = [f"Q: {q.question} A: {q.incorrect[0]}" for q in train]
    vectors = baselines.reading_vectors(
        baselines.collect_hidden_states(model, tokenizer, true_texts),
        baselines.collect_hidden_states(model, tokenizer, false_texts),
    )
    layers = args.repe_layers or list(range(len(vectors) // 3, 2 * len(vectors) // 3))
    return baselines.repe_adapter(model, {layer: vectors[layer] for layer in layers}, args.repe_coefficient)


def grid_runs(args) -> list[tuple]:
    """(method, seed, training rows, fraction) for the methods x seeds, the extra seeds and the sweeps; a sweep point
    equal to a headline run is run once."""
    runs = [(m, s, args.train_limit, args.fraction) for m in args.methods for s in args.seeds]
    runs += [
        (m, s, args.train_limit, args.fraction)
        for m in args.extra_seed_methods
        if m in args.methods
        for s in args.extra_seeds
    ]
    runs += [(m, args.seeds[0], size, args.fraction) for size in args.sweep_data for m in ("lofit", "lora_r8")]
    runs += [("lofit", args.seeds[0], args.train_limit, f) for f in args.sweep_k]
    return list(dict.fromkeys(runs))


def run_grid(args, output: Path, argv, eval_speed: Optional[dict] = None) -> dict:
    """Every run of ``grid_runs``; ``results.partial.json`` after each, then ``results.json``, ``results.md`` and
    the plots."""
    task = get_task(args.task)
    cache: dict = {}
    rows = []
    timings: dict = {}
    with timed(timings, "wall_s"):
        for method, seed, limit, fraction in grid_runs(args):
            print(f"\n=== {method} seed={seed} train_rows={limit or 'all'} fraction={fraction} ===", flush=True)
            rows.append(run_method(args, method, seed, limit, fraction, cache))
            atomic_write_json(output / "results.partial.json", {"rows": rows})
    summary = summarize(rows, task.metrics)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.lofit_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "settings": dict(vars(args)),
        "wall_s": timings["wall_s"],
        "eval_prefix_cache": eval_speed,
        "rows": rows,
        "summary": summary,
    }
    atomic_write_json(output / "results.json", results)
    table = results_table(summary, task.metrics)
    plots = [name for metric in task.metrics[:2] for name in plot(summary, metric, output)]
    atomic_write_text(
        output / "results.md", f"{results['date']} · {results['machine']}\n\n`{results['command']}`\n\n{table}\n"
    )
    (output / "results.partial.json").unlink(missing_ok=True)
    print("\n" + table)
    print(f"\nWritten: {output}/results.json, results.md, {', '.join(plots)}")
    return results
