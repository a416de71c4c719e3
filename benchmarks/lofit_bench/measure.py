"""What the benchmark measures besides the task metrics: peak memory, activations kept for backward, epoch times,
inference latency (``torch.utils.benchmark``, which synchronizes accelerators) and adapter file size."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils import benchmark
from transformers import TrainerCallback

from peft_lofit.checkpoint import save_adapter


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


class EpochTimer(TrainerCallback):
    """Wall time of each training epoch (the trainer's set-up, e.g. DPO's reference pass, is not in it)."""

    def __init__(self):
        self.epoch_s: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_s.append(time.perf_counter() - self._start)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return statistics.median(timer.timeit(1).median for _ in range(repeats))


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


def adapter_bytes(peft_model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(peft_model, folder)
        return (Path(folder) / "adapter_model.safetensors").stat().st_size


def relative_latency(base, unmerged, merged) -> Optional[dict]:
    """The three latencies and the adapted ones as ratios to the base model's (None without a base measurement)."""
    if base is None:
        return None
    return {
        "base": base,
        "unmerged": unmerged,
        "merged": merged,
        "unmerged_vs_base": {k: unmerged[k] / base[k] for k in base},
        "merged_vs_base": {k: merged[k] / base[k] for k in base},
    }
