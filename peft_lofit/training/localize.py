"""Step 1 of LoFiT: find the heads that matter for a task.

A LoFiT adapter on every head with only the scalings A (``A ~ N(0, init_std^2)``) is trained with

    loss = task loss + lambda * sum_lh |A_lh|

and each head is scored by ``||A_lh||_2``. The model is handed back exactly as it came in.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from peft import PeftModel

from ..tuner.architectures import layer_index
from ..tuner.config import LoFiTConfig
from ..tuner.layer import LoFiTLayer
from .heads import HeadSelection
from .settings import TrainSettings
from .trainers import train_adapter


def localize(
    model,
    tokenizer,
    rows: list[dict],
    objective: str,
    settings: Optional[TrainSettings] = None,
    init_std: float = 1e-3,
    target_modules=None,
    num_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    metadata: Optional[dict] = None,
    callbacks=None,
) -> HeadSelection:
    """Train per-head scalings under an L1 penalty on ``rows`` and return every head's score.

    ``rows``/``objective`` are as for ``training.build_trainer`` (``"dpo"``: prompt/chosen/rejected, ``"sft"``:
    prompt/completion). ``settings.l1_lambda`` is lambda. ``model`` must be a plain transformers model: to localize
    on top of an adapter, merge it first (``peft_model.merge_and_unload()``). ``callbacks``: TrainerCallbacks.
    """
    if isinstance(model, PeftModel):
        raise ValueError(
            "localize() takes the base model, not a PeftModel: merge the existing adapter first "
            "(model = peft_model.merge_and_unload()) or pass peft_model.get_base_model() after unload()."
        )
    settings = settings or TrainSettings.localization()
    if settings.l1_lambda == 0:
        raise ValueError("localize() needs l1_lambda > 0: the L1 penalty is what separates the heads.")
    config = localization_config(init_std, target_modules=target_modules, num_heads=num_heads, head_dim=head_dim)
    with handed_back_unchanged(model):
        peft_model, _ = train_adapter(model, tokenizer, rows, objective, config, settings, callbacks)
        scores = head_scores(peft_model)
    info = {"objective": objective, "init_std": init_std, **settings.to_dict(), **(metadata or {})}
    info.pop("extra", None)
    return HeadSelection(scores=scores, metadata=info)


def localization_config(init_std: float = 1e-3, **geometry) -> LoFiTConfig:
    """Step 1's adapter: scalings A ~ N(0, init_std^2) on every head, no offsets (``geometry``: target_modules,
    num_heads, head_dim)."""
    return LoFiTConfig(
        heads=None, use_scaling=True, use_offset=False, init_weights="normal", init_std=init_std, **geometry
    )


@contextmanager
def handed_back_unchanged(model):
    """Undo everything training does to ``model``, also when it fails: LoFiT layers (unloaded), frozen parameters,
    train/eval mode, and what TRL's trainers patch (the forward wrapper, ``config.use_cache``, dropout, tags)."""
    instance_forward = vars(model).get("forward")
    had_tags, tags = hasattr(model, "model_tags"), getattr(model, "model_tags", None)
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    dropout = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    try:
        yield
    finally:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoFiTLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
        if instance_forward is None:
            vars(model).pop("forward", None)
        else:
            model.forward = instance_forward
        if had_tags:
            model.model_tags = tags
        else:
            vars(model).pop("model_tags", None)
        if use_cache is not None:
            model.config.use_cache = use_cache
        for name, module in model.named_modules():
            if name in dropout:
                module.p = dropout[name]
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))
        model.train(was_training)


def head_scores(peft_model, adapter_name: str = "default") -> list[list[float]]:
    """``||A_lh||_2`` for every head of every adapted layer, as ``scores[layer][head]`` (layers in order)."""
    by_layer = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoFiTLayer) and adapter_name in module.lofit_scaling:
            norms = torch.zeros(module.geometry.num_heads)
            norms[module.lofit_head_index[adapter_name].cpu()] = (
                module.lofit_scaling[adapter_name].detach().float().norm(dim=-1).cpu()
            )
            by_layer[layer_index(name)] = norms.tolist()
    if not by_layer:
        raise ValueError(f"No LoFiT scalings found for adapter {adapter_name!r}.")
    return [by_layer[layer] for layer in sorted(by_layer)]
