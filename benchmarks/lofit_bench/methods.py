"""The methods the benchmark compares, declared as data: what each trains, where its heads come from, and which
learning-rate setting it uses. LoRA targets PEFT's defaults for the model's family and IA3 the attention output
projection of the architecture table, so every family LoFiT supports can be benchmarked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peft import IA3Config, LoraConfig

from peft_lofit import LoFiTConfig
from peft_lofit.training.settings import TrainSettings
from peft_lofit.tuner.architectures import default_target_modules


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "base" (nothing), "trained" (a PEFT adapter trained by TRL), "computed" (offsets from activations)
    adapter: Optional[str] = None  # trained: "lofit", "lora" or "ia3"
    heads: Optional[str] = None  # LoFiT: "localized", "random", "all", "iti" (probe accuracy), "other" (--other-heads)
    learning_rate: Optional[str] = None  # the setting holding its learning rate
    rank: Optional[int] = None  # LoRA

    @property
    def is_lofit(self) -> bool:
        return self.adapter == "lofit"

    def peft_config(self, model, heads=None):
        """The PEFT config this method trains on ``model`` (LoFiT methods need their heads)."""
        if self.adapter == "lofit":
            return LoFiTConfig(heads=heads)
        if self.adapter == "lora":  # target_modules None: PEFT's default for the family (q and v for Llama)
            return LoraConfig(r=self.rank, lora_alpha=2 * self.rank, lora_dropout=0.0)
        if self.adapter == "ia3":  # scaling the input of the output projection: LoFiT's A on every head, no offsets
            target = default_target_modules(model.config.model_type)
            return IA3Config(target_modules=target, feedforward_modules=target)
        raise ValueError(f"{self.name} trains nothing.")


METHODS = {
    method.name: method
    for method in (
        Method("base", "base"),
        Method("lofit", "trained", "lofit", heads="localized", learning_rate="lofit_lr"),
        Method("lofit_random", "trained", "lofit", heads="random", learning_rate="lofit_lr"),
        Method("lofit_all_heads", "trained", "lofit", heads="all", learning_rate="lofit_lr"),
        Method("lofit_iti_heads", "trained", "lofit", heads="iti", learning_rate="lofit_lr"),
        Method("lofit_other_heads", "trained", "lofit", heads="other", learning_rate="lofit_lr"),
        Method("lora_r8", "trained", "lora", learning_rate="lora_lr", rank=8),
        Method("lora_r1", "trained", "lora", learning_rate="lora_lr", rank=1),
        Method("ia3", "trained", "ia3", learning_rate="ia3_lr"),
        Method("iti", "computed"),
        Method("repe", "computed"),
    )
}
COMPUTED = tuple(name for name, method in METHODS.items() if method.kind == "computed")  # TruthfulQA only


def train_settings(learning_rate: float, *, epochs: int, batch_size: int, seed: int, folder: Path) -> TrainSettings:
    """The trainer settings of every benchmarked training (the grid's and the headline's); checkpoints go to
    ``folder/checkpoints``."""
    return TrainSettings(
        learning_rate=learning_rate,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        output_dir=str(folder / "checkpoints"),
        logging_steps=50,
    )
