"""LoFiT with the tools around it: DDP launchers, torch.compile, gradient checkpointing, quantized bases, export,
and TRL's trainers used directly."""

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
from conftest import small_run, tiny_model, tiny_model_folder, tiny_tokenizer
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from peft_lofit import LoFiTConfig, LoFiTLayer
from peft_lofit.app import cli
from peft_lofit.checkpoint import hotswap_adapter, save_adapter
from peft_lofit.training import TrainSettings, train_adapter

WORKER = Path(__file__).parent / "ddp_worker.py"
HEADS = [[0, 1], [1, 3]]


# --------------------------------------------------------------------------------------------- distributed
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


# ------------------------------------------------------------------------------------------------ compile
def test_lofit_layer_has_no_graph_breaks():
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, use_scaling=True, init_weights=False))
    model.add_adapter("other", LoFiTConfig(heads=[[0, 2]], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = next(m for m in model.modules() if isinstance(m, LoFiTLayer))
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 5, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_adapted_model_adds_no_graph_breaks(inputs):
    base_breaks = torch._dynamo.explain(tiny_model("llama"))(inputs).graph_break_count
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, init_weights=False)).eval()
    assert torch._dynamo.explain(model)(inputs).graph_break_count == base_breaks


def test_hot_swap_into_compiled_model_does_not_recompile(tmp_path, inputs):
    donor = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, init_weights=False))
    save_adapter(donor, tmp_path / "donor")
    with torch.no_grad():
        expected = donor(inputs).logits
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS)).eval()
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        before = compiled(inputs).logits
        hotswap_adapter(model, tmp_path / "donor")
        with torch._dynamo.config.patch(error_on_recompile=True):
            after = compiled(inputs).logits
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)


def test_hot_swap_refuses_other_heads(tmp_path):
    save_adapter(get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 0]])), tmp_path / "other")
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS))
    with pytest.raises(ValueError, match="Cannot hot-swap: the saved adapter has heads="):
        hotswap_adapter(model, tmp_path / "other")


# --------------------------------------------------------------------------------- gradient checkpointing
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


# -------------------------------------------------------------------------------------------- quantized
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


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_writes_a_plain_transformers_checkpoint(tmp_path, inputs, dtype):
    """The merged folder keeps the base checkpoint's dtype and config (no pad token added for training)."""
    base_dir = tmp_path / "base"
    tiny_model("llama", dtype=dtype).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    adapted = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, use_scaling=True, init_weights=False))
    save_adapter(adapted, tmp_path / "adapter")
    with torch.no_grad():
        expected = adapted(inputs).logits
    command = ["export", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter")]
    assert cli.main([*command, "--merged", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    base_config = json.loads((base_dir / "config.json").read_text())
    assert config["attention_bias"] is True and config["dtype"] == base_config["dtype"] == str(dtype).split(".")[1]
    assert config.get("pad_token_id") == base_config.get("pad_token_id")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2  # bfloat16 weights: rounding of the merged weights
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs).logits, expected, atol=tolerance, rtol=tolerance)
    assert cli.main([*command, "--merged", str(tmp_path / "float32"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "float32" / "config.json").read_text())["dtype"] == "float32"


# --------------------------------------------------------------------------------------------------- TRL
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
