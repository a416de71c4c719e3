"""``lofit``: the LoFiT pipeline on the command line.

    lofit run        localize, train, evaluate base and LoFiT, save adapter + heads + metrics
    lofit localize   step 1 only: score every head, write a head-selection JSON and heatmap
    lofit train      step 2 only: train offsets on heads from a selection (or random heads)
    lofit eval       evaluate a model, with or without an adapter
    lofit export     merge an adapter into the base model and save a plain transformers checkpoint
    lofit push       upload an adapter folder to the Hugging Face Hub with a model card

Expected errors (bad input, missing files) are reported as one line (``lofit: error: ...``) with exit status 2;
``lofit --debug ...`` shows their traceback. Anything else is a bug and shows its traceback. ``localize``, ``train``,
``run`` and ``eval`` also run under ``torchrun`` / ``accelerate launch`` (DDP): every process trains, the main
process writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..distributed import finish, is_main_process
from ..extras import MissingExtraError
from . import arguments
from .arguments import DEFAULTS, positive_int, settings_from


def say(message: str) -> None:
    """Print once: in the main process only when launched with torchrun / accelerate launch."""
    if is_main_process():
        print(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,localize,train,eval,export,push}")
    _run_parser(commands)
    _localize_parser(commands)
    _train_parser(commands)
    _eval_parser(commands)
    _export_parser(commands)
    _push_parser(commands)
    return parser


def _run_parser(commands) -> None:
    run = commands.add_parser("run", help="the whole pipeline", description="Localize, train, evaluate and save.")
    arguments.common(run)
    arguments.head_count(run)
    arguments.step(run, "localize-", "localize")
    arguments.step(run, "", "train")
    arguments.both_steps(run)
    arguments.setting(run, "--both-vectors", "train_both_vectors", action="store_true")
    arguments.setting(run, "--heads", "heads")
    arguments.run_options(run)
    run.add_argument("--output", default=DEFAULTS.output_dir, help=f"output folder (default: {DEFAULTS.output_dir})")
    run.add_argument(
        "--quick", action="store_true", help="smoke run: 32 training rows, 24 eval examples, 1 epoch each"
    )


def _localize_parser(commands) -> None:
    loc = commands.add_parser("localize", help="step 1: score every head", description="Step 1 of LoFiT.")
    arguments.common(loc)
    arguments.step(loc, "", "localize")
    arguments.both_steps(loc)
    loc.add_argument("--output", default="lofit_runs/heads.json", help="head-selection JSON (a PNG is written beside)")
    loc.add_argument("--top", type=positive_int, default=8, help="heads outlined in the heatmap (default: 8)")


def _train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="step 2: train offsets on selected heads", description="Step 2 of LoFiT."
    )
    arguments.common(train)
    arguments.head_count(train)
    arguments.step(train, "", "train")
    arguments.both_steps(train)
    arguments.setting(train, "--both-vectors", "train_both_vectors", action="store_true")
    arguments.setting(
        train, "--heads", "heads", required=True, help_text="head-selection JSON from `lofit localize`, or 'random'"
    )
    train.add_argument("--output", default="lofit_runs/adapter", help="adapter folder (default: lofit_runs/adapter)")


def _eval_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a model", description="Evaluate a model (and adapter).")
    arguments.common(evaluate)
    evaluate.add_argument("--adapter", default=None, help="LoFiT adapter folder to apply")
    evaluate.add_argument("--split", default="test", help="split (default: test)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="only the first N examples")
    arguments.setting(evaluate, "--batch-size", "eval_batch_size", type=positive_int)
    evaluate.add_argument("--output", default=None, help="also write the metrics to this JSON file")


def _export_parser(commands) -> None:
    export = commands.add_parser(
        "export",
        help="write a merged plain transformers checkpoint",
        description="Merge an adapter and save the model.",
    )
    arguments.setting(export, "--model", "model")
    export.add_argument("--adapter", required=True, help="LoFiT adapter folder")
    export.add_argument("--merged", required=True, help="output folder for the merged checkpoint")
    export.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the merged checkpoint (default: the base checkpoint's own; merging runs on the CPU)",
    )


def _push_parser(commands) -> None:
    push = commands.add_parser("push", help="upload an adapter to the Hub", description="Upload an adapter folder.")
    push.add_argument("folder", help="adapter folder (e.g. lofit_runs/run/adapter)")
    push.add_argument("--repo-id", required=True, help="Hub repository, e.g. your-name/smollm2-lofit-truthfulqa")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: the one from `hf auth login`)")


def command_run(args) -> None:
    from .pipeline import results_table, run_pipeline

    settings = settings_from(args, args.output)
    if args.quick:
        settings.make_quick()
    results = run_pipeline(settings)
    if results["search"]:
        best = results["search"]["best"]
        say(
            f"\nChosen on val ({results['search']['strategy']}, {results['search']['metric']} {best['score']:.4f}): "
            f"lambda {best['l1']:g}, K {best['k']}, lr {best['learning_rate']:g}, {best['epochs']:g} epochs; "
            f"trials in {Path(results['settings']['output_dir']) / 'search' / 'trials.md'}"
        )
    say(f"\n{results_table(results)}\n\nTimes (s): {results['timings_s']}")
    say(f"Adapter, heads and metrics written to {settings.output_dir}/")


def command_localize(args) -> None:
    from ..training.localize import localize
    from .default_model import load_model_and_tokenizer
    from .tasks import get_task

    output = Path(args.output)
    settings = settings_from(args, output.parent)
    task = get_task(settings.task)
    rows = settings.train_rows()
    model, tokenizer = load_model_and_tokenizer(settings.model)
    settings.localize.output_dir = str(output.parent / "checkpoints" / "localize")
    selection = localize(
        model, tokenizer, rows, task.objective, settings=settings.localize, metadata={"task": settings.task}
    )
    if is_main_process():
        selection.save(output)
        selection.heatmap(output.with_suffix(".png"), title=f"{settings.task}: LoFiT head scores", k=args.top)
    say(f"Top {args.top} heads: {selection.top(args.top)}")
    say(f"Scores written to {output} and {output.with_suffix('.png')}")


def command_train(args) -> None:
    from ..checkpoint import save_adapter
    from ..training.trainers import train_adapter
    from ..tuner import LoFiTConfig
    from .default_model import load_model_and_tokenizer
    from .pipeline import select_heads
    from .tasks import get_task

    settings = settings_from(args, args.output)
    if settings.heads == "learned":
        raise ValueError("lofit train needs --heads FILE.json (written by `lofit localize`) or --heads random.")
    task = get_task(settings.task)
    rows = settings.train_rows()
    model, tokenizer = load_model_and_tokenizer(settings.model)
    settings.train.output_dir = str(Path(settings.output_dir) / "checkpoints")
    heads, _ = select_heads(settings, model, tokenizer, rows, Path(settings.output_dir), {})
    config = LoFiTConfig(heads=heads, use_scaling=settings.train_both_vectors)
    peft_model, _ = train_adapter(model, tokenizer, rows, task.objective, config, settings.train)
    if is_main_process():
        save_adapter(peft_model, args.output)
    say(f"Adapter on {len(heads)} heads written to {args.output}")


def command_eval(args) -> None:
    from ..checkpoint import load_adapter, validate_adapter_folder
    from ..io import atomic_write_json
    from .default_model import load_model_and_tokenizer
    from .tasks import get_task

    settings = settings_from(args, DEFAULTS.output_dir)
    if args.adapter:
        validate_adapter_folder(args.adapter)
    model, tokenizer = load_model_and_tokenizer(settings.model)
    if args.adapter:
        model = load_adapter(model, args.adapter).eval()
    metrics = get_task(settings.task).evaluate(
        model,
        tokenizer,
        split=args.split,
        data_dir=settings.data_dir,
        fold=settings.fold,
        limit=args.limit,
        batch_size=settings.eval_batch_size,
    )
    say(
        " ".join(
            f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}" for key, value in metrics.items()
        )
    )
    if args.output and is_main_process():
        atomic_write_json(Path(args.output), metrics)


def command_export(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoint import load_adapter, validate_adapter_folder
    from ..io import replace_directory
    from .default_model import resolve_model_path

    merged_folder = Path(args.merged)
    if merged_folder.exists() and not merged_folder.is_dir():
        raise ValueError(f"--merged {merged_folder} is a file; name a folder for the merged checkpoint.")
    validate_adapter_folder(args.adapter)
    model_name = settings_from(args, DEFAULTS.output_dir).model
    sources = {"--adapter": Path(args.adapter), "--model": Path(resolve_model_path(model_name))}
    for flag, source in sources.items():
        if source.exists() and source.resolve().is_relative_to(merged_folder.resolve()):
            what = "is" if source.resolve() == merged_folder.resolve() else "holds"
            raise ValueError(
                f"--merged {merged_folder} {what} the {flag} folder, which it would replace; name another."
            )
    if merged_folder.is_dir() and any(merged_folder.iterdir()) and not (merged_folder / "config.json").is_file():
        raise ValueError(
            f"--merged {merged_folder} is a folder with other files in it, which the merged checkpoint would replace; "
            "name a new or empty folder (or a previous merged checkpoint)."
        )
    base = resolve_model_path(model_name)
    # the base as its checkpoint has it (dtype, tokenizer without the pad token training adds): whatever machine
    # exports, the merged folder differs from the base only by the merge
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base, dtype=dtype), AutoTokenizer.from_pretrained(base)
    merged = load_adapter(model, args.adapter).merge_and_unload(safe_merge=True)
    with replace_directory(merged_folder) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(
        f"Merged checkpoint written to {args.merged}; load it with AutoModelForCausalLM.from_pretrained (no plugin)."
    )


def command_push(args) -> None:
    from .publish import push_adapter

    commit = push_adapter(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"Uploaded {args.folder} to {getattr(commit, 'commit_url', args.repo_id)}")


COMMANDS = {
    "run": command_run,
    "localize": command_localize,
    "train": command_train,
    "eval": command_eval,
    "export": command_export,
    "push": command_push,
}


# What bad input, a missing file or extra, an unreachable model or a diverged run raise: reported in one line. Anything
# else is a bug and keeps its traceback.
EXPECTED_ERRORS = (MissingExtraError, ValueError, OSError, FloatingPointError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        COMMANDS[args.command](args)
        finish()
    except EXPECTED_ERRORS as error:
        if args.debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"lofit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lofit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
