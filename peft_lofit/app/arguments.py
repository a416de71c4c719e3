"""The ``lofit`` options, built from the settings dataclasses.

Each option that sets a hyperparameter names the field it sets (``"fold"``, ``"localize.learning_rate"``, or
``"steps.batch_size"`` for both steps); its default is that field's value in ``PipelineSettings()`` (the paper's
recipe) and its help the field's ``metadata["help"]``, so defaults and help texts are written once, in
``app/settings.py`` and ``training/settings.py``. ``settings_from(args)`` turns the parsed options back into a
``PipelineSettings`` through its constructor, so the same validation runs as for settings made in Python.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from ..training.settings import TrainSettings
from .search import SearchSpace
from .settings import PipelineSettings
from .tasks import TASKS

DEFAULTS = PipelineSettings()
PREFIX = "setting:"  # dest of an option that sets a field: "setting:" + the field's path
STEP_NAMES = {"localize": "step 1: ", "train": "step 2: ", "steps": "both steps: "}
SEARCH_AXES = {  # --search-FLAG -> (SearchSpace field, what it lists)
    "l1": ("l1", "L1 weights of step 1 (one localization each)"),
    "k": ("k", "numbers of heads (each lambda's ranking reused)"),
    "lr": ("learning_rate", "step-2 learning rates"),
    "epochs": ("epochs", "step-2 epochs"),
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _field_owner(path: str):
    """The default settings object holding the field at ``path``, and the field's name."""
    *owner, name = path.split(".")
    if owner == ["steps"] and getattr(DEFAULTS.localize, name) != getattr(DEFAULTS.train, name):
        raise ValueError(f"--{name} sets both steps, whose defaults differ; give each step its own option.")
    obj = DEFAULTS.train if owner == ["steps"] else DEFAULTS  # both steps share these defaults
    for part in owner if owner != ["steps"] else []:
        obj = getattr(obj, part)
    return obj, name


def setting(parser, flag: str, path: str, help_text: str | None = None, **kwargs) -> None:
    """Add ``flag``, which sets the field at ``path``; default and help from the field (``help_text`` replaces the
    field's text where the flag says it the other way round, as ``--no-metrics-cache``)."""
    owner, name = _field_owner(path)
    spec = next(item for item in fields(owner) if item.name == name)
    default = kwargs.pop("default", getattr(owner, name))
    text = STEP_NAMES.get(path.split(".")[0], "") + (help_text or spec.metadata["help"])
    if not (default is None or isinstance(default, bool) or kwargs.get("required")):
        text += f" (default: {default})"
    if not kwargs.get("action") and not kwargs.get("choices"):
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=PREFIX + path, default=default, help=text, **kwargs)


def common(parser) -> None:
    """Task, model, data and seed: the options of every training and evaluation command."""
    setting(parser, "--task", "task", choices=sorted(TASKS))
    setting(parser, "--model", "model")
    setting(parser, "--data-dir", "data_dir")
    setting(parser, "--fold", "fold", type=int)
    setting(parser, "--seed", "seed", type=int)
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")


def step(parser, prefix: str, which: str) -> None:
    """``--{prefix}lr`` and ``--{prefix}epochs`` of step ``which`` ("localize" or "train"), and ``--l1`` for step 1."""
    setting(parser, f"--{prefix}lr", f"{which}.learning_rate", type=positive_float)
    setting(parser, f"--{prefix}epochs", f"{which}.epochs", type=positive_float)
    if which == "localize":
        setting(parser, "--l1", "localize.l1_lambda", type=non_negative_float)


def both_steps(parser) -> None:
    setting(parser, "--batch-size", "steps.batch_size", type=positive_int)
    setting(parser, "--beta", "steps.dpo_beta", type=positive_float)
    setting(parser, "--train-limit", "train_limit", type=positive_int)


def head_count(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    setting(group, "--k", "k", type=positive_int)
    setting(group, "--fraction", "fraction", type=fraction)


def run_options(parser) -> None:
    """What only ``lofit run`` has: evaluation, the searches, the card's Hub id, the cache switch."""
    setting(parser, "--eval-limit", "eval_limit", type=positive_int)
    setting(parser, "--eval-split", "eval_split")
    setting(parser, "--base-model-id", "base_model_id")
    setting(
        parser,
        "--no-metrics-cache",
        "cache_base_metrics",
        action="store_false",
        help_text="evaluate the base model even when its metrics for this model, data and settings are cached",
    )
    for flag, (_, what) in SEARCH_AXES.items():
        parser.add_argument(
            f"--search-{flag}",
            *(["--l1-search"] if flag == "l1" else []),  # the older name of --search-l1
            type=positive_float if flag != "k" else positive_int,
            nargs="+",
            default=None,
            metavar=flag.upper(),
            help=f"choose among these {what} on the validation split (trials in OUTPUT/search/)",
        )
    parser.add_argument(
        "--search-max-trials",
        type=positive_int,
        default=None,
        help="trial budget: a seeded random sample of the grid when it is larger",
    )


def search_space(args) -> SearchSpace | None:
    """The ``--search-*`` options as a ``SearchSpace`` (None when no axis is given)."""
    values = {name: getattr(args, f"search_{flag}", None) for flag, (name, _) in SEARCH_AXES.items()}
    if not any(values.values()):
        return None
    return SearchSpace(**{name: value or [] for name, value in values.items()}, max_trials=args.search_max_trials)


def settings_from(args, output_dir: str | Path) -> PipelineSettings:
    """The ``PipelineSettings`` the parsed options describe; every field without an option keeps its default."""
    top, steps = {}, {"localize": {}, "train": {}}
    for key, value in vars(args).items():
        if not key.startswith(PREFIX):
            continue
        *owner, name = key[len(PREFIX) :].split(".")
        if owner == ["steps"]:
            steps["localize"][name] = steps["train"][name] = value
        elif owner:
            steps[owner[0]][name] = value
        else:
            top[name] = value
    for values in steps.values():
        values["seed"] = top.get("seed", DEFAULTS.seed)
    return PipelineSettings(
        **top,
        localize=TrainSettings.localization(**steps["localize"]),
        train=TrainSettings.offsets(**steps["train"]),
        search=search_space(args) if hasattr(args, "search_max_trials") else None,
        output_dir=str(output_dir),
    )
