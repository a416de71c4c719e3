"""LoFiT behaves like every PEFT adapter: the checks of PEFT's generic tests, for every family, plain or wrapped.

Shaped like PEFT's own generic tests (``TestPeftCustomModel``, ``TestMultipleActiveAdapters``, ``TestDecoderModels``,
``TestPeftConfig``): one table of cases (model family x config x plain / wrapped in a module without ``.config``),
every case run through the same checks. No case passes ``num_heads``, ``head_dim`` or ``target_modules``: LoFiT reads them
from the model, also through the wrapper.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, ConfiglessWrapper, outputs_of, tiny_model
from peft import PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPTJConfig

from peft_lofit import LoFiTConfig, LoFiTLayer

HEADS = [[0, 1], [1, 0], [1, 3]]
OTHER_HEADS = [[0, 3], [1, 3]]
CONFIGS = {
    "offsets": dict(heads=HEADS),  # step 2, the default vectors
    "scalings_all_heads": dict(heads=None, use_scaling=True, use_offset=False),  # step 1
    "both": dict(heads=HEADS, use_scaling=True, use_offset=True),
}
CASES = [(arch, config, wrapped) for arch in ARCHITECTURES for config in CONFIGS for wrapped in (False, True)]
FAMILY_CASES = [(arch, wrapped) for arch in ARCHITECTURES for wrapped in (False, True)]


def case_id(case) -> str:
    return "-".join(str(part) if not isinstance(part, bool) else ("wrapped" if part else "plain") for part in case)


def base_model(arch: str, wrapped: bool, dtype=torch.float32):
    model = tiny_model(arch, dtype=dtype)
    return ConfiglessWrapper(model).eval() if wrapped else model


def lofit(config: str = "offsets", **overrides) -> LoFiTConfig:
    return LoFiTConfig(**{**CONFIGS[config], "init_weights": False, **overrides})


def adapted(arch, config, wrapped, **overrides):
    torch.manual_seed(7)
    return get_peft_model(base_model(arch, wrapped), lofit(config, **overrides)).eval()


def run(model, inputs, **kwargs):
    with torch.no_grad():
        return outputs_of(model, inputs, **kwargs)


def lofit_layers(model):
    return [module for module in model.modules() if isinstance(module, LoFiTLayer)]


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def differs(first, second, tol=1e-4):
    assert (first - second).abs().max() > tol


def two_adapters(arch, wrapped, config="both"):
    model = adapted(arch, config, wrapped)
    model.add_adapter("other", lofit(config, heads=OTHER_HEADS if CONFIGS[config]["heads"] else None))
    return model


# ------------------------------------------------------------------------------------------------ injection
@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_injection_adds_nothing_to_the_base_and_reads_geometry_from_the_model(arch, wrapped, inputs):
    base = base_model(arch, wrapped)
    base_state = {key: value.clone() for key, value in base.state_dict().items()}
    model = get_peft_model(base, LoFiTConfig(heads=HEADS))  # no target_modules, num_heads or head_dim
    layers = lofit_layers(model)
    assert [layer.heads_of("default") for layer in layers] == [[1], [0, 3]]
    assert all(layer.geometry.num_heads == 4 for layer in layers)
    close(run(model, inputs), run(base_model(arch, wrapped), inputs), tol=0)  # identity at init
    from peft.utils.save_and_load import get_base_model_state_dict  # noqa: PLC0415  (PEFT >= 0.21)

    assert get_base_model_state_dict(model).keys() == base_state.keys()
    unloaded = model.unload()
    assert unloaded.state_dict().keys() == base_state.keys()
    assert all(torch.equal(unloaded.state_dict()[key], value) for key, value in base_state.items())


def test_layer_index_comes_from_the_innermost_layer_list():
    model = get_peft_model(
        ConfiglessWrapper(tiny_model("llama")), LoFiTConfig(heads=[[1, 2]], target_modules=["o_proj"])
    )
    names = [name for name, module in model.named_modules() if isinstance(module, LoFiTLayer)]
    assert names == ["base_model.model.models.0.model.layers.1.self_attn.o_proj"]


def test_geometry_nobody_states_is_a_clear_error():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8)}) for _ in range(2)])

    with pytest.raises(ValueError, match="Cannot tell how many attention heads.*Pass `num_heads=`"):
        get_peft_model(Bare(), LoFiTConfig(heads=[[0, 0]], target_modules=["proj"]))
    model = get_peft_model(Bare(), LoFiTConfig(heads=[[0, 1]], target_modules=["proj"], num_heads=2))
    assert lofit_layers(model)[0].geometry.head_dim == 4


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("arch, config, wrapped", CASES, ids=map(case_id, CASES))
def test_save_load_round_trip(arch, config, wrapped, inputs, tmp_path):
    model = adapted(arch, config, wrapped)
    expected = run(model, inputs)
    differs(expected, run(base_model(arch, wrapped), inputs))
    model.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(get_peft_model_state_dict(model))
    torch.manual_seed(54321)  # nothing about the adapter may come from the random state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base_model(arch, wrapped), tmp_path).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    close(run(loaded, inputs), expected, tol=0)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_selected_adapters_save_to_subfolders_and_load_back(arch, wrapped, inputs, tmp_path):
    model = two_adapters(arch, wrapped)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(base_model(arch, wrapped), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name in ("default", "other"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        close(run(loaded.eval(), inputs), run(model, inputs), tol=0)
    model.save_pretrained(tmp_path / "only_default", selected_adapters=["default"])
    assert set(PeftModel.from_pretrained(base_model(arch, wrapped), tmp_path / "only_default").peft_config) == {
        "default"
    }


@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_low_cpu_mem_usage_loading(arch, wrapped, inputs, tmp_path):
    model = adapted(arch, "both", wrapped)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(arch, wrapped), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(param.is_meta for param in loaded.parameters())
    close(run(loaded, inputs), run(model, inputs), tol=0)
    empty = inject_adapter_in_model(lofit("both"), base_model(arch, wrapped), low_cpu_mem_usage=True)
    assert any(param.is_meta for name, param in empty.named_parameters() if "lofit_" in name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_adapter_dtype_follows_autocast_adapter_dtype(dtype, autocast, wrapped, tmp_path):
    def lofit_dtypes(model):
        return {param.dtype for name, param in model.named_parameters() if "lofit_" in name}

    expected = {torch.float32} if autocast else {dtype}
    model = get_peft_model(base_model("llama", wrapped, dtype), lofit("both"), autocast_adapter_dtype=autocast)
    model.add_adapter("other", lofit("offsets"), autocast_adapter_dtype=autocast)
    assert lofit_dtypes(model) == expected
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(
            base_model("llama", wrapped, dtype),
            tmp_path,
            autocast_adapter_dtype=autocast,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        loaded.load_adapter(tmp_path / "other", "other", autocast_adapter_dtype=autocast)
        assert lofit_dtypes(loaded) == expected


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("arch, config, wrapped", CASES, ids=map(case_id, CASES))
def test_merge_unmerge_and_merge_and_unload(arch, config, wrapped, inputs, tmp_path):
    model = adapted(arch, config, wrapped)
    base_state = {
        key: value.clone() for key, value in model.get_base_model().state_dict().items() if "lofit_" not in key
    }
    expected = run(model, inputs)
    model.merge_adapter()
    close(run(model, inputs), expected)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    model.unmerge_adapter()
    close(run(model, inputs), expected)
    state = {key: value for key, value in model.get_base_model().state_dict().items() if "lofit_" not in key}
    assert state.keys() == base_state.keys()  # a bias created by the merge is gone again
    assert all(torch.allclose(state[key], value, atol=1e-6) for key, value in base_state.items())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Qwen2 / Mistral say they come back as Llama
        merged = model.merge_and_unload()
    assert not lofit_layers(merged) and not hasattr(merged, "peft_config")
    close(run(merged, inputs), expected)
    if wrapped:  # not a checkpoint format: the round trip of PEFT's custom-model tests
        close(run(pickle.loads(pickle.dumps(merged)), inputs), expected)
        return
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    close(run(reloaded, inputs), expected)


@pytest.mark.parametrize("arch", ["llama_gqa", "qwen2", "mistral"])
def test_merged_checkpoint_loads_without_peft_lofit(arch, inputs, tmp_path):
    """Qwen2 and Mistral have no bias switch: they come back as the same computation in Llama form."""
    model = adapted(arch, "both", wrapped=False)
    expected = run(model, inputs)
    if arch == "llama_gqa":
        merged = model.merge_and_unload()
    else:
        with pytest.warns(UserWarning, match=r"returned as LlamaForCausalLM \(attention_bias=True\)"):
            merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.attention_bias
    assert merged.model.embed_tokens.weight is merged.lm_head.weight or not merged.config.tie_word_embeddings
    merged.save_pretrained(tmp_path / "merged")
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        "assert 'peft_lofit' not in sys.modules and 'peft' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(model(io['inputs']).logits, io['expected'], atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize(
    "arch, window",
    [
        ("mistral", dict(sliding_window=4)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
    ],
)
def test_sliding_window_offsets_are_refused_before_touching_the_model(arch, window, inputs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(arch, **window), lofit("offsets")).eval()
    expected = run(model, inputs)
    with pytest.raises(ValueError, match="sliding.*Llama cannot express.*Keep the adapter unmerged"):
        model.merge_and_unload()
    assert len(lofit_layers(model)) == 2 and not any(layer.merged for layer in lofit_layers(model))
    close(run(model, inputs), expected, tol=0)
    scalings_only = get_peft_model(tiny_model(arch, **window), lofit("scalings_all_heads")).eval()
    expected = run(scalings_only, inputs)
    close(run(scalings_only.merge_and_unload(), inputs), expected)  # nothing to carry: merges natively


def test_gptj_offsets_merge_in_memory_but_are_refused_for_a_checkpoint(inputs):
    """GPT-J's out_proj has no bias and its config no switch, and no stock architecture computes what it does."""
    config = GPTJConfig(
        vocab_size=64, n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(), lofit("both")).eval()
    expected = run(model, inputs)
    model.merge_adapter()
    close(run(model, inputs), expected)
    model.unmerge_adapter()
    with pytest.raises(ValueError, match="Cannot merge LoFiT offsets into gptj.*Keep the adapter unmerged"):
        model.merge_and_unload()
    close(run(model, inputs), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_half_precision_merges(arch, wrapped, dtype, inputs):
    torch.manual_seed(7)
    model = get_peft_model(base_model(arch, wrapped, dtype), lofit("both", init_std=0.1, init_weights="normal")).eval()
    expected = run(model, inputs).float()
    model.merge_adapter(safe_merge=True)
    close(run(model, inputs).float(), expected, tol=0.05)
    model.unmerge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload(safe_merge=True)
    assert all(param.dtype == dtype for param in merged.parameters())
    close(run(merged, inputs).float(), expected, tol=0.05)


@pytest.mark.parametrize("arch, config, wrapped", CASES, ids=map(case_id, CASES))
def test_safe_merge_refuses_nans_and_leaves_the_model_untouched(arch, config, wrapped, inputs):
    model = adapted(arch, config, wrapped)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lofit_" in name:
                param[0] = float("nan")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    message = "NaNs detected in the merged weights. The adapter default seems to be broken"
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match=message):
        model.merge_adapter(safe_merge=True)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key].nan_to_num(), value.nan_to_num()) for key, value in before.items())


# ------------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("arch, config, wrapped", CASES, ids=map(case_id, CASES))
def test_multiple_active_adapters(arch, config, wrapped, inputs):
    model = two_adapters(arch, wrapped, config)
    base = run(base_model(arch, wrapped), inputs)
    single = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        single[name] = run(model, inputs)
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    both = run(model, inputs)
    differs(both, single["default"])
    differs(both, single["other"])
    model.merge_adapter()
    close(run(model, inputs), both)
    model.unmerge_adapter()
    model.merge_adapter(["default"])
    model.merge_adapter(["other"])  # one after the other = together, in any order
    close(run(model, inputs), both)
    model.unmerge_adapter()
    with model.disable_adapter():
        close(run(model, inputs), base)
    for names in (["other"], ["other", "default"]):
        merged = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = merged.merge_and_unload(adapter_names=names)
        close(run(merged, inputs), single["other"] if len(names) == 1 else both)


@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_delete_adapters_inactive_active_and_merged(arch, wrapped, inputs):
    model = two_adapters(arch, wrapped)
    model.set_adapter("other")
    model.merge_adapter()
    merged_before = [list(layer.merged_adapters) for layer in lofit_layers(model)]
    with pytest.raises(
        ValueError,
        match=re.escape("Cannot delete adapter(s) ['other'] while they are merged. Please unmerge them first."),
    ):
        model.delete_adapter("other")
    assert set(model.peft_config) == {"default", "other"}
    model.delete_adapter("default")  # inactive, not merged: the merged one stays merged
    assert [list(layer.merged_adapters) for layer in lofit_layers(model)] == merged_before
    assert model.active_adapters == ["other"]
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert not model.peft_config and model.active_adapters == []
    for layer in lofit_layers(model):
        for attribute in layer.adapter_layer_names + layer.other_param_names:
            assert not getattr(layer, attribute)
    # with no adapter left, PeftModel itself has no active config to look up; PEFT's tests run the tuner model
    close(run(model.base_model, inputs), run(base_model(arch, wrapped), inputs))  # merged and unmerged: rounding
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_disable_adapter_also_while_merged_and_nested(arch, wrapped, inputs):
    model = adapted(arch, "both", wrapped)
    base, adapted_output = run(base_model(arch, wrapped), inputs), run(model, inputs)
    model.merge_adapter()
    with model.disable_adapter():
        close(run(model, inputs), base)
        with model.disable_adapter():
            close(run(model, inputs), base)
        close(run(model, inputs), base)  # the inner exit does not re-enable
    close(run(model, inputs), adapted_output)
    model.base_model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(layer.disable_adapters for layer in lofit_layers(model))  # stays as it was before the context


@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_mixed_batches(arch, wrapped, inputs):
    model = two_adapters(arch, wrapped)
    per_adapter = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per_adapter[name] = run(model, inputs)
    with model.disable_adapter():
        per_adapter["__base__"] = run(model, inputs)
    rows = ["default", "other", "__base__"]
    mixed = run(model, inputs, adapter_names=rows)
    for row, name in enumerate(rows):
        close(mixed[row], per_adapter[name][row], tol=1e-6)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        run(model, inputs, adapter_names=["default"])
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): a, b"):
        run(model, inputs, adapter_names=["b", "a", "default"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        run(model, inputs, adapter_names=rows)
    model.unmerge_adapter()
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode."):
        outputs_of(model, inputs, adapter_names=rows)


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_with_mixed_batches(arch, num_beams, inputs):
    model = two_adapters(arch, wrapped=False)
    settings = dict(max_new_tokens=3, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=inputs[:2], adapter_names=["default", "other"], **settings)
        model.set_adapter("default")
        first = model.generate(input_ids=inputs[:1], **settings)
        model.set_adapter("other")
        second = model.generate(input_ids=inputs[1:2], **settings)
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[1], second[0])


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("arch, config, wrapped", CASES, ids=map(case_id, CASES))
def test_training_updates_only_adapter_parameters(arch, config, wrapped, inputs):
    model = adapted(arch, config, wrapped).train()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        outputs_of(model, inputs).float().sum().backward()
        for name, param in model.named_parameters():
            assert (param.grad is not None) == ("lofit_" in name), name
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.allclose(param, before[name], atol=1e-4)
        assert changed == ("lofit_" in name), name


def transformers_model(model):
    """The transformers model inside a plain model or a wrapper (gradient checkpointing is its feature)."""
    base = model.get_base_model()
    return base.models[0] if isinstance(base, ConfiglessWrapper) else base


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("arch, wrapped", FAMILY_CASES, ids=map(case_id, FAMILY_CASES))
def test_gradient_checkpointing_gives_the_same_gradients(arch, wrapped, use_reentrant, inputs):
    def gradients(model):
        torch.manual_seed(0)  # the same dropout masks in both runs (checkpointing replays its own)
        model.zero_grad()
        (outputs_of(model, inputs).float() ** 2).sum().backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    model = adapted(arch, "both", wrapped).train()
    plain = gradients(model)
    inner = transformers_model(model)
    inner.enable_input_require_grads()
    inner.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed = gradients(model)
    assert plain.keys() == checkpointed.keys() and all("lofit_" in name for name in plain) and plain
    for name in plain:
        close(checkpointed[name], plain[name], tol=1e-5)


# ------------------------------------------------------------------------------------------------ config
def saved_config(tmp_path, **extra):
    LoFiTConfig(heads=HEADS).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    return path


@pytest.mark.parametrize("loader", [LoFiTConfig, PeftConfig], ids=["LoFiTConfig", "PeftConfig"])
def test_unknown_config_keys_give_peft_s_one_warning(loader, tmp_path):
    saved_config(tmp_path, foobar=1, spam="eggs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = loader.from_pretrained(tmp_path)
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        "Unexpected keyword arguments ['foobar', 'spam'] for class LoFiTConfig, these are ignored."
    )
    assert isinstance(config, LoFiTConfig) and config.to_dict() == LoFiTConfig(heads=HEADS).to_dict()


def test_json_that_is_not_a_peft_config_gets_peft_s_type_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar", "baz": 123}))
    with pytest.raises(TypeError, match=re.escape("is missing required keys: {'peft_type'}")):
        LoFiTConfig.from_pretrained(tmp_path)


def test_config_round_trips_like_peft_configs(tmp_path):
    config = LoFiTConfig(heads=HEADS, use_scaling=True)
    config.save_pretrained(tmp_path)
    assert LoFiTConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert LoFiTConfig.from_json_file(tmp_path / "adapter_config.json") == config.to_dict()
    assert type(PeftConfig.from_peft_type(peft_type="LOFIT")) is LoFiTConfig
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="Invalid task type"):
        LoFiTConfig(task_type="invalid-task-type")


def test_peft_mixed_model_is_refused_by_peft():
    """Documented limitation: PEFT hard-codes the tuner types PeftMixedModel accepts."""
    with pytest.raises(ValueError, match="'LOFIT' is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS), mixed=True)


def test_deleting_an_adapter_keeps_inference_loaded_adapters_frozen(tmp_path):
    model = two_adapters("llama", wrapped=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.delete_adapter("other")
    assert not any(param.requires_grad for param in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    trainable.add_adapter("extra", lofit("offsets"))
    trainable.delete_adapter("extra")
    assert all(param.requires_grad for name, param in trainable.named_parameters() if "lofit_" in name)


def test_qwen2_with_every_layer_full_attention_merges_as_llama(inputs, tmp_path):
    """use_sliding_window with max_window_layers >= layers: Qwen2's layer_types say no layer slides."""
    torch.manual_seed(0)
    base = tiny_model(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2, tie_word_embeddings=True
    )
    assert set(base.config.layer_types) == {"full_attention"}
    base.config._attn_implementation = "eager"
    model = get_peft_model(base, lofit("both")).eval()
    expected = run(model, inputs)
    with pytest.warns(UserWarning, match="returned as LlamaForCausalLM"):
        merged = model.merge_and_unload()
    assert merged.config._attn_implementation == "eager"
    assert merged.model.embed_tokens.weight is merged.lm_head.weight  # tied weights stay tied
    merged.save_pretrained(tmp_path)
    close(run(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), inputs), expected)
