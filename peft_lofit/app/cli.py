"""``lofit``: the LoFiT pipeline on the command line.

    lofit run        localize, train, evaluate base and LoFiT, save adapter + heads + metrics
    lofit localize   step 1 only: score every head, write a head-selection JSON and heatmap
    lofit train      step 2 only: train offsets on heads from a selection (or random heads)
    lofit eval       evaluate a model, with or without an adapter
    lofit export     merge an adapter into the base model and save a plain transformers checkpoint
    lofit push       upload an adapter folder to the Hugging Face Hub with a model card

Expected errors (bad input, missing files) are reported as one line (``lofit: error: ...``) with exit status 2;
``lofit --debug ...`` shows their traceback. Anything else is a bug and shows its traceback. ``localize``, ``train``, ``run`` and
``eval`` also run under ``torchrun`` / ``accelerate launch`` (DDP): every process trains, the main process writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..distributed import finish, is_main_process
from ..extras import MissingExtraError
from .tasks import TASKS

DEFAULT_MODEL_HELP = "HF model id or local folder (default: the embedded SmolLM2-135M-Instruct)"


def say(message: str) -> None:
    """Print once: in the main process only when launched with torchrun / accelerate launch."""
    if is_main_process():
        print(message)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=sorted(TASKS), default="truthfulqa", help="task (default: truthfulqa)")
    parser.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    parser.add_argument(
        "--data-dir", default=None, help="data folder (default: $LOFIT_DATA_DIR, else the data shipped in the package)"
    )
    parser.add_argument("--fold", type=int, default=0, help="TruthfulQA fold (default: 0)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch")


def _train_arguments(parser, prefix: str, lr: float, epochs: float, what: str, l1: float | None = None) -> None:
    parser.add_argument(
        f"--{prefix}lr", type=_positive_float, default=lr, help=f"{what} learning rate (default: {lr})"
    )
    parser.add_argument(
        f"--{prefix}epochs", type=_positive_float, default=epochs, help=f"{what} epochs (default: {epochs})"
    )
    if l1 is not None:
        parser.add_argument(
            "--l1", type=_non_negative_float, default=l1, help=f"L1 weight lambda on A (default: {l1})"
        )


def _selection_arguments(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--k", type=_positive_int, default=None, help="number of heads to train")
    group.add_argument("--fraction", type=_fraction, default=0.03, help="share of all heads to train (default: 0.03)")


def _run_options(parser, evaluates: bool = True) -> None:
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="training batch size (default: 8)")
    parser.add_argument("--beta", type=_positive_float, default=0.5, help="DPO beta (default: 0.5)")
    parser.add_argument("--train-limit", type=_positive_int, default=None, help="use only the first N training rows")
    parser.add_argument("--both-vectors", action="store_true", help="step 2 trains A and v (default: v only)")
    if evaluates:
        parser.add_argument(
            "--eval-limit", type=_positive_int, default=None, help="evaluate only the first N examples"
        )
        parser.add_argument("--eval-split", default="test", help="split to evaluate (default: test)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lofit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,localize,train,eval,export,push}")

    run = commands.add_parser("run", help="the whole pipeline", description="Localize, train, evaluate and save.")
    _common(run)
    _selection_arguments(run)
    _train_arguments(run, "localize-", 5e-3, 5, "localization", l1=5e-4)
    _train_arguments(run, "", 1e-2, 5, "offset training")
    _run_options(run)
    run.add_argument("--heads", default="learned", help="'learned' (default), 'random', or a head-selection JSON")
    run.add_argument(
        "--l1-search",
        type=_positive_float,
        nargs="+",
        default=None,
        metavar="L1",
        help="choose the L1 weight among these on the validation split (one localize + train + eval each), then "
        "train and evaluate with the best; trials go to OUTPUT/l1_search/",
    )
    run.add_argument("--output", default="lofit_runs/run", help="output folder (default: lofit_runs/run)")
    run.add_argument(
        "--base-model-id",
        default=None,
        help="the model's Hub id for the model card, when --model is a local folder that does not say it",
    )
    run.add_argument(
        "--quick", action="store_true", help="smoke run: 32 training rows, 24 eval examples, 1 epoch each"
    )
    run.add_argument(
        "--no-metrics-cache",
        action="store_true",
        help="evaluate the base model even when its metrics for this model, data and settings are cached",
    )
    search_axes = (
        ("l1", _positive_float, "L1 weights of step 1 (one localization each)"),
        ("k", _positive_int, "numbers of heads (each lambda's ranking reused)"),
        ("lr", _positive_float, "step-2 learning rates"),
        ("epochs", _positive_float, "step-2 epochs"),
    )
    for flag, kind, what in search_axes:
        run.add_argument(
            f"--search-{flag}",
            type=kind,
            nargs="+",
            default=None,
            metavar=flag.upper(),
            help=f"choose among these {what} on the validation split (trials in OUTPUT/search/)",
        )
    run.add_argument(
        "--search-max-trials",
        type=_positive_int,
        default=None,
        help="trial budget: a seeded random sample of the grid when it is larger",
    )

    loc = commands.add_parser("localize", help="step 1: score every head", description="Step 1 of LoFiT.")
    _common(loc)
    _train_arguments(loc, "", 5e-3, 5, "localization", l1=5e-4)
    loc.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default: 8)")
    loc.add_argument("--beta", type=_positive_float, default=0.5, help="DPO beta (default: 0.5)")
    loc.add_argument("--train-limit", type=_positive_int, default=None, help="use only the first N training rows")
    loc.add_argument("--output", default="lofit_runs/heads.json", help="head-selection JSON (a PNG is written beside)")
    loc.add_argument("--top", type=_positive_int, default=8, help="heads outlined in the heatmap (default: 8)")

    train = commands.add_parser(
        "train", help="step 2: train offsets on selected heads", description="Step 2 of LoFiT."
    )
    _common(train)
    _selection_arguments(train)
    _train_arguments(train, "", 1e-2, 5, "offset training")
    _run_options(train, evaluates=False)
    train.add_argument("--heads", required=True, help="head-selection JSON from `lofit localize`, or 'random'")
    train.add_argument("--output", default="lofit_runs/adapter", help="adapter folder (default: lofit_runs/adapter)")

    evaluate = commands.add_parser("eval", help="evaluate a model", description="Evaluate a model (and adapter).")
    _common(evaluate)
    evaluate.add_argument("--adapter", default=None, help="LoFiT adapter folder to apply")
    evaluate.add_argument("--split", default="test", help="split (default: test)")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="only the first N examples")
    evaluate.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        help="generation batch size for MQuAKE/CLUTRR (default: 16); TruthfulQA scores each question's answers as one batch",
    )
    evaluate.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    export = commands.add_parser(
        "export",
        help="write a merged plain transformers checkpoint",
        description="Merge an adapter and save the model.",
    )
    export.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    export.add_argument("--adapter", required=True, help="LoFiT adapter folder")
    export.add_argument("--merged", required=True, help="output folder for the merged checkpoint")
    export.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the merged checkpoint (default: the base checkpoint's own; merging runs on the CPU)",
    )

    push = commands.add_parser("push", help="upload an adapter to the Hub", description="Upload an adapter folder.")
    push.add_argument("folder", help="adapter folder (e.g. lofit_runs/run/adapter)")
    push.add_argument("--repo-id", required=True, help="Hub repository, e.g. your-name/smollm2-lofit-truthfulqa")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="Hub token (default: the one from `hf auth login`)")
    return parser


def _search_space(args):
    from .search import SearchSpace

    axes = {"l1": "search_l1", "k": "search_k", "learning_rate": "search_lr", "epochs": "search_epochs"}
    values = {field: getattr(args, name, None) for field, name in axes.items()}
    if not any(values.values()):
        return None
    return SearchSpace(
        **{field: value or [] for field, value in values.items()}, max_trials=getattr(args, "search_max_trials", None)
    )


def _settings(args):
    from ..training.trainers import TrainSettings
    from .pipeline import PipelineSettings

    localize = TrainSettings(
        learning_rate=getattr(args, "localize_lr", args.lr),
        epochs=getattr(args, "localize_epochs", args.epochs),
        l1_lambda=getattr(args, "l1", 5e-4),
        batch_size=args.batch_size,
        dpo_beta=args.beta,
        seed=args.seed,
    )
    train = TrainSettings(
        learning_rate=args.lr, epochs=args.epochs, batch_size=args.batch_size, dpo_beta=args.beta, seed=args.seed
    )
    return PipelineSettings(
        task=args.task,
        model=args.model,
        base_model_id=getattr(args, "base_model_id", None),
        cache_base_metrics=not getattr(args, "no_metrics_cache", False),
        data_dir=args.data_dir,
        fold=args.fold,
        k=getattr(args, "k", None),
        fraction=getattr(args, "fraction", 0.03),
        heads=getattr(args, "heads", "learned"),
        l1_search=getattr(args, "l1_search", None),
        search=_search_space(args),
        localize=localize,
        train=train,
        train_both_vectors=getattr(args, "both_vectors", False),
        train_limit=args.train_limit,
        eval_split=getattr(args, "eval_split", "test"),
        eval_limit=getattr(args, "eval_limit", None),
        output_dir=str(Path(args.output).parent if args.command == "localize" else args.output),
        seed=args.seed,
    )


def command_run(args) -> None:
    from .pipeline import results_table, run_pipeline
    from .publish import describe_l1_search

    settings = _settings(args)
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
    if results["l1_search"]:
        say(f"\nL1 weight chosen by {describe_l1_search(results['l1_search'])}: {results['l1_search']['best']:g}")
    say(f"\n{results_table(results)}\n\nTimes (s): {results['timings_s']}")
    say(f"Adapter, heads and metrics written to {settings.output_dir}/")


def command_localize(args) -> None:
    from ..training.localize import localize
    from .default_model import load_model_and_tokenizer
    from .tasks import get_task

    settings = _settings(args)
    task = get_task(args.task)
    rows = task.training_rows("train", data_dir=args.data_dir, fold=args.fold, limit=args.train_limit)
    model, tokenizer = load_model_and_tokenizer(args.model)
    settings.localize.output_dir = str(Path(settings.output_dir) / "checkpoints" / "localize")
    selection = localize(
        model, tokenizer, rows, task.objective, settings=settings.localize, metadata={"task": args.task}
    )
    output = Path(args.output)
    if is_main_process():
        selection.save(output)
        selection.heatmap(output.with_suffix(".png"), title=f"{args.task}: LoFiT head scores", k=args.top)
    say(f"Top {args.top} heads: {selection.top(args.top)}")
    say(f"Scores written to {output} and {output.with_suffix('.png')}")


def command_train(args) -> None:
    from ..checkpoint import save_adapter
    from ..training.trainers import train_adapter
    from ..tuner import LoFiTConfig
    from .default_model import load_model_and_tokenizer
    from .pipeline import select_heads
    from .tasks import get_task

    if args.heads == "learned":
        raise ValueError("lofit train needs --heads FILE.json (written by `lofit localize`) or --heads random.")
    settings = _settings(args)
    task = get_task(args.task)
    rows = task.training_rows("train", data_dir=args.data_dir, fold=args.fold, limit=args.train_limit)
    model, tokenizer = load_model_and_tokenizer(args.model)
    settings.train.output_dir = str(Path(settings.output_dir) / "checkpoints")
    heads, _ = select_heads(settings, model, tokenizer, rows, Path(settings.output_dir), {})
    config = LoFiTConfig(heads=heads, use_scaling=args.both_vectors)
    peft_model, _ = train_adapter(model, tokenizer, rows, task.objective, config, settings.train)
    if is_main_process():
        save_adapter(peft_model, args.output)
    say(f"Adapter on {len(heads)} heads written to {args.output}")


def command_eval(args) -> None:
    from ..checkpoint import load_adapter, validate_adapter_folder
    from ..io import atomic_write_json
    from .default_model import load_model_and_tokenizer
    from .tasks import get_task

    if args.adapter:
        validate_adapter_folder(args.adapter)
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.adapter:
        model = load_adapter(model, args.adapter).eval()
    metrics = get_task(args.task).evaluate(
        model,
        tokenizer,
        split=args.split,
        data_dir=args.data_dir,
        fold=args.fold,
        limit=args.limit,
        batch_size=args.batch_size,
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
    sources = {"--adapter": Path(args.adapter), "--model": Path(resolve_model_path(args.model))}
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
    base = resolve_model_path(args.model)
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
