"""The paper's tasks behind one interface: training rows for a trainer objective, and an evaluation.

=========== ========= ============================================ =========================
task        objective training rows                                metrics
=========== ========= ============================================ =========================
truthfulqa  dpo       prompt / chosen / rejected                   mc1, mc2, mc3
mquake      sft       prompt / completion                          accuracy (exact match)
clutrr      sft       prompt / completion (first 300 train rows)   accuracy (exact match)
=========== ========= ============================================ =========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import clutrr, mquake, truthfulqa


@dataclass(frozen=True)
class Task:
    name: str
    objective: str
    metrics: tuple[str, ...]
    _rows: Callable
    _evaluate: Callable
    _files: Callable  # (split, data_dir, fold) -> the files an evaluation of that split reads
    train_size: Optional[int] = None  # the paper's training-set size: the first N rows of the train split (None: all)

    def data_files(self, split: str = "test", data_dir=None, fold: int = 0) -> list:
        """Every file ``evaluate`` reads for ``split``: what a cached result must be keyed by."""
        return list(self._files(split, data_dir, fold))

    def training_rows(
        self, split: str = "train", data_dir=None, fold: int = 0, limit: Optional[int] = None
    ) -> list[dict]:
        """The first ``limit`` rows of ``split``; ``0`` means every row, and ``None`` every row but of the train split,
        where it means ``train_size`` (the paper's training-set size)."""
        if limit is None and split == "train":
            limit = self.train_size
        elif limit == 0:
            limit = None
        return self._rows(split, data_dir, fold)[:limit]

    @property
    def selection_metric(self) -> str:
        """The metric hyperparameters are chosen by: MC2 for TruthfulQA (it scores every answer), else accuracy."""
        return "mc2" if "mc2" in self.metrics else self.metrics[0]

    def evaluate(self, model, tokenizer, split="test", data_dir=None, fold=0, limit=None, batch_size=16, desc=None):
        """Metrics of ``model`` on ``split`` (the first ``limit`` examples), as a dict with ``n``."""
        return self._evaluate(
            model, tokenizer, split, data_dir, fold, limit, batch_size, desc or f"{self.name} {split}"
        )


def _truthfulqa_rows(split, data_dir, fold):
    return truthfulqa.dpo_pairs(truthfulqa.load_truthfulqa(split, fold=fold, data_dir=data_dir))


def _truthfulqa_evaluate(model, tokenizer, split, data_dir, fold, limit, batch_size, desc):
    questions = truthfulqa.load_truthfulqa(split, fold=fold, data_dir=data_dir)[:limit]
    return truthfulqa.evaluate_mc(model, tokenizer, questions, data_dir=data_dir, desc=desc)


def _truthfulqa_files(split, data_dir, fold):
    return [truthfulqa.split_file(split, fold, data_dir=data_dir), *truthfulqa.prompt_files(data_dir)]


def _generation_task(module):
    def rows(split, data_dir, fold):
        return [{"prompt": e.prompt, "completion": e.completion} for e in module.load(split, data_dir=data_dir)]

    def evaluate(model, tokenizer, split, data_dir, fold, limit, batch_size, desc):
        examples = module.load(split, data_dir=data_dir)[:limit]
        metrics, _ = module.evaluate(model, tokenizer, examples, batch_size=batch_size, desc=desc)
        return metrics

    def files(split, data_dir, fold):
        return [module.split_file(split, data_dir)]

    return rows, evaluate, files


TASKS = {
    "truthfulqa": Task(
        "truthfulqa", "dpo", ("mc1", "mc2", "mc3"), _truthfulqa_rows, _truthfulqa_evaluate, _truthfulqa_files
    ),
    "mquake": Task("mquake", "sft", ("accuracy",), *_generation_task(mquake)),
    # the paper trains CLUTRR on 300 examples: the first 300 of the 3,151 rows of train.json, in file order
    "clutrr": Task("clutrr", "sft", ("accuracy",), *_generation_task(clutrr), train_size=300),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name]
