"""LoFiTModel: injects LoFiT layers into the attention output projections of a transformers model."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.other import _set_adapter as _set_auxiliary_adapter
from torch import nn

from .architectures import (
    DEFAULT_TARGET_MODULES,
    HeadGeometry,
    ancestors,
    default_target_modules,
    head_geometry,
    layer_index,
    model_type_of,
    projection_in_features,
)
from .config import LoFiTConfig
from .layer import BASE_ADAPTER_NAME, LoFiTLayer, has_plain_weight, quantized_merge_message
from .merging import carry_merged_biases, check_can_carry_biases


def _adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0..2, 5'."""
    parts, start = [], None
    for index, number in enumerate(numbers):
        if start is None:
            start = number
        if index + 1 == len(numbers) or numbers[index + 1] != number + 1:
            parts.append(str(start) if start == number else f"{start}..{number}")
            start = None
    return ", ".join(parts)


def find_projections(model: nn.Module, config: LoFiTConfig) -> dict[int, tuple[str, HeadGeometry]]:
    """Map each layer index to (output projection name, head geometry), validating ``config.heads`` on the way.

    Raises a ValueError if no module matches, a layer has several matches, a module is not in a numbered layer, or
    a selected head names a layer without a projection or a head index past the layer's last head.
    """
    if config.target_modules is None:
        config = replace(config, target_modules=default_target_modules(model_type_of(model)))
    tuner_layers = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    found: dict[int, tuple[str, HeadGeometry]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in tuner_layers):
            continue
        match = check_target_module_exists(config, name)
        if not match or isinstance(match, _ExcludedModule):
            continue
        layer = layer_index(name)
        if layer is None:
            raise ValueError(
                f"`target_modules` matched {name!r}, which is not inside a numbered decoder layer, so its heads "
                "cannot be addressed as [layer, head]. Narrow `target_modules` to the attention output projection."
            )
        if layer in found:
            raise ValueError(
                f"`target_modules` matched two modules in layer {layer}: {found[layer][0]!r} and {name!r}. LoFiT "
                "needs exactly one attention output projection per layer; narrow `target_modules` "
                "(e.g. 'attn.c_proj' rather than 'c_proj', or a regex such as r'models\\.0\\..*o_proj' when a "
                "wrapper holds several models)."
            )
        geometry = head_geometry(
            ancestors(model, name), projection_in_features(module), config.num_heads, config.head_dim
        )
        if isinstance(module, LoFiTLayer) and module.geometry != geometry:
            raise ValueError(
                f"This adapter splits {name} into {geometry}, but the layer already holds adapters with "
                f"{module.geometry}; all adapters on a model must share num_heads and head_dim."
            )
        found[layer] = (name, geometry)
    if not found:
        raise ValueError(
            f"`target_modules`={config.target_modules!r} matched no module of the model. Pass the name of the "
            "attention output projection, e.g. target_modules=['self_attn.o_proj']."
        )
    for layer, head in config.heads or []:
        if layer not in found:
            raise ValueError(
                f"Head [{layer}, {head}] is in layer {layer}, which has no targeted attention output projection "
                f"(targeted layers: {_ranges(sorted(found))}). Check the head list against this model, and "
                "`target_modules` / `exclude_modules`."
            )
        num_heads = found[layer][1].num_heads
        if head >= num_heads:
            raise ValueError(
                f"Head [{layer}, {head}] does not exist: layer {layer} has {num_heads} heads (0..{num_heads - 1})."
            )
    return found


class LoFiTModel(BaseTuner):
    """Creates a LoFiT model from a pretrained transformers model (Yin et al., 2024, arXiv:2406.01563).

    Example:

        ```py
        >>> import peft_lofit
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_lofit.LoFiTConfig(heads=[[3, 1], [10, 7]]))
        ```
    """

    prefix: str = "lofit_"
    tuner_layer_cls = LoFiTLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    # ------------------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: LoFiTConfig, model_config: dict) -> LoFiTConfig:
        if peft_config.target_modules is None:
            # from the model itself, not `model_config`: a wrapper without a config holds a transformers model inside
            peft_config.target_modules = default_target_modules(model_type_of(self.model))
        return peft_config

    def _prepare_model(self, peft_config: LoFiTConfig, model: nn.Module) -> None:
        """Validate the head list against the model before anything is replaced."""
        find_projections(model, peft_config)

    @staticmethod
    def _check_target_module_exists(peft_config: LoFiTConfig, key: str):
        """Match the output projections, but only in layers that have a selected head."""
        match = check_target_module_exists(peft_config, key)
        if not match or isinstance(match, _ExcludedModule) or peft_config.heads is None:
            return match
        return match if layer_index(key) in {layer for layer, _ in peft_config.heads} else False

    def _create_and_replace(self, lofit_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer = layer_index(current_key)
        geometry = head_geometry(
            ancestors(self.model, current_key),
            projection_in_features(target),
            lofit_config.num_heads,
            lofit_config.head_dim,
        )
        if lofit_config.heads is None:
            heads = list(range(geometry.num_heads))
        else:
            heads = [head for head_layer, head in lofit_config.heads if head_layer == layer]
        if isinstance(target, LoFiTLayer):  # geometry was checked against it in `find_projections`
            target.update_layer(adapter_name, lofit_config, heads)
            return
        new_module = LoFiTLayer(target, adapter_name, lofit_config, geometry, heads)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    # -------------------------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check the checkpoint against the model before anything is loaded, so that a file that does not match its
        config is an error naming the tensors, not different outputs: every tensor must have a place in the model
        (a scaling tensor under ``use_scaling=False`` has none), the shape of that place, a float dtype and finite
        values."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {**dict(model.named_parameters()), **model.state_dict()}
        unknown = sorted(key for key in remapped if key not in expected)
        if unknown:
            raise ValueError(
                f"The adapter checkpoint has tensors this model and adapter config have no place for: {unknown[:4]}"
                f"{' ...' if len(unknown) > 4 else ''}. The weights file does not match adapter_config.json (e.g. "
                "scaling tensors with use_scaling=false), or was written for another model."
            )
        for key, tensor in remapped.items():
            if expected[key].shape != tensor.shape:
                raise ValueError(
                    f"Adapter tensor {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                    f"{tuple(expected[key].shape)} in this model (selected heads x head_dim). The adapter was trained "
                    "for a model with a different head geometry or head list; load it onto the base model it was "
                    "trained with."
                )
            if not tensor.is_floating_point():
                raise ValueError(f"Adapter tensor {key} has dtype {tensor.dtype}; LoFiT vectors are floating point.")
        broken = sorted(key for key, tensor in remapped.items() if not torch.isfinite(tensor).all())
        if broken:
            raise ValueError(f"Adapter tensors {broken} hold NaN or inf values; the adapter file is broken.")
        return remapped

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's delete (which refuses merged adapters), then one active set for the whole model.

        LoFiT layers hold only the adapters with a head in their layer, so PEFT's per-layer fallback would pick
        different adapters in different layers. The new active set is applied without ``set_adapter``, which would
        unmerge the adapters that are still merged.
        """
        was_active = list(self.active_adapters)
        super().delete_adapter(adapter_name)
        remaining = [name for name in was_active if name != adapter_name and name in self.peft_config]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
        # adapters loaded for inference stay frozen, as PEFT's own delete leaves them
        frozen = bool(remaining) and all(self.peft_config[name].inference_mode for name in remaining)
        _set_auxiliary_adapter(self.model, remaining, inference_mode=frozen)  # modules_to_save copies
        for module in self.model.modules():
            if isinstance(module, LoFiTLayer):
                module.set_adapter(remaining, inference_mode=frozen)
        self.active_adapter = remaining

    # ------------------------------------------------------------------------------------------ mixed batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Route ``adapter_names=[...]`` (one per batch row, ``"__base__"`` for none) to every LoFiT layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"`adapter_names` must be a list of str, one per batch row; got {adapter_names!r}.")
        known = set()
        for module in self.modules():
            if isinstance(module, LoFiTLayer):
                known |= set(module.lofit_head_index.keys())
        unknown = {name for name in adapter_names if name != BASE_ADAPTER_NAME} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # generate() repeats each row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        try:
            for module in self.modules():
                if isinstance(module, (LoFiTLayer, AuxiliaryTrainingWrapper)):  # modules_to_save copies too
                    hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(adapter_names))
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------------------------------------- merging
    def _check_merge_allowed(self) -> None:
        """PEFT's checks, then refuse, before any layer changes, to merge into quantized projections (both merge paths
        call this hook)."""
        super()._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, LoFiTLayer) and not has_plain_weight(module.get_base_layer()):
                raise ValueError(quantized_merge_message(type(module.get_base_layer().weight.data).__name__))

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge reversibly; refuses scalings with ``1 + A`` near 0, which unmerging would have to divide by."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for module_name, module in self.model.named_modules():
            if not isinstance(module, LoFiTLayer):
                continue
            scale = module.min_scale(list(dict.fromkeys([*module.merged_adapters, *names])))
            if scale < 1e-4:
                raise ValueError(
                    f"{module_name}: the merged scalings reach |prod (1 + A)| = {scale:.2g}, so merge_adapter() could "
                    "not be undone (unmerging divides by it). Use merge_and_unload(), which does not need to undo it."
                )
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _layers_needing_bias(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = adapter_names if adapter_names is not None else self.active_adapters
        return [
            module_name
            for module_name, module in self.model.named_modules()
            if isinstance(module, LoFiTLayer)
            and (module.get_base_layer().bias is None or module._bias_created_by_merge)
            and any(name in module.lofit_offset for name in names)
        ]

    def _unload_and_optionally_merge(
        self, merge=True, progressbar=False, safe_merge=False, adapter_names=None
    ) -> nn.Module:
        """PEFT's unload, with a LoFiT step on each side of a merge: before it, check that some route can carry the
        merged offsets as output-projection biases; after it, put the model in that form (see ``merging``)."""
        if merge:
            check_can_carry_biases(self.model, self._layers_needing_bias(adapter_names))
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        return carry_merged_biases(model) if merge else model

    # ------------------------------------------------------------------------------------------ weighted sums
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` with ``A = sum_i w_i A_i`` and ``v = sum_i w_i v_i`` over the union of their heads.

        A head that an adapter does not select counts as zero for it. The adapters must share target modules and head
        geometry; the new adapter has a vector if any of them has it.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; choose a new name.")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("Pass one weight per adapter, and at least one adapter.")
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} do not exist; existing: {sorted(self.peft_config)}.")
        configs = [self.peft_config[name] for name in adapters]
        for field_name in ("target_modules", "num_heads", "head_dim"):
            if len({repr(getattr(config, field_name)) for config in configs}) > 1:
                raise ValueError(f"Adapters {adapters} differ in `{field_name}`; only like adapters can be combined.")
        if any(config.heads is None for config in configs):
            heads = None
        else:
            heads = sorted({tuple(pair) for config in configs for pair in config.heads})
        self.peft_config[adapter_name] = replace(
            configs[0],
            heads=heads,
            use_scaling=any(config.use_scaling for config in configs),
            use_offset=any(config.use_offset for config in configs),
            init_weights=True,
            inference_mode=True,
        )
        self.inject_adapter(self.model, adapter_name)
        self._cast_adapter_dtype(adapter_name)  # same precision as the adapters it combines
        for module in self.model.modules():
            if isinstance(module, LoFiTLayer) and adapter_name in module.lofit_head_index:
                self._fill_weighted_sum(module, adapters, weights, adapter_name)

    @staticmethod
    def _fill_weighted_sum(layer: LoFiTLayer, adapters, weights, adapter_name) -> None:
        row_of = {head: row for row, head in enumerate(layer.heads_of(adapter_name))}
        for container in (layer.lofit_scaling, layer.lofit_offset):
            if adapter_name not in container:
                continue
            target = container[adapter_name]
            with torch.no_grad():
                target.zero_()
                for source_name, weight in zip(adapters, weights):
                    if source_name not in container:
                        continue
                    rows = [row_of[head] for head in layer.heads_of(source_name)]
                    target[rows] += weight * container[source_name].to(target.dtype)
