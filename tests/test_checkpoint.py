"""Adapter folders: validation of broken, mismatched and unsafe files; atomic saves that survive kills; hot swap."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HEADS, tiny_config, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peft_lofit.io as lofit_io
from peft_lofit import LoFiTConfig
from peft_lofit.checkpoint import hotswap_adapter, load_adapter, save_adapter, validate_adapter_folder
from peft_lofit.training.heads import HeadSelection


def test_adapter_loaded_onto_other_geometry_names_parameter_and_shapes(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1]], init_weights=False))
    model.save_pretrained(tmp_path)
    config = tiny_config("llama")
    config.num_attention_heads = config.num_key_value_heads = 2  # head_dim 16 instead of 8
    config.head_dim = 16
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        ValueError, match=r"lofit_offset.* has shape \(1, 8\) in the checkpoint but \(1, 16\) in this model"
    ):
        PeftModel.from_pretrained(other, tmp_path)


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


def test_hot_swap_refuses_a_merged_adapter(adapter_dir):
    from peft_lofit.checkpoint import hotswap_adapter

    folder, _ = adapter_dir
    model = load_adapter(tiny_model("llama"), folder)
    model.merge_adapter()
    with pytest.raises(ValueError, match="is merged; call unmerge_adapter"):
        hotswap_adapter(model, folder)


def test_hot_swap_refuses_other_heads(tmp_path):
    save_adapter(get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 0]])), tmp_path / "other")
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS))
    with pytest.raises(ValueError, match="Cannot hot-swap: the saved adapter has heads="):
        hotswap_adapter(model, tmp_path / "other")
