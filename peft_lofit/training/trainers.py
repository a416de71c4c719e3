"""Training for both LoFiT steps on TRL's trainers: DPO (TruthfulQA) and SFT with the loss on answer tokens.

LoFiT adds two things to the trainers and nothing else: an L1 penalty ``lambda * sum |A|`` on the scalings (step 1),
and the choice of which adapter vectors exist (the LoFiTConfig passed as ``peft_config``). The DPO reference model is
the same model with the adapter disabled, which is what TRL does when it is given a ``peft_config``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from peft import PeftConfig

from ..extras import missing_extra

try:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from trl.trainer import utils as trl_utils
except ImportError as error:
    raise missing_extra(error, "Training (localize, train_adapter, lofit)") from error

from ..distributed import is_main_process
from .frozen_prefix import FrozenPrefixCache
from .settings import TrainSettings
from .shared_prompt import prompt_once_per_pair

OBJECTIVES = ("dpo", "sft")


def scaling_l1(model: torch.nn.Module) -> torch.Tensor:
    """``sum |A|`` over the trainable LoFiT scalings of ``model`` (0 when there are none)."""
    terms = [p.abs().sum() for n, p in model.named_parameters() if ".lofit_scaling." in n and p.requires_grad]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@contextlib.contextmanager
def loss_positions_only(enabled: bool = True):
    """While active, TRL's fused LM head runs the output layer only at the positions the loss reads, on CPUs too.

    TRL's trainers score ``model(..., labels=labels, fused_lm_head=True)`` (``trl.trainer.utils.add_fused_lm_head``):
    on Triton devices (CUDA, XPU) only the rows whose label is not -100 go through the output layer and the
    log-softmax; elsewhere every position does (fixed tile shapes, for backends that compile per shape). Nothing is
    compiled on a CPU, so this takes TRL's compact path there too. The per-token log-probabilities are the same (each
    row is scored on its own) and so are the losses and gradients; the saving is the output layer's share of the
    prompt positions (49,152 words x 576 features per position for SmolLM2), forward and backward. The switch is
    TRL's module-level dispatch: while a context is active it holds for every fused-head call in the process (with the
    same values), so trainers in concurrent threads should not enter and leave it out of order.
    """
    device_has_compact_path = getattr(trl_utils, "_use_triton", None)
    if not enabled or device_has_compact_path is None:  # switched off, or a TRL without this dispatch
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or device_has_compact_path(device)
    try:
        yield
    finally:
        trl_utils._use_triton = device_has_compact_path


class LoFiTLossMixin:
    """Adds ``l1_lambda * sum |A|`` to the trainer's loss (logged as ``l1``), stops on a NaN/inf loss, and scores
    only the loss positions (``loss_positions_only``) when ``score_loss_positions_only``.

    The check runs on every step, before the backward pass, so a bad batch never reaches the optimizer: the adapter
    in memory is still the last good one when the error is raised.
    """

    def __init__(
        self,
        *args,
        l1_lambda: float = 0.0,
        score_loss_positions_only: bool = True,
        share_prompts: bool = True,
        **kwargs,
    ):
        # set before the trainer's __init__, which already scores the DPO reference
        self.l1_lambda, self.score_loss_positions_only = l1_lambda, score_loss_positions_only
        self.share_prompts = share_prompts
        super().__init__(*args, **kwargs)

    def _exact_speedups(self):
        """The context every scoring call runs in (TRL's trainers score through their fused LM head)."""
        return loss_positions_only(self.score_loss_positions_only)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        with self._exact_speedups():
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        if self.l1_lambda:
            penalty = self.l1_lambda * scaling_l1(model)
            self._last_l1 = penalty.detach()
            if self._loss_not_divided_for_accumulation(kwargs.get("num_items_in_batch")):
                penalty = penalty / self.current_gradient_accumulation_steps  # Trainer will not divide it
            loss = loss + penalty.to(loss.device)
        if model.training and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"Training loss became {loss.detach().float().item()} at step {self.state.global_step + 1}; "
                "stopping before the optimizer applies it. Lower the learning rate or check the data."
            )
        return (loss, outputs) if return_outputs else loss

    def _loss_not_divided_for_accumulation(self, num_items_in_batch) -> bool:
        """Mirror of Trainer.training_step: a loss normalised by ``num_items_in_batch`` is not divided by the number
        of accumulation steps afterwards, so a penalty added to it must be divided here."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def log(self, logs, *args, **kwargs):
        if self.l1_lambda and "loss" in logs and hasattr(self, "_last_l1"):
            logs["l1"] = self._last_l1.item()  # read only when logging: no host sync on every step
        super().log(logs, *args, **kwargs)


class LoFiTDPOTrainer(LoFiTLossMixin, DPOTrainer):
    """TRL's DPOTrainer with the LoFiT L1 penalty and the NaN stop; with ``share_prompts`` each pair's prompt runs
    once (``shared_prompt.prompt_once_per_pair``). The reference pass gets the same speed-ups."""

    @contextlib.contextmanager
    def _exact_speedups(self):
        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        with super()._exact_speedups(), prompt_once_per_pair(model, self.share_prompts):
            yield

    def compute_ref_log_probs(self, model, inputs):
        with self._exact_speedups():
            return super().compute_ref_log_probs(model, inputs)


class LoFiTSFTTrainer(LoFiTLossMixin, SFTTrainer):
    """TRL's SFTTrainer (prompt-completion data: loss on completion tokens only) with the L1 penalty and NaN stop."""


def build_trainer(
    model,
    tokenizer,
    rows: list[dict],
    objective: str,
    peft_config: PeftConfig,
    settings: TrainSettings,
    callbacks=None,
):
    """A TRL trainer that wraps ``model`` with ``peft_config`` (LoFiT, or any PEFT method) and trains on ``rows``.

    ``rows`` are ``{prompt, chosen, rejected}`` for DPO and ``{prompt, completion}`` for SFT; ``callbacks`` are
    ``transformers.TrainerCallback``s.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if not rows:
        raise ValueError("No training rows: check the data split and --limit.")
    dataset = Dataset.from_list(rows)
    if objective == "dpo":
        args = DPOConfig(
            beta=settings.dpo_beta,
            # TRL's precomputation shares an in-memory dataset cache that other processes cannot open: under DDP
            # the reference is recomputed each step instead (same result).
            precompute_ref_log_probs=settings.precompute_ref_log_probs and int(os.environ.get("WORLD_SIZE", "1")) == 1,
            precompute_ref_batch_size=2 * settings.batch_size,
            **settings.trainer_arguments(),
        )
        trainer_class = LoFiTDPOTrainer
    else:
        args = SFTConfig(completion_only_loss=True, **settings.trainer_arguments())
        trainer_class = LoFiTSFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        l1_lambda=settings.l1_lambda,
        score_loss_positions_only=settings.score_loss_positions_only,
        share_prompts=settings.share_prompts,
    )
    return trainer


def train_adapter(model, tokenizer, rows, objective, peft_config: PeftConfig, settings: TrainSettings, callbacks=None):
    """Train an adapter (LoFiT, or any PEFT config) and return the PeftModel and the trainer.

    ``model`` is wrapped in place (its target modules become tuner layers). With ``cache_frozen_layers`` the frozen
    layers below the lowest adapted one run once per distinct sequence (``trainer.frozen_prefix_stats`` counts it).

    If the loss becomes NaN/inf, the last good adapter is saved to ``{output_dir}/last_good_adapter`` and the
    FloatingPointError says where.
    """
    from ..checkpoint import save_adapter

    torch.manual_seed(settings.seed)
    trainer = build_trainer(model, tokenizer, rows, objective, peft_config, settings, callbacks)
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    use_cache = settings.cache_frozen_layers and not sharded  # sharded ranks must all run the same layers
    cache = FrozenPrefixCache(trainer.model) if use_cache else contextlib.nullcontext()
    try:
        with cache:
            trainer.train(resume_from_checkpoint=settings.resume_from_checkpoint)
    except FloatingPointError as error:
        kept = Path(settings.output_dir) / "last_good_adapter"
        if is_main_process():  # every rank holds the same adapter; one writes it
            save_adapter(trainer.model, kept)
        raise FloatingPointError(f"{error} The last good adapter is saved in {kept}.") from None
    trainer.frozen_prefix_stats = cache.stats if use_cache else None
    peft_model = trainer.model
    peft_model.eval()
    return peft_model, trainer
