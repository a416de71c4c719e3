"""Step 1 (localization), the L1 term, which vectors train in each step, and HeadSelection."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import projection_of, tiny_model, tiny_tokenizer
from peft import get_peft_model

from peft_lofit import LoFiTConfig, LoFiTLayer
from peft_lofit.localize import localize
from peft_lofit.training import TrainSettings, build_trainer, scaling_l1
from peft_lofit.training.heads import HeadSelection, random_heads, resolve_k

TARGET_HEAD = (1, 2)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def amplified_model():
    """Tiny Llama whose head (1, 2) feeds the residual stream 6x more strongly than the others."""
    model = tiny_model("llama")
    with torch.no_grad():
        projection_of(model, 1).weight[:, 16:24] *= 6  # columns of head 2 (head_dim 8)
    return model


def teacher_rows(tokenizer, count=64):
    """SFT rows whose completions come from the same model with only head (1, 2) scaled by 2.

    Only that head's scaling can reproduce them, so localization must rank it first.
    """
    teacher = get_peft_model(
        amplified_model(), LoFiTConfig(heads=[list(TARGET_HEAD)], use_scaling=True, use_offset=False)
    )
    for module in teacher.modules():
        if isinstance(module, LoFiTLayer):
            module.lofit_scaling["default"].data.fill_(1.0)
    generator = random.Random(0)
    rows = []
    for _ in range(count):
        prompt = "".join(generator.choice(LETTERS) for _ in range(6))
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = teacher.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        rows.append(
            {"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}
        )
    return rows


def test_localization_ranks_the_only_useful_head_first(tmp_path):
    tokenizer = tiny_tokenizer()
    model = amplified_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(learning_rate=0.02, epochs=5, l1_lambda=1e-3, output_dir=str(tmp_path), logging_steps=50)
    selection = localize(model, tokenizer, teacher_rows(tokenizer), "sft", settings)
    assert selection.ranked()[0] == list(TARGET_HEAD)
    assert selection.top(1) == [list(TARGET_HEAD)]
    # the model is handed back as it came: same modules, same weights, nothing frozen, no PEFT leftovers
    assert not any(isinstance(m, LoFiTLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


def test_localize_refuses_zero_lambda():
    with pytest.raises(ValueError, match="l1_lambda > 0"):
        localize(tiny_model("llama"), tiny_tokenizer(), [{"prompt": "a", "completion": "b"}], "sft", TrainSettings())


def sft_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("l1_lambda", [0.0, 0.3])
def test_l1_term_is_exactly_lambda_times_sum_abs_A(tmp_path, l1_lambda):
    tokenizer = tiny_tokenizer()
    rows = [{"prompt": "abc", "completion": "de"}] * 4
    config = LoFiTConfig(use_scaling=True, use_offset=False, init_weights=False)
    settings = TrainSettings(l1_lambda=l1_lambda, output_dir=str(tmp_path), batch_size=4)
    trainer = build_trainer(tiny_model("llama"), tokenizer, rows, "sft", config, settings)
    model = trainer.model
    batch = sft_batch(trainer)
    with_penalty = trainer.compute_loss(model, dict(batch))
    trainer.l1_lambda = 0.0
    without = trainer.compute_loss(model, dict(batch))
    hand_sum = sum(m.lofit_scaling["default"].abs().sum() for m in model.modules() if isinstance(m, LoFiTLayer))
    torch.testing.assert_close(with_penalty - without, l1_lambda * hand_sum.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaling_l1(model), hand_sum)


def test_step_one_trains_only_A_and_step_two_only_v_on_selected_heads(tmp_path):
    tokenizer = tiny_tokenizer()
    rows = [{"prompt": "abc", "completion": "de"}] * 8
    step1 = build_trainer(
        tiny_model("llama"),
        tokenizer,
        rows,
        "sft",
        LoFiTConfig(use_scaling=True, use_offset=False, init_weights="normal"),
        TrainSettings(l1_lambda=1e-3, output_dir=str(tmp_path / "a"), batch_size=8),
    )
    trainable = {n for n, p in step1.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lofit_scaling." in n for n in trainable)
    assert len(trainable) == 2  # every head of both layers, one (H, d) tensor per layer
    step1.train()

    heads = [[1, 3]]
    step2 = build_trainer(
        tiny_model("llama"),
        tokenizer,
        rows,
        "sft",
        LoFiTConfig(heads=heads),
        TrainSettings(output_dir=str(tmp_path / "b"), batch_size=8),
    )
    named = dict(step2.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {"base_model.model.model.layers.1.self_attn.o_proj.lofit_offset.default"}
    assert named[next(iter(trainable))].shape == (1, 8)
    before = {n: p.detach().clone() for n, p in named.items()}
    step2.train()
    changed = {n for n, p in step2.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_head_selection_top_save_load_heatmap(tmp_path):
    selection = HeadSelection(scores=[[0.1, 0.9, 0.3], [0.5, 0.2, 0.95]], metadata={"task": "x"})
    assert selection.ranked()[:3] == [[1, 2], [0, 1], [1, 0]]
    assert selection.top(2) == [[0, 1], [1, 2]]  # sorted by position
    assert selection.top(fraction=0.5) == [[0, 1], [1, 0], [1, 2]]
    path = selection.save(tmp_path / "heads.json")
    assert HeadSelection.load(path) == selection
    png = selection.heatmap(tmp_path / "heads.png", k=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert LoFiTConfig(heads=selection.top(2)).heads == [[0, 1], [1, 2]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k must be an integer from 1 to 6"),
        (dict(k=7), "from 1 to 6"),
        (dict(fraction=1.5), "fraction must be"),
        (dict(), "exactly one of k"),
        (dict(k=1, fraction=0.1), "exactly one of k"),
    ],
)
def test_bad_k(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_k(6, **kwargs)


def test_random_heads_are_seeded_and_distinct():
    first = random_heads([4, 4, 4], 5, seed=1)
    assert first == random_heads([4, 4, 4], 5, seed=1) and len({tuple(p) for p in first}) == 5
    assert first != random_heads([4, 4, 4], 5, seed=2)


def test_head_selection_load_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a head-selection JSON"):
        HeadSelection.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"heads": []}')
    with pytest.raises(ValueError, match="has no 'scores'"):
        HeadSelection.load(tmp_path / "other.json")


def test_localize_hands_the_model_back_even_when_training_fails(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    forward, use_cache = vars(model).get("forward"), model.config.use_cache
    rows = [{"prompt": "abc", "completion": "de"}] * 4
    calls = []
    hook = model.model.norm.register_forward_hook(
        lambda m, a, out: out * float("nan") if calls.append(1) or len(calls) == 2 else out
    )
    settings = TrainSettings(epochs=3, l1_lambda=1e-3, output_dir=str(tmp_path), batch_size=2)
    with pytest.raises(FloatingPointError, match="at step 2"):
        localize(model, tokenizer, rows, "sft", settings)
    hook.remove()
    assert not any(isinstance(m, LoFiTLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    assert vars(model).get("forward") is forward and model.config.use_cache == use_cache
    assert all(p.requires_grad for p in model.parameters()) and not model.training
