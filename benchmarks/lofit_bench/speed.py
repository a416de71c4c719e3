"""Speed modes: epochs of LoFiT step 1, LoRA r8 and step 2 round-robin; inference latency of untrained adapters
round-robin; the TruthfulQA evaluation with and without its shared-prefix cache; training throughput of one run
against several at once."""

from __future__ import annotations

import copy
import gc
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor

import torch

from peft_lofit import LoFiTConfig
from peft_lofit.app.default_model import load_model_and_tokenizer
from peft_lofit.app.pipeline import heads_per_layer
from peft_lofit.app.tasks import get_task
from peft_lofit.localize import localize
from peft_lofit.timing import timed
from peft_lofit.training import train_adapter
from peft_lofit.training.heads import HeadSelection, random_heads, resolve_k

from .grid import grid_train_settings
from .measure import EpochTimer, PeakMemory, SavedActivations, latency
from .methods import METHODS

# lora_r8 is TRL's own DPO path (on CPU the output layer runs on every position, every prompt twice); every other
# variant uses the project's trainer as users get it (output layer on the loss positions only, each pair's prompt
# once); lora_r8_fast shows that part of the gain alone.
SPEED_VARIANTS = ("lofit_step1", "lora_r8", "lora_r8_fast", "lofit_step2_plain", "lofit_step2_cached")


def training_speed(args) -> dict:
    """Seconds per epoch of LoFiT step 1, LoRA r8 (TRL's path, and the project's), and LoFiT step 2 without and
    with the frozen-layer cache.

    Same rows, trainer and batch size for all; ``--repeats`` rounds run the five variants in turn so machine noise
    hits all alike. Every variant runs ``--epochs`` epochs (step 1 too: epochs are what is compared). Step 2 trains
    the top K heads of ``--head-selection`` (or of round 1's step 1). Reports each
    variant's median epoch time (all epochs, and epochs after the first, when the cache is warm), its median total
    time (set-up included), peak memory, the activations kept for backward (``SavedActivations``), and ratios to
    LoRA r8.
    """
    task = get_task(args.task)
    _, tokenizer = load_model_and_tokenizer(args.model)
    rows = task.training_rows("train", data_dir=args.data_dir, fold=args.fold, limit=args.train_limit)
    selection = HeadSelection.load(args.head_selection) if args.head_selection else None
    runs: dict[str, list[dict]] = {variant: [] for variant in SPEED_VARIANTS}
    for round_index in range(args.repeats):
        for variant in SPEED_VARIANTS:
            model, _ = load_model_and_tokenizer(args.model)
            timer, saved = EpochTimer(), SavedActivations()
            settings = grid_train_settings(args, args.seeds[0], args.lofit_lr)
            settings.score_loss_positions_only = settings.share_prompts = variant != "lora_r8"
            found = trainer = None
            seconds = {}
            with timed(seconds, "total_s"), PeakMemory() as memory, saved:
                if variant == "lofit_step1":
                    settings.learning_rate, settings.l1_lambda = args.localize_lr, args.l1
                    found = localize(model, tokenizer, rows, task.objective, settings, callbacks=[timer, saved])
                    selection = selection or found
                    stats = None
                else:
                    if variant.startswith("lora_r8"):
                        settings.learning_rate, config = args.lora_lr, METHODS["lora_r8"].peft_config(model)
                    else:
                        config = LoFiTConfig(heads=selection.top(fraction=args.fraction))
                        settings.cache_frozen_layers = variant == "lofit_step2_cached"
                    _, trainer = train_adapter(
                        model, tokenizer, rows, task.objective, config, settings, [timer, saved]
                    )
                    stats = trainer.frozen_prefix_stats
            runs[variant].append(
                {
                    "total_s": seconds["total_s"],
                    "epoch_s": timer.epoch_s,
                    "peak_memory_mb": memory.peak_mb,
                    "saved_activations_mb": saved.peak_mb,
                    "cache": vars(stats) if stats else None,
                }
            )
            del model, found, trainer  # free this variant before the next one loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"round {round_index + 1} {variant}: epochs {[round(t, 1) for t in timer.epoch_s]} s", flush=True)
    return {"train_rows": len(rows), "epochs": args.epochs, "repeats": args.repeats, "variants": speed_summary(runs)}


def speed_summary(runs: dict[str, list[dict]]) -> dict:
    """Per variant: median epoch times (all, and after the first), median total time, the largest peak memory and
    kept activations, each also as a ratio to LoRA r8's on TRL's own path (``_vs_lora_r8``) and on the project's
    trainer (``_vs_lora_r8_fast``: the same exact speed-ups as LoFiT, so the part of the gain that is LoFiT's)."""
    variants = {}
    for variant, measured in runs.items():
        variants[variant] = {
            "epoch_s": statistics.median(t for run in measured for t in run["epoch_s"]),
            "later_epoch_s": statistics.median(t for run in measured for t in (run["epoch_s"][1:] or run["epoch_s"])),
            "total_s": statistics.median(run["total_s"] for run in measured),
            "peak_memory_mb": max(run["peak_memory_mb"] for run in measured),
            "saved_activations_mb": max(run["saved_activations_mb"] for run in measured),
            "runs": measured,
        }
    for baseline in ("lora_r8", "lora_r8_fast"):
        reference = variants[baseline]
        for value in variants.values():
            for key in ("epoch_s", "later_epoch_s", "total_s", "peak_memory_mb", "saved_activations_mb"):
                value[f"{key}_vs_{baseline}"] = value[key] / reference[key] if reference[key] else None
    return variants


def interleaved_latency(args, methods: list[str]) -> dict:
    """Inference latency of untrained adapters (values do not change the cost), measured round-robin.

    Each round times the base model, then every method unmerged and merged, so machine noise hits all alike; the
    medians over ``--repeats`` rounds are reported with their ratios to the base model.
    """
    model, _ = load_model_and_tokenizer(args.model)
    vocab = model.config.vocab_size
    k = resolve_k(sum(heads_per_layer(model)), fraction=args.fraction)
    heads = (
        HeadSelection.load(args.head_selection).top(k)
        if args.head_selection
        else random_heads(heads_per_layer(model), k)
    )
    from peft import get_peft_model

    variants = {"base": model.eval()}  # one copy of the base model per method: PEFT cannot mix adapter types
    for method in methods:
        if METHODS[method].kind != "trained":
            continue
        config = METHODS[method].peft_config(model, heads)
        if isinstance(config, LoFiTConfig):
            config.init_weights = False
        variants[method] = get_peft_model(copy.deepcopy(model), config).eval()
    measure = dict(prefill_shape=(8, args.prefill_tokens), decode_tokens=args.decode_tokens, repeats=1, warmup=0)
    times: dict[str, list[dict]] = {}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, variant in variants.items():
            if name == "base":
                result = {"base": latency(variant, vocab, **measure)}
            else:
                result = {f"{name}_unmerged": latency(variant, vocab, **measure)}
                variant.merge_adapter()
                result[f"{name}_merged"] = latency(variant, vocab, **measure)
                variant.unmerge_adapter()
            if round_index:
                for key, value in result.items():
                    times.setdefault(key, []).append(value)
    medians = {
        key: {m: statistics.median(r[m] for r in runs) for m in ("prefill_s", "decode_s")}
        for key, runs in times.items()
    }
    return {
        key: {**value, **{f"{m}_vs_base": value[m] / medians["base"][m] for m in ("prefill_s", "decode_s")}}
        for key, value in medians.items()
    }


def eval_cache_speedup(model, tokenizer, args, questions: int) -> dict:
    """TruthfulQA MC scoring of ``questions`` test questions with and without the shared-prefix KV cache.

    Alternating order, one warm-up question; returns both times, their ratio and the largest score difference.
    """
    from peft_lofit.app.tasks.truthfulqa import evaluate_mc, load_truthfulqa

    items = load_truthfulqa("test", fold=args.fold, data_dir=args.data_dir)[:questions]
    evaluate_mc(model, tokenizer, items[:1], data_dir=args.data_dir, desc="warm-up")
    times, scores = {True: [], False: []}, {}
    for use_cache in (True, False, True, False):
        seconds = {}
        with timed(seconds, "s"):
            _, scores[use_cache] = evaluate_mc(
                model,
                tokenizer,
                items,
                data_dir=args.data_dir,
                use_prefix_cache=use_cache,
                return_scores=True,
                desc=f"cache={use_cache}",
            )
        times[use_cache].append(seconds["s"])
    difference = max(abs(a - b) for x, y in zip(scores[True], scores[False]) for a, b in zip(x, y))
    cached, plain = statistics.median(times[True]), statistics.median(times[False])
    return {
        "questions": questions,
        "cached_s": cached,
        "plain_s": plain,
        "speedup": plain / cached,
        "max_score_difference": difference,
    }


def lora_epoch_seconds(args, threads: int) -> float:
    """Seconds of one LoRA r8 epoch on the task's training rows with ``threads`` CPU threads (one process's work)."""
    torch.set_num_threads(threads)
    task = get_task(args.task)
    model, tokenizer = load_model_and_tokenizer(args.model)
    rows = task.training_rows("train", data_dir=args.data_dir, fold=args.fold, limit=args.train_limit)
    settings = grid_train_settings(args, args.seeds[0], args.lora_lr)
    settings.epochs = 1
    seconds = {}
    with timed(seconds, "train"):
        train_adapter(model, tokenizer, rows, task.objective, METHODS["lora_r8"].peft_config(model), settings)
    return seconds["train"]


def thread_split(args) -> dict:
    """Training throughput of one run with a thread per core against ``--jobs`` runs at once, the cores shared out.

    Each run is a LoRA r8 epoch of the same rows in its own process; ``--repeats`` rounds alternate the two layouts.
    ``throughput_ratio`` = (jobs / median seconds of a shared run) / (1 / median seconds of the lone run): above 1,
    running ``jobs`` trainings at once finishes more of them per hour.
    """
    cores, jobs = os.cpu_count() or 1, args.jobs
    layouts = {"one_run": [cores], "split": [max(1, cores // jobs)] * jobs}
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(args.repeats):
            for name, threads in layouts.items():
                seconds[name] += pool.map(lora_epoch_seconds, [args] * len(threads), threads)
    one, shared = statistics.median(seconds["one_run"]), statistics.median(seconds["split"])
    return {
        "cores": cores,
        "jobs": jobs,
        "threads": {name: threads[0] for name, threads in layouts.items()},
        "epoch_s": seconds,
        "throughput_ratio": (jobs / shared) / (1 / one),
    }
