"""ITI and RepE-style baselines as LoFiT adapters: hand-computed directions, probe ranking, life cycle."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import projection_of, tiny_model, tiny_tokenizer
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_lofit.baselines import (
    adapter_with_offsets,
    collect_head_activations,
    collect_hidden_states,
    iti_adapter,
    iti_offsets,
    mass_mean_shift,
    probe_accuracies,
    reading_vectors,
    repe_adapter,
    repe_offsets,
)
from peft_lofit.checkpoint import save_adapter


def test_mass_mean_shift_and_alpha_scaling_by_hand():
    activations = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 0.0], [0.0, 2.0]]).view(4, 1, 1, 2)
    labels = torch.tensor([1, 1, 0, 0])
    theta, sigma = mass_mean_shift(activations, labels)
    # means: true (3, 0), false (0, 1) -> shift (3, -1) -> unit (3, -1) / sqrt(10)
    torch.testing.assert_close(theta[0, 0], torch.tensor([3.0, -1.0]) / math.sqrt(10))
    projections = torch.tensor([6.0, 12.0, 0.0, -2.0]) / math.sqrt(10)
    mean = projections.mean()
    expected_sigma = math.sqrt(((projections - mean) ** 2).sum() / 3)  # unbiased, as torch.std
    assert abs(sigma[0, 0].item() - expected_sigma) < 1e-6
    (offset,) = iti_offsets(activations, labels, [[0, 0]], alpha=15.0).values()
    torch.testing.assert_close(offset, 15.0 * expected_sigma * torch.tensor([3.0, -1.0]) / math.sqrt(10))


def planted(n=240, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 2, 4, 8, generator=generator)
    x[:, 1, 2, 0] += 3.0 * (2 * y - 1)  # head [1, 2] separates the classes
    return x, y


def test_probe_ranking_finds_the_planted_head():
    x, y = planted()
    accuracy = probe_accuracies(x[:160], y[:160], x[160:], y[160:])
    assert accuracy.shape == (2, 4)
    assert accuracy[1, 2] > 0.95 and accuracy.flatten().topk(2).values[1] < 0.75


def test_iti_adapter_adds_the_offsets_and_round_trips(tmp_path):
    x, y = planted()
    inputs = torch.randint(3, 64, (2, 6))
    model, selection = iti_adapter(tiny_model("llama"), x[:160], y[:160], x[160:], y[160:], k=1, alpha=2.0)
    assert selection.top(1) == [[1, 2]] and model.peft_config["default"].heads == [[1, 2]]
    expected_offset = iti_offsets(x[:160], y[:160], [[1, 2]], alpha=2.0)[(1, 2)]
    layer = projection_of(model.get_base_model(), 1)
    torch.testing.assert_close(layer.lofit_offset["default"][0], expected_offset)
    assert model.get_nb_trainable_parameters()[0] == 0  # computed, not trained
    with torch.no_grad():
        adapted = model(inputs).logits
    save_adapter(model, tmp_path / "iti")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "iti")
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, adapted, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(inputs).logits, adapted, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_repe_offsets_reproduce_the_reading_vector_on_the_attention_output(arch, tmp_path):
    model = tiny_model(arch)
    direction = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    offsets = repe_offsets(model, {1: direction}, coefficient=4.0)
    assert sorted(offsets) == [(1, h) for h in range(4)]
    v = torch.cat([offsets[(1, h)] for h in range(4)])
    projection = projection_of(model, 1)
    bias = projection.bias if projection.bias is not None else 0
    torch.testing.assert_close(projection(v) - bias, 4.0 * direction, atol=1e-4, rtol=1e-4)

    inputs = torch.randint(3, 64, (2, 6))
    reference = tiny_model(arch)
    hook = projection_of(reference, 1).register_forward_hook(lambda m, a, out: out + 4.0 * direction)
    with torch.no_grad():
        expected = reference(inputs).logits
    hook.remove()
    adapted = repe_adapter(model, {1: direction}, coefficient=4.0)
    save_adapter(adapted, tmp_path / "repe")
    reloaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "repe")
    with torch.no_grad():
        torch.testing.assert_close(adapted(inputs).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reloaded(inputs).logits, expected, atol=1e-4, rtol=1e-4)
        merged = adapted.merge_and_unload()
        torch.testing.assert_close(merged(inputs).logits, expected, atol=1e-4, rtol=1e-4)


def test_reading_vector_is_the_first_principal_component_signed_to_true():
    generator = torch.Generator().manual_seed(0)
    axis = torch.tensor([0.6, 0.8, 0.0])
    scale = torch.randn(50, 1, 1, generator=generator) * 3 + 5  # differences mostly along +axis
    false = torch.randn(50, 1, 3, generator=generator)
    true = false + scale * axis + 0.01 * torch.randn(50, 1, 3, generator=generator)
    vector = reading_vectors(true, false)[0]
    assert torch.allclose(vector, axis, atol=1e-2)


def test_activation_collection_picks_each_rows_last_token():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    texts = ["q: a a: b", "q: longer question a: yes"]
    together = collect_head_activations(model, tokenizer, texts, batch_size=2)
    alone = torch.cat([collect_head_activations(model, tokenizer, [t]) for t in texts])
    assert together.shape == (2, 2, 4, 8)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    states = collect_hidden_states(model, tokenizer, texts, batch_size=2)
    assert states.shape == (2, 2, 32)
    torch.testing.assert_close(
        states, torch.cat([collect_hidden_states(model, tokenizer, [t]) for t in texts]), atol=1e-5, rtol=1e-5
    )


def test_adapter_with_offsets_sets_exactly_the_given_heads():
    offsets = {(0, 3): torch.ones(8), (1, 0): -torch.ones(8)}
    model = adapter_with_offsets(tiny_model("gpt2"), offsets)
    assert model.peft_config["default"].heads == [[0, 3], [1, 0]]
    values = {n: p for n, p in model.named_parameters() if "lofit_offset" in n}
    assert len(values) == 2 and all(p.abs().min() == 1 for p in values.values())
