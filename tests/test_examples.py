"""The scripts in examples/ run end to end (on a tiny model and a few rows) and print what they promise."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from conftest import small_run, tiny_model_folder

EXAMPLES = Path(__file__).parents[1] / "examples"


def run_example(name: str, *argv: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.fixture
def model_dir(tmp_path):
    return str(tiny_model_folder(tmp_path / "tiny"))


def test_quickstart(monkeypatch, capsys):
    run_example("quickstart.py", monkeypatch=monkeypatch)
    assert (
        "reloaded adapter gives the same logits: True; merged model gives the same logits: True"
        in capsys.readouterr().out
    )


def test_truthfulqa_two_steps(tmp_path, model_dir, monkeypatch, capsys):
    output = tmp_path / "run"
    run_example(
        "truthfulqa_two_steps.py",
        "--model",
        model_dir,
        "--k",
        "2",
        "--localize-epochs",
        "1",
        "--epochs",
        "1",
        "--train-limit",
        "8",
        "--eval-limit",
        "2",
        "--output",
        str(output),
        monkeypatch=monkeypatch,
    )
    printed = capsys.readouterr().out
    assert "selected heads:" in printed and "LoFiT MC1" in printed and "(2 heads)" in printed
    assert {"heads.json", "heads.png", "adapter"} <= {path.name for path in output.iterdir()}


def test_sft_clutrr(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_example(
        "sft_clutrr.py",
        *small_run(model_dir),
        monkeypatch=monkeypatch,
    )
    assert "| LoFiT (K = 1) |" in capsys.readouterr().out
    assert (tmp_path / "lofit_runs" / "clutrr" / "adapter" / "adapter_model.safetensors").is_file()
