"""Make a merged model's config describe the output-projection biases that merging LoFiT offsets created.

Merged offsets live in the output projection's bias (``b <- b + W v``). Llama, Gemma and similar configs carry a switch
(``attention_bias``) that gives every attention projection a bias; once it is on, stock ``from_pretrained`` expects a
bias on q, k, v and o of every layer. ``make_config_carry_biases`` turns the switch on and gives every projection that
now needs one a zero bias, so the saved checkpoint loads with plain transformers and computes the same function.
Architectures without such a switch (Mistral, Qwen2) cannot carry offsets: ``check_can_carry_biases`` says so before
anything is touched.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import text_config

# Config attributes that add a bias to the attention projections, in the order they are tried.
BIAS_SWITCHES = ("attention_bias", "enable_bias")


def bias_switch(model_config) -> str | None:
    """The config attribute that gives attention projections a bias, or None where the architecture has none."""
    config = text_config(model_config)
    return next((name for name in BIAS_SWITCHES if hasattr(config, name)), None)


def check_can_carry_biases(model: nn.Module, modules_needing_bias: list[str]) -> None:
    """Raise a ValueError, before any change, if merged offsets would need a bias the checkpoint cannot load."""
    if not modules_needing_bias:
        return
    config = getattr(model, "config", None)
    if config is None or bias_switch(config) is None:
        model_type = getattr(config, "model_type", type(model).__name__)
        raise ValueError(
            f"Cannot merge LoFiT offsets into {model_type}: its output projection ({modules_needing_bias[0]}, and "
            f"{len(modules_needing_bias) - 1} more) has no bias, and its config has no switch ({', '.join(BIAS_SWITCHES)}) "
            "that would let a saved checkpoint load one, so merged offsets would be lost on reload. Keep the adapter "
            "unmerged (PeftModel / merge_adapter() in memory), or merge an adapter with use_offset=False."
        )


def _parameter_names_for(model: nn.Module) -> dict[str, torch.Size]:
    """Parameter names and shapes a fresh model of the same class and config would have (built on meta, no memory)."""
    with torch.device("meta"):
        skeleton = type(model)._from_config(model.config)
    return {name: param.shape for name, param in skeleton.named_parameters()}


def make_config_carry_biases(model: nn.Module) -> list[str]:
    """Turn on the bias switch where merging created biases, and add zero biases the switch implies.

    Returns the names of the zero biases added. A model whose parameters already match its config is left as is.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return []
    actual = {name: param for name, param in model.named_parameters()}
    if not set(actual) - set(_parameter_names_for(model)):
        return []
    switch = bias_switch(config)
    if switch is None:
        raise ValueError(f"{config.model_type} has no config switch for attention biases; see check_can_carry_biases.")
    setattr(text_config(config), switch, True)
    added = []
    for name, shape in _parameter_names_for(model).items():
        if name in actual:
            continue
        module_name, _, param_name = name.rpartition(".")
        if param_name != "bias":
            raise ValueError(f"Turning on `{switch}` would add {name}, which is not a bias; cannot merge safely.")
        module = model.get_submodule(module_name)
        module.bias = nn.Parameter(module.weight.new_zeros(shape), requires_grad=False)
        added.append(name)
    return added
