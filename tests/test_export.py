"""``lofit export``: a plain transformers checkpoint, refused targets, and plugin-free serving (the folder
``lofit export --merged`` writes is what vLLM and llama.cpp read).

Neither engine runs here (see ``benchmarks/serving/`` for the checks that run them). What they read from a merged
folder is checked directly, for the families an engine loads: ``config.json`` names ``LlamaForCausalLM`` with
``attention_bias: true`` (vLLM's Llama builds ``o_proj`` with a bias from that flag; llama.cpp's converter maps
``model.layers.N.self_attn.o_proj.bias`` to ``blk.N.attn_output.bias``), and the safetensors hold every bias that flag
implies under the names Llama uses, with values that are exactly ``W_0 v`` (and ``W_0 diag(1 + A)`` for the weight).
Qwen2 and Mistral are merged "as Llama"; Qwen2's own q/k/v biases must survive. The existing tests cover the merge in
memory and reloading with transformers (test_peft_conformance and
``test_export_writes_a_plain_transformers_checkpoint`` here); the serving tests read the files as an engine does.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import HEADS, VOCAB, tiny_model, tiny_model_folder, tiny_tokenizer
from peft import get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from peft_lofit import LoFiTConfig, LoFiTLayer
from peft_lofit.app import cli
from peft_lofit.checkpoint import save_adapter

FAMILIES = ["llama", "qwen2", "mistral"]


def base_folder(arch: str, folder):
    model = tiny_model(arch)
    if arch == "qwen2":  # Qwen2's q/k/v biases start at zero: make them matter
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("_proj.bias"):
                    parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def read_safetensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(family, base model, unmerged LoFiT model, merged folder) after ``lofit export``, once per family."""
    arch = request.param
    tmp_path = tmp_path_factory.mktemp(f"serving_{arch}")
    base = base_folder(arch, tmp_path / "base")
    torch.manual_seed(0)
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(),
        LoFiTConfig(heads=HEADS, use_scaling=True, init_weights=False),
    ).eval()
    save_adapter(adapted, tmp_path / "adapter")
    arguments = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "returned as LlamaForCausalLM" for Qwen2 / Mistral
        assert cli.main([*arguments, "--merged", str(tmp_path / "merged")]) == 0
    return arch, base, adapted, tmp_path / "merged"


def test_merged_folder_has_the_config_flags_engines_read(exported):
    arch, base, _, merged = exported
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["attention_bias"] is True and config.get("mlp_bias") is False
    assert config["num_attention_heads"] == base.config.num_attention_heads
    assert config["num_key_value_heads"] == base.config.num_key_value_heads
    assert config["head_dim"] == base.config.hidden_size // base.config.num_attention_heads
    # Nothing a Llama loader would read as a sliding window (the merge refuses models that use one).
    assert not any(config.get(key) for key in ("sliding_window", "use_sliding_window", "layer_types"))
    assert (merged / "tokenizer.json").is_file() or (merged / "tokenizer_config.json").is_file()


def test_merged_safetensors_hold_every_bias_attention_bias_implies(exported):
    arch, base, _, merged = exported
    tensors = read_safetensors(merged)
    layers = base.config.num_hidden_layers
    hidden = base.config.hidden_size
    kv_width = base.config.num_key_value_heads * (hidden // base.config.num_attention_heads)
    widths = {"q_proj": hidden, "k_proj": kv_width, "v_proj": kv_width, "o_proj": hidden}
    for layer in range(layers):
        for projection, width in widths.items():
            name = f"model.layers.{layer}.self_attn.{projection}.bias"
            assert name in tensors, f"{name} missing: an engine would build the bias and find no value"
            assert tensors[name].shape == (width,) and tensors[name].dtype == torch.float32
        assert not any(key.startswith(f"model.layers.{layer}.mlp.") and key.endswith(".bias") for key in tensors)
    base_tensors = base.state_dict()
    for layer in range(layers):
        for projection in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{projection}.bias"
            expected = base_tensors.get(name, torch.zeros(widths[projection]))  # Qwen2: its own; else zero
            torch.testing.assert_close(tensors[name], expected, atol=0, rtol=0)
    assert not any(key.startswith("lofit") or "lofit_" in key or "base_layer" in key for key in tensors)


def test_merged_tensors_equal_what_the_adapter_implies(exported):
    """o_proj.bias = b_0 + W_0 v and o_proj.weight = W_0 diag(1 + A), from the adapter's own vectors."""
    _, base, adapted, merged = exported
    tensors = read_safetensors(merged)
    lofit_layers = {
        int(name.split(".layers.")[1].split(".")[0]): module
        for name, module in adapted.named_modules()
        if isinstance(module, LoFiTLayer)
    }
    assert sorted(lofit_layers) == sorted({layer for layer, _ in HEADS})
    for layer in range(base.config.num_hidden_layers):
        weight = base.model.layers[layer].self_attn.o_proj.weight.detach()
        bias, merged_weight = (tensors[f"model.layers.{layer}.self_attn.o_proj.{leaf}"] for leaf in ("bias", "weight"))
        if layer not in lofit_layers:
            torch.testing.assert_close(merged_weight, weight, atol=0, rtol=0)
            assert not bias.any()
            continue
        scale, offset = (vector.detach() for vector in lofit_layers[layer].combined_vectors(["default"]))
        assert offset.abs().max() > 0.1 and (scale - 1).abs().max() > 0.01  # a non-trivial adapter
        torch.testing.assert_close(bias, weight @ offset, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(merged_weight, weight * scale, atol=1e-7, rtol=1e-6)
        assert bias.abs().max() > 1e-3


def test_reloaded_merged_folder_computes_the_unmerged_adapter(exported, inputs):
    _, base, adapted, merged = exported
    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.vocab_size == VOCAB
    with torch.no_grad():
        expected = adapted(inputs).logits
        torch.testing.assert_close(reloaded(inputs).logits, expected, atol=1e-5, rtol=1e-5)
        assert (base(inputs).logits - expected).abs().max() > 0.1  # the check could fail: the adapter acts


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
