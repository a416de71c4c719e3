"""Broken files, unsafe files, interruptions, numerical faults and version skew."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_model_folder, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import peft_lofit.io as lofit_io
from peft_lofit import LoFiTConfig, LoFiTLayer
from peft_lofit.app import cli
from peft_lofit.app.tasks import get_task
from peft_lofit.checkpoint import hotswap_adapter, load_adapter, save_adapter, validate_adapter_folder
from peft_lofit.training import TrainSettings, train_adapter
from peft_lofit.training.heads import HeadSelection
from peft_lofit.tuner.config import normalize_heads

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
HEADS = [[0, 1], [1, 3]]


@pytest.fixture
def adapter_dir(tmp_path, inputs):
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, init_weights=False))
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(inputs).logits
    return tmp_path / "adapter", expected


# ------------------------------------------------------------------------------------------------ version skew
def with_config(adapter_dir: Path, fixture: str) -> Path:
    shutil.copy(FIXTURES / fixture, adapter_dir / "adapter_config.json")
    return adapter_dir


@pytest.mark.parametrize(
    "fixture, warning",
    [
        ("current.json", None),
        ("older_missing_fields.json", r"lacks fields \[.*'init_std'.*'use_scaling'.*\]; using their defaults"),
        (
            "newer_extra_fields.json",
            r"Unexpected keyword arguments \[.head_groups., .offset_dropout.\] for class LoFiTConfig",
        ),
        ("authors_field_name.json", "`lofit_heads` is now called `heads`"),
    ],
)
def test_configs_from_other_versions_load(adapter_dir, inputs, fixture, warning):
    folder, expected = adapter_dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_model("llama"), with_config(folder, fixture))
    config_markers = ("peft_lofit", "now called", "using their defaults", "Unexpected keyword arguments")
    lofit_warnings = [str(w.message) for w in caught if any(marker in str(w.message) for marker in config_markers)]
    if warning is None:
        assert lofit_warnings == []
    else:
        assert any(re.search(warning, message) for message in lofit_warnings), lofit_warnings
        assert sum("Unexpected keyword arguments" in message for message in lofit_warnings) <= 1, lofit_warnings
    assert model.peft_config["default"].heads == HEADS
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, expected)


@pytest.mark.parametrize(
    "fixture, message",
    [
        ("future_format.json", r"lofit_format=2 \(written by peft_lofit 1.0.0\).*pip install -U peft_lofit"),
        ("no_heads.json", "has no 'heads' field"),
    ],
)
def test_unclear_configs_fail_with_a_message(adapter_dir, fixture, message):
    folder, _ = adapter_dir
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_model("llama"), with_config(folder, fixture))


def test_config_with_conflicting_old_and_new_names(adapter_dir):
    folder, _ = adapter_dir
    config = json.loads((FIXTURES / "current.json").read_text())
    config["lofit_heads"] = [[0, 0]]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="both `lofit_heads` .* and `heads` with different values"):
        PeftModel.from_pretrained(tiny_model("llama"), folder)


# ------------------------------------------------------------------------------------------------ broken files
def test_valid_folder_passes(adapter_dir):
    assert validate_adapter_folder(adapter_dir[0])["heads"] == HEADS


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: (f / "adapter_model.safetensors").write_bytes(
                (f / "adapter_model.safetensors").read_bytes()[:40]
            ),
            "cannot be read as safetensors .* truncated or corrupted",
        ),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "cannot be read as safetensors"),
        (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LOF'), "is not valid JSON"),
        (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA"}'), "describes a 'LORA' adapter"),
        (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json not found"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors not found"),
        (
            lambda f: save_file(
                {k: v.to(torch.int32) for k, v in load_file(f / "adapter_model.safetensors").items()},
                f / "adapter_model.safetensors",
            ),
            "has dtype I32; LoFiT vectors are floating point",
        ),
    ],
)
def test_broken_adapter_files_are_named(adapter_dir, damage, message):
    folder, _ = adapter_dir
    damage(folder)
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_model("llama"), folder)


def test_truncated_file_through_plain_peft_still_errors(adapter_dir):
    folder, _ = adapter_dir
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(Exception, match="(?i)deserializ|header|invalid|incomplete"):
        PeftModel.from_pretrained(tiny_model("llama"), folder)


def test_int_tensors_in_checkpoint_rejected_by_plain_peft(adapter_dir):
    folder, _ = adapter_dir
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match="has dtype torch.int32; LoFiT vectors are floating point"):
        PeftModel.from_pretrained(tiny_model("llama"), folder)


def test_adapter_for_another_architecture(adapter_dir):
    folder, _ = adapter_dir
    with pytest.raises(ValueError, match="matched no module of the model"):
        PeftModel.from_pretrained(tiny_model("gpt2"), folder)


def rewrite_weights(folder, change):
    weights = folder / "adapter_model.safetensors"
    save_file(change(load_file(weights)), weights)


def with_scaling(tensors):
    return {**tensors, **{k.replace("lofit_offset", "lofit_scaling"): v.clone() for k, v in tensors.items()}}


@pytest.mark.parametrize(
    "change, message, hotswap_message",
    [
        (
            with_scaling,
            r"no place for: \['base_model.model.model.layers.0.self_attn.o_proj.lofit_scaling'",
            "lofit_scaling",
        ),
        (
            lambda t: {**t, "base_model.model.extra.weight": torch.ones(2)},
            r"no place for: \['base_model.model.extra",
            "extra.weight",
        ),
        (lambda t: {k: v.fill_(float("nan")) for k, v in t.items()}, r"hold NaN or inf values", "hold NaN or inf"),
        (lambda t: {k: v.fill_(float("inf")) for k, v in t.items()}, r"hold NaN or inf values", "hold NaN or inf"),
    ],
    ids=["scalings-under-use_scaling-false", "unknown-tensor", "nan", "inf"],
)
@pytest.mark.parametrize("loader", ["PeftModel.from_pretrained", "load_adapter", "hotswap_adapter"])
def test_weights_that_do_not_match_their_config_are_refused(adapter_dir, change, message, hotswap_message, loader):
    folder, _ = adapter_dir
    rewrite_weights(folder, change)
    if loader == "PeftModel.from_pretrained":
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(tiny_model("llama"), folder)
    elif loader == "load_adapter":
        with pytest.raises(ValueError, match=message):
            load_adapter(tiny_model("llama"), folder)
    else:
        model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS))
        with pytest.raises(ValueError, match="Cannot hot-swap.*" + re.escape(hotswap_message)):
            hotswap_adapter(model, folder)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_adapters_are_refused_and_never_run(adapter_dir, tmp_path):
    folder, _ = adapter_dir
    marker = tmp_path / "code_ran"
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump({"weights": Payload(str(marker))}, handle)
    with pytest.raises(ValueError, match=r"adapter_model.bin is a pickle file; peft_lofit loads safetensors only"):
        load_adapter(tiny_model("llama"), folder)
    with pytest.raises(pickle.UnpicklingError):  # plain PEFT path: torch.load(weights_only=True) refuses
        PeftModel.from_pretrained(tiny_model("llama"), folder)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ atomic saving
def test_interrupted_adapter_save_keeps_the_old_adapter(adapter_dir, monkeypatch, inputs):
    folder, expected = adapter_dir
    import peft.peft_model

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "safe_save_file", torn_write)
    other = get_peft_model(tiny_model("llama", seed=5), LoFiTConfig(heads=HEADS, init_weights=False))
    with pytest.raises(KeyboardInterrupt):
        save_adapter(other, folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]  # no staging leftovers
    model = load_adapter(tiny_model("llama"), folder)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, expected)


def test_interrupted_json_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "heads.json"
    HeadSelection(scores=[[1.0, 2.0]]).save(path)
    monkeypatch.setattr(lofit_io.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        HeadSelection(scores=[[5.0, 6.0]]).save(path)
    assert HeadSelection.load(path).scores == [[1.0, 2.0]]
    assert [p.name for p in tmp_path.iterdir()] == ["heads.json"]


KILL_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from peft import get_peft_model
import peft.peft_model
import peft_lofit.io as lofit_io
from peft_lofit.app import cli
from peft_lofit import LoFiTConfig
from peft_lofit.checkpoint import save_adapter

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

real_replace = os.replace
def replace_then_die(source, target):  # the old folder moved away, the new one not yet in place
    real_replace(source, target)
    die()

if {where!r} == "between renames":
    lofit_io.os.replace = replace_then_die
else:
    peft.peft_model.safe_save_file = die  # inside the writer
model = get_peft_model(tiny_model("llama", seed=5), LoFiTConfig(heads={heads!r}, init_weights=False))
save_adapter(model, {folder!r})
"""


@pytest.mark.parametrize("where", ["between renames", "inside the writer"])
def test_save_killed_by_sigkill_is_recovered_by_the_next_load_and_save(adapter_dir, inputs, where):
    folder, expected = adapter_dir
    script = KILL_DURING_SAVE.format(tests=str(Path(__file__).parent), where=where, heads=HEADS, folder=str(folder))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    leftovers = sorted(p.name for p in folder.parent.iterdir() if p.name != "adapter")
    assert leftovers and all(name.startswith((".adapter.old-", ".adapter.new-")) for name in leftovers)
    assert folder.exists() == (where == "inside the writer")
    model = load_adapter(tiny_model("llama"), folder)  # recovers: the previous adapter, whole
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, expected)
    save_adapter(model, folder)  # the next save (a writer) deletes what the interrupted one left
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]


def test_stale_temporaries_are_cleaned_by_the_next_save(adapter_dir):
    folder, _ = adapter_dir
    (folder.parent / ".adapter.new-stale").mkdir()
    save_adapter(get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS)), folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["adapter"]


def test_save_adapter_keeps_the_users_model_card_and_other_files(adapter_dir):
    folder, _ = adapter_dir
    (folder / "README.md").write_text("# My card\n")
    (folder / "notes.txt").write_text("keep me")
    save_adapter(get_peft_model(tiny_model("llama", seed=2), LoFiTConfig(heads=HEADS, init_weights=False)), folder)
    assert (folder / "README.md").read_text() == "# My card\n" and (folder / "notes.txt").read_text() == "keep me"


def test_export_refuses_a_file_or_the_base_model_folder_before_loading(tmp_path, adapter_dir, capsys):
    folder, _ = adapter_dir
    base = tiny_model_folder(tmp_path / "base")
    weights = (base / "model.safetensors").read_bytes()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    for merged, message in (
        (tmp_path / "a_file", "is a file"),
        (base, "is the --model folder"),
        (folder, "is the --adapter folder"),
        (folder.parent, "holds the --adapter folder"),
        (tmp_path / "run", "is a folder with other files in it"),
    ):
        assert cli.main(["export", "--adapter", str(folder), "--model", str(base), "--merged", str(merged)]) == 2
        assert message in capsys.readouterr().err
    assert (base / "model.safetensors").read_bytes() == weights and (tmp_path / "a_file").read_text() == "x"
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"
    assert cli.main(["export", "--adapter", str(folder), "--model", str(base), "--merged", str(tmp_path / "m")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # renamed into place


def test_missing_model_folder_says_so(capsys):
    assert cli.main(["eval", "--model", "/nonexistent/model", "--limit", "1"]) == 2
    assert "Model folder /nonexistent/model not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- interrupted training
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


# ---------------------------------------------------------------------------------------------- numerical faults
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


# ------------------------------------------------------------------------------------------ property-based tests
pairs = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=30)


@given(pairs)
def test_head_list_parsing_sorts_or_rejects_duplicates(raw):
    if len(set(raw)) < len(raw):
        with pytest.raises(ValueError, match="more than once"):
            normalize_heads(raw)
    else:
        assert normalize_heads(raw) == sorted([list(pair) for pair in raw])
        assert normalize_heads([list(p) for p in reversed(raw)]) == normalize_heads(raw)


@given(
    st.lists(
        st.one_of(st.integers(-5, -1), st.floats(0.5, 3.5), st.text(max_size=2), st.none()), min_size=1, max_size=3
    )
)
def test_head_list_parsing_rejects_non_indices(bad_values):
    with pytest.raises(ValueError, match=r"heads\[0\]"):
        normalize_heads([[bad_values[0], 0]])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    heads=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=8, unique=True),
    seed=st.integers(0, 1000),
    scale=st.floats(0.01, 0.9),
    arch=st.sampled_from(["llama", "gpt2", "opt"]),
)
def test_merge_unmerge_is_an_exact_round_trip(heads, seed, scale, arch):
    model = get_peft_model(tiny_model(arch), LoFiTConfig(heads=heads, use_scaling=True))
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoFiTLayer):
            with torch.no_grad():
                a = module.lofit_scaling["default"]
                a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) * scale)  # |A| < 1: invertible
                module.lofit_offset["default"].copy_(torch.randn(a.shape, generator=generator))
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "lofit_" not in k}
    model.merge_adapter()
    model.unmerge_adapter()
    after = {k: v for k, v in model.base_model.model.state_dict().items() if "lofit_" not in k}
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=1e-5)


def test_hot_swap_refuses_a_merged_adapter(adapter_dir):
    from peft_lofit.checkpoint import hotswap_adapter

    folder, _ = adapter_dir
    model = load_adapter(tiny_model("llama"), folder)
    model.merge_adapter()
    with pytest.raises(ValueError, match="is merged; call unmerge_adapter"):
        hotswap_adapter(model, folder)


def test_saving_over_an_adapter_keeps_other_files_and_never_mixes_saves(adapter_dir, monkeypatch):
    folder, _ = adapter_dir
    (folder / "head_selection.json").write_text("{}")
    other = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 2]], init_weights=False))
    save_adapter(other, folder)
    assert (
        validate_adapter_folder(folder)["heads"] == [[0, 2]] and (folder / "head_selection.json").read_text() == "{}"
    )
    real_replace, calls = os.replace, []

    def interrupted_replace(source, target):
        calls.append(target)
        if len(calls) == 2:  # old folder moved away, new one not yet in place
            raise KeyboardInterrupt
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    third = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[1, 1]], init_weights=False))
    with pytest.raises(KeyboardInterrupt):
        save_adapter(third, folder)
    backups = [p for p in folder.parent.iterdir() if p.name.startswith(".adapter.old-")]
    assert len(backups) == 1 and validate_adapter_folder(backups[0] / "adapter")["heads"] == [[0, 2]]  # intact


@pytest.mark.parametrize(
    "scores, message",
    [
        ([[0.5] * 8] * 3, r"scores 3 layers x 8 heads, but the model has 2 layers x 4 heads"),
        ([[0.5] * 4, [0.5] * 3], r"layers have different numbers of heads \(\[4, 3\]\)"),
        ([1, 2, 3], r"scores\[0\] is 1; each layer must be a non-empty list of head scores"),
        ("abc", r"scores must be a non-empty list of layers"),
        ([[0.5, True, 0.1, 0.2]] * 2, r"score \[0\]\[1\] is True"),
    ],
)
@pytest.mark.parametrize("command", ["train", "run"])
def test_every_command_checks_a_head_selection_against_the_model(tmp_path, capsys, scores, message, command):
    selection = tmp_path / "heads.json"
    selection.write_text(json.dumps({"format_version": 1, "scores": scores}))
    model = tiny_model_folder(tmp_path / "model")
    arguments = [command, "--model", str(model), "--heads", str(selection), "--train-limit", "2", "--epochs", "1"]
    assert cli.main(arguments + ["--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: progress bars
    assert error.startswith("lofit: error: ") and re.search(message, error), error
    assert not (tmp_path / "out" / "adapter").exists()


# ------------------------------------------------------------------------ property-based catalogue of bad inputs
CONFIG_VALUES = {
    "heads": st.one_of(st.none(), st.just([]), pairs, st.text(max_size=3), st.lists(st.integers(-2, 3), max_size=3)),
    "use_scaling": st.one_of(st.booleans(), st.integers(0, 2), st.text(max_size=2), st.none()),
    "use_offset": st.one_of(st.booleans(), st.integers(0, 2), st.text(max_size=2), st.none()),
    "init_weights": st.one_of(st.booleans(), st.sampled_from(["normal", "xavier", 1, 0.0, None])),
    "init_std": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.text(max_size=2)),
    "num_heads": st.one_of(st.none(), st.integers(-1, 5), st.floats(0, 3), st.booleans()),
    "head_dim": st.one_of(st.none(), st.integers(-1, 9), st.text(max_size=2)),
}


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({}, optional=CONFIG_VALUES))
def test_random_configs_build_or_raise_a_value_error(values):
    """Documented outcome only: a config whose fields have their documented types, or a ValueError naming one."""
    try:
        config = LoFiTConfig(**values)
    except ValueError as error:
        named_field = re.search(r"`(%s)[`\[]" % "|".join(CONFIG_VALUES), str(error))
        assert named_field or "nothing to learn" in str(error) or "lists [layer" in str(error), error
        return
    assert isinstance(config.use_scaling, bool) and isinstance(config.use_offset, bool)
    assert config.init_weights in (True, False, "normal") and type(config.init_weights) in (bool, str)
    assert math.isfinite(config.init_std) and config.init_std > 0
    assert config.heads is None or normalize_heads(config.heads) == config.heads


def corrupt(folder: Path, kind: str, position: int, byte: int) -> None:
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    if kind == "truncate":
        weights.write_bytes(bytes(data[: position % len(data)]))
    elif kind == "flip header byte":
        data[8 + position % (header_end - 8)] ^= byte or 1
        weights.write_bytes(bytes(data))
    elif kind == "wrong dtype":
        save_file(
            {k: v.to(torch.float16 if byte % 2 else torch.int64) for k, v in load_file(weights).items()}, weights
        )
    elif kind == "missing file":
        (folder / ("adapter_model.safetensors" if byte % 2 else "adapter_config.json")).unlink()
    elif kind == "extra file":
        (folder / "adapter_model.bin").write_bytes(bytes(data[: position % 64]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["truncate", "flip header byte", "wrong dtype", "missing file", "extra file"]),
    position=st.integers(0, 10_000),
    byte=st.integers(0, 255),
)
def test_corrupted_adapter_folders_load_correctly_or_say_why(
    adapter_dir, tmp_path_factory, inputs, kind, position, byte
):
    source, expected = adapter_dir
    folder = tmp_path_factory.mktemp("corrupt") / "adapter"
    shutil.copytree(source, folder)
    corrupt(folder, kind, position, byte)
    try:
        model = load_adapter(tiny_model("llama"), folder)
    except ValueError as error:
        assert str(folder) in str(error) or "Adapter tensor" in str(error), error
        return
    with torch.no_grad():  # it loaded: then it must be the adapter that was saved, not something else
        assert torch.equal(model(inputs).logits, expected) or kind == "wrong dtype"


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=st.sampled_from(["mquake", "clutrr"]),
    field_name=st.sampled_from(
        ["requested_rewrite", "questions", "new_answer", "new_answer_alias", "clean_story", "query", "target_text"]
    ),
    value=JSON_VALUES,
)
def test_malformed_data_rows_load_or_name_the_field(tmp_path_factory, task, field_name, value):
    good = {
        "mquake": {
            "requested_rewrite": [{"prompt": "{} is", "subject": "S", "target_new": {"str": "T"}}],
            "questions": ["Q?"],
            "new_answer": "A",
            "new_answer_alias": ["B"],
        },
        "clutrr": {"clean_story": "[A] is [B]'s son.", "query": "('B', 'A')", "target_text": "son"},
    }[task]
    row = {**good, field_name: value}
    folder = tmp_path_factory.mktemp("data")
    (folder / task).mkdir()
    name = "train.jsonl" if task == "mquake" else "train.json"
    (folder / task / name).write_text(json.dumps(row) + "\n" if task == "mquake" else json.dumps([row]))
    try:
        rows = get_task(task).training_rows("train", data_dir=folder)
    except ValueError as error:
        assert f"{name}, row 1: field" in str(error), error
        return
    assert len(rows) == 1 and all(isinstance(text, str) and text for text in rows[0].values())
