"""``from peft_lofit.localize import localize``: the public entry point of step 1 (``peft_lofit.training.localize``)."""

from .training.localize import localization_config, localize

__all__ = ["localization_config", "localize"]
