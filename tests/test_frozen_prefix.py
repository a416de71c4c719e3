"""The frozen-lower-layers cache gives the plain path's losses and gradients, whatever the padding and batch order."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from peft import get_peft_model
from test_training import dpo_run

from peft_lofit import LoFiTConfig
from peft_lofit.training.frozen_prefix import FrozenPrefixCache, _keyable_4d_pattern

FAMILIES = ["llama", "gemma2", "gpt2", "gpt_neox", "opt"]
HEADS = [[2, 1], [3, 0]]  # the lowest adapted layer is 2 of 4


def four_layer_model(name: str):
    """Adapter on layers 2 and 3 of 4, in eval mode (the tiny configs have dropout, which the cache would bypass)."""
    depth = {"n_layer": 4} if name == "gpt2" else {"num_hidden_layers": 4}
    return get_peft_model(tiny_model(name, **depth), LoFiTConfig(heads=HEADS, init_weights=False))


def padded(sequences: list[list[int]], side: str, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids and mask, padded with id 0 on ``side`` to at least ``width``."""
    width = max(width, *map(len, sequences))
    ids, mask = (
        torch.zeros(len(sequences), width, dtype=torch.long),
        torch.zeros(len(sequences), width, dtype=torch.long),
    )
    for row, tokens in enumerate(sequences):
        span = slice(0, len(tokens)) if side == "right" else slice(width - len(tokens), width)
        ids[row, span], mask[row, span] = torch.tensor(tokens), 1
    return ids, mask


def loss_and_grads(model, ids, mask, positions=None):
    """Mean next-token loss over real tokens predicted from real tokens, and the gradients of the LoFiT vectors."""
    model.zero_grad()
    predicted_from_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1).bool()
    labels = ids.masked_fill(~(mask.bool() & predicted_from_real), -100)
    loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(result, reference):
    torch.testing.assert_close(result[0], reference[0], atol=1e-5, rtol=1e-5)
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_and_backward_equal_the_plain_path(family):
    model = four_layer_model(family)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (9, 5, 7)]
    first = (*padded(sequences, "right"), None)
    # The same sequences in another order, padded wider: every row must come from the cache.
    second = (*padded(sequences[::-1] + sequences[:1], "right", width=12), None)
    # Left padding with positions counted from the first real token, as in generation: cached too.
    ids, mask = padded(sequences, "left")
    third = (ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))

    batches = (first, second, third)
    plain = [loss_and_grads(model, *batch) for batch in batches]
    with FrozenPrefixCache(model) as cache:
        assert cache.boundary == 2 and cache.active
        cached = [loss_and_grads(model, *batch) for batch in batches]
    assert (cache.stats.misses, cache.stats.hits, cache.stats.cached_sequences) == (1, 2, 3)
    for result, reference in zip(cached, plain):
        assert_same(result, reference)


def test_a_hit_skips_the_frozen_layers_and_exit_restores_the_model():
    model = four_layer_model("llama")
    layers = model.base_model.model.model.layers
    calls = []
    for index, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda *args, index=index: calls.append(index))
    ids, mask = padded([[5, 6, 7, 8], [9, 10]], "right")
    with FrozenPrefixCache(model):
        model(input_ids=ids, attention_mask=mask)
        assert calls == [0, 1, 2, 3]
        calls.clear()
        model(input_ids=ids, attention_mask=mask)
        assert calls == [2, 3]  # layers 0 and 1 skipped
    assert all("forward" not in layer.__dict__ for layer in layers)
    calls.clear()
    model(input_ids=ids, attention_mask=mask)
    assert calls == [0, 1, 2, 3]


def test_no_graph_is_kept_below_the_boundary():
    model = four_layer_model("llama")
    layers = model.base_model.model.model.layers
    reached = []
    for index, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda *args, index=index: reached.append(index))
    model.enable_input_require_grads()  # what PEFT does for gradient checkpointing: the embeddings need grad
    ids, mask = padded([[5, 6, 7, 8]], "right")
    with FrozenPrefixCache(model):
        loss_and_grads(model, ids, mask)
    assert sorted(reached) == [2, 3]


def test_the_cache_stays_off_where_it_could_not_be_exact():
    low = get_peft_model(tiny_model("llama", num_hidden_layers=4), LoFiTConfig(heads=[[0, 1], [3, 0]]))
    assert "first decoder layer" in FrozenPrefixCache(low).inactive_reason

    base = tiny_model("llama", num_hidden_layers=4).requires_grad_(False)
    assert "nothing in the decoder layers is trainable" in FrozenPrefixCache(base).inactive_reason
    base.model.layers[3].requires_grad_(True)
    assert FrozenPrefixCache(base).active
    base.get_input_embeddings().weight.requires_grad_(True)  # only the embeddings below the boundary
    assert "are trainable" in FrozenPrefixCache(base).inactive_reason

    gpt2 = tiny_model("gpt2", n_layer=4).requires_grad_(False)
    gpt2.transformer.h[3].requires_grad_(True)
    gpt2.transformer.wpe.weight.requires_grad_(True)  # position embeddings: in the stack, not in a layer
    assert "are trainable" in FrozenPrefixCache(gpt2).inactive_reason

    stacked = get_peft_model(tiny_model("llama", num_hidden_layers=4), LoFiTConfig(heads=[[0, 1]]), adapter_name="old")
    stacked.add_adapter("new", LoFiTConfig(heads=HEADS))
    stacked.set_adapter("new")  # "old" (layer 0) is frozen but could be switched back on
    assert "PEFT modules" in FrozenPrefixCache(stacked).inactive_reason


def test_exit_restores_forwards_that_were_there_before():
    model = four_layer_model("llama")
    layers = model.base_model.model.model.layers
    marker = layers[0].forward  # e.g. what accelerate's hooks install as an instance attribute
    layers[0].forward = marker
    with FrozenPrefixCache(model):
        assert layers[0].forward is not marker
    assert layers[0].__dict__["forward"] is marker and "forward" not in layers[1].__dict__
    frozen = tiny_model("llama", num_hidden_layers=4).requires_grad_(False)  # inactive: nothing to touch
    frozen.model.layers[2].forward = marker
    with FrozenPrefixCache(frozen):
        pass
    assert frozen.model.layers[2].__dict__["forward"] is marker


def test_generation_and_hidden_state_requests_run_the_plain_path():
    model = four_layer_model("llama").eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    settings = dict(
        max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    plain = model.generate(prompt, **settings)
    with FrozenPrefixCache(model) as cache:
        model(input_ids=prompt)  # the prompt is cached; generation must still fill every layer's KV cache
        generated = [model.generate(prompt, **settings) for _ in range(2)]
        hidden = model(input_ids=prompt, output_hidden_states=True).hidden_states
    assert cache.stats.hits == 0
    for run in generated:
        assert torch.equal(run.sequences, plain.sequences)
        torch.testing.assert_close(torch.stack(run.logits), torch.stack(plain.logits), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.stack(hidden), torch.stack(model(input_ids=prompt, output_hidden_states=True).hidden_states)
    )


NO_GPT2_DROPOUT = dict(resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)
DROPOUT = {
    "llama_attention": ("llama", {"attention_dropout": 0.5}),  # a float attribute of the attention module
    "opt_layerdrop": ("opt", {"dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.5}),  # of the decoder stack
    "gpt2_residual": ("gpt2", {**NO_GPT2_DROPOUT, "resid_pdrop": 0.5}),  # nn.Dropout in a layer
    "gpt2_embeddings": ("gpt2", {**NO_GPT2_DROPOUT, "embd_pdrop": 0.5}),  # nn.Dropout in the stack, below layer 0
}


@pytest.mark.parametrize("case", sorted(DROPOUT))
def test_batches_with_active_dropout_run_the_plain_path(case):
    family, dropout = DROPOUT[case]
    depth = {"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4}
    model = get_peft_model(tiny_model(family, **depth, **dropout), LoFiTConfig(heads=HEADS)).train()
    ids, mask = padded([[5, 6, 7, 8]], "right")
    with FrozenPrefixCache(model) as cache:
        model(input_ids=ids, attention_mask=mask)
        model.eval()
        model(input_ids=ids, attention_mask=mask)
    assert (cache.stats.bypassed, cache.stats.misses) == (1, 1)


def test_memory_bound_stops_caching_new_sequences():
    model = four_layer_model("llama")
    ids, mask = padded([[5, 6, 7, 8], [9, 10]], "right")
    with FrozenPrefixCache(model, max_bytes=4 * 32 * 4) as cache:  # room for the first row (4 tokens x 32 floats)
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    assert (cache.stats.cached_sequences, cache.stats.misses, cache.stats.hits) == (1, 2, 0)


def test_dpo_training_with_the_cache_equals_training_without(tmp_path):
    """Heads in layer 1 of 2: the first step fills the cache (TRL scores the reference while building the trainer),
    the other three hit it."""
    plain_losses, plain_offsets = dpo_run(tmp_path, "plain", cache_frozen_layers=False, heads=[[1, 2]])
    losses, offsets, trainer = dpo_run(tmp_path, "cached", cache_frozen_layers=True, heads=[[1, 2]], with_trainer=True)
    stats = trainer.frozen_prefix_stats
    assert (stats.misses, stats.hits, stats.cached_sequences) == (1, 3, 2)  # 2 pairs, one packed row each
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), atol=1e-6, rtol=1e-5)
    for name, value in offsets.items():
        torch.testing.assert_close(value, plain_offsets[name], atol=1e-6, rtol=1e-5)


def test_4d_masks_are_cached_only_when_they_describe_their_rows():
    ids, positions = torch.tensor([[5, 6, 7], [8, 9, 10]]), {"position_ids": torch.arange(3).expand(2, 3)}
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    rows = causal.expand(2, 1, 3, 3)
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~rows, torch.finfo(torch.float32).min)
    assert _keyable_4d_pattern(rows, ids, positions) is not None
    assert _keyable_4d_pattern(additive, ids, positions) is not None
    assert _keyable_4d_pattern(rows, ids, {}) is None  # where the tokens are is not in the mask
    assert _keyable_4d_pattern(causal.expand(1, 1, 3, 3), ids, positions) is None  # one mask broadcast over the batch
    assert _keyable_4d_pattern(causal.expand(2, 2, 3, 3), ids, positions) is None  # one per head
    assert _keyable_4d_pattern(additive + 0.5 * rows, ids, positions) is None  # a bias baked into the mask
    attends_padding = rows.clone()
    attends_padding[:, :, 1, 1] = False  # token 1 is padding (does not attend to itself), token 2 still sees it
    assert _keyable_4d_pattern(attends_padding, ids, positions) is None
