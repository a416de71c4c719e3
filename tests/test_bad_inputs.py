"""Bad input gets a clear ValueError, raised before the model is modified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BloomConfig

from peft_lofit import LoFiTConfig, LoFiTLayer


@pytest.mark.parametrize(
    "heads, message",
    [
        ([[0, 1], [0, 1]], r"lists \[layer 0, head 1\] more than once"),
        ([], "`heads` is empty"),
        ([[0]], r"heads\[0\]` is \[0\]: each entry must be a \[layer, head\] pair"),
        ([[0, 1, 2]], r"each entry must be a \[layer, head\] pair"),
        (["0,1"], r"each entry must be a \[layer, head\] pair"),
        ([[0, 1.5]], "the head index must be an integer, got float"),
        ([[True, 1]], "the layer index must be an integer, got bool"),
        ([[-1, 0]], "the layer index must be >= 0"),
        ([[0, -2]], "the head index must be >= 0"),
        ("0,1", "must be a list of \\[layer, head\\] pairs"),
        (3, "must be a list of \\[layer, head\\] pairs"),
    ],
)
def test_malformed_head_lists(heads, message):
    with pytest.raises(ValueError, match=message):
        LoFiTConfig(heads=heads)


def test_numpy_and_torch_indices_are_accepted_and_sorted():
    config = LoFiTConfig(heads=[(np.int64(1), torch.tensor(2)), (0, 3)])
    assert config.heads == [[0, 3], [1, 2]]


def test_nothing_to_learn():
    with pytest.raises(ValueError, match="nothing to learn"):
        LoFiTConfig(use_scaling=False, use_offset=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(init_weights="xavier"), "`init_weights` must be True, False or 'normal'"),
        (dict(init_weights=1), "`init_weights` must be True, False or 'normal'; got 1"),
        (dict(init_weights=0.0), "`init_weights` must be True, False or 'normal'"),
        (dict(use_offset="no"), "`use_offset` must be True or False; got 'no'"),
        (dict(use_scaling=1), "`use_scaling` must be True or False; got 1"),
        (dict(init_std=0.0), "`init_std` must be a positive finite number"),
        (dict(init_std="big"), "`init_std` must be a positive finite number.*got 'big'"),
        (dict(init_std=float("inf")), "`init_std` must be a positive finite number"),
        (dict(init_std=float("nan")), "`init_std` must be a positive finite number"),
        (dict(num_heads=0), "`num_heads` must be a positive integer"),
        (dict(head_dim=2.5), "`head_dim` must be a positive integer"),
    ],
)
def test_bad_config_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoFiTConfig(**kwargs)


def assert_untouched(model):
    assert not any(isinstance(module, LoFiTLayer) for module in model.modules())
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize(
    "config, message",
    [
        (
            LoFiTConfig(heads=[[2, 0]]),
            r"Head \[2, 0\] is in layer 2, which has no targeted attention output projection \(targeted layers: 0..1\)",
        ),
        (LoFiTConfig(heads=[[0, 0], [1, 4]]), r"Head \[1, 4\] does not exist: layer 1 has 4 heads \(0..3\)"),
        (
            LoFiTConfig(heads=[[1, 0]], exclude_modules=["model.layers.1.self_attn.o_proj"]),
            r"Head \[1, 0\] is in layer 1, which has no targeted .* \(targeted layers: 0\)",
        ),
        (LoFiTConfig(target_modules=["no_such_module"]), "matched no module of the model"),
        (LoFiTConfig(target_modules=r".*\.(o_proj|down_proj)"), "matched two modules in layer 0"),
        (LoFiTConfig(target_modules=["lm_head"]), "not inside a numbered decoder layer"),
        (LoFiTConfig(num_heads=5), "do not split into 5 heads"),
        (LoFiTConfig(num_heads=4, head_dim=4), "num_heads=4 x head_dim=4 = 16, but the output projection takes 32"),
    ],
)
def test_bad_heads_for_model_raise_before_modifying(config, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config)
    assert_untouched(model)


def test_bad_second_adapter_leaves_first_intact(inputs):
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1]], init_weights=False))
    with torch.no_grad():
        expected = model(inputs).logits
    with pytest.raises(ValueError, match=r"Head \[0, 9\] does not exist"):
        model.add_adapter("bad", LoFiTConfig(heads=[[0, 9]]))
    layers = [m for m in model.modules() if isinstance(m, LoFiTLayer)]
    assert len(layers) == 1 and set(layers[0].lofit_head_index) == {"default"}
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, expected)


def test_unsupported_architecture_names_families_and_fix():
    config = BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        ValueError, match=r"model_type='bloom'.*Supported families: .*gpt2.*llama.*`target_modules=\[...\]`"
    ):
        get_peft_model(model, LoFiTConfig(heads=[[0, 1]]))
    assert_untouched(model)
    # the explicit route works
    peft_model = get_peft_model(model, LoFiTConfig(heads=[[0, 1]], target_modules=["self_attention.dense"]))
    assert sum(isinstance(m, LoFiTLayer) for m in peft_model.modules()) == 1


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


def test_mixed_batch_length_mismatch(inputs):
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1]], init_weights=False)).eval()
    with pytest.raises(
        ValueError, match="Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3"
    ):
        model(inputs, adapter_names=["default", "default"])


def test_weighted_adapter_errors():
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1]]))
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['nope'\] do not exist"):
        model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default"], [1.0, 2.0], "mix")
    model.add_adapter("other_targets", LoFiTConfig(heads=[[0, 1]], target_modules=["layers.0.self_attn.o_proj"]))
    with pytest.raises(ValueError, match="differ in `target_modules`"):
        model.add_weighted_adapter(["default", "other_targets"], [1.0, 1.0], "mix")


def test_second_adapter_with_other_geometry():
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1]]))
    with pytest.raises(ValueError, match=r"splits model.layers.0.self_attn.o_proj into 2 heads x 16.*4 heads x 8"):
        model.add_adapter("wide", LoFiTConfig(heads=[[0, 1]], num_heads=2))
    assert set(model.base_model.model.model.layers[0].self_attn.o_proj.lofit_head_index) == {"default"}


def test_cli_reports_expected_errors_in_one_line_and_bugs_with_a_traceback(monkeypatch, capsys):
    from peft_lofit.app import cli

    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: (_ for _ in ()).throw(ValueError("bad input\nmore")))
    assert cli.main(["eval"]) == 2
    assert capsys.readouterr().err == "lofit: error: bad input\n"
    with pytest.raises(ValueError, match="bad input"):
        cli.main(["--debug", "eval"])
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: {}["mc2"])
    with pytest.raises(KeyError, match="mc2"):  # a bug: not disguised as `lofit: error: 'mc2'`
        cli.main(["eval"])
