"""DPO with each pair's prompt run once: chosen and rejected packed into one row that shares the prompt.

TRL's DPO batch is ``[prompt + chosen] * B`` followed by ``[prompt + rejected] * B`` (right-padded), so every prompt
goes through the model twice. ``prompt_once_per_pair`` packs pair ``i`` into one row

    prompt (p tokens) | chosen (c) | last prompt token again | rejected (r)

with position ids ``0..p+c-1 | p-1 | p..p+r-1`` and a mask under which the prompt and the chosen tokens attend as in
their own sequence, and the repeated prompt token and the rejected tokens attend to the prompt without its last token
and to themselves (so the repeated token's state is the last prompt token's, and it predicts the first rejected
token as that token predicts the first chosen one). Every completion token then sees exactly the tokens and positions
it sees in TRL's batch: the per-token log-probabilities, and so the losses and gradients, are the same up to float
rounding, for ``p + c + 1 + r`` tokens per pair instead of ``2p + c + r`` plus padding.

Used only where that holds: the families in ``PACKABLE_MODEL_TYPES`` with eager or SDPA attention, packed rows no
longer than a sliding window, and batches that have the pair structure (same prompt tokens, right padding,
completions at the end). Anything else runs TRL's plain path. The patch is on the model object while the context is
active: two trainers must not train the same model in threads at once.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Families whose every layer takes the 4-D mask and the position ids as given (tests/test_training.py). OPT,
# for one, derives its learned positions from the mask and would not be exact.
PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")


def can_pack(model) -> bool:
    """Whether ``model`` (a transformers causal LM) honours a custom 4-D mask and position ids in every layer."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    return getattr(config, "_attn_implementation", None) in ("eager", "sdpa")


def longest_packed_row(model) -> Optional[int]:
    """The longest packed row that stays exact: a sliding window (Mistral v0.1's 4,096, Qwen2's sliding layers) only
    cuts attention in rows longer than it, and the custom mask replaces it; None when there is no window."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "sliding_window", None)


@dataclass
class PackedPairs:
    """One packed row per pair (``P`` rows of ``T``) and where each of TRL's ``(2P, L - 1)`` positions comes from."""

    input_ids: torch.Tensor  # (P, T)
    position_ids: torch.Tensor  # (P, T)
    allowed: torch.Tensor  # (P, T, T) bool: query attends key
    shift_labels: torch.Tensor  # (P, T): the token each position predicts, -100 where none is scored
    source: torch.Tensor  # (2P, L - 1): packed position of TRL's shifted position
    valid: torch.Tensor  # (2P, L - 1) bool: a completion token is predicted there

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """(P, 1, T, T): boolean for SDPA, additive (0 / dtype min) for eager attention."""
        allowed = self.allowed[:, None]
        if implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(P, T) per-position values -> TRL's (2P, L - 1) layout, zero where no completion token is predicted."""
        pairs = packed.shape[0]
        row_of = torch.arange(2 * pairs, device=packed.device) % pairs  # (2P,)
        values = packed[row_of[:, None], self.source]  # (2P, L - 1)
        return values.masked_fill(~self.valid, 0)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Optional[PackedPairs]:
    """Pack TRL's DPO batch (see the module docstring); None when the batch does not have the pair structure."""
    rows, width = input_ids.shape
    if rows % 2 or attention_mask is None or attention_mask.dim() != 2:
        return None
    pairs, device = rows // 2, input_ids.device
    ids, mask, completion = input_ids.cpu(), attention_mask.cpu().bool(), labels.cpu() != -100
    lengths = mask.sum(1)  # (2P,)
    columns = torch.arange(width)
    starts = completion.int().argmax(1)  # first completion token of each row
    right_padded = torch.equal(mask, columns < lengths[:, None])
    tail = (columns >= starts[:, None]) & (columns < lengths[:, None])
    if not (right_padded and completion.any(1).all() and torch.equal(completion, tail)):
        return None
    if not torch.equal(starts[:pairs], starts[pairs:]) or bool((starts < 1).any()):
        return None
    if any(not torch.equal(ids[i, : starts[i]], ids[i + pairs, : starts[i]]) for i in range(pairs)):
        return None

    segments = []  # per pair: tokens, positions, group (0 prompt, 1 chosen, 2 repeated token + rejected)
    for i in range(pairs):
        p, chosen_end, rejected_end = int(starts[i]), int(lengths[i]), int(lengths[i + pairs])
        tokens = torch.cat([ids[i, :chosen_end], ids[i, p - 1 : p], ids[i + pairs, p:rejected_end]])
        positions = torch.cat([torch.arange(chosen_end), torch.tensor([p - 1]), torch.arange(p, rejected_end)])
        group = torch.cat([torch.zeros(p), torch.ones(chosen_end - p), torch.full((1 + rejected_end - p,), 2)]).long()
        segments.append((p, chosen_end, tokens, positions, group))
    packed_width = max(len(tokens) for _, _, tokens, _, _ in segments)
    packed_ids = torch.zeros(pairs, packed_width, dtype=ids.dtype)
    packed_positions = torch.zeros(pairs, packed_width, dtype=torch.long)
    allowed = torch.zeros(pairs, packed_width, packed_width, dtype=torch.bool)
    allowed[:, :, 0] = True  # padding queries attend to the first token only (no empty softmax); no one sees them
    shift_labels = torch.full((pairs, packed_width), -100, dtype=torch.long)
    source = torch.zeros(rows, width - 1, dtype=torch.long)
    valid = torch.zeros(rows, width - 1, dtype=torch.bool)
    for i, (p, chosen_end, tokens, positions, group) in enumerate(segments):
        n = len(tokens)
        packed_ids[i, :n], packed_positions[i, :n] = tokens, positions
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        rejected_query = (group == 2)[:, None]
        hidden_from_rejected = (group == 1)[None, :] | (torch.arange(n) == p - 1)[None, :]
        allowed[i, :n, :n] = causal & ~(rejected_query & hidden_from_rejected)
        # scored positions: the prompt's last token and chosen tokens but the last; the repeated token and rejected
        # tokens but the last
        for first, last in ((p - 1, chosen_end - 1), (chosen_end, n - 1)):
            shift_labels[i, first:last] = tokens[first + 1 : last + 1]
        rejected_end = int(lengths[i + pairs])
        source[i, p - 1 : chosen_end - 1] = torch.arange(p - 1, chosen_end - 1)
        source[i + pairs, p - 1 : rejected_end - 1] = torch.arange(chosen_end, n - 1)
        valid[i, p - 1 : chosen_end - 1] = valid[i + pairs, p - 1 : rejected_end - 1] = True
    return PackedPairs(*(t.to(device) for t in (packed_ids, packed_positions, allowed, shift_labels, source, valid)))


@contextmanager
def prompt_once_per_pair(model, enabled: bool = True):
    """While active, fused-head DPO calls of ``model`` (the transformers model TRL patched with
    ``add_fused_lm_head``) run each pair's prompt once; every other call, and batches without the pair structure,
    run as before."""
    if not enabled or not can_pack(model):
        yield
        return
    fused_forward = model.forward
    implementation = model.config._attn_implementation
    window = longest_packed_row(model)

    @functools.wraps(fused_forward)
    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        plain = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache")}
        packed = None
        if fused_lm_head and labels is not None and kwargs.get("input_ids") is not None and not args:
            if not any(v is not None for v in plain.values()):
                packed = pack_pairs(kwargs["input_ids"], kwargs.get("attention_mask"), labels)
        if packed is not None and window is not None and packed.input_ids.shape[1] > window:
            packed = None  # the sliding window would cut these rows: the plain path applies it
        if packed is None:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        output = fused_forward(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask(implementation, model.dtype),
            position_ids=packed.position_ids,
            shift_labels=packed.shift_labels,
            fused_lm_head=True,
            use_cache=False,
        )
        for name in PER_TOKEN_FIELDS:
            value = getattr(output, name, None)
            if value is not None:
                setattr(output, name, packed.unpack(value))
        output.label_mask = packed.valid
        output.loss = -output.log_probs.sum() / packed.valid.sum().clamp(min=1)
        return output

    model.forward = forward
    try:
        yield
    finally:
        model.forward = fused_forward
