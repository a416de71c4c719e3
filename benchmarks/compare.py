"""LoFiT vs LoRA (and IA3, random heads, the base model) on the same task, data, seeds, trainer and evaluation.

    python benchmarks/compare.py                                   # SmolLM2-135M-Instruct, TruthfulQA fold 0
    python benchmarks/compare.py --methods lofit lora_r8 --seeds 1 2 3 --eval-limit 100
    python benchmarks/compare.py --sweep-data 16 32 64 128 0 --sweep-k 0.01 0.03 0.1 0.2
    python benchmarks/compare.py --methods lofit_all_heads lofit_iti_heads lofit_other_heads iti repe \
        --other-heads mquake_heads.json                            # head-selection ablations and baselines
    python benchmarks/compare.py --train-speed-only --head-selection heads.json   # seconds per epoch vs LoRA r8
    python benchmarks/compare.py --combine a/results.json b/results.json          # one table from several runs

Writes ``results.json``, ``results.md`` and PNG plots to ``--output`` (default ``benchmarks/results``). Every row
has: trainable parameters, adapter file size, training wall time (localization and training separately for
LoFiT), time per optimizer step, peak memory during training, the task metrics, and inference latency (prefill and
greedy decoding) unmerged and merged, relative to the base model measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from peft import IA3Config, LoraConfig
from transformers import TrainerCallback

from peft_lofit import LoFiTConfig
from peft_lofit.app.default_model import load_model_and_tokenizer
from peft_lofit.app.pipeline import heads_per_layer
from peft_lofit.app.tasks import get_task
from peft_lofit.checkpoint import save_adapter
from peft_lofit.io import atomic_write_json, atomic_write_text
from peft_lofit.localize import localize
from peft_lofit.training import TrainSettings, train_adapter
from peft_lofit.training.heads import HeadSelection, random_heads, resolve_k

METHODS = (
    "base",
    "lofit",
    "lofit_random",
    "lofit_all_heads",
    "lofit_iti_heads",
    "lofit_other_heads",
    "lora_r8",
    "lora_r1",
    "ia3",
    "iti",
    "repe",
)
COMPUTED = ("iti", "repe")  # offsets computed from activations (TruthfulQA only), nothing trained
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


# ---------------------------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on GPU, else sampled process RSS above the start."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_mb = interval, 0.0

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        import psutil

        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (self._peak - self._start) / 2**20


class SavedActivations(TrainerCallback):
    """Bytes autograd keeps for the backward pass, per optimizer step (the largest step is reported).

    Counted in ``saved_tensors_hooks``: each distinct storage saved during the step, leaving out parameters and
    buffers (they are in memory anyway). Unlike sampled RSS, this is exact and the same on any device, and it is where
    PEFT methods differ: weights are shared, gradients and optimizer states are a few MB, the kept activations are not.
    Use it as a context around training and as a callback of that training. Exact for what the benchmark runs: one
    process and device, one batch per step, no gradient checkpointing (its own hooks would hide these); other set-ups
    are refused.
    """

    def __init__(self):
        self.peak_bytes = 0
        self._step: dict[tuple, int] = {}
        self._excluded: set[tuple] = set()

    @staticmethod
    def _key(tensor) -> tuple:
        return tensor.device, tensor.untyped_storage().data_ptr()

    def _pack(self, tensor):
        key = self._key(tensor)
        if key not in self._excluded:
            self._step[key] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args is not None and (
            args.n_gpu > 1 or args.gradient_accumulation_steps > 1 or args.gradient_checkpointing
        ):
            raise ValueError(
                "SavedActivations counts one process on one device, one batch per step and no gradient "
                "checkpointing; turn off DataParallel, gradient accumulation and checkpointing."
            )
        self._excluded = {self._key(tensor) for tensor in (*model.parameters(), *model.buffers())}

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.peak_bytes = max(self.peak_bytes, sum(self._step.values()))

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(model, vocab: int, prefill_shape=(8, 256), decode_tokens=64, repeats=3, warmup=1) -> dict[str, float]:
    """Median seconds for a prefill forward of ``prefill_shape`` tokens and for greedy decoding ``decode_tokens``."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, prefill_shape, generator=generator).to(model.device)
    short = prompt[:, :16]

    def prefill():
        with torch.no_grad():
            model(prompt)

    def decode():
        with torch.no_grad():
            model.generate(
                short, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0
            )

    return {"prefill_s": median_time(prefill, repeats, warmup), "decode_s": median_time(decode, repeats, warmup)}


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
        if method in ("base", *COMPUTED):
            continue
        config = peft_config_for(method, heads)
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


class EpochTimer(TrainerCallback):
    """Wall time of each training epoch (the trainer's set-up, e.g. DPO's reference pass, is not in it)."""

    def __init__(self):
        self.epoch_s: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_s.append(time.perf_counter() - self._start)


# lora_r8 is TRL's own DPO path (on CPU the output layer runs on every position, every prompt twice); every other
# variant uses the project's trainer as users get it (output layer on the loss positions only, each pair's prompt
# once); lora_r8_fast shows that part of the gain alone.
SPEED_VARIANTS = ("lofit_step1", "lora_r8", "lora_r8_fast", "lofit_step2_plain", "lofit_step2_cached")


def training_speed(args) -> dict:
    """Seconds per epoch of LoFiT step 1, LoRA r8 (TRL's path, and the project's), and LoFiT step 2 without and
    with the frozen-layer cache.

    Same rows, trainer and batch size for all; ``--repeats`` rounds run the four variants in turn so machine noise
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
            settings = train_settings(args, args.seeds[0], Path(args.output) / "tmp", args.lofit_lr)
            settings.score_loss_positions_only = settings.share_prompts = variant != "lora_r8"
            start = time.perf_counter()
            found = trainer = None
            with PeakMemory() as memory, saved:
                if variant == "lofit_step1":
                    settings.learning_rate, settings.l1_lambda = args.localize_lr, args.l1
                    found = localize(model, tokenizer, rows, task.objective, settings, callbacks=[timer, saved])
                    selection = selection or found
                    stats = None
                else:
                    if variant.startswith("lora_r8"):
                        settings.learning_rate, config = args.lora_lr, peft_config_for("lora_r8")
                    else:
                        config = LoFiTConfig(heads=selection.top(fraction=args.fraction))
                        settings.cache_frozen_layers = variant == "lofit_step2_cached"
                    _, trainer = train_adapter(
                        model, tokenizer, rows, task.objective, config, settings, [timer, saved]
                    )
                    stats = trainer.frozen_prefix_stats
            runs[variant].append(
                {
                    "total_s": time.perf_counter() - start,
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
    result = {"train_rows": len(rows), "epochs": args.epochs, "repeats": args.repeats, "variants": {}}
    for variant, measured in runs.items():
        result["variants"][variant] = {
            "epoch_s": statistics.median(t for run in measured for t in run["epoch_s"]),
            "later_epoch_s": statistics.median(t for run in measured for t in (run["epoch_s"][1:] or run["epoch_s"])),
            "total_s": statistics.median(run["total_s"] for run in measured),
            "peak_memory_mb": max(run["peak_memory_mb"] for run in measured),
            "saved_activations_mb": max(run["saved_activations_mb"] for run in measured),
            "runs": measured,
        }
    lora = result["variants"]["lora_r8"]
    for variant, value in result["variants"].items():
        for key in ("epoch_s", "later_epoch_s", "total_s", "peak_memory_mb", "saved_activations_mb"):
            value[f"{key}_vs_lora_r8"] = value[key] / lora[key] if lora[key] else None
    return result


def adapter_bytes(peft_model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(peft_model, folder)
        return (Path(folder) / "adapter_model.safetensors").stat().st_size


def eval_cache_speedup(model, tokenizer, args, questions: int) -> dict:
    """TruthfulQA MC scoring of ``questions`` test questions with and without the shared-prefix KV cache.

    Alternating order, one warm-up question; returns both times, their ratio and the largest score difference.
    """
    from peft_lofit.app.tasks.truthfulqa import evaluate_mc, load_truthfulqa

    items = load_truthfulqa("test", fold=args.fold, data_dir=args.data_dir)[:questions]
    evaluate_mc(model, tokenizer, items[:1], data_dir=args.data_dir, desc="warm-up")
    times, scores = {True: [], False: []}, {}
    for use_cache in (True, False, True, False):
        start = time.perf_counter()
        _, scores[use_cache] = evaluate_mc(
            model,
            tokenizer,
            items,
            data_dir=args.data_dir,
            use_prefix_cache=use_cache,
            return_scores=True,
            desc=f"cache={use_cache}",
        )
        times[use_cache].append(time.perf_counter() - start)
    difference = max(abs(a - b) for x, y in zip(scores[True], scores[False]) for a, b in zip(x, y))
    cached, plain = statistics.median(times[True]), statistics.median(times[False])
    return {
        "questions": questions,
        "cached_s": cached,
        "plain_s": plain,
        "speedup": plain / cached,
        "max_score_difference": difference,
    }


# --------------------------------------------------------------------------------------------------- methods
def peft_config_for(method: str, heads=None):
    """The PEFT config a method trains (LoFiT methods need their heads)."""
    if method.startswith("lofit"):
        return LoFiTConfig(heads=heads)
    if method.startswith("lora_r"):
        rank = int(method.removeprefix("lora_r"))
        return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    if method == "ia3":  # IA3 scaling the input of the output projection: LoFiT's A on every head, no offsets
        return IA3Config(target_modules=["o_proj"], feedforward_modules=["o_proj"])
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


def train_settings(args, seed: int, output: Path, learning_rate: float) -> TrainSettings:
    return TrainSettings(
        learning_rate=learning_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        output_dir=str(output / "checkpoints"),
        logging_steps=50,
    )


def run_method(args, method: str, seed: int, train_limit: Optional[int], fraction: float, cache: dict) -> dict:
    """Train and measure one method; ``cache`` keeps localizations and base latency between calls."""
    task = get_task(args.task)
    model, tokenizer = load_model_and_tokenizer(args.model)
    torch.manual_seed(seed)
    rows = task.training_rows("train", data_dir=args.data_dir, fold=args.fold, limit=train_limit)
    evaluate = dict(split="test", data_dir=args.data_dir, fold=args.fold, limit=args.eval_limit)
    row = dict.fromkeys(ROW_FIELDS)
    row.update(method=method, seed=seed, train_rows=len(rows))
    vocab = model.config.vocab_size
    measure = dict(prefill_shape=(8, args.prefill_tokens), decode_tokens=args.decode_tokens, repeats=args.repeats)
    if "base_latency" not in cache and not args.skip_latency:
        cache["base_latency"] = latency(model, vocab, **measure)
    if method == "base":
        row.update(trainable_parameters=0, adapter_bytes=0, metrics=task.evaluate(model, tokenizer, **evaluate))
        row["latency"] = _relative(cache.get("base_latency"), cache.get("base_latency"), cache.get("base_latency"))
        return row

    heads = None
    if method.startswith("lofit"):
        k = resolve_k(sum(heads_per_layer(model)), fraction=fraction)
        heads = heads_for(method, args, model, tokenizer, rows, task, seed, train_limit, k, cache, row)
        row["k"] = len(heads)

    if method in COMPUTED:
        if args.task != "truthfulqa":
            raise ValueError(f"{method} is built from TruthfulQA true/false answers; use --task truthfulqa.")
        start = time.perf_counter()
        with PeakMemory() as memory:
            k = resolve_k(sum(heads_per_layer(model)), fraction=fraction)
            peft_model = computed_adapter(method, model, tokenizer, args, k, train_limit, cache)
        row["train_s"], row["steps"] = time.perf_counter() - start, 0
        row["k"] = len(peft_model.peft_config["default"].heads)
    else:
        learning_rate = (
            args.lofit_lr if method.startswith("lofit") else args.lora_lr if method.startswith("lora") else args.ia3_lr
        )
        settings = train_settings(args, seed, Path(args.output) / "tmp", learning_rate)
        start = time.perf_counter()
        with PeakMemory() as memory:
            peft_model, trainer = train_adapter(
                model, tokenizer, rows, task.objective, peft_config_for(method, heads), settings
            )
        row["train_s"] = time.perf_counter() - start
        row["steps"] = trainer.state.global_step
        row["step_s"] = row["train_s"] / max(1, row["steps"])
    row["peak_memory_mb"] = memory.peak_mb
    row["trainable_parameters"] = peft_model.get_nb_trainable_parameters()[0]
    row["adapter_bytes"] = adapter_bytes(peft_model)
    row["metrics"] = task.evaluate(peft_model, tokenizer, desc=f"{method} seed {seed}", **evaluate)
    if not args.skip_latency:
        unmerged = latency(peft_model, vocab, **measure)
        peft_model.merge_adapter()
        merged = latency(peft_model, vocab, **measure)
        peft_model.unmerge_adapter()
        row["latency"] = _relative(cache["base_latency"], unmerged, merged)
    return row


def heads_for(method, args, model, tokenizer, rows, task, seed, train_limit, k, cache, row) -> list[list[int]]:
    """The K heads step 2 trains for a LoFiT method; localizations are kept in ``cache`` (and timed into ``row``)."""
    layout = heads_per_layer(model)
    if method == "lofit_random":
        return random_heads(layout, k, seed=seed)
    if method == "lofit_all_heads":
        return [[layer, head] for layer, count in enumerate(layout) for head in range(count)]
    if method == "lofit_other_heads":
        if not args.other_heads:
            raise ValueError("lofit_other_heads needs --other-heads: a head-selection JSON localized on another task.")
        selection = HeadSelection.load(args.other_heads)
        selection.check_fits(layout, args.other_heads)
        return selection.top(k)
    if method == "lofit_iti_heads":
        return iti_probe_data(model, tokenizer, args, train_limit, cache)[0].top(k)
    key = "file" if args.head_selection else (seed, train_limit)
    if key not in cache:
        if args.head_selection:
            cache[key] = (HeadSelection.load(args.head_selection), None, None)
        else:
            settings = train_settings(args, seed, Path(args.output) / "tmp", args.localize_lr)
            settings.epochs, settings.l1_lambda = args.localize_epochs, args.l1
            start = time.perf_counter()
            with PeakMemory() as memory:
                selection = localize(model, tokenizer, rows, task.objective, settings)
            cache[key] = (selection, time.perf_counter() - start, memory.peak_mb)
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
    train = load_truthfulqa("train", fold=args.fold, data_dir=args.data_dir)[:limit]
    val = load_truthfulqa("val", fold=args.fold, data_dir=args.data_dir)[:limit]
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
    train = load_truthfulqa("train", fold=args.fold, data_dir=args.data_dir)[:limit]
    true_texts = [f"Q: {q.question} A: {q.best_answer}" for q in train]
    false_texts = [f"Q: {q.question} A: {q.incorrect[0]}" for q in train]
    vectors = baselines.reading_vectors(
        baselines.collect_hidden_states(model, tokenizer, true_texts),
        baselines.collect_hidden_states(model, tokenizer, false_texts),
    )
    layers = args.repe_layers or list(range(len(vectors) // 3, 2 * len(vectors) // 3))
    return baselines.repe_adapter(model, {layer: vectors[layer] for layer in layers}, args.repe_coefficient)


def _relative(base, unmerged, merged) -> Optional[dict]:
    if base is None:
        return None
    return {
        "base": base,
        "unmerged": unmerged,
        "merged": merged,
        "unmerged_vs_base": {k: unmerged[k] / base[k] for k in base},
        "merged_vs_base": {k: merged[k] / base[k] for k in base},
    }


# ----------------------------------------------------------------------------------------------------- report
def summarize(rows: list[dict], metrics: tuple[str, ...]) -> list[dict]:
    """Mean and spread (population std) over seeds for each (method, train_rows, k)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["train_rows"], row["k"]), []).append(row)
    summary = []
    for (method, train_rows, k), members in groups.items():
        entry = {
            "method": method,
            "train_rows": train_rows,
            "k": k,
            "seeds": [m["seed"] for m in members],
            "trainable_parameters": members[0]["trainable_parameters"],
            "adapter_bytes": members[0]["adapter_bytes"],
        }
        for name in metrics:
            values = [m["metrics"][name] for m in members]
            entry[name] = statistics.mean(values)
            entry[f"{name}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        for name in ("localize_s", "train_s", "step_s", "peak_memory_mb"):
            values = [m[name] for m in members if m[name] is not None]
            entry[name] = statistics.mean(values) if values else None
        latencies = [m["latency"] for m in members if m["latency"]]
        if latencies:
            for which in ("unmerged_vs_base", "merged_vs_base"):
                for key in ("prefill_s", "decode_s"):
                    entry[f"{which}_{key}"] = statistics.mean(run[which][key] for run in latencies)
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict], metrics: tuple[str, ...]) -> str:
    def fmt(value, pattern="{:.3f}"):
        return "–" if value is None else pattern.format(value)

    header = [
        "method",
        "train rows",
        "K",
        "seeds",
        *metrics,
        "trained numbers",
        "adapter KB",
        "localize s",
        "train s",
        "s / step",
        "peak MB",
        "prefill x base (unmerged / merged)",
        "decode x base (unmerged / merged)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in summary:
        cells = [e["method"], str(e["train_rows"]), fmt(e["k"], "{}"), str(len(e["seeds"]))]
        cells += [f"{e[m]:.3f} ± {e[m + '_std']:.3f}" for m in metrics]
        cells += [
            f"{e['trainable_parameters']:,}",
            fmt(e["adapter_bytes"] / 1024, "{:.1f}"),
            fmt(e["localize_s"], "{:.0f}"),
            fmt(e["train_s"], "{:.0f}"),
            fmt(e["step_s"], "{:.2f}"),
            fmt(e["peak_memory_mb"], "{:.0f}"),
        ]
        for key in ("prefill_s", "decode_s"):
            unmerged, merged = e.get(f"unmerged_vs_base_{key}"), e.get(f"merged_vs_base_{key}")
            cells.append(f"{fmt(unmerged)} / {fmt(merged)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_curves(summary: list[dict], field: str, metric: str) -> dict[str, list[tuple]]:
    """Per method, the ``(x, mean, std)`` points of a sweep over ``field`` ("train_rows" or "k") with the other
    field held at the value that has the most points; methods with fewer than 2 points are left out."""
    other = "k" if field == "train_rows" else "train_rows"
    curves = {}
    for method in sorted({e["method"] for e in summary}):
        groups: dict = {}
        for e in summary:
            if e["method"] == method and e[field]:
                groups.setdefault(e[other], []).append((e[field], e[metric], e[f"{metric}_std"]))
        points = max(groups.values(), key=len, default=[])
        if len(points) >= 2:
            curves[method] = sorted(points)
    return curves


def plot(summary: list[dict], metric: str, output: Path) -> list[str]:
    """Metric vs trained numbers (all runs); metric vs training rows and vs K (a line per method) where sweeps ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axes = plt.subplots(figsize=(6, 4))
    for e in summary:
        if e["trainable_parameters"]:
            axes.errorbar(e["trainable_parameters"], e[metric], yerr=e[f"{metric}_std"], fmt="o", capsize=3)
            axes.annotate(
                f"{e['method']} ({e['train_rows']}, K={e['k']})", (e["trainable_parameters"], e[metric]), fontsize=7
            )
        else:
            axes.axhline(e[metric], color="grey", linestyle="--", label="base")
    axes.set_xscale("log")
    axes.set_xlabel("trained numbers (log)")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} against adapter size")
    figure.tight_layout()
    figure.savefig(output / f"{metric}_vs_parameters.png", dpi=100)
    plt.close(figure)
    written.append(f"{metric}_vs_parameters.png")
    for field, name, label in (("train_rows", "data", "training rows"), ("k", "k", "K (heads trained)")):
        curves = sweep_curves(summary, field, metric)
        if not curves:
            continue
        figure, axes = plt.subplots(figsize=(5.5, 3.8))
        for method, points in curves.items():
            xs, ys, errors = zip(*points)
            axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        base = [e[metric] for e in summary if e["method"] == "base"]
        if base:
            axes.axhline(base[0], color="grey", linestyle="--", label="base")
        axes.set_xscale("log", base=2)
        axes.set_xlabel(f"{label} (log)")
        axes.set_ylabel(metric)
        axes.set_title(f"{metric} against {'training data' if name == 'data' else 'K'}")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(output / f"{metric}_vs_{name}.png", dpi=100)
        plt.close(figure)
        written.append(f"{metric}_vs_{name}.png")
    return written


# ------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="truthfulqa", choices=["truthfulqa", "mquake", "clutrr"])
    parser.add_argument("--model", default=None, help="HF model id or folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--extra-seeds", nargs="*", type=int, default=[], help="more seeds for --extra-seed-methods")
    parser.add_argument(
        "--extra-seed-methods", nargs="*", default=["lofit", "lofit_random", "lora_r8"], choices=METHODS
    )
    parser.add_argument(
        "--head-selection",
        default=None,
        help="reuse a head-selection JSON (e.g. from `lofit run`) instead of localizing per seed",
    )
    parser.add_argument(
        "--other-heads",
        default=None,
        help="lofit_other_heads: head-selection JSON localized on another task (e.g. MQuAKE heads)",
    )
    parser.add_argument("--fraction", type=float, default=0.03, help="K as a share of all heads (default 0.03)")
    parser.add_argument("--train-limit", type=int, default=None, help="training rows (default: all)")
    parser.add_argument("--eval-limit", type=int, default=None, help="test examples (default: all)")
    parser.add_argument("--epochs", type=float, default=5)
    parser.add_argument("--localize-epochs", type=float, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--l1", type=float, default=5e-4)
    parser.add_argument("--localize-lr", type=float, default=5e-3)
    parser.add_argument("--lofit-lr", type=float, default=1e-2)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--ia3-lr", type=float, default=5e-3)
    parser.add_argument("--iti-alpha", type=float, default=15.0, help="ITI offset strength (ITI: 15 with K=48 on 7B)")
    parser.add_argument("--repe-coefficient", type=float, default=4.0, help="RepE: c in c * r_l")
    parser.add_argument("--repe-layers", nargs="*", type=int, default=None, help="RepE layers (default: middle third)")
    parser.add_argument(
        "--sweep-data", nargs="*", type=int, default=[], help="training-set sizes (0 = all) for lofit and lora_r8"
    )
    parser.add_argument("--sweep-k", nargs="*", type=float, default=[], help="fractions of heads for lofit")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--prefill-tokens", type=int, default=256, help="latency: prefill of 8 x N tokens (default 256)"
    )
    parser.add_argument("--decode-tokens", type=int, default=64, help="latency: greedy tokens decoded (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="latency: timed repeats after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--eval-speed-questions",
        type=int,
        default=12,
        help="TruthfulQA questions for the prefix-cache speed check (0 to skip)",
    )
    parser.add_argument("--eval-speed-only", action="store_true", help="run only the prefix-cache speed check")
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="only inference latency of untrained adapters of --methods, round-robin over --repeats",
    )
    parser.add_argument(
        "--train-speed-only",
        action="store_true",
        help="only seconds per epoch of LoFiT step 1, LoRA r8 and step 2 (plain / cached), round-robin",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="only merge the rows of earlier results.json files (same task) into one table, "
        "written to --output/combined.md",
    )
    parser.add_argument("--output", default="benchmarks/results")
    return parser


def combine(files: list[str], metrics: tuple[str, ...], output: Path) -> str:
    """One table (and the plots) from the rows of several runs, e.g. a headline run and an ablation run with the same
    settings."""
    rows, commands = [], []
    for file in files:
        results = json.loads(Path(file).read_text())
        rows += [row for row in results["rows"] if row["metrics"]]
        commands.append(f"- `{results['command']}` ({results['date']})")
    summary = summarize(rows, metrics)
    table = markdown_table(summary, metrics)
    for metric in metrics[:2]:
        plot(summary, metric, output)
    atomic_write_text(output / "combined.md", "Rows from:\n" + "\n".join(commands) + f"\n\n{table}\n")
    return table


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    task = get_task(args.task)
    if args.combine:
        table = combine(args.combine, task.metrics, output)
        print(table)
        return {"combined": table}
    if args.latency_only:
        result = interleaved_latency(args, args.methods)
        atomic_write_json(output / "latency.json", result)
        for key, value in result.items():
            print(
                f"{key:>16}: prefill {value['prefill_s']:.3f}s ({value['prefill_s_vs_base']:.3f}x), "
                f"decode {value['decode_s']:.3f}s ({value['decode_s_vs_base']:.3f}x)"
            )
        return {"latency": result}
    if args.train_speed_only:
        result = training_speed(args)
        atomic_write_json(output / "train_speed.json", result)
        for variant, value in result["variants"].items():
            print(
                f"{variant:>20}: {value['epoch_s']:.1f} s/epoch ({value['epoch_s_vs_lora_r8']:.2f}x LoRA r8), after the "
                f"first epoch {value['later_epoch_s']:.1f} s ({value['later_epoch_s_vs_lora_r8']:.2f}x), peak "
                f"{value['peak_memory_mb']:.0f} MB ({value['peak_memory_mb_vs_lora_r8']:.2f}x), kept for backward "
                f"{value['saved_activations_mb']:.0f} MB ({value['saved_activations_mb_vs_lora_r8']:.2f}x)"
            )
        return {"train_speed": result}
    eval_speed = None
    if args.task == "truthfulqa" and args.eval_speed_questions:
        model, tokenizer = load_model_and_tokenizer(args.model)
        eval_speed = eval_cache_speedup(model, tokenizer, args, args.eval_speed_questions)
        atomic_write_json(output / "eval_speed.json", eval_speed)
        print(
            f"prefix cache: {eval_speed['speedup']:.1f}x faster, max score difference "
            f"{eval_speed['max_score_difference']:.2e}"
        )
        if args.eval_speed_only:
            return {"eval_speed": eval_speed}
    runs = [(m, s, args.train_limit, args.fraction) for m in args.methods for s in args.seeds]
    runs += [
        (m, s, args.train_limit, args.fraction)
        for m in args.extra_seed_methods
        if m in args.methods
        for s in args.extra_seeds
    ]
    runs += [(m, args.seeds[0], size or None, args.fraction) for size in args.sweep_data for m in ("lofit", "lora_r8")]
    runs += [("lofit", args.seeds[0], args.train_limit, f) for f in args.sweep_k]
    runs = list(dict.fromkeys(runs))  # a sweep point equal to a headline run is run once
    cache: dict = {}
    rows = []
    started = time.perf_counter()
    for method, seed, limit, fraction in runs:
        print(f"\n=== {method} seed={seed} train_rows={limit or 'all'} fraction={fraction} ===", flush=True)
        rows.append(run_method(args, method, seed, limit, fraction, cache))
        partial = {"rows": rows}
        atomic_write_json(output / "results.partial.json", partial)
    summary = summarize(rows, task.metrics)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/compare.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "settings": {k: v for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - started,
        "eval_prefix_cache": eval_speed,
        "rows": rows,
        "summary": summary,
    }
    atomic_write_json(output / "results.json", results)
    table = markdown_table(summary, task.metrics)
    plots = plot(summary, task.metrics[0], output) + (
        plot(summary, task.metrics[1], output) if len(task.metrics) > 1 else []
    )
    atomic_write_text(
        output / "results.md", f"{results['date']} · {results['machine']}\n\n`{results['command']}`\n\n{table}\n"
    )
    (output / "results.partial.json").unlink(missing_ok=True)
    print("\n" + table)
    print(f"\nWritten: {output}/results.json, results.md, {', '.join(plots)}")
    return results


if __name__ == "__main__":
    main()
