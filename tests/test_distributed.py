"""DDP under torchrun and accelerate launch equals one process, and only the main process writes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_run, tiny_model_folder
from safetensors.torch import load_file

from peft_lofit.app import cli

WORKER = Path(__file__).parent / "ddp_worker.py"


def launch(command: list[str]) -> subprocess.CompletedProcess:
    """Run a launcher on the CPU (gloo; GPUs hidden); on failure show every error line of its stderr (they can be
    far from its end) and the end."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in result.stderr.splitlines() if re.search(r"Error|Traceback|terminate|Signal", line)]
    assert result.returncode == 0, "\n".join(errors[:60]) + "\n...\n" + result.stderr[-3000:]
    return result


def run_worker(launcher: list[str], output: Path, batch: int, objective: str) -> dict:
    launch([*launcher, str(WORKER), str(output), str(batch), objective])
    return load_file(output / "adapter" / "adapter_model.safetensors")


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    free_port(),
]


@pytest.mark.parametrize(
    "launcher, objective",
    [(TORCHRUN, "sft"), (TORCHRUN, "dpo"), (ACCELERATE, "sft")],
    ids=["torchrun-sft", "torchrun-dpo", "accelerate-sft"],
)
def test_two_process_ddp_equals_single_process(tmp_path, launcher, objective):
    single = run_worker([sys.executable], tmp_path / "single", batch=4, objective=objective)
    double = run_worker(launcher, tmp_path / "ddp", batch=2, objective=objective)  # same global batch of 4
    how = json.loads((tmp_path / "ddp" / "distributed.json").read_text())
    assert how["world_size"] == 2
    if objective == "dpo":  # heads in layer 1 only: epoch 2 reads layer 0's output from the cache
        assert how["cache_hits"] > 0
    assert single.keys() == double.keys()
    for key in single:
        assert single[key].abs().max() > 1e-3  # it trained
        torch.testing.assert_close(double[key], single[key], atol=1e-6, rtol=1e-5)


def test_lofit_run_under_torchrun_equals_single_process_and_writes_once(tmp_path):
    model_dir = tiny_model_folder(tmp_path / "tiny")
    common = [
        "run",
        *small_run(model_dir),
        "--k",
        "2",
        "--localize-epochs",
        "1",
        "--lr",
        "5e-2",
        "--localize-lr",
        "5e-2",
        "--threads",
        "1",
    ]
    assert cli.main([*common, "--batch-size", "4", "--output", str(tmp_path / "single")]) == 0
    result = launch(
        [*TORCHRUN, "-m", "peft_lofit.app.cli", *common, "--batch-size", "2", "--output", str(tmp_path / "ddp")]
    )
    assert result.stdout.count("| LoFiT (K = 2) |") == 1  # printed by the main process only
    single, double = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("single", "ddp"))
    assert double["heads"] == single["heads"]
    for metric, value in single["lofit"].items():
        assert double["lofit"][metric] == pytest.approx(value, abs=1e-6)
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("single", "ddp")]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=1e-5)
