"""Training on TRL: speed-up paths give the same results as the plain path; seeded runs reproduce."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from peft_lofit import LoFiTConfig
from peft_lofit.training import TrainSettings, train_adapter

DPO_ROWS = [
    {"prompt": "q: ab a:", "chosen": " yes", "rejected": " no"},
    {"prompt": "q: cd a:", "chosen": " b", "rejected": " c"},
] * 4


def dpo_run(tmp_path, name, heads=((0, 1), (1, 2)), with_trainer=False, **overrides):
    """Two epochs of DPO on a tiny Llama; the logged losses and the trained vectors (and the trainer if asked)."""
    settings = TrainSettings(
        epochs=2, batch_size=4, learning_rate=1e-2, output_dir=str(tmp_path / name), logging_steps=1
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    config = LoFiTConfig(heads=[list(head) for head in heads])
    model, trainer = train_adapter(tiny_model("llama"), tiny_tokenizer(), DPO_ROWS, "dpo", config, settings)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    offsets = {n: p.detach().clone() for n, p in model.named_parameters() if "lofit_" in n}
    return (losses, offsets, trainer) if with_trainer else (losses, offsets)


def test_precomputed_reference_equals_reference_recomputed_each_step(tmp_path):
    fast_losses, fast_offsets = dpo_run(tmp_path, "fast", precompute_ref_log_probs=True)
    plain_losses, plain_offsets = dpo_run(tmp_path, "plain", precompute_ref_log_probs=False)
    assert len(fast_losses) == 4
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), atol=1e-6, rtol=1e-5)
    for name, value in fast_offsets.items():
        torch.testing.assert_close(value, plain_offsets[name], atol=1e-6, rtol=1e-5)


def test_seeded_runs_reproduce(tmp_path):
    first = dpo_run(tmp_path, "one")
    second = dpo_run(tmp_path, "two")
    assert first[0] == second[0]
    assert all(torch.equal(first[1][n], second[1][n]) for n in first[1])


def test_trainer_arguments_run_ddp_on_cpu_and_let_extra_override(monkeypatch):
    monkeypatch.setattr("peft_lofit.training.has_accelerator", lambda: False)
    arguments = TrainSettings(learning_rate=1e-3).trainer_arguments()
    assert arguments["use_cpu"] is True and arguments["bf16"] is False  # CPU: Trainer sets up DDP only with use_cpu
    arguments = TrainSettings(learning_rate=1e-3, extra={"learning_rate": 2e-3, "bf16": True}).trainer_arguments()
    assert arguments["learning_rate"] == 2e-3 and arguments["bf16"] is True
    monkeypatch.setattr("peft_lofit.training.has_accelerator", lambda: True)
    assert TrainSettings().trainer_arguments()["use_cpu"] is False


def test_bad_settings():
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        TrainSettings(learning_rate=0)
    with pytest.raises(ValueError, match="l1_lambda must be >= 0"):
        TrainSettings(l1_lambda=-1)


def test_no_backward_below_the_lowest_selected_layer(inputs):
    """Step 2 with heads in layer 1 only: nothing in layer 0 takes part in the backward pass."""
    from peft import get_peft_model

    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[1, 2]]))
    model.train()
    reached = []
    layers = model.base_model.model.model.layers
    layers[0].register_full_backward_hook(lambda *args: reached.append(0))
    layers[1].register_full_backward_hook(lambda *args: reached.append(1))
    model(inputs, labels=inputs).loss.backward()
    assert reached == [1]
    assert next(p for n, p in model.named_parameters() if "lofit_offset" in n).grad is not None
