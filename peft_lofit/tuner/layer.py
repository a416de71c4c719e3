"""LoFiTLayer: edits the heads entering an attention output projection.

The projection computes ``y = W z + b`` on ``z = [z_1, ..., z_H]`` (``z_h`` of size ``d``). For each selected head
``h`` of this layer the adapter stores ``A_h, v_h in R^d`` and feeds the projection

    z_h  <-  (1 + A_h) * z_h + v_h

Only the K selected heads are stored (``(K, d)`` per vector). In ``forward`` they are scattered once into dense
``(H * d,)`` vectors, so the edit is one multiply and one add over the projection input, whatever K is.

Merging is exact: ``W ((1 + A) * z + v) + b = (W diag(1 + A)) z + (W v + b)``; where the projection has no bias,
merging an offset creates one, and unmerging removes it again. Several adapters edit as
``z <- prod_i (1 + A_i) * z + sum_i v_i``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import HeadGeometry
from .config import LoFiTConfig

BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" rows in a mixed batch


def has_plain_weight(module: nn.Module) -> bool:
    """False for quantized weights, which merging cannot write into: torchao tensor subclasses, bitsandbytes
    ``Params4bit`` / ``Int8Params`` (``nn.Parameter`` subclasses) and integer storage."""
    weight = module.weight
    return (
        type(weight) in (nn.Parameter, torch.Tensor)
        and type(weight.data) is torch.Tensor
        and weight.dtype.is_floating_point
    )


def quantized_merge_message(weight_type: str) -> str:
    return (
        f"Cannot merge a LoFiT adapter into a quantized projection ({weight_type} weights). LoFiT works unmerged on "
        "quantized models; to merge, load the base model in full precision, then "
        "PeftModel.from_pretrained(base, adapter).merge_and_unload(), and quantize the merged model afterwards."
    )


class LoFiTLayer(nn.Module, BaseTunerLayer):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D`` output projection with one or more LoFiT adapters.

    Several active adapters combine as scalings that multiply and offsets that add, so their order does not matter
    and they merge one by one or together to the same layer: ``z <- (1 + A_1)(1 + A_2) * z + v_1 + v_2``.
    """

    adapter_layer_names = ("lofit_scaling", "lofit_offset")
    other_param_names = ("lofit_head_index",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoFiTConfig,
        geometry: HeadGeometry,
        heads: list[int],
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lofit_scaling = nn.ParameterDict({})
        self.lofit_offset = nn.ParameterDict({})
        self.lofit_head_index = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters = []
        self._bias_created_by_merge = False

        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape  # Conv1D stores (in, out)
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(
                f"LoFiT adapts nn.Linear or transformers Conv1D output projections, not {type(base).__name__}. "
                "Check `target_modules`."
            )
        if geometry.width != self.in_features:
            raise ValueError(
                f"{geometry.num_heads} heads x {geometry.head_dim} = {geometry.width} features, but the projection "
                f"takes {self.in_features}. Fix `num_heads=` / `head_dim=` in LoFiTConfig."
            )
        self.geometry = geometry
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, heads)

    @property
    def is_conv1d(self) -> bool:
        return isinstance(self.get_base_layer(), Conv1D)

    def update_layer(self, adapter_name: str, config: LoFiTConfig, heads: list[int]) -> None:
        """Create the vectors of ``adapter_name`` for the given head indices of this layer."""
        heads = sorted(heads)
        num_heads, head_dim = self.geometry.num_heads, self.geometry.head_dim
        if heads and (heads[0] < 0 or heads[-1] >= num_heads):
            raise ValueError(f"Head indices {heads} out of range: this layer has heads 0..{num_heads - 1}.")
        self.lofit_head_index[adapter_name] = torch.tensor(heads, dtype=torch.long)
        containers = {"scaling": self.lofit_scaling, "offset": self.lofit_offset}
        for vector in config.trained_vectors:
            containers[vector][adapter_name] = nn.Parameter(torch.zeros(len(heads), head_dim))
        self.reset_lofit_parameters(adapter_name, config.init_weights, config.init_std)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_lofit_parameters(self, adapter_name: str, init_weights, init_std: float = 1e-3) -> None:
        """``True``: zeros (identity). ``"normal"``: N(0, init_std^2). ``False``: visibly non-identity, A ~ N(0, 0.1^2)
        (so ``1 + A`` stays far from 0 and merges stay invertible) and v ~ N(0, 1)."""
        for container in (self.lofit_scaling, self.lofit_offset):
            if adapter_name not in container:
                continue
            with torch.no_grad():
                if init_weights is True:
                    container[adapter_name].zero_()
                else:
                    random_std = 0.1 if container is self.lofit_scaling else 1.0
                    container[adapter_name].normal_(0.0, init_std if init_weights == "normal" else random_std)

    def heads_of(self, adapter_name: str) -> list[int]:
        """The head indices (sorted) that ``adapter_name`` edits in this layer."""
        return self.lofit_head_index[adapter_name].tolist()

    def dense_vectors(self, adapter_name: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(1 + A, v)`` of one adapter scattered over all heads, each ``(H * d,)``; None for an absent vector.

        Heads the adapter does not select get scale 1 and offset 0. Differentiable in A and v.
        """
        index = self.lofit_head_index[adapter_name]
        num_heads, head_dim = self.geometry.num_heads, self.geometry.head_dim
        scale = offset = None
        if adapter_name in self.lofit_scaling:
            scaling = self.lofit_scaling[adapter_name]  # (K, d)
            scale = 1.0 + scaling.new_zeros(num_heads, head_dim).index_copy(0, index, scaling).flatten()  # (H*d,)
        if adapter_name in self.lofit_offset:
            vector = self.lofit_offset[adapter_name]  # (K, d)
            offset = vector.new_zeros(num_heads, head_dim).index_copy(0, index, vector).flatten()  # (H*d,)
        return scale, offset

    def combined_vectors(self, adapter_names: list[str]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(prod_i (1 + A_i), sum_i v_i)`` over the given adapters that this layer holds, each ``(H * d,)``; None
        where none of them has that vector. Differentiable."""
        scale = offset = None
        for name in adapter_names:
            if name not in self.lofit_head_index:
                continue
            name_scale, name_offset = self.dense_vectors(name)
            if name_scale is not None:
                scale = name_scale if scale is None else scale * name_scale
            if name_offset is not None:
                offset = name_offset if offset is None else offset + name_offset
        return scale, offset

    def edit(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``x * prod_i (1 + A_i) + sum_i v_i`` for the projection input ``x`` of shape ``(..., H * d)``."""
        scale, offset = self.combined_vectors(adapter_names)
        if scale is None and offset is None:
            return x
        input_dtype = x.dtype
        x = self._cast_input_dtype(x, (scale if scale is not None else offset).dtype)
        if scale is not None:
            x = x * scale
        if offset is not None:
            x = x + offset
        return x.to(input_dtype)

    def _mixed_batch_edit(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Edit each row of the batch with its own adapter (``"__base__"``: no edit)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0]} respectively (one name per batch row; '__base__' for none)."
            )
        edited = x.clone()
        for name in set(adapter_names):
            if name == BASE_ADAPTER_NAME or name not in self.lofit_head_index:
                continue
            rows = [i for i, row_adapter in enumerate(adapter_names) if row_adapter == name]
            edited[rows] = self.edit(x[rows], [name])
        return edited

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
        elif adapter_names is not None:
            if self.merged:
                raise ValueError(
                    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
                )
            x = self._mixed_batch_edit(x, adapter_names)
        elif not self.merged:
            x = self.edit(x, self.active_adapters)
        return self.base_layer(x, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------- merging
    def _input_axis_shape(self) -> tuple[int, int]:
        """Shape that broadcasts a per-input-feature vector over the weight: Linear is (out, in), Conv1D (in, out)."""
        return (-1, 1) if self.is_conv1d else (1, -1)

    def _project(self, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """``W v`` for a weight stored in this layer's layout."""
        return vector @ weight if self.is_conv1d else weight @ vector

    def _merged_vectors(self, adapter_names: list[str]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        scale, offset = self.combined_vectors(adapter_names)
        return tuple(t.detach().float() if t is not None else None for t in (scale, offset))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the projection: ``W <- W diag(S)``, ``b <- b + W_0 V`` with ``S = prod (1 + A)``,
        ``V = sum v`` over the adapters, and ``W_0`` the weight before any merge.

        Scalings multiply and offsets add, so merging adapters together or one after the other, in any order, gives
        the same layer as ``forward``. ``W_0 V`` is ``W (V / S_merged)`` where adapters with scalings ``S_merged``
        are already merged (exact when nothing is merged yet). With ``safe_merge`` the result is computed on copies
        and checked for NaN/inf before anything is written. Computed in float32, written in the weight's dtype.
        """
        adapter_names = [
            name for name in check_adapters_to_merge(self, adapter_names) if name in self.lofit_head_index
        ]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if not has_plain_weight(base):
            raise ValueError(quantized_merge_message(type(base.weight.data).__name__))
        scale, offset = self._merged_vectors(adapter_names)
        merged_scale, _ = self._merged_vectors(self.merged_adapters)
        weight = base.weight.data.float()
        new_weight = weight * scale.view(self._input_axis_shape()) if scale is not None else weight
        new_bias = None
        if offset is not None:
            original_offset = offset / merged_scale if merged_scale is not None else offset
            old_bias = base.bias.data.float() if base.bias is not None else weight.new_zeros(self.out_features)
            new_bias = old_bias + self._project(weight, original_offset)
        if safe_merge and not all(torch.isfinite(t).all() for t in (new_weight, new_bias) if t is not None):
            broken = ", ".join(adapter_names)
            raise ValueError(f"NaNs detected in the merged weights. The adapter {broken} seems to be broken")
        base.weight.data = new_weight.to(base.weight.dtype)
        if new_bias is not None:
            if base.bias is None:
                base.bias = nn.Parameter(new_bias.to(base.weight.dtype), requires_grad=False)
                self._bias_created_by_merge = True
            else:
                base.bias.data = new_bias.to(base.bias.dtype)
        self.merged_adapters.extend(adapter_names)

    def min_scale(self, adapter_names: list[str]) -> float:
        """Smallest ``|prod_i (1 + A_i)|`` over the heads, for the given adapters together (1.0 without scalings)."""
        scale, _ = self._merged_vectors(adapter_names)
        return 1.0 if scale is None else scale.abs().min().item()

    def unmerge(self) -> None:
        """Undo every merge: ``W_0 = W / S``, ``b <- b - W_0 V`` over all merged adapters; drop a bias merging made."""
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        scale, offset = self._merged_vectors(self.merged_adapters)
        weight = base.weight.data.float()
        if scale is not None:
            weight = weight / scale.view(self._input_axis_shape())
            base.weight.data = weight.to(base.weight.dtype)
        if offset is not None:
            base.bias.data = (base.bias.data.float() - self._project(weight, offset)).to(base.bias.dtype)
        self.merged_adapters.clear()
        if self._bias_created_by_merge:
            base.bias = None
            self._bias_created_by_merge = False

    def __repr__(self) -> str:
        return "lofit." + super().__repr__()
