"""The headline comparison: each trained method tuned on the validation split with the same budget, then trained with
its winning settings under several seeds and scored on the whole test split.

For one task (and TruthfulQA fold):

1. **Tune** on ``val`` with the first seed. Every method gets ``TRIALS`` trials of the same number of epochs, the
   full grid of its ``SPACES`` entry, with no early stopping: the same tuning budget.
   - LoFiT goes through ``lofit run --search``'s own ``run_search``: one localization with the paper's lambda, its
     ranking reused for every K, then one step-2 training per (K, learning rate).
   - LoRA r8, LoRA r1 and IA3 get one training per learning rate.
2. **Test.** For every seed, the winner's settings train on ``train`` and score on ``test``, and LoFiT localizes again
   for each seed. The first seed reuses the winning trial's adapter while its folder is there: the same rows, settings
   and seed give the same weights.

Each (task, fold, method, seed) is one row of ``headline.json``, written as it finishes. Rows already there are
skipped and finished trials reused, so a stopped run resumes where it stopped. ``headline_report.py`` builds the
tables and the plot from the file alone.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peft import PeftModel

from peft_lofit.app.default_model import load_model_and_tokenizer
from peft_lofit.app.pipeline import heads_per_layer, run_pipeline, with_best_trial
from peft_lofit.app.search import SearchSpace, run_search
from peft_lofit.app.settings import PipelineSettings
from peft_lofit.app.tasks import get_task
from peft_lofit.checkpoint import save_adapter
from peft_lofit.io import atomic_write_json
from peft_lofit.timing import timed
from peft_lofit.training import TrainSettings, train_adapter
from peft_lofit.training.heads import resolve_k

from .methods import METHODS

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
# their updates are smaller. LoFiT: the paper's step-2 rate and twice it, on 10% and 20% of the heads.
SPACES = {
    "lofit": Space((1e-2, 2e-2), k_fractions=(0.1, 0.2)),
    "lora_r8": Space((5e-4, 1e-3, 2e-3, 4e-3)),
    "lora_r1": Space((1e-3, 2e-3, 4e-3, 8e-3)),
    "ia3": Space((3e-3, 1e-2, 3e-2, 1e-1)),
}
TRIALS = SPACES["lofit"].trials
assert all(space.trials == TRIALS for space in SPACES.values()), "every method gets the same tuning budget"


def read_json(path: Path, empty):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else empty


def row_key(row: dict) -> tuple:
    return row["task"], row["fold"], row["method"], row["seed"]


def adapter_file_bytes(folder: Path) -> int:
    return (Path(folder) / "adapter_model.safetensors").stat().st_size


class Headline:
    """The tuning and test runs of one task (and fold); ``run`` does every missing row of ``methods`` x ``seeds``."""

    def __init__(self, args):
        unknown = [name for name in args.methods if name not in HEADLINE_METHODS]
        if unknown:
            raise ValueError(f"the headline compares {', '.join(HEADLINE_METHODS)}; not {', '.join(unknown)}.")
        self.args, self.task = args, get_task(args.task)
        self.fold = args.fold if args.task == "truthfulqa" else None
        self.work = Path(args.work_dir) / (args.task if self.fold is None else f"{args.task}_fold{self.fold}")
        self.rows_file, self.tuning_file = (
            Path(args.output) / "headline.json",
            Path(args.output) / "headline_tuning.json",
        )
        self.rows = read_json(self.rows_file, [])
        self.tuning = read_json(self.tuning_file, {})
        self.model, self.tokenizer = load_model_and_tokenizer(args.model)
        self.train_rows = self.task.training_rows(
            "train", data_dir=args.data_dir, fold=args.fold, limit=args.train_limit
        )

    @property
    def first_seed(self) -> int:
        return self.args.seeds[0]

    def evaluation(self, split: str) -> dict:
        return dict(split=split, data_dir=self.args.data_dir, fold=self.args.fold, limit=self.args.eval_limit)

    def run(self) -> list[dict]:
        """Base model, then each method's tuning and first seed, then the other seeds (comparable rows come first)."""
        trained = [name for name in self.args.methods if name != "base"]
        if "base" in self.args.methods:
            self.add_row("base", None, self.base_row)
        for seed in self.args.seeds:
            for name in trained:
                self.add_row(name, seed, lambda name=name, seed=seed: self.test_row(name, seed))
        return self.rows

    def add_row(self, method: str, seed: Optional[int], build) -> None:
        key = (self.args.task, self.fold, method, seed)
        if any(row_key(row) == key for row in self.rows):
            return
        print(f"\n=== headline: {self.args.task} fold {self.fold} {method} seed {seed} ===", flush=True)
        row = {"task": self.args.task, "fold": self.fold, "method": method, "seed": seed, **build()}
        self.rows.append({name: row[name] for name in ROW_FIELDS})
        atomic_write_json(self.rows_file, self.rows)

    def base_row(self) -> dict:
        metrics = self.task.evaluate(
            self.model, self.tokenizer, batch_size=RUN.eval_batch_size, **self.evaluation("test")
        )
        return {"metrics": metrics, "trained_numbers": 0, "adapter_bytes": 0, "train_seconds": 0.0, "settings": {}}

    def test_row(self, name: str, seed: int) -> dict:
        record = self.tuned(name)
        best = record["best"]
        settings = {**{key: best[key] for key in ("learning_rate", "epochs", "k", "l1") if key in best}}
        settings.update(
            batch_size=RUN.train.batch_size,
            train_rows=len(self.train_rows),
            tuned_on=f"{record['split']} {record['metric']}, {len(record['trials'])} trials",
        )
        if METHODS[name].rank:
            settings["rank"] = METHODS[name].rank
        if seed == self.first_seed and Path(best["adapter"]).is_dir():  # the winning trial is this seed's training
            trained = {key: best[key] for key in ("trained_numbers", "adapter_bytes", "train_seconds")}
            model = PeftModel.from_pretrained(copy.deepcopy(self.model), best["adapter"])
            metrics = self.task.evaluate(
                model,
                self.tokenizer,
                batch_size=RUN.eval_batch_size,
                desc=f"{name} seed {seed}",
                **self.evaluation("test"),
            )
            return {"metrics": metrics, **trained, "settings": settings}
        if name == "lofit":
            return {**self.lofit_run(record, seed, "test"), "settings": settings}
        return {**self.baseline_run(name, best["learning_rate"], seed, "test"), "settings": settings}

    # --- tuning -----------------------------------------------------------------------------------------------
    def tuned(self, name: str) -> dict:
        """The tuning record of ``name`` (trials and the best one), run or finished now if it is missing."""
        key = f"{self.args.task}/{self.fold}/{name}"
        record = self.tuning.get(key, {})
        if not record.get("best"):
            record = self.tune_lofit() if name == "lofit" else self.tune_baseline(name, key, record.get("trials", []))
            self.save_tuning(key, record)
        return record

    def save_tuning(self, key: str, record: dict) -> None:
        self.tuning[key] = record
        atomic_write_json(self.tuning_file, self.tuning)

    def tune_baseline(self, name: str, key: str, done: list[dict]) -> dict:
        trials = list(done)
        for learning_rate in SPACES[name].learning_rates:
            if any(trial["learning_rate"] == learning_rate for trial in trials):
                continue
            run = self.baseline_run(name, learning_rate, self.first_seed, "val")
            trials.append({"learning_rate": learning_rate, "epochs": self.args.epochs, **run})
            self.save_tuning(key, self.record(trials, best=None))  # each trial as it finishes
        return self.record(trials, best=max(trials, key=lambda trial: trial["score"]))

    def tune_lofit(self) -> dict:
        total = sum(heads_per_layer(self.model))
        space = SearchSpace(
            k=sorted({resolve_k(total, fraction=fraction) for fraction in SPACES["lofit"].k_fractions}),
            learning_rate=list(SPACES["lofit"].learning_rates),
            epochs=[self.args.epochs],
        )
        settings = self.lofit_settings(self.first_seed, self.work / "lofit_search")
        search = run_search(settings, space, self.model, self.tokenizer)
        localize_seconds = {
            trial["l1"]: trial["localize_seconds"] for trial in search["trials"] if "localize_seconds" in trial
        }
        trials = []
        for trial in search["trials"]:
            finished = read_json(Path(trial["output_dir"]) / "metrics.json", {})
            trials.append(
                {
                    **{key: trial[key] for key in ("l1", "k", "learning_rate", "epochs", "score")},
                    "trained_numbers": finished["trainable_parameters"],
                    "adapter": str(Path(trial["output_dir"]) / "adapter"),
                    "adapter_bytes": adapter_file_bytes(Path(trial["output_dir"]) / "adapter"),
                    "train_seconds": round(localize_seconds[trial["l1"]] + finished["timings_s"]["train_s"], 1),
                }
            )
        best = trials[search["trials"].index(search["best"])]
        return {
            **self.record(trials, best),
            "head_selection": search["head_selection"],
            "strategy": search["strategy"],
        }

    def record(self, trials: list[dict], best: Optional[dict]) -> dict:
        return {
            "metric": self.task.selection_metric,
            "split": "val",
            "seed": self.first_seed,
            "trials": trials,
            "best": best,
        }

    # --- one training -----------------------------------------------------------------------------------------
    def lofit_settings(self, seed: int, output: Path) -> PipelineSettings:
        settings = PipelineSettings(
            task=self.args.task,
            model=self.args.model,
            data_dir=self.args.data_dir,
            fold=self.args.fold,
            train_limit=self.args.train_limit,
            eval_limit=self.args.eval_limit,
            output_dir=str(output),
            seed=seed,
        )
        settings.localize.epochs, settings.train.epochs = self.args.localize_epochs, self.args.epochs
        return settings

    def lofit_run(self, record: dict, seed: int, split: str) -> dict:
        """The tuned LoFiT recipe with ``seed``: localize (the winner's lambda), train the winner's K heads, score."""
        searched = self.lofit_settings(self.first_seed, self.work / "lofit_search")
        settings = with_best_trial(searched, {"best": record["best"], "head_selection": record["head_selection"]})
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
        settings = TrainSettings(
            learning_rate=learning_rate,
            epochs=self.args.epochs,
            batch_size=RUN.train.batch_size,
            seed=seed,
            output_dir=str(folder / "checkpoints"),
            logging_steps=50,
        )
        model = copy.deepcopy(self.model)
        seconds: dict = {}
        with timed(seconds, "train"):
            peft_model, _ = train_adapter(
                model, self.tokenizer, self.train_rows, self.task.objective, method.peft_config(model), settings
            )
        save_adapter(peft_model, folder / "adapter")
        metrics = self.task.evaluate(
            peft_model,
            self.tokenizer,
            batch_size=RUN.eval_batch_size,
            desc=f"{name} lr {learning_rate:g} {split}",
            **self.evaluation(split),
        )
        return {
            "metrics": metrics,
            "score": metrics[self.task.selection_metric],
            "trained_numbers": peft_model.get_nb_trainable_parameters()[0],
            "adapter": str(folder / "adapter"),
            "adapter_bytes": adapter_file_bytes(folder / "adapter"),
            "train_seconds": round(seconds["train"], 1),
        }
