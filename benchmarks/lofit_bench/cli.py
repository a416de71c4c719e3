"""LoFiT vs LoRA (and IA3, random heads, ITI, RepE, the base model) on the same task, data, seeds, trainer and
evaluation; and the speed and latency measurements. Subcommands (run from the repository root):

    python -m benchmarks.lofit_bench grid                      # SmolLM2-135M-Instruct, TruthfulQA fold 0, all methods
    python -m benchmarks.lofit_bench grid --methods lofit lora_r8 --seeds 1 2 3 --eval-limit 100
    python -m benchmarks.lofit_bench grid --sweep-data 16 32 64 128 0 --sweep-k 0.01 0.03 0.1 0.2
    python -m benchmarks.lofit_bench train-speed --head-selection heads.json  # seconds per epoch vs LoRA r8
    python -m benchmarks.lofit_bench latency --methods lofit lora_r8        # untrained adapters, round-robin
    python -m benchmarks.lofit_bench eval-speed                             # TruthfulQA prefix cache on / off
    python -m benchmarks.lofit_bench combine a/results.json b/results.json  # one table from several runs
    python -m benchmarks.lofit_bench thread-split --jobs 2 --train-limit 128 # one run vs two at once
    python -m benchmarks.lofit_bench headline --task truthfulqa --fold 0    # tuned methods x 3 seeds (resumes)
    python -m benchmarks.lofit_bench headline-report                        # tables + plot into the READMEs

Every command writes JSON (and the grid Markdown and PNG plots) to ``--output`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from peft_lofit.app.default_model import load_model_and_tokenizer
from peft_lofit.app.settings import PipelineSettings
from peft_lofit.app.tasks import TASKS, get_task
from peft_lofit.io import atomic_write_json

from .grid import run_grid
from .headline import HEADLINE_METHODS, Headline
from .headline_report import write_report
from .methods import METHODS
from .report import combine
from .speed import eval_cache_speedup, interleaved_latency, thread_split, training_speed

RUN = PipelineSettings()


def _data_and_methods(options) -> None:
    options.add_argument("--task", default="truthfulqa", choices=sorted(TASKS))
    options.add_argument("--model", default=None, help="HF model id or folder (default: SmolLM2-135M-Instruct)")
    options.add_argument("--data-dir", default=None)
    options.add_argument("--fold", type=int, default=0)
    options.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    options.add_argument("--seeds", nargs="+", type=int, default=[42])
    options.add_argument("--extra-seeds", nargs="*", type=int, default=[], help="more seeds for --extra-seed-methods")
    options.add_argument(
        "--extra-seed-methods", nargs="*", default=["lofit", "lofit_random", "lora_r8"], choices=list(METHODS)
    )
    options.add_argument(
        "--head-selection",
        default=None,
        help="reuse a head-selection JSON (e.g. from `lofit run`) instead of localizing per seed",
    )
    options.add_argument(
        "--other-heads",
        default=None,
        help="lofit_other_heads: head-selection JSON localized on another task (e.g. MQuAKE heads)",
    )
    options.add_argument(
        "--fraction", type=float, default=RUN.fraction, help=f"K as a share of all heads (default {RUN.fraction})"
    )


def _training(options) -> None:
    options.add_argument(
        "--train-limit", type=int, default=None, help="training rows (default: the task's size, CLUTRR 300; 0: all)"
    )
    options.add_argument("--eval-limit", type=int, default=None, help="test examples (default: all)")
    # the pipeline's defaults (the paper's recipe): one source for `lofit run` and the benchmark
    options.add_argument("--epochs", type=float, default=RUN.train.epochs)
    options.add_argument("--localize-epochs", type=float, default=RUN.localize.epochs)
    options.add_argument("--batch-size", type=int, default=RUN.train.batch_size)
    options.add_argument("--l1", type=float, default=RUN.localize.l1_lambda)
    options.add_argument("--localize-lr", type=float, default=RUN.localize.learning_rate)
    options.add_argument("--lofit-lr", type=float, default=RUN.train.learning_rate)
    options.add_argument("--lora-lr", type=float, default=5e-4)
    options.add_argument("--ia3-lr", type=float, default=5e-3)


def _baselines_and_sweeps(options) -> None:
    options.add_argument("--iti-alpha", type=float, default=15.0, help="ITI offset strength (ITI: 15 with K=48 on 7B)")
    options.add_argument("--repe-coefficient", type=float, default=4.0, help="RepE: c in c * r_l")
    options.add_argument(
        "--repe-layers", nargs="*", type=int, default=None, help="RepE layers (default: middle third)"
    )
    options.add_argument(
        "--sweep-data", nargs="*", type=int, default=[], help="training-set sizes (0: all rows) for lofit and lora_r8"
    )
    options.add_argument("--sweep-k", nargs="*", type=float, default=[], help="fractions of heads for lofit")


def _measurement(options) -> None:
    options.add_argument("--skip-latency", action="store_true")
    options.add_argument(
        "--prefill-tokens", type=int, default=256, help="latency: prefill of 8 x N tokens (default 256)"
    )
    options.add_argument("--decode-tokens", type=int, default=64, help="latency: greedy tokens decoded (default 64)")
    options.add_argument("--repeats", type=int, default=3, help="latency: timed repeats after one warm-up (default 3)")
    options.add_argument("--threads", type=int, default=None)
    options.add_argument(
        "--eval-speed-questions",
        type=int,
        default=12,
        help="TruthfulQA questions for the prefix-cache speed check (grid: 0 skips it)",
    )
    options.add_argument("--output", default="benchmarks/results")


def build_parser() -> argparse.ArgumentParser:
    """One set of options shared by every subcommand (each reads the ones it needs)."""
    options = argparse.ArgumentParser(add_help=False)
    for add in (_data_and_methods, _training, _baselines_and_sweeps, _measurement):
        add(options)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lofit_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("grid", parents=[options], help="train and evaluate --methods (and the sweeps)")
    commands.add_parser("latency", parents=[options], help="inference latency of untrained adapters, round-robin")
    commands.add_parser(
        "train-speed", parents=[options], help="seconds per epoch of step 1, LoRA r8 and step 2, round-robin"
    )
    commands.add_parser("eval-speed", parents=[options], help="TruthfulQA scoring with and without the prefix cache")
    split = commands.add_parser(
        "thread-split", parents=[options], help="LoRA r8 epochs: one run on every core vs --jobs runs at once"
    )
    split.add_argument("--jobs", type=int, default=2, help="runs at once, the cores shared out (default 2)")
    combined = commands.add_parser("combine", parents=[options], help="one table from earlier results.json files")
    combined.add_argument("files", nargs="+", metavar="RESULTS_JSON")
    _headline_options(
        commands.add_parser("headline", help="every method tuned on val, then trained with 3 seeds (headline.py)")
    )
    reported = commands.add_parser("headline-report", help="headline.json to tables and plot (headline_report.py)")
    reported.add_argument("--output", default="benchmarks/results", help="the folder holding headline.json")
    reported.add_argument("--readmes", nargs="*", default=[Path("README.md"), Path("benchmarks/README.md")], type=Path)
    return parser


def _headline_options(options) -> None:
    """The headline's own options: it runs a fixed protocol (headline.py), so the grid's method settings are not here."""
    options.add_argument("--task", default="truthfulqa", choices=sorted(TASKS))
    options.add_argument("--fold", type=int, default=0, help="TruthfulQA fold (other tasks have none)")
    options.add_argument("--model", default=None, help="HF model id or folder (default: SmolLM2-135M-Instruct)")
    options.add_argument("--data-dir", default=None)
    options.add_argument("--methods", nargs="+", default=list(HEADLINE_METHODS), choices=HEADLINE_METHODS)
    options.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="test seeds (tuning uses 42)")
    options.add_argument(
        "--train-limit", type=int, default=None, help="training rows (default: the task's size; 0: all)"
    )
    options.add_argument("--eval-limit", type=int, default=None, help="val and test examples (default: all)")
    options.add_argument("--epochs", type=float, default=RUN.train.epochs, help="epochs of every training")
    options.add_argument("--localize-epochs", type=float, default=RUN.localize.epochs)
    options.add_argument("--threads", type=int, default=None)
    options.add_argument("--output", default="benchmarks/results", help="headline.json and headline_tuning.json")
    options.add_argument("--work-dir", default="lofit_runs/headline", help="adapters and trial folders")


def print_latency(result: dict) -> None:
    for key, value in result.items():
        print(
            f"{key:>16}: prefill {value['prefill_s']:.3f}s ({value['prefill_s_vs_base']:.3f}x), "
            f"decode {value['decode_s']:.3f}s ({value['decode_s_vs_base']:.3f}x)"
        )


def print_train_speed(result: dict) -> None:
    for variant, value in result["variants"].items():
        print(
            f"{variant:>20}: {value['epoch_s']:.1f} s/epoch ({value['epoch_s_vs_lora_r8']:.2f}x LoRA r8), after the "
            f"first epoch {value['later_epoch_s']:.1f} s ({value['later_epoch_s_vs_lora_r8']:.2f}x), peak "
            f"{value['peak_memory_mb']:.0f} MB ({value['peak_memory_mb_vs_lora_r8']:.2f}x), kept for backward "
            f"{value['saved_activations_mb']:.0f} MB ({value['saved_activations_mb_vs_lora_r8']:.2f}x)"
        )


def eval_speed(args, output: Path) -> dict:
    model, tokenizer = load_model_and_tokenizer(args.model)
    result = eval_cache_speedup(model, tokenizer, args, args.eval_speed_questions)
    atomic_write_json(output / "eval_speed.json", result)
    print(f"prefix cache: {result['speedup']:.1f}x faster, max score difference {result['max_score_difference']:.2e}")
    return result


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.command == "headline-report":
        rows = json.loads((output / "headline.json").read_text(encoding="utf-8"))
        command = "python -m benchmarks.lofit_bench " + " ".join(argv if argv is not None else sys.argv[1:])
        tables = write_report(rows, output, args.readmes, command)
        print(tables)
        return {"headline_report": tables}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "combine":
        table = combine(args.files, get_task(args.task).metrics, output)
        print(table)
        return {"combined": table}
    if args.command == "latency":
        result = interleaved_latency(args, args.methods)
        atomic_write_json(output / "latency.json", result)
        print_latency(result)
        return {"latency": result}
    if args.command == "train-speed":
        result = training_speed(args)
        atomic_write_json(output / "train_speed.json", result)
        print_train_speed(result)
        return {"train_speed": result}
    if args.command == "thread-split":
        result = thread_split(args)
        atomic_write_json(output / "thread_split.json", result)
        print(f"{args.jobs} runs at once train {result['throughput_ratio']:.2f}x as much per hour as one: {result}")
        return {"thread_split": result}
    if args.command == "headline":
        return {"headline": Headline(args).run()}
    if args.command == "eval-speed":
        return {"eval_speed": eval_speed(args, output)}
    measured = eval_speed(args, output) if args.task == "truthfulqa" and args.eval_speed_questions else None
    return run_grid(args, output, argv, measured)
