"""Make a merged model carry the output-projection biases that merging LoFiT offsets creates.

Merged offsets live in the output projection's bias (``b <- b + W v``). Whether a saved checkpoint can hold that bias
depends on the architecture, so each merge takes one of three routes, chosen before anything is touched:

- **switch**: the config has a switch that gives every attention projection a bias (``attention_bias`` for Llama,
  Gemma, OLMo, Qwen3; ``enable_bias`` for OPT). It is turned on and every projection the switch implies gets a zero
  bias, so stock ``from_pretrained`` loads the checkpoint and computes the same function. GPT-2 and GPT-NeoX always
  have the bias: nothing to change.
- **as Llama**: Qwen2 and Mistral have no switch, but without sliding-window attention they are the same computation
  as Llama with ``attention_bias=True`` (which holds Qwen2's q/k/v biases, zero biases for Mistral's, and the new
  o_proj biases). The merged model is returned as the Llama class of the same head (``LlamaForCausalLM`` for
  ``Qwen2ForCausalLM``), built around the very same tensors: no copy.
- **in memory**: a model without a transformers config (a wrapper module) is not a checkpoint format, so the bias is
  simply created. transformers models inside it get the switch route where they have a switch.

Where none applies (sliding-window layers in use, an unknown family without a switch), ``check_can_carry_biases``
raises before the merge, saying why and what to do instead.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import Optional

import torch
import transformers
from torch import nn

from .architectures import text_config

# Config attributes that add a bias to the attention projections, in the order they are tried.
BIAS_SWITCHES = ("attention_bias", "enable_bias")
# Families that are Llama with fixed biases when no sliding window is in use: model_type -> class-name prefix.
LLAMA_EQUIVALENTS = {"qwen2": "Qwen2", "mistral": "Mistral"}
# Config fields of those families that Llama has no use for (they describe the sliding window checked below).
_SLIDING_WINDOW_FIELDS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def bias_switch(model_config) -> Optional[str]:
    """The config attribute that gives attention projections a bias, or None where the architecture has none."""
    config = text_config(model_config)
    return next((name for name in BIAS_SWITCHES if hasattr(config, name)), None)


def _sliding_window_in_use(config) -> Optional[str]:
    """Why ``config`` attends through a sliding window (a reason to print); None when every layer sees all tokens.

    Where the config lists ``layer_types`` (Qwen2), they alone decide, as in the modelling code; otherwise (Mistral)
    a ``sliding_window`` shorter than the longest sequence does.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        sliding = [index for index, kind in enumerate(layer_types) if kind == "sliding_attention"]
        return f"its layers {sliding} use sliding-window attention" if sliding else None
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return f"sliding_window={window} is smaller than max_position_embeddings={config.max_position_embeddings}"
    return None


def _llama_class_for(model: nn.Module) -> Optional[type]:
    """The Llama class with the same head as ``model`` (``Qwen2ForCausalLM`` -> ``LlamaForCausalLM``), if any."""
    prefix = LLAMA_EQUIVALENTS.get(getattr(model.config, "model_type", None))
    name = type(model).__name__
    if prefix is None or not name.startswith(prefix):
        return None
    return getattr(transformers, "Llama" + name[len(prefix) :], None)


def check_can_carry_biases(model: nn.Module, modules_needing_bias: list[str]) -> None:
    """Raise a ValueError, before any change, if merged offsets would need a bias no route can carry (see above)."""
    config = getattr(model, "config", None)
    if not modules_needing_bias or config is None or bias_switch(config) is not None:
        return
    model_type = getattr(config, "model_type", type(model).__name__)
    more = len(modules_needing_bias) - 1
    where = f"({modules_needing_bias[0]}{f', and {more} more' if more else ''})"
    advice = (
        "Keep the adapter unmerged (PeftModel, or merge_adapter() in memory), or merge an adapter with "
        "use_offset=False (scalings fold into the weight)."
    )
    if model_type not in LLAMA_EQUIVALENTS:
        raise ValueError(
            f"Cannot merge LoFiT offsets into {model_type}: its output projection {where} has no bias, and its config "
            f"has no switch ({', '.join(BIAS_SWITCHES)}) that would let a saved checkpoint load one, so merged "
            f"offsets would be lost on reload. {advice}"
        )
    reason = _sliding_window_in_use(text_config(config))
    if reason is not None:
        raise ValueError(
            f"Cannot merge LoFiT offsets into {model_type}: its output projection {where} has no bias and its config "
            f"no switch for one. Without a sliding window it would be saved as the same computation in Llama form, "
            f"but {reason}, which Llama cannot express. {advice}"
        )
    if _llama_class_for(model) is None:
        raise ValueError(
            f"Cannot merge LoFiT offsets into {type(model).__name__}: transformers has no Llama "
            f"equivalent of this class to carry the output-projection biases. {advice}"
        )
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        raise ValueError(
            f"Cannot merge LoFiT offsets into {model_type} dispatched over several devices (device_map): the merged "
            "model is rebuilt in Llama form, which would lose the dispatch. Load the base model on one device to "
            f"merge. {advice}"
        )


def carry_merged_biases(model: nn.Module) -> nn.Module:
    """After a merge: the model in a form whose config loads the biases merging created (the routes above)."""
    if getattr(model, "config", None) is None:
        for module in _outermost_transformers_models(model):
            if bias_switch(module.config) is not None:
                make_config_carry_biases(module)
        return model
    if bias_switch(model.config) is not None:
        make_config_carry_biases(model)  # checks itself whether the merge created any bias
        return model
    return as_llama(model) if _extra_parameters(model) else model


def _outermost_transformers_models(model: nn.Module) -> list[nn.Module]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, transformers.PreTrainedModel) and not any(
            name.startswith(outer + ".") for outer, _ in found
        ):
            found.append((name, module))
    return [module for _, module in found]


def _skeleton(model_class: type, config, **kwargs) -> nn.Module:
    """A model of ``model_class`` on the meta device: its parameter names and shapes, no memory, no initialisation."""
    with torch.device("meta"):
        return model_class._from_config(config, **kwargs)


def _extra_parameters(model: nn.Module) -> set[str]:
    """Parameters of ``model`` that a fresh model of its class and config would not have (biases a merge created)."""
    return set(dict(model.named_parameters())) - set(dict(_skeleton(type(model), model.config).named_parameters()))


def _zero_biases_for_missing(model: nn.Module, expected: dict[str, torch.Size], switch: str) -> list[str]:
    """Give ``model`` a zero bias for every parameter of ``expected`` it lacks; anything but a bias is an error."""
    actual = dict(model.named_parameters())
    added = []
    for name, shape in expected.items():
        if name in actual:
            continue
        module_name, _, param_name = name.rpartition(".")
        if param_name != "bias":
            raise ValueError(f"Turning on `{switch}` would add {name}, which is not a bias; cannot merge safely.")
        module = model.get_submodule(module_name)
        module.bias = nn.Parameter(module.weight.new_zeros(shape), requires_grad=False)
        added.append(name)
    return added


def make_config_carry_biases(model: nn.Module) -> list[str]:
    """Switch route: turn the config's bias switch on and add the zero biases it implies; return their names.

    A model whose parameters already match its config is left as it is.
    """
    if not _extra_parameters(model):
        return []
    switch = bias_switch(model.config)
    setattr(text_config(model.config), switch, True)
    expected = {name: param.shape for name, param in _skeleton(type(model), model.config).named_parameters()}
    return _zero_biases_for_missing(model, expected, switch)


def llama_config_for(config) -> transformers.LlamaConfig:
    """The ``LlamaConfig`` (with ``attention_bias=True``) that computes what a Qwen2 / Mistral config without a
    sliding window computes. ``check_can_carry_biases`` has checked that there is no sliding window."""
    values = {key: value for key, value in config.to_dict().items() if key not in _SLIDING_WINDOW_FIELDS}
    for key in ("model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return transformers.LlamaConfig(**{**values, "attention_bias": True, "mlp_bias": False, "head_dim": head_dim})


def as_llama(model: nn.Module) -> nn.Module:
    """ "As Llama" route: the same tensors in the Llama class of the same head, with zero biases where Llama has a bias
    and ``model`` had none. Tied weights stay tied (the same parameter object is assigned under both names)."""
    llama_class = _llama_class_for(model)
    attention = getattr(model.config, "_attn_implementation", None)  # eager / sdpa / flash as the model was loaded
    llama = _skeleton(
        llama_class, llama_config_for(model.config), **({"attn_implementation": attention} if attention else {})
    )
    tensors = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        module_name, _, leaf = name.rpartition(".")
        module = llama.get_submodule(module_name)
        registry = module._parameters if isinstance(tensor, nn.Parameter) else module._buffers
        if leaf not in registry:
            raise ValueError(f"{type(model).__name__} has {name}, which {llama_class.__name__} has no place for.")
        registry[leaf] = tensor
    expected = {name: param.shape for name, param in llama.named_parameters() if param.is_meta}
    for name in expected:  # not filled from `model`: must be a bias Llama has and `model` had not
        module_name, _, leaf = name.rpartition(".")
        delattr(llama.get_submodule(module_name), leaf)
        llama.get_submodule(module_name).register_parameter(leaf, None)
    _zero_biases_for_missing(llama, expected, "attention_bias")
    still_meta = [name for name, tensor in chain(llama.named_parameters(), llama.named_buffers()) if tensor.is_meta]
    if still_meta:
        raise ValueError(f"Converting {type(model).__name__} to {llama_class.__name__} left {still_meta} unset.")
    llama.generation_config = model.generation_config
    llama.config._name_or_path = model.config._name_or_path
    llama.train(model.training)
    warnings.warn(
        f"{type(model).__name__} has no config switch for an output-projection bias, so the merged model is returned "
        f"as {llama_class.__name__} (attention_bias=True): the same computation and tensors, which save_pretrained "
        "writes as a checkpoint that stock transformers loads with the merged offsets.",
        stacklevel=3,
    )
    return llama
