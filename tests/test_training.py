"""Training on TRL: speed-up paths give the same results as the plain path; seeded and resumed runs reproduce; NaN
losses stop with the last good adapter; gradient checkpointing, quantized bases and TRL's trainers used directly."""

from __future__ import annotations

import pytest
import torch
from conftest import HEADS, tiny_model, tiny_tokenizer
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from peft_lofit import LoFiTConfig, LoFiTLayer
from peft_lofit.training import TrainSettings, train_adapter
from peft_lofit.training.shared_prompt import pack_pairs

DPO_ROWS = [
    {"prompt": "q: ab a:", "chosen": " yes", "rejected": " no"},
    {"prompt": "q: cd a:", "chosen": " b", "rejected": " c"},
] * 4
SFT_ROWS = [{"prompt": f"q: {c}{c} a:", "completion": f" {c}"} for c in "abcdefgh"]
ROWS = {"dpo": DPO_ROWS, "sft": SFT_ROWS}


def dpo_run(
    tmp_path,
    name,
    heads=((0, 1), (1, 2)),
    with_trainer=False,
    objective="dpo",
    family="llama",
    rows=None,
    model_config=None,
    **overrides,
):
    """Two epochs of DPO (or SFT) on a tiny model, on ``rows`` (default ``ROWS[objective]``); the logged losses and
    the trained vectors (and the trainer if asked)."""
    settings = TrainSettings(
        epochs=2, batch_size=4, learning_rate=1e-2, output_dir=str(tmp_path / name), logging_steps=1
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    config = LoFiTConfig(heads=[list(head) for head in heads])
    model = tiny_model(family, **(model_config or {}))
    model, trainer = train_adapter(model, tiny_tokenizer(), rows or ROWS[objective], objective, config, settings)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    offsets = {n: p.detach().clone() for n, p in model.named_parameters() if "lofit_" in n}
    return (losses, offsets, trainer) if with_trainer else (losses, offsets)


def assert_same_run(run, reference):
    """Same logged losses and the same trained vectors."""
    torch.testing.assert_close(torch.tensor(run[0]), torch.tensor(reference[0]), atol=1e-6, rtol=1e-5)
    for name, value in reference[1].items():
        torch.testing.assert_close(run[1][name], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "family, objective, cache",
    [(f, o, True) for f in ("llama", "gemma2", "gpt2") for o in ("dpo", "sft")] + [("llama", "dpo", False)],
)
def test_scoring_only_the_loss_positions_equals_scoring_every_position(tmp_path, family, objective, cache):
    """Whole runs under gradient accumulation (2 micro-batches per step), with and without the frozen-layer cache
    (heads in layer 1 of 2); gemma2 soft-caps its logits."""
    common = dict(
        heads=[[1, 2]], objective=objective, family=family, cache_frozen_layers=cache, batch_size=2,
        extra={"gradient_accumulation_steps": 2},
    )  # fmt: skip
    every_position = dpo_run(tmp_path, "every", score_loss_positions_only=False, **common)
    assert len(every_position[0]) == 4  # 8 rows / (2 x 2) = 2 steps per epoch
    assert_same_run(dpo_run(tmp_path, "loss_positions", **common), every_position)


@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_only_the_loss_positions_reach_the_output_layer(tmp_path, monkeypatch, objective):
    """The rows given to TRL's log-probability function: one per completion token, against every position."""
    import trl.trainer.utils as trl_utils

    seen = []
    function = trl_utils._ChunkedLogProbFunction

    class Recorder:
        @staticmethod
        def apply(hidden_states, *args):
            seen.append(hidden_states.shape[0])
            return function.apply(hidden_states, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recorder)
    rows = ROWS[objective][:2]
    tokenizer = tiny_tokenizer()
    completions = [[row["chosen"], row["rejected"]] if objective == "dpo" else [row["completion"]] for row in rows]
    # the tiny tokenizer has one token per character, and TRL appends EOS to every completion
    completion_tokens = sum(len(text) + 1 for pair in completions for text in pair)
    runs = {}
    for compact in (True, False):
        seen.clear()
        dpo_run(tmp_path, str(compact), objective=objective, rows=rows, batch_size=2, epochs=1,
                score_loss_positions_only=compact, share_prompts=False)  # fmt: skip
        runs[compact] = seen[-1]  # the one training step (DPO scores the reference before it)
    lengths = [
        len(tokenizer(row["prompt"] + text).input_ids) + 1 for row, pair in zip(rows, completions) for text in pair
    ]
    assert runs[True] == completion_tokens
    assert runs[False] == len(lengths) * (max(lengths) - 1)


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
    monkeypatch.setattr("peft_lofit.training.settings.has_accelerator", lambda: False)
    arguments = TrainSettings(learning_rate=1e-3).trainer_arguments()
    assert arguments["use_cpu"] is True and arguments["bf16"] is False  # CPU: Trainer sets up DDP only with use_cpu
    arguments = TrainSettings(learning_rate=1e-3, extra={"learning_rate": 2e-3, "bf16": True}).trainer_arguments()
    assert arguments["learning_rate"] == 2e-3 and arguments["bf16"] is True
    monkeypatch.setattr("peft_lofit.training.settings.has_accelerator", lambda: True)
    assert TrainSettings().trainer_arguments()["use_cpu"] is False


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True}], ids=["ours", "extra"])
def test_checkpointing_reaches_trl_under_its_current_name_without_a_deprecation_warning(extra, recwarn):
    config = SFTConfig(**TrainSettings(gradient_checkpointing=not extra, extra=extra).trainer_arguments())
    assert config.gradient_checkpointing is True  # ours, or the old name passed through ``extra``, takes effect
    if not extra:
        assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)]


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


# ------------------------------------------------------------------------------------------ prompt once per pair
def test_a_pair_packs_into_one_row_sharing_its_prompt():
    """Prompt [5, 6, 7], chosen [8, 9], rejected [10] (right-padded to 5), worked out by hand."""
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, -100, -100, 10, -100]])
    packed = pack_pairs(input_ids, attention_mask, labels)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert packed.shift_labels.tolist() == [[-100, -100, 8, 9, -100, 10, -100]]
    allowed = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # the repeated last prompt token: the prompt before it, and itself
        [1, 1, 0, 0, 0, 1, 1],
    ]
    assert packed.allowed.int().tolist() == [allowed]
    # TRL's shifted layout: chosen predicts 8 at 2 and 9 at 3; rejected predicts 10 at 2 (packed position 5)
    assert packed.valid.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    scores = torch.arange(7.0)[None]  # a per-position value: its packed index
    assert packed.unpack(scores).tolist() == [[0, 0, 2, 3], [0, 0, 5, 0]]


@pytest.mark.parametrize(
    "change",
    ["prompt tokens differ", "prompt lengths differ", "left padding", "odd rows"],
)
def test_batches_without_the_pair_structure_are_not_packed(change):
    input_ids = torch.tensor([[5, 6, 8], [5, 6, 9]])
    attention_mask = torch.ones(2, 3, dtype=torch.long)
    labels = torch.tensor([[-100, -100, 8], [-100, -100, 9]])
    assert pack_pairs(input_ids, attention_mask, labels) is not None
    if change == "prompt tokens differ":
        input_ids = torch.tensor([[5, 6, 8], [5, 7, 9]])
    elif change == "prompt lengths differ":
        labels = torch.tensor([[-100, -100, 8], [-100, 6, 9]])
    elif change == "left padding":
        input_ids, attention_mask = torch.tensor([[0, 5, 8], [0, 5, 9]]), torch.tensor([[0, 1, 1], [0, 1, 1]])
        labels = torch.tensor([[-100, -100, 8], [-100, -100, 9]])
    else:
        input_ids, attention_mask, labels = input_ids[:1], attention_mask[:1], labels[:1]
    assert pack_pairs(input_ids, attention_mask, labels) is None


@pytest.mark.parametrize(
    "family, cache, packs",
    [("llama", True, True), ("llama", False, True), ("gpt2", True, True), ("gpt_neox", True, True)]
    + [("qwen2", True, True), ("mistral", True, True), ("opt", True, False), ("gemma2", True, False)],
)
def test_prompt_once_per_pair_equals_the_plain_dpo_path(tmp_path, monkeypatch, family, cache, packs):
    """Whole DPO runs under gradient accumulation, with and without the frozen-layer cache (heads in layer 1 of 2).
    OPT (positions from the mask) and Gemma 2 (sliding-window layers) run the plain path."""
    import peft_lofit.training.shared_prompt as shared_prompt

    packed_batches, pack = [], shared_prompt.pack_pairs

    def recording_pack_pairs(*args):
        packed_batches.append(pack(*args))
        return packed_batches[-1]

    common = dict(
        heads=[[1, 2]], family=family, cache_frozen_layers=cache, batch_size=2,
        extra={"gradient_accumulation_steps": 2},
    )  # fmt: skip
    plain = dpo_run(tmp_path, "plain", share_prompts=False, **common)
    monkeypatch.setattr("peft_lofit.training.shared_prompt.pack_pairs", recording_pack_pairs)
    packed_run = dpo_run(tmp_path, "packed", with_trainer=True, **common)
    assert_same_run(packed_run, plain)
    # the reference pass (2 batches of 2 x 2 pairs) and 2 epochs of 4 micro-batches
    assert len(packed_batches) == (10 if packs else 0) and all(batch is not None for batch in packed_batches)
    stats = packed_run[2].frozen_prefix_stats
    if cache and packs:
        assert stats.hits > 0 and stats.bypassed == 0  # packed rows are cached too


@pytest.mark.parametrize("window, packs", [(4, False), (4096, True)])
def test_a_sliding_window_shorter_than_the_packed_rows_keeps_the_plain_path(tmp_path, monkeypatch, window, packs):
    """Mistral v0.1's window: rows no longer than it pack (the window cuts nothing), longer ones do not."""
    import peft_lofit.training.shared_prompt as shared_prompt

    packed, pack = [], shared_prompt.pack_pairs

    def recording_pack_pairs(*args):
        packed.append(pack(*args))
        return packed[-1]

    monkeypatch.setattr("peft_lofit.training.shared_prompt.pack_pairs", recording_pack_pairs)
    common = dict(heads=[[1, 2]], family="mistral", model_config={"sliding_window": window}, epochs=1)
    plain = dpo_run(tmp_path, "plain", share_prompts=False, **common)
    packed_run = dpo_run(tmp_path, "packed", **common)
    assert_same_run(packed_run, plain)
    assert packed and all(batch is not None for batch in packed)  # the batches have the pair structure either way
    assert shared_prompt.longest_packed_row(tiny_model("mistral", sliding_window=window)) == window
    assert (max(batch.input_ids.shape[1] for batch in packed) <= window) == packs


SFT_ROWS = [{"prompt": f"q{c}", "completion": f" {c}{c}"} for c in "abcdefgh"]


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def sft_settings(output, **kwargs):
    return TrainSettings(
        epochs=3,
        batch_size=4,
        learning_rate=5e-2,
        output_dir=str(output),
        save_checkpoints=True,
        logging_steps=1,
        **kwargs,
    )


def offsets(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lofit_" in n}


def test_resumed_training_equals_uninterrupted(tmp_path, monkeypatch):
    from peft_lofit.training import trainers

    config = LoFiTConfig(heads=HEADS, use_scaling=True)
    full, _ = train_adapter(
        tiny_model("llama"), tiny_tokenizer(), SFT_ROWS, "sft", config, sft_settings(tmp_path / "full")
    )

    original = trainers.build_trainer

    def interrupted(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(StopAt(3))  # after the epoch-1 checkpoint (step 2), inside epoch 2
        return trainer

    monkeypatch.setattr(trainers, "build_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_model("llama"), tiny_tokenizer(), SFT_ROWS, "sft", config, sft_settings(tmp_path / "cut"))
    monkeypatch.setattr(trainers, "build_trainer", original)
    assert (tmp_path / "cut" / "checkpoint-2").is_dir()
    resumed, _ = train_adapter(
        tiny_model("llama"),
        tiny_tokenizer(),
        SFT_ROWS,
        "sft",
        config,
        sft_settings(tmp_path / "cut", resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2")),
    )
    expected, got = offsets(full), offsets(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_nan_loss_stops_with_step_and_keeps_last_good_adapter(tmp_path):
    model = tiny_model("llama")
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output  # third forward = step 3

    model.model.norm.register_forward_hook(poison)  # TRL computes the loss from lm_head.weight directly
    config = LoFiTConfig(heads=HEADS)
    settings = TrainSettings(epochs=2, batch_size=2, learning_rate=5e-2, output_dir=str(tmp_path), logging_steps=1)
    with pytest.raises(
        FloatingPointError, match=r"loss became nan at step 3.*last good adapter is saved in .*last_good_adapter"
    ):
        train_adapter(model, tiny_tokenizer(), SFT_ROWS, "sft", config, settings)
    kept = load_file(tmp_path / "last_good_adapter" / "adapter_model.safetensors")
    assert kept and all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in kept.values())  # trained 2 steps


@pytest.mark.parametrize(
    "vectors", [dict(use_scaling=True, use_offset=False), dict(use_offset=True)], ids=["step1", "step2"]
)
def test_gradient_checkpointing_gives_the_same_adapter(tmp_path, vectors):
    rows = [{"prompt": f"q{c}", "completion": f" {c}{c}"} for c in "abcd"]
    results = []
    for checkpointing in (False, True):
        settings = TrainSettings(
            epochs=2,
            batch_size=2,
            learning_rate=5e-2,
            output_dir=str(tmp_path / str(checkpointing)),
            gradient_checkpointing=checkpointing,
            l1_lambda=1e-3 if vectors.get("use_scaling") else 0,
        )
        model, trainer = train_adapter(
            tiny_model("llama"),
            tiny_tokenizer(),
            rows,
            "sft",
            LoFiTConfig(heads=HEADS, init_weights="normal", **vectors),
            settings,
        )
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if "lofit_" in n})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-6, rtol=1e-5)


def test_quantized_base_trains_and_refuses_to_merge(inputs):
    pytest.importorskip("torchao", reason="torchao is in the [test] extra")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    full = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, init_weights=False))
    base = tiny_model("llama")
    quantize_(base, Int8WeightOnlyConfig())
    model = get_peft_model(base, LoFiTConfig(heads=HEADS))
    model.load_state_dict({n: p for n, p in full.state_dict().items() if "lofit_" in n}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, full(inputs).logits, atol=0.05, rtol=0.05)
        with model.disable_adapter():
            assert (model(inputs).logits - full(inputs).logits).abs().max() > 0.1  # the adapter acts
    model.train()
    model(inputs, labels=inputs).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(
            ValueError, match="Cannot merge a LoFiT adapter into a quantized projection .*full precision"
        ):
            merge()
    assert sum(isinstance(m, LoFiTLayer) for m in model.modules()) == 2 and not any(
        m.merged for m in model.modules() if isinstance(m, LoFiTLayer)
    )


def test_lofit_config_as_peft_config_of_trl_trainers(tmp_path):
    tokenizer = tiny_tokenizer()

    def arguments(config_class, name):
        return config_class(
            output_dir=str(tmp_path / name),
            num_train_epochs=1,
            per_device_train_batch_size=2,
            report_to="none",
            learning_rate=5e-2,
            use_cpu=True,
        )

    sft = SFTTrainer(
        model=tiny_model("llama"),
        args=arguments(SFTConfig, "sft"),
        train_dataset=Dataset.from_list([{"prompt": "qa", "completion": " bb"}] * 4),
        processing_class=tokenizer,
        peft_config=LoFiTConfig(heads=HEADS),
    )
    sft.train()
    dpo = DPOTrainer(
        model=tiny_model("llama"),
        args=arguments(DPOConfig, "dpo"),
        train_dataset=Dataset.from_list([{"prompt": "qa", "chosen": " bb", "rejected": " cc"}] * 4),
        processing_class=tokenizer,
        peft_config=LoFiTConfig(heads=HEADS),
    )
    dpo.train()
    for trainer in (sft, dpo):
        offsets = [p for n, p in trainer.model.named_parameters() if "lofit_offset" in n]
        assert len(offsets) == 2 and all(p.abs().max() > 0 for p in offsets)
