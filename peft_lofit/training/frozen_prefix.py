"""Compute the frozen lower decoder layers once per sequence while training an adapter that lives higher up.

LoFiT step 2 edits only the layers that hold a selected head. Every decoder layer below the lowest of them is frozen
and deterministic, so the hidden state entering that layer is a fixed function of the sequence: it is the same in
every epoch, for the policy and for the DPO reference (adapter disabled). ``FrozenPrefixCache`` exploits both facts:

- *truncated back-propagation*: the hidden state leaving the frozen part is detached, so no graph is kept below it;
- *cached lower layers*: the first time a sequence is seen its hidden state at the boundary is stored (per real
  token); afterwards the frozen layers are skipped for any batch whose sequences are all cached.

A sequence is identified by its real tokens and their positions, so the cache is independent of how batches are
padded (left or right) or shuffled: a real token only attends to real tokens at earlier positions. Rows with a 4-D
mask and explicit positions (``shared_prompt``'s packed DPO pairs) are identified by their real tokens, positions and
who attends whom among them. The results equal
the plain forward up to float rounding: losses, gradients and whole training runs.

The cache is used only while it is exact: nothing trainable and no PEFT module outside the layers from the boundary
up (checked on entry), and per batch no active dropout there, no KV cache (generation), no ``inputs_embeds`` and no
request for per-layer hidden states or attentions (such batches run the plain path). Under FSDP / DeepSpeed ZeRO-3,
where ranks must run the same layers, ``train_adapter`` does not use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..tuner.architectures import text_config


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder stack (the module that loops over the layers) and its ``ModuleList`` of layers."""
    config = text_config(getattr(model, "config", None))
    num_layers = getattr(config, "num_hidden_layers", None)
    for stack in model.modules():
        for child in stack.children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers:
                return stack, child
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: no ModuleList of config.num_hidden_layers="
        f"{num_layers} modules."
    )


def first_trainable_layer(layers: nn.ModuleList) -> Optional[int]:
    """Index of the lowest layer with a trainable parameter (None when no layer has one)."""
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return None


_RANDOM_ATTRIBUTES = ("dropout", "layerdrop", "jitter")  # float rates some modules apply themselves


def _is_stochastic(module: nn.Module) -> bool:
    """Dropout modules, and modules that draw random numbers from a float attribute in training (OPT's ``dropout`` and
    ``layerdrop``, Llama's ``attention_dropout``, Mixtral's ``jitter_noise``)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return any(
        isinstance(value, float) and value > 0
        for name, value in vars(module).items()
        if any(word in name for word in _RANDOM_ATTRIBUTES)
    )


@dataclass
class CacheStats:
    hits: int = 0  # batches that skipped the frozen layers
    misses: int = 0  # batches that ran them (and cached their sequences)
    bypassed: int = 0  # batches that ran the plain path (dropout active, no input_ids, ...)
    cached_sequences: int = 0
    cached_bytes: int = 0


class FrozenPrefixCache:
    """Context manager: while active, ``model``'s layers below ``boundary`` run once per distinct sequence.

    ``boundary`` defaults to the lowest layer with a trainable parameter. ``max_bytes`` bounds the memory the cached
    hidden states take (on the model's device); past it, new sequences run the plain path. Where the cache could not
    be exact (boundary 0, something trainable or a PEFT layer below it) the context does nothing and
    ``inactive_reason`` says why.
    """

    def __init__(self, model: nn.Module, boundary: Optional[int] = None, max_bytes: int = 4 * 2**30):
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._store: dict[bytes, torch.Tensor] = {}
        self._batch: Optional[dict] = None  # per-batch state set by the stack's pre-hook
        self._hooks: list = []
        self._shadowed: dict[int, object] = {}  # layer index -> the instance `forward` it had before (if any)
        self._output_len: Optional[int] = None  # layers returning tuples: their length (None = a plain tensor)
        self._stochastic: list[nn.Module] = []
        try:
            self.stack, self.layers = decoder_layers(model)
        except ValueError as error:
            self.boundary, self.inactive_reason = 0, str(error)
            return
        self.boundary = first_trainable_layer(self.layers) if boundary is None else boundary
        self.inactive_reason = self._why_not_exact(model)

    @property
    def active(self) -> bool:
        return self.inactive_reason is None

    def _frozen_part(self, model: nn.Module) -> list[nn.Module]:
        """Every module that can influence the boundary state: the decoder stack without the layers from the boundary
        up, and the input embeddings (conservatively, the final norm of the stack is included)."""
        upper = {id(m) for layer in self.layers[self.boundary :] for m in layer.modules()}
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        modules = [m for m in self.stack.modules() if id(m) not in upper]
        return modules + (list(embedding.modules()) if embedding is not None else [])

    def _why_not_exact(self, model: nn.Module) -> Optional[str]:
        """None when the part below the boundary is a fixed function during training; otherwise the reason."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        if self.boundary is None:
            return "nothing in the decoder layers is trainable"
        if self.boundary == 0:
            return "something trainable is in the first decoder layer"
        frozen = self._frozen_part(model)
        if any(p.requires_grad for m in frozen for p in m.parameters(recurse=False)):
            return f"parameters outside layers {self.boundary}+ (embeddings, lower layers, stack) are trainable"
        if any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in frozen):
            return f"PEFT modules outside layers {self.boundary}+ can be switched on and off"
        self._stochastic = [m for m in frozen if _is_stochastic(m)]
        return None

    # ---- installation ----------------------------------------------------------------------------------------------

    def __enter__(self) -> "FrozenPrefixCache":
        if self.active:
            self._hooks.append(self.stack.register_forward_pre_hook(self._start_batch, with_kwargs=True))
            self._hooks.append(self.stack.register_forward_hook(self._end_batch))
            for index, layer in enumerate(self.layers[: self.boundary]):
                if "forward" in layer.__dict__:
                    self._shadowed[index] = layer.__dict__["forward"]
                layer.forward = self._wrapped_forward(index, layer.forward)  # instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for index, layer in enumerate(self.layers[: self.boundary]):
            if index in self._shadowed:
                layer.forward = self._shadowed.pop(index)
            else:
                layer.__dict__.pop("forward", None)
        self._batch = None
        self._store.clear()  # the statistics stay

    # ---- per batch -------------------------------------------------------------------------------------------------

    def _start_batch(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        stochastic = any(m.training for m in self._stochastic)
        mask = kwargs.get("attention_mask")
        four_d = mask is not None and mask.dim() != 2
        pattern = _keyable_4d_pattern(mask, input_ids, kwargs) if four_d else None  # read once per batch
        custom_mask = four_d and pattern is None
        if (
            input_ids is None
            or kwargs.get("inputs_embeds") is not None
            or stochastic
            or custom_mask
            or _uses_kv_cache(kwargs)
            or kwargs.get("output_hidden_states")
            or kwargs.get("output_attentions")
        ):
            self._batch = None
            self.stats.bypassed += 1
            return
        keys, real = _sequence_keys(input_ids, None if four_d else mask, kwargs.get("position_ids"), pattern)
        hit = all(key in self._store for key in keys)
        self._batch = {"keys": keys, "real": real, "hit": hit}
        self.stats.hits += hit
        self.stats.misses += not hit

    def _end_batch(self, module, args, output):
        self._batch = None

    def _wrapped_forward(self, index: int, forward):
        last = index == self.boundary - 1

        def forward_with_cache(hidden_states, *args, **kwargs):
            batch = self._batch
            if batch is None:
                return forward(hidden_states, *args, **kwargs)
            if batch["hit"]:
                if not last:
                    return self._as_layer_output(hidden_states)  # skipped: the last frozen layer returns the cache
                return self._as_layer_output(self._assemble(hidden_states, batch))
            output = forward(hidden_states, *args, **kwargs)
            if not last:
                return output
            self._output_len = len(output) if isinstance(output, tuple) else None
            hidden = output[0] if isinstance(output, tuple) else output
            self._remember(hidden, batch)
            boundary_state = hidden.detach().requires_grad_(hidden_states.requires_grad)  # no graph below
            return self._as_layer_output(boundary_state)

        return forward_with_cache

    def _as_layer_output(self, hidden: torch.Tensor):
        return hidden if self._output_len is None else (hidden,) + (None,) * (self._output_len - 1)

    def _remember(self, hidden: torch.Tensor, batch: dict) -> None:
        for row, (key, real) in enumerate(zip(batch["keys"], batch["real"])):
            if key in self._store:
                continue
            size = int(real.sum()) * hidden.shape[-1] * hidden.element_size()
            if self.stats.cached_bytes + size > self.max_bytes:
                return
            self._store[key] = hidden[row, real].detach().clone()  # (n_real, hidden_size)
            self.stats.cached_sequences += 1
            self.stats.cached_bytes += size

    def _assemble(self, like: torch.Tensor, batch: dict) -> torch.Tensor:
        """The boundary hidden state of the batch, (B, T, hidden_size), requiring grad where ``like`` (the frozen
        part's input) does; padding positions are zero (masked)."""
        stored = [self._store[key] for key in batch["keys"]]
        state = like.new_zeros(like.shape, dtype=stored[0].dtype)  # the dtype layer boundary-1 returned
        for row, (cached, real) in enumerate(zip(stored, batch["real"])):
            state[row, real] = cached
        return state.requires_grad_(like.requires_grad)


def _uses_kv_cache(kwargs: dict) -> bool:
    """Generation passes a KV cache that every layer must fill, so skipped layers would leave it incomplete."""
    return kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, T, T) booleans of a (B, 1, T, T) boolean or additive (0 where allowed) mask."""
    pattern = mask[:, 0].detach().cpu()
    return pattern if pattern.dtype == torch.bool else pattern == 0


def _keyable_4d_pattern(mask: torch.Tensor, input_ids, kwargs) -> Optional[torch.Tensor]:
    """Who attends whom, (B, T, T) on the CPU, of a 4-D mask that fully describes its rows, so that rows can be
    cached by (tokens, positions, mask); None for any other mask. Such a mask is one per row (B, 1, T, T), comes with
    explicit position ids (it says who attends whom, not where tokens are), is boolean or additive with only 0 and
    the dtype's minimum (no biases), and lets real tokens (those that attend to themselves) attend to real tokens
    only."""
    if input_ids is None or kwargs.get("position_ids") is None or mask.dim() != 4:
        return None
    if mask.shape[0] != input_ids.shape[0] or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == torch.finfo(mask.dtype).min)).all()):
        return None
    allowed = _allowed(mask)
    real = allowed.diagonal(dim1=1, dim2=2)  # (B, T)
    return None if bool((allowed & real[:, :, None] & ~real[:, None, :]).any()) else allowed


def _sequence_keys(
    input_ids: torch.Tensor, attention_mask, position_ids, pattern: Optional[torch.Tensor] = None
) -> tuple[list[bytes], list[torch.Tensor]]:
    """Per row: a key made of the real tokens and their positions, and the boolean mask of the real tokens.

    With a 2-D (padding) mask a real token attends to the real tokens before it. With the ``pattern`` of a 4-D mask
    (``_keyable_4d_pattern``; e.g. ``shared_prompt``'s packed pairs) the real tokens are those that attend to
    themselves, and the key also holds who attends whom among them.
    """
    ids = input_ids.detach().cpu().long()
    if pattern is not None:
        mask = pattern.diagonal(dim1=1, dim2=2)
    elif attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = attention_mask.detach().cpu().bool()
    positions = None if position_ids is None else position_ids.detach().cpu().long().expand_as(ids)
    keys, real = [], []
    for row in range(ids.shape[0]):
        where = mask[row]
        index = torch.nonzero(where).flatten() if positions is None else positions[row][where]
        key = ids[row][where].numpy().tobytes() + b"|" + index.numpy().tobytes()
        if pattern is not None:  # who attends whom among the real tokens, as a digest (not n^2 bytes per row)
            key += b"|" + hashlib.sha256(pattern[row][where][:, where].numpy().tobytes()).digest()
        keys.append(key)
        real.append(where.to(input_ids.device))
    return keys, real
