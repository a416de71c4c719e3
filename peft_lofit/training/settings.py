"""The hyperparameters of one training run, and the paper's values for each LoFiT step.

``TrainSettings`` is the single source of the defaults and help texts: the ``lofit`` command line, the pipeline, the
examples and the benchmark read them from here (``field(metadata={"help": ...})``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

import torch
from transformers import TrainingArguments

from ..distributed import has_accelerator

# transformers 5.24 renamed TrainingArguments.gradient_checkpointing to activation_checkpointing and warns on the old
# name; setup.cfg admits releases from before the rename.
CHECKPOINTING_NAMES = ("activation_checkpointing", "gradient_checkpointing")
CHECKPOINTING_ARGUMENT = next(
    name for name in CHECKPOINTING_NAMES if name in {argument.name for argument in fields(TrainingArguments)}
)


@dataclass
class TrainSettings:
    """Hyperparameters of one training run; the defaults are the paper's (AdamW, linear decay, no warm-up)."""

    learning_rate: float = field(default=5e-3, metadata={"help": "learning rate (AdamW, linear decay, no warm-up)"})
    epochs: float = field(default=5, metadata={"help": "epochs"})
    batch_size: int = field(default=8, metadata={"help": "training batch size (per device)"})
    l1_lambda: float = field(default=0.0, metadata={"help": "L1 weight lambda on the scalings A (step 1)"})
    dpo_beta: float = field(default=0.5, metadata={"help": "DPO beta"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    max_length: Optional[int] = field(
        default=512, metadata={"help": "longest tokenized sequence; longer ones are truncated"}
    )
    output_dir: str = field(default="lofit_runs/train", metadata={"help": "trainer output folder (checkpoints)"})
    save_checkpoints: bool = field(default=False, metadata={"help": "save a checkpoint after every epoch"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "checkpoint folder to resume from"})
    logging_steps: int = field(default=5, metadata={"help": "log every N optimizer steps"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute activations in backward (TRL's default is on; it only pays off when memory is short)"
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "DPO: score the fixed reference (adapter disabled) once before training"}
    )
    cache_frozen_layers: bool = field(
        default=True, metadata={"help": "run the frozen layers below the adapter once per sequence (frozen_prefix.py)"}
    )
    score_loss_positions_only: bool = field(
        default=True,
        metadata={"help": "run the output layer only where the loss reads (trainers.loss_positions_only)"},
    )
    share_prompts: bool = field(default=True, metadata={"help": "DPO: run each pair's prompt once (shared_prompt.py)"})
    extra: dict = field(default_factory=dict, metadata={"help": "any other TRL / Trainer argument"})

    @classmethod
    def localization(cls, **overrides) -> "TrainSettings":
        """Step 1 as in the paper: scalings A under an L1 penalty, lr 5e-3, lambda 5e-4."""
        return replace(cls(learning_rate=5e-3, l1_lambda=5e-4), **overrides)

    @classmethod
    def offsets(cls, **overrides) -> "TrainSettings":
        """Step 2 as in the paper: offsets v on the selected heads, lr 1e-2."""
        return replace(cls(learning_rate=1e-2), **overrides)

    def __post_init__(self):
        for name in ("learning_rate", "epochs", "batch_size", "dpo_beta", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if not self.l1_lambda >= 0:
            raise ValueError(f"l1_lambda must be >= 0, got {self.l1_lambda!r}.")

    def trainer_arguments(self) -> dict:
        """TRL config arguments; ``extra`` overrides any of them."""
        arguments = dict(
            output_dir=self.output_dir,
            learning_rate=self.learning_rate,
            num_train_epochs=self.epochs,
            per_device_train_batch_size=self.batch_size,
            lr_scheduler_type="linear",
            warmup_steps=0,
            optim="adamw_torch",
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            data_seed=self.seed,
            logging_steps=self.logging_steps,
            save_strategy="epoch" if self.save_checkpoints else "no",
            report_to="none",
            max_length=self.max_length,
        )
        if not self.extra.keys() & set(CHECKPOINTING_NAMES):  # either name in ``extra`` wins over ours
            arguments[CHECKPOINTING_ARGUMENT] = self.gradient_checkpointing
        arguments.update(self.extra)
        # Without use_cpu Trainer does not set up DDP on a machine with no accelerator: under torchrun every process
        # would train alone on all the data.
        use_cpu = arguments.setdefault("use_cpu", not has_accelerator())
        # TRL's default bf16 assumes a GPU: on only where training runs on a GPU that supports it.
        arguments.setdefault("bf16", not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return arguments

    def to_dict(self) -> dict:
        return asdict(self)
