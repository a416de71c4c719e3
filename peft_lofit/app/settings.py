"""The settings of one LoFiT run: the single source of the pipeline's defaults and help texts (``lofit run`` builds
its options from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..training.settings import TrainSettings
from .search import SEARCH_SPLIT, SearchSpace
from .tasks import get_task

HEAD_CHOICES = ("learned", "random")


@dataclass
class PipelineSettings:
    """One LoFiT run. Defaults: the paper's TruthfulQA recipe with K = 3% of heads."""

    task: str = field(default="truthfulqa", metadata={"help": "task"})
    model: Optional[str] = field(
        default=None, metadata={"help": "HF model id or local folder (default: the embedded SmolLM2-135M-Instruct)"}
    )
    base_model_id: Optional[str] = field(
        default=None,
        metadata={
            "help": "the model's Hub id for the model card, when --model is a local folder that does not say it"
        },
    )
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "data folder (default: $LOFIT_DATA_DIR, else the data shipped in the package)"}
    )
    fold: int = field(default=0, metadata={"help": "TruthfulQA fold"})
    k: Optional[int] = field(default=None, metadata={"help": "number of heads to train"})
    fraction: float = field(default=0.03, metadata={"help": "share of all heads to train"})
    heads: str = field(
        default="learned",
        metadata={"help": "'learned', 'random', or a head-selection JSON (heads from another run or task)"},
    )
    search: Optional[SearchSpace] = field(
        default=None,
        metadata={"help": "choose lambda, K, step-2 learning rate and epochs on the validation split (search.py)"},
    )
    localize: TrainSettings = field(
        default_factory=TrainSettings.localization, metadata={"help": "step 1's training settings"}
    )
    train: TrainSettings = field(
        default_factory=TrainSettings.offsets, metadata={"help": "step 2's training settings"}
    )
    train_both_vectors: bool = field(
        default=False, metadata={"help": "step 2 trains A and v (default: v only, as the paper)"}
    )
    train_limit: Optional[int] = field(
        default=None,
        metadata={"help": "use only the first N training rows (default: all; CLUTRR: the first 300, as the paper)"},
    )
    eval_split: str = field(default="test", metadata={"help": "split to evaluate"})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "evaluate only the first N examples"})
    eval_batch_size: int = field(
        default=16,
        metadata={
            "help": "generation batch size for MQuAKE/CLUTRR; TruthfulQA scores each question's answers as one batch"
        },
    )
    cache_base_metrics: bool = field(
        default=True, metadata={"help": "reuse the base model's metrics from disk when model, data and settings match"}
    )
    output_dir: str = field(default="lofit_runs/run", metadata={"help": "output folder"})
    seed: int = field(default=42, metadata={"help": "random seed"})

    def __post_init__(self):
        get_task(self.task)
        if self.heads not in HEAD_CHOICES and not Path(self.heads).is_file():
            raise ValueError(
                f"--heads must be 'learned', 'random' or an existing head-selection JSON file; got {self.heads!r}."
            )
        for name in ("train_limit", "eval_limit", "k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if self.k is None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}.")
        if self.search is not None:
            if self.heads != "learned":
                raise ValueError("--search chooses lambda and K itself: it needs --heads learned.")
            if self.eval_split == SEARCH_SPLIT:
                raise ValueError(
                    f"--search chooses on the {SEARCH_SPLIT} split; evaluate on another one (--eval-split test)."
                )

    def train_rows(self) -> list[dict]:
        """The rows this run trains on: the first ``train_limit`` rows of the train split of its data and fold."""
        return get_task(self.task).training_rows(
            "train", data_dir=self.data_dir, fold=self.fold, limit=self.train_limit
        )

    def evaluation(self, split: Optional[str] = None) -> dict:
        """The keyword arguments of the task's ``evaluate`` (and of the base metrics' cache key): ``split`` (default
        ``eval_split``), the data folder, the fold and ``eval_limit``."""
        return dict(split=split or self.eval_split, data_dir=self.data_dir, fold=self.fold, limit=self.eval_limit)

    def make_quick(self) -> "PipelineSettings":
        """Turn this into a smoke run of a couple of minutes: few examples, one epoch per step."""
        self.train_limit = self.train_limit or 32
        self.eval_limit = self.eval_limit or 24
        self.localize.epochs = self.train.epochs = 1
        return self
