"""The headline comparison: each trained method tuned on the validation split with the same budget, then trained with
its winning settings under several seeds and scored on the whole test split.

For one task (and TruthfulQA fold):

1. **Tune** on ``val`` with seed ``TUNING_SEED``. Every method gets ``TRIALS`` trials of the same number of epochs,
   the full grid of its ``SPACES`` entry, with no early stopping: the same tuning budget.
   - LoFiT goes through ``lofit run --search``'s own ``run_search``: one localization with the paper's lambda, its
     ranking reused for every K, then one step-2 training per (K, learning rate).
   - LoRA r8, LoRA r1 and IA3 get one training per learning rate.
2. **Test.** For every seed, the winner's settings train on ``train`` and score on ``test``, and LoFiT localizes again
   for each seed. Seed ``TUNING_SEED`` reuses the winning trial's adapter while its folder is there: the same rows,
   settings and seed give the same weights.

Each (task, fold, method, seed) is one row of ``headline.json``, written as it finishes (under a lock, so runs of
other tasks can share the file). A stopped run resumes: rows already there are skipped and finished trials reused,
but only those of a run with the same settings (``run_settings``); others are refused, not mixed in. When a grid of
``SPACES`` grows, only its new points are tried; when it drops a point, that point's trials stay in the record but can
no longer win. A row whose settings are no longer the winner's is trained again.
``headline_report.py`` builds the tables and the plot from the file alone.
"""

from __future__ import annotations

import copy
import fcntl
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from peft import PeftModel

from peft_lofit.app.default_model import DEFAULT_MODEL, load_model_and_tokenizer
from peft_lofit.app.pipeline import evaluate_base, heads_per_layer, run_pipeline, with_best_trial
from peft_lofit.app.search import SearchSpace, run_search
from peft_lofit.app.settings import PipelineSettings
from peft_lofit.app.tasks import get_task
from peft_lofit.checkpoint import save_adapter
from peft_lofit.io import atomic_write_json
from peft_lofit.timing import timed
from peft_lofit.training import train_adapter
from peft_lofit.training.heads import resolve_k

from .methods import METHODS, train_settings

HEADLINE_METHODS = ("base", "lofit", "lora_r8", "lora_r1", "ia3")
ROW_FIELDS = (
    "task",
    "fold",
    "method",
    "seed",
    "metrics",
    "trained_numbers",
    "adapter_bytes",
    "train_seconds",
    "settings",
)
TUNING_SEED = 42
RUN = PipelineSettings()


@dataclass(frozen=True)
class Space:
    """What one method's tuning tries: learning rates, and for LoFiT the number of heads as shares of all heads."""

    learning_rates: tuple[float, ...]
    k_fractions: tuple[float, ...] = ()

    @property
    def trials(self) -> int:
        return len(self.learning_rates) * max(1, len(self.k_fractions))


# LoRA's grid brackets 2e-3, the best value in DESIGN.md's reference loop; rank 1 and IA3 are shifted up because
# their updates are smaller. LoFiT: the paper's step-2 rate, twice and four times it, on 10% and 20% of the heads.
# The grids were 4 points until the winners of TruthfulQA (both folds) and MQuAKE sat at their largest learning
# rate; each grew by two points upwards (LoFiT: one rate for both K), still the same budget for every method.
# LoFiT's winners then sat at 4e-2, its largest rate, on TruthfulQA fold 0 and CLUTRR, and 1e-2 won nowhere: its
# grid slid one rate up, keeping 6 trials.
SPACES = {
    "lofit": Space((2e-2, 4e-2, 8e-2), k_fractions=(0.1, 0.2)),
    "lora_r8": Space((5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)),
    "lora_r1": Space((1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)),
    "ia3": Space((3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
}
TRIALS = SPACES["lofit"].trials
assert all(space.trials == TRIALS for space in SPACES.values()), "every method gets the same tuning budget"


def read_json(path: Path, empty):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else empty


@contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path``'s lock file: one writer at a time among processes sharing ``--output``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_json(path: Path, empty, change: Callable):
    """Read ``path`` (``empty`` when missing), apply ``change`` and write the result back, under the lock."""
    with locked(path):
        value = change(read_json(path, empty))
        atomic_write_json(path, value)
    return value


def grid_point(trial: dict) -> tuple:
    """The (K, learning rate) of a trial; K None for the methods without one."""
    return trial.get("k"), trial["learning_rate"]


def grid_points(trials: list[dict]) -> set[tuple]:
    return {grid_point(trial) for trial in trials}


def best_trial(trials: list[dict]) -> dict:
    """The trial with the highest score; the earlier one on a tie."""
    return max(trials, key=lambda trial: trial["score"])


def adapter_file_bytes(folder: Path) -> int:
    return (Path(folder) / "adapter_model.safetensors").stat().st_size


class Headline:
    """The tuning and test runs of one task (and fold); ``run`` does every missing row of ``methods`` x ``seeds``."""

    def __init__(self, args):
        self.args, self.task = args, get_task(args.task)
        self.fold = args.fold if args.task == "truthfulqa" else None  # MQuAKE and CLUTRR have one split
        self.data_fold = self.fold or 0
        self.label = args.task if self.fold is None else f"{args.task}/fold{self.fold}"
        self.work = Path(args.work_dir) / self.label.replace("/", "_")
        self.rows_file = Path(args.output) / "headline.json"
        self.tuning_file = Path(args.output) / "headline_tuning.json"
        self.run_settings = {
            "model": args.model or DEFAULT_MODEL,
            "data_dir": args.data_dir,
            "train_limit": args.train_limit,
            "eval_limit": args.eval_limit,
            "epochs": args.epochs,
            "localize_epochs": args.localize_epochs,
        }
        self.model, self.tokenizer = load_model_and_tokenizer(args.model)
        self.train_rows = self.lofit_settings(TUNING_SEED).train_rows()  # every method trains on LoFiT's rows

    def evaluation(self, split: str) -> dict:
        """What every method is scored on: LoFiT's evaluation inputs, so all rows (and the metrics cache) agree."""
        return self.lofit_settings(TUNING_SEED).evaluation(split)

    def run(self) -> list[dict]:
        """Base model, then each method's tuning and first seed, then the other seeds (comparable rows come first)."""
        if "base" in self.args.methods:
            self.add_row("base", None, self.base_row)
        for seed in self.args.seeds:
            for name in (name for name in self.args.methods if name != "base"):
                self.add_row(name, seed, lambda name=name, seed=seed: self.test_row(name, seed))
        return read_json(self.rows_file, [])

    def check_same_run(self, what: str, recorded: dict) -> None:
        if recorded != self.run_settings:
            raise ValueError(
                f"{what} comes from a run with other settings ({recorded}, now {self.run_settings}): use another "
                "--output (and --work-dir) for these settings, or the same options to resume that run."
            )

    def add_row(self, method: str, seed: Optional[int], build) -> None:
        key = (self.args.task, self.fold, method, seed)
        rows = read_json(self.rows_file, [])
        done = next((row for row in rows if (row["task"], row["fold"], row["method"], row["seed"]) == key), None)
        if done:
            self.check_same_run(f"{self.rows_file}'s row {key}", done["settings"]["run"])
            if method == "base":
                return
            record = self.tuned(method)
            if self.tuned_settings(method, record["best"]) == self.tuned_settings(method, done["settings"]):
                self.refresh_tuning_summary(done, self.tuning_summary(method, record))
                return
            print(f"{key} was trained with other settings than tuning now picks: training it again", flush=True)
            update_json(self.rows_file, [], lambda rows: [row for row in rows if row != done])
        print(f"\n=== headline: {self.label} {method} seed {seed} ===", flush=True)
        row = {"task": self.args.task, "fold": self.fold, "method": method, "seed": seed, **build()}
        row["settings"]["run"] = self.run_settings
        update_json(self.rows_file, [], lambda rows: [*rows, {name: row[name] for name in ROW_FIELDS}])

    def base_row(self) -> dict:
        """The base model on test, through ``lofit run``'s metrics cache: LoFiT's seed rows then reuse it."""
        settings = self.lofit_settings(TUNING_SEED)
        settings.eval_split = "test"
        metrics, _ = evaluate_base(settings, self.task, self.model, self.tokenizer)
        return {"metrics": metrics, "trained_numbers": 0, "adapter_bytes": 0, "train_seconds": 0.0, "settings": {}}

    def tuned_settings(self, name: str, settings: Optional[dict] = None) -> dict:
        """The tuned values (learning rate, epochs, K, lambda) of ``settings``, by default of ``name``'s winner."""
        chosen = self.tuned(name)["best"] if settings is None else settings
        return {key: chosen[key] for key in ("learning_rate", "epochs", "k", "l1") if key in chosen}

    def tuning_summary(self, name: str, record: dict) -> dict:
        """What a row says of its tuning: the learning rates of the trials that could win (``grid``) and on what
        (``tuned_on``)."""
        trials = self.on_grid(name, record["trials"])
        return {
            "grid": sorted({trial["learning_rate"] for trial in trials}),
            "tuned_on": f"{record['split']} {record['metric']}, {len(trials)} trials",
        }

    def refresh_tuning_summary(self, done: dict, summary: dict) -> None:
        """Rewrites ``done``'s tuning summary in place after its grid grew without changing the winner."""
        if all(done["settings"].get(key) == value for key, value in summary.items()):
            return
        refreshed = {**done, "settings": {**done["settings"], **summary}}
        update_json(self.rows_file, [], lambda rows: [refreshed if row == done else row for row in rows])

    def test_row(self, name: str, seed: int) -> dict:
        record = self.tuned(name)
        best = record["best"]
        settings = self.tuned_settings(name)
        settings.update(
            self.tuning_summary(name, record), batch_size=RUN.train.batch_size, train_rows=len(self.train_rows)
        )
        if METHODS[name].rank:
            settings["rank"] = METHODS[name].rank
        if seed == record["seed"] and Path(best["adapter"]).is_dir():  # the winning trial is this seed's training
            trained = {key: best[key] for key in ("trained_numbers", "adapter_bytes", "train_seconds")}
            model = PeftModel.from_pretrained(copy.deepcopy(self.model), best["adapter"])
            desc = f"{name} seed {seed}"
            metrics = self.task.evaluate(
                model, self.tokenizer, batch_size=RUN.eval_batch_size, desc=desc, **self.evaluation("test")
            )
            return {"metrics": metrics, **trained, "settings": settings}
        if name == "lofit":
            return {**self.lofit_run(record, seed, "test"), "settings": settings}
        return {**self.baseline_run(name, best["learning_rate"], seed, "test"), "settings": settings}

    # --- tuning -----------------------------------------------------------------------------------------------
    def tuned(self, name: str) -> dict:
        """The tuning record of ``name`` (trials and the best one), run or finished now if it is missing."""
        key = f"{self.label}/{name}"
        record = read_json(self.tuning_file, {}).get(key, {})
        if record:
            self.check_same_run(f"{self.tuning_file}'s {key}", record["run"])
        trials = record.get("trials", [])
        if self.untried(name, trials) or self.loses_on_grid(name, record):
            record = self.tune_lofit(record) if name == "lofit" else self.tune_baseline(name, key, trials)
            self.save_tuning(key, record)
        return record

    def lofit_ks(self) -> list[int]:
        total, fractions = sum(heads_per_layer(self.model)), SPACES["lofit"].k_fractions
        ks = sorted({resolve_k(total, fraction=fraction) for fraction in fractions})
        if len(ks) < len(fractions):
            raise ValueError(f"the K fractions {fractions} give only K = {ks} on a model with {total} heads.")
        return ks

    def grid(self, name: str) -> set[tuple]:
        """The (K, learning rate) points of ``name``'s grid; K None for the methods without one."""
        ks = self.lofit_ks() if name == "lofit" else [None]
        return {(k, rate) for k in ks for rate in SPACES[name].learning_rates}

    def on_grid(self, name: str, trials: list[dict]) -> list[dict]:
        """The trials on ``name``'s grid now: the ones that can win (a point the grid dropped keeps its trials)."""
        grid = self.grid(name)
        return [trial for trial in trials if grid_point(trial) in grid]

    def loses_on_grid(self, name: str, record: dict) -> bool:
        """Whether ``record`` has no winner, or one that is not the best of its trials on the grid (the grid dropped
        it, or a record written before the grid changed)."""
        best = record.get("best")
        return not best or grid_point(best) != grid_point(best_trial(self.on_grid(name, record["trials"])))

    def untried(self, name: str, trials: list[dict]) -> list[float]:
        """The learning rates of ``name``'s grid with a point ``trials`` lacks (for LoFiT: with one of its K)."""
        missing_rates = {rate for _, rate in self.grid(name) - grid_points(trials)}
        return [rate for rate in SPACES[name].learning_rates if rate in missing_rates]

    def save_tuning(self, key: str, record: dict) -> None:
        update_json(self.tuning_file, {}, lambda tuning: {**tuning, key: record})

    def record(self, trials: list[dict], best: Optional[dict]) -> dict:
        return {
            "metric": self.task.selection_metric,
            "split": "val",
            "seed": TUNING_SEED,
            "run": self.run_settings,
            "trials": trials,
            "best": best,
        }

    def tune_baseline(self, name: str, key: str, done: list[dict]) -> dict:
        trials = list(done)  # finished trials of this run (same settings and seed, checked by ``tuned``)
        for learning_rate in self.untried(name, done):
            run = self.baseline_run(name, learning_rate, TUNING_SEED, "val")
            trials.append({"learning_rate": learning_rate, "epochs": self.args.epochs, **run})
            self.save_tuning(key, self.record(trials, best=None))  # each trial as it finishes
        return self.record(trials, best=best_trial(self.on_grid(name, trials)))

    def tune_lofit(self, record: dict) -> dict:
        """LoFiT's grid points that ``record`` lacks, added to the trials it has; the best of those on the grid
        wins."""
        done = record.get("trials", [])
        missing = self.untried("lofit", done)
        new = self.lofit_trials(missing) if missing else []  # a missing rate's K that ``done`` has is not added twice
        tried = grid_points(done)
        trials = [*done, *(trial for trial in new if grid_point(trial) not in tried)]
        best = best_trial(self.on_grid("lofit", trials))
        return {
            **self.record(trials, best),
            # the ranking the winner trained on, as its trial saved it
            "head_selection": str(Path(best["adapter"]).parent / "head_selection.json"),
            "strategy": f"full grid of {len(self.on_grid('lofit', trials))} trials",
        }

    def lofit_trials(self, learning_rates: list[float]) -> list[dict]:
        """One trial per K and learning rate through ``lofit run --search``'s ``run_search``: one localization with
        the run's lambda, its ranking reused for every K."""
        space = SearchSpace(k=self.lofit_ks(), learning_rate=learning_rates, epochs=[self.args.epochs])
        search = run_search(self.lofit_settings(TUNING_SEED), space, self.model, self.tokenizer)
        trials = []
        for trial in search["trials"]:
            folder = Path(trial["output_dir"])
            finished = read_json(folder / "metrics.json", {})
            localize_seconds = search["localize_seconds"][f"{trial['l1']:g}"]
            trials.append(
                {
                    **{key: trial[key] for key in ("l1", "k", "learning_rate", "epochs", "score")},
                    "trained_numbers": finished["trainable_parameters"],
                    "adapter": str(folder / "adapter"),
                    "adapter_bytes": adapter_file_bytes(folder / "adapter"),
                    "train_seconds": None
                    if localize_seconds is None
                    else round(localize_seconds + finished["timings_s"]["train_s"], 1),
                }
            )
        return trials

    # --- one training -----------------------------------------------------------------------------------------
    def lofit_settings(self, seed: int, output: Optional[Path] = None) -> PipelineSettings:
        """LoFiT's settings for this run; the search's folder unless ``output`` is given."""
        settings = PipelineSettings(
            task=self.args.task,
            model=self.args.model,
            data_dir=self.args.data_dir,
            fold=self.data_fold,
            train_limit=self.args.train_limit,
            eval_limit=self.args.eval_limit,
            output_dir=str(output or self.work / "lofit_search"),
            seed=seed,
        )
        settings.localize.epochs, settings.train.epochs = self.args.localize_epochs, self.args.epochs
        return settings

    def lofit_run(self, record: dict, seed: int, split: str) -> dict:
        """The tuned LoFiT recipe with ``seed``: localize (the winner's lambda), train the winner's K heads, score."""
        searched = {"best": record["best"], "head_selection": record["head_selection"]}
        settings = with_best_trial(self.lofit_settings(TUNING_SEED), searched)
        settings.heads, settings.seed, settings.eval_split = "learned", seed, split
        settings.output_dir = str(self.work / f"lofit_seed{seed}")
        result = run_pipeline(settings, copy.deepcopy(self.model), self.tokenizer)
        timings = result["timings_s"]
        return {
            "metrics": result["lofit"],
            "trained_numbers": result["trainable_parameters"],
            "adapter_bytes": adapter_file_bytes(Path(settings.output_dir) / "adapter"),
            "train_seconds": round(timings["localize_s"] + timings["train_s"], 1),
        }

    def baseline_run(self, name: str, learning_rate: float, seed: int, split: str) -> dict:
        """Train ``name`` with ``learning_rate`` and ``seed`` on the train split, save it and score it on ``split``."""
        method, folder = METHODS[name], self.work / f"{name}_lr{learning_rate:g}_seed{seed}"
        settings = train_settings(
            learning_rate, epochs=self.args.epochs, batch_size=RUN.train.batch_size, seed=seed, folder=folder
        )
        model = copy.deepcopy(self.model)
        seconds: dict = {}
        with timed(seconds, "train"):
            peft_model, _ = train_adapter(
                model, self.tokenizer, self.train_rows, self.task.objective, method.peft_config(model), settings
            )
        save_adapter(peft_model, folder / "adapter")
        desc = f"{name} lr {learning_rate:g} {split}"
        metrics = self.task.evaluate(
            peft_model, self.tokenizer, batch_size=RUN.eval_batch_size, desc=desc, **self.evaluation(split)
        )
        return {
            "metrics": metrics,
            "score": metrics[self.task.selection_metric],
            "trained_numbers": peft_model.get_nb_trainable_parameters()[0],
            "adapter": str(folder / "adapter"),
            "adapter_bytes": adapter_file_bytes(folder / "adapter"),
            "train_seconds": round(seconds["train"], 1),
        }
