"""peft_lofit: LoFiT (Localized Fine-tuning on LLM Representations) as a PEFT method.

``import peft_lofit`` registers LoFiT with PEFT, after which ``get_peft_model(model, LoFiTConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM.from_pretrained`` work as for LoRA.

Layout: ``peft_lofit.tuner`` is the PEFT method itself (it imports nothing from the rest); ``localize``,
``training`` and ``frozen_prefix`` train it; ``tasks``, ``pipeline``, ``cli``, ``default_model`` and ``publish`` are
the application on top; ``baselines`` holds the ITI / RepE comparisons.
"""

from .tuner import LoFiTConfig, LoFiTLayer, LoFiTModel
from .tuner._version import __version__

__all__ = ["LoFiTConfig", "LoFiTLayer", "LoFiTModel", "__version__"]
