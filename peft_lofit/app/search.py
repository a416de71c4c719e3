"""Choosing LoFiT's hyperparameters on the validation split: lambda, K, the step-2 learning rate and epochs.

``run_search`` localizes once per L1 weight (step 1 on the training split) and reuses that ranking for every K, then
runs one trial per point of the grid (lambda x K x learning rate x epochs): step 2 on the training split, scored on
the validation split by the task's ``selection_metric`` (MC2 for TruthfulQA, exact match otherwise). Every trial is
a row of ``OUTPUT/search/trials.json`` (and ``trials.md``), written as it finishes. The budget is ``max_trials``:
when the grid is larger, that many of its points are tried, drawn in a seeded random order (plain random search,
no early stopping). The best trial wins, the first one on a tie; ``run_pipeline`` then trains its settings on the
training split and evaluates on the test split. A stopped search resumes where it stopped (``fingerprint``), and one
run again with more values reuses the trials it has (each trial's folder is named by its grid point).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..distributed import barrier, is_main_process
from ..io import atomic_write_json, atomic_write_text, read_json_if_complete
from ..markdown import markdown_table
from ..timing import timed

SEARCH_SPLIT = "val"
TRIAL_FILE = "search_trial.json"  # in each trial's folder: its record, and the run it belongs to
LOCALIZATION_FILE = "localization.json"  # beside each lambda's head selection: the run that wrote it, its seconds


@dataclass
class SearchSpace:
    """The values to try; an empty list means the run's own value (``--l1``, ``--k``, ``--lr``, ``--epochs``)."""

    l1: list[float] = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    max_trials: Optional[int] = None

    def __post_init__(self):
        for name in ("l1", "k", "learning_rate", "epochs"):
            values = getattr(self, name)
            if any(not value > 0 for value in values):
                raise ValueError(f"search values for {name} must be > 0, got {values}.")
            if len({f"{value:g}" for value in values}) < len(values):  # folder names use 6 significant digits
                raise ValueError(f"search values for {name} must differ (to 6 significant digits), got {values}.")
        if self.max_trials is not None and self.max_trials < 1:
            raise ValueError(f"--search-max-trials must be at least 1, got {self.max_trials}.")

    def grid(self, settings) -> list[dict]:
        """Every trial's settings, in grid order, then cut to ``max_trials`` in a random order seeded by the run."""
        axes = {
            "l1": self.l1 or [settings.localize.l1_lambda],
            "k": self.k or [settings.k],
            "learning_rate": self.learning_rate or [settings.train.learning_rate],
            "epochs": self.epochs or [settings.train.epochs],
        }
        points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
        if self.max_trials is not None and self.max_trials < len(points):
            random.Random(settings.seed).shuffle(points)
            points = points[: self.max_trials]
        return points


def trial_folder_name(point: dict) -> str:
    """A trial's folder, named by its grid point (``trial_l1-0.0005_k27_lr0.02_ep5``; ``krun``: the run's own K or
    fraction), so that a grid grown with new values keeps every finished trial where it was."""
    k = "run" if point["k"] is None else point["k"]
    return f"trial_l1-{point['l1']:g}_k{k}_lr{point['learning_rate']:g}_ep{point['epochs']:g}"


def _trial_settings(settings, point: dict, heads_file: Path, output: Path):
    trial = copy.deepcopy(settings)
    trial.search = None
    trial.heads, trial.k, trial.eval_split, trial.output_dir = str(heads_file), point["k"], SEARCH_SPLIT, str(output)
    trial.localize.l1_lambda = point["l1"]
    trial.train.learning_rate, trial.train.epochs = point["learning_rate"], point["epochs"]
    return trial


def _localize_once(settings, l1: float, model, tokenizer, rows, folder: Path) -> Path:
    """Step 1 with L1 weight ``l1`` on a copy of the model; the head-selection file every K of it reuses."""
    from ..training.localize import localize
    from .tasks import get_task

    step = copy.deepcopy(settings.localize)
    step.l1_lambda, step.seed, step.output_dir = l1, settings.seed, str(folder / "checkpoints")
    selection = localize(
        copy.deepcopy(model),
        tokenizer,
        rows,
        get_task(settings.task).objective,
        settings=step,
        metadata={"task": settings.task, "l1_lambda": l1},
    )
    return selection.save(folder / "head_selection.json")


def _strategy(space: SearchSpace, settings, tried: int) -> str:
    whole = len(SearchSpace(**{**asdict(space), "max_trials": None}).grid(settings))
    if tried == whole:
        return f"full grid of {whole} trials"
    return f"random sample of {tried} of the {whole} grid points (seed {settings.seed})"


def trials_table(trials: list[dict], metric: str) -> str:
    """The trials as a Markdown table, best first."""
    rows = [
        (
            f"{t['l1']:g}",
            t["k"],
            f"{t['learning_rate']:g}",
            f"{t['epochs']:g}",
            f"{t['score']:.4f}",
            f"{t['seconds']:.0f}",
        )
        for t in sorted(trials, key=lambda row: -row["score"])
    ]
    return markdown_table(("lambda", "K", "learning rate", "epochs", f"val {metric}", "seconds"), rows) + "\n"


def fingerprint(settings, task) -> str:
    """What a finished trial or localization of a search depends on besides its own grid point: every setting of
    the run except the search space, and the bytes of the training and validation data."""
    digest = hashlib.sha256(json.dumps({**asdict(settings), "search": None}, sort_keys=True, default=str).encode())
    for split in ("train", SEARCH_SPLIT):
        for path in task.data_files(split, settings.data_dir, settings.fold):
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _localization(settings, l1: float, model, tokenizer, rows, folder: Path, run: str) -> float:
    """Make sure ``folder/head_selection.json`` is the localization with L1 weight ``l1`` of the run ``run``
    (a fingerprint): kept when a run with the same settings wrote it, else localized now. Returns its seconds."""
    done = read_json_if_complete(folder / LOCALIZATION_FILE)
    if done and done["fingerprint"] == run and (folder / "head_selection.json").is_file():
        return done["seconds"]
    seconds = {}
    with timed(seconds, "localize"):
        _localize_once(settings, l1, model, tokenizer, rows, folder)
    if is_main_process():
        atomic_write_json(folder / LOCALIZATION_FILE, {"fingerprint": run, "seconds": round(seconds["localize"], 1)})
    return round(seconds["localize"], 1)


def run_search(settings, space: SearchSpace, model, tokenizer) -> dict:
    """Try the grid on the validation split (see the module docstring); return the trials and the best one.

    A stopped search resumes: a trial (or localization) that a run with the same settings finished is read back from
    its folder instead of run again.
    """
    from .pipeline import run_pipeline
    from .tasks import get_task

    task = get_task(settings.task)
    root = Path(settings.output_dir) / "search"
    rows = settings.train_rows()
    run = fingerprint(settings, task)
    trials, localize_seconds = [], {}
    for point in space.grid(settings):
        folder, heads = root / trial_folder_name(point), root / f"l1_{point['l1']:g}"
        done = read_json_if_complete(folder / TRIAL_FILE)
        if done and done["fingerprint"] == run and done["point"] == point:
            trials.append(done["trial"])
            localize_seconds.setdefault(
                point["l1"], (read_json_if_complete(heads / LOCALIZATION_FILE) or {}).get("seconds")
            )
            continue
        if localize_seconds.get(point["l1"]) is None:
            localize_seconds[point["l1"]] = _localization(settings, point["l1"], model, tokenizer, rows, heads, run)
        trial = _trial_settings(settings, point, heads / "head_selection.json", folder)
        seconds = {}
        with timed(seconds, "trial"):
            result = run_pipeline(trial, copy.deepcopy(model), tokenizer)
        record = {
            **point,
            "k": result["num_heads_selected"],
            "score": result["lofit"][task.selection_metric],
            "seconds": round(seconds["trial"], 1),
            "output_dir": trial.output_dir,
        }
        trials.append(record)
        if is_main_process():  # as each trial finishes: nothing is lost to an interruption
            atomic_write_json(folder / TRIAL_FILE, {"fingerprint": run, "point": point, "trial": record})
            atomic_write_json(root / "trials.json", trials)
    if is_main_process():
        atomic_write_json(root / "trials.json", trials)
        atomic_write_text(root / "trials.md", trials_table(trials, task.selection_metric))
    barrier()  # the other processes read the head selection the main process wrote
    best = max(trials, key=lambda row: row["score"])  # max keeps the first of equal scores
    return {
        "metric": task.selection_metric,
        "split": SEARCH_SPLIT,
        "strategy": _strategy(space, settings, len(trials)),
        "space": asdict(space),
        "trials": trials,
        "best": best,
        # the ranking the winning trial trained on, as that trial saved it (a lambda folder can be overwritten)
        "head_selection": str(Path(best["output_dir"]) / "head_selection.json"),
        "localize_seconds": {f"{l1:g}": seconds for l1, seconds in localize_seconds.items()},  # None: not known
    }
