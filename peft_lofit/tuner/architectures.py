"""Where the attention heads live in each supported architecture, and how many there are.

LoFiT edits the input of the attention output projection, ``z = [z_1, ..., z_H]`` with ``z_h`` of size ``head_dim``.
This module answers three questions for a model:

- which module is the output projection (``DEFAULT_TARGET_MODULES``, keyed by ``config.model_type``);
- how the projection input splits into heads (``head_geometry``);
- which decoder layer a module belongs to (``layer_index``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

# Suffixes of the attention output projection, per `config.model_type`. The suffix includes the attention block's
# name where the MLP has a module of the same name (GPT-2's `mlp.c_proj`).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["self_attn.o_proj"],
    "mistral": ["self_attn.o_proj"],
    "mixtral": ["self_attn.o_proj"],
    "qwen2": ["self_attn.o_proj"],
    "qwen3": ["self_attn.o_proj"],
    "gemma": ["self_attn.o_proj"],
    "gemma2": ["self_attn.o_proj"],
    "gemma3": ["self_attn.o_proj"],
    "gemma3_text": ["self_attn.o_proj"],
    "phi3": ["self_attn.o_proj"],
    "olmo": ["self_attn.o_proj"],
    "olmo2": ["self_attn.o_proj"],
    "gpt2": ["attn.c_proj"],
    "gpt_neox": ["attention.dense"],
    "gptj": ["attn.out_proj"],
    "opt": ["self_attn.out_proj"],
}

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


@dataclass(frozen=True)
class HeadGeometry:
    """How a projection input of ``num_heads * head_dim`` features splits into heads."""

    num_heads: int
    head_dim: int

    def __str__(self) -> str:
        return f"{self.num_heads} heads x {self.head_dim}"

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


def text_config(model_config: Any) -> Any:
    """The decoder's config: ``text_config`` for multimodal wrappers (Gemma 3), the config itself otherwise."""
    get_text_config = getattr(model_config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else model_config


def default_target_modules(model_type: Optional[str]) -> list[str]:
    """The output-projection suffixes for ``model_type``; a ValueError that says what to pass otherwise."""
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    raise ValueError(
        f"LoFiT does not know where the attention output projection of model_type={model_type!r} is. Supported "
        f"families: {', '.join(sorted(DEFAULT_TARGET_MODULES))}. For another architecture pass "
        "`target_modules=[...]` (the module whose input is the concatenation of the attention heads, e.g. "
        "'self_attn.o_proj') and, where the model config has no `num_attention_heads`, `num_heads=` and `head_dim=` "
        "to LoFiTConfig."
    )


def ancestors(model: Any, module_name: str) -> list[Any]:
    """The modules that contain ``module_name``, nearest first: its parent, the parent's parent, ..., ``model``."""
    parts = module_name.split(".")[:-1]
    return [model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts), -1, -1)]


def _int_attribute(owner: Any, names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        value = getattr(owner, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _geometry_hints(owner: Any) -> tuple[Optional[int], Optional[int]]:
    """(number of heads, head width) that one module or config states, each None where it says nothing.

    transformers' attention modules carry them in family-specific combinations: GPT-2 and OPT ``num_heads`` and
    ``head_dim``; Llama, Mistral, Qwen2 and Gemma ``head_dim`` and a ``config``; GPT-NeoX ``head_size`` and a
    ``config``. A config states ``num_attention_heads`` (the query heads) and sometimes ``head_dim``.
    """
    num_heads = _int_attribute(owner, ("num_heads", "num_attention_heads", "n_head"))
    head_dim = _int_attribute(owner, ("head_dim", "head_size"))
    config = getattr(owner, "config", None)
    if config is not None and not isinstance(config, dict):
        config = text_config(config)
        num_heads = num_heads or _int_attribute(config, ("num_attention_heads",))
        head_dim = head_dim or _int_attribute(config, ("head_dim",))
    return num_heads, head_dim


def head_geometry(
    owners: list[Any], in_features: int, num_heads: Optional[int] = None, head_dim: Optional[int] = None
) -> HeadGeometry:
    """Split a projection input of ``in_features`` into heads.

    Explicit ``num_heads`` / ``head_dim`` (LoFiTConfig) come first. Otherwise the geometry is read from the nearest of
    ``owners`` (the modules above the projection, nearest first, see ``ancestors``) that states a number of heads:
    normally the attention module itself, so that a model wrapped in a module without a config works too. Under
    grouped-query attention that number is the query heads, which is what the output projection sees; a missing
    ``head_dim`` is ``in_features / num_heads``.
    """
    if num_heads is None and head_dim is None:
        for owner in owners:
            num_heads, head_dim = _geometry_hints(owner)
            if num_heads is not None:
                if head_dim is not None and num_heads * head_dim != in_features:
                    head_dim = None  # e.g. a module's head_dim that does not describe this projection
                break
    if num_heads is None and head_dim is not None and in_features % head_dim == 0:
        num_heads = in_features // head_dim
    if num_heads is None:
        raise ValueError(
            "Cannot tell how many attention heads the output projection has: neither its attention module nor any "
            "config above it states `num_heads` / `num_attention_heads`. Pass `num_heads=` (and `head_dim=` if "
            "needed) to LoFiTConfig."
        )
    if head_dim is None:
        if in_features % num_heads != 0:
            raise ValueError(
                f"The output projection takes {in_features} features, which do not split into {num_heads} heads. "
                "Pass `num_heads=` and `head_dim=` to LoFiTConfig."
            )
        head_dim = in_features // num_heads
    if num_heads * head_dim != in_features:
        raise ValueError(
            f"num_heads={num_heads} x head_dim={head_dim} = {num_heads * head_dim}, but the output projection takes "
            f"{in_features} features. Fix `num_heads=` / `head_dim=` in LoFiTConfig."
        )
    return HeadGeometry(num_heads=int(num_heads), head_dim=int(head_dim))


def layer_index(module_name: str) -> Optional[int]:
    """The decoder layer of a module: the index of the innermost numbered list it sits in, read from its dotted name.

    ``model.layers.3.self_attn.o_proj`` -> 3; inside a wrapper, ``models.0.model.layers.1.self_attn.o_proj`` -> 1.
    """
    matches = _LAYER_INDEX.findall(module_name)
    return int(matches[-1]) if matches else None


def model_type_of(model: Any) -> Optional[str]:
    """``config.model_type`` of the model, or of the first transformers model inside a wrapper without a config."""
    for module in model.modules():
        config = getattr(module, "config", None)
        model_type = getattr(text_config(config), "model_type", None) if config is not None else None
        if isinstance(model_type, str):
            return model_type
    return None


def projection_in_features(module: Any) -> int:
    """Input width of an output projection (``nn.Linear``, GPT-2 ``Conv1D``, or a tuner layer wrapping one)."""
    from transformers.pytorch_utils import Conv1D

    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if isinstance(module, Conv1D):
        return module.weight.shape[0]  # Conv1D stores (in, out)
    in_features = getattr(module, "in_features", None)
    if in_features is None:
        raise ValueError(
            f"LoFiT targets linear output projections, but {type(module).__name__} has no `in_features`. "
            "Check `target_modules`."
        )
    return in_features
