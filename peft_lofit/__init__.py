"""peft_lofit: LoFiT (Localized Fine-tuning on LLM Representations) as a PEFT method.

``import peft_lofit`` registers LoFiT with PEFT, after which ``get_peft_model(model, LoFiTConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM.from_pretrained`` work as for LoRA.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ._peft_type import ensure_lofit_peft_type
from ._version import __version__
from .config import LoFiTConfig
from .layer import LoFiTLayer
from .model import LoFiTModel

__all__ = ["LoFiTConfig", "LoFiTLayer", "LoFiTModel", "__version__"]

if ensure_lofit_peft_type() not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="lofit", config_cls=LoFiTConfig, model_cls=LoFiTModel, prefix="lofit_")
