"""peft_lofit: LoFiT (Localized Fine-tuning on LLM Representations) as a PEFT method.

``import peft_lofit`` registers LoFiT with PEFT, after which ``get_peft_model(model, LoFiTConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM.from_pretrained`` work as for LoRA.

Layout: ``peft_lofit.tuner`` is the PEFT method itself (it imports nothing from the rest); ``peft_lofit.training``
trains it (step 1 is ``peft_lofit.localize.localize``); ``peft_lofit.app`` is the application on top (tasks,
pipeline, ``lofit`` command, default model, publishing); ``baselines`` holds the ITI / RepE comparisons; the
top-level ``io``, ``checkpoint``, ``distributed``, ``extras``, ``timing`` and ``markdown`` are helpers for all.
"""

from .tuner import LoFiTConfig, LoFiTLayer, LoFiTModel
from .tuner._version import __version__

__all__ = ["LoFiTConfig", "LoFiTLayer", "LoFiTModel", "__version__"]
