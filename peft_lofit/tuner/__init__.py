"""LoFiT as a PEFT tuner: config, layer, model, the architecture table, merging and config compatibility.

This subpackage is the PEFT method alone. It imports torch, transformers and peft, and nothing from the rest of
peft_lofit (a test holds it to that), so that it reads like, and could be copied to, ``peft/tuners/lofit/``.
Importing it registers LoFiT with PEFT, after which ``get_peft_model(model, LoFiTConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM.from_pretrained`` work as for LoRA.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ._peft_type import ensure_lofit_peft_type
from .config import LoFiTConfig
from .layer import LoFiTLayer
from .model import LoFiTModel

__all__ = ["LoFiTConfig", "LoFiTLayer", "LoFiTModel"]

if ensure_lofit_peft_type() not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="lofit", config_cls=LoFiTConfig, model_cls=LoFiTModel, prefix="lofit_")
