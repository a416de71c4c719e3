"""LoFiT as a PEFT method: golden values, identity, training, save/load, merging, multiple adapters, and clear errors
for heads, architectures and adapters that do not fit (raised before the model is modified)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, projection_of, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BloomConfig

from peft_lofit import LoFiTConfig, LoFiTLayer

HEADS = [[0, 1], [1, 0], [1, 3]]


def hand_set_vectors(model, heads=HEADS, adapter="default", seed=3):
    """Give every selected head known A and v; return {(layer, head): (A, v)}."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoFiTLayer) or adapter not in module.lofit_head_index:
            continue
        from peft_lofit.tuner.architectures import layer_index

        layer = layer_index(name)
        with torch.no_grad():
            for row, head in enumerate(module.heads_of(adapter)):
                a = torch.randn(module.geometry.head_dim, generator=generator) * 0.5
                v = torch.randn(module.geometry.head_dim, generator=generator)
                if adapter in module.lofit_scaling:
                    module.lofit_scaling[adapter][row] = a
                if adapter in module.lofit_offset:
                    module.lofit_offset[adapter][row] = v
                values[(layer, head)] = (a, v)
    return values


def reference_logits(base_model, values, inputs, use_scaling=True, use_offset=True):
    """Independent computation: a pre-hook edits each selected head of the projection input, one head at a time."""
    handles = []
    for layer in {layer for layer, _ in values}:
        projection = projection_of(base_model, layer)
        num_heads = base_model.config.num_attention_heads

        def edit(module, args, layer=layer, num_heads=num_heads):
            z = args[0].clone()
            head_dim = z.shape[-1] // num_heads
            for (edit_layer, head), (a, v) in values.items():
                if edit_layer != layer:
                    continue
                part = z[..., head * head_dim : (head + 1) * head_dim]
                if use_scaling:
                    part = (1 + a) * part
                if use_offset:
                    part = part + v
                z[..., head * head_dim : (head + 1) * head_dim] = part
            return (z,) + args[1:]

        handles.append(projection.register_forward_pre_hook(edit))
    try:
        with torch.no_grad():
            return base_model(inputs).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_golden_values_match_hand_edited_heads(arch, inputs):
    base = tiny_model(arch)
    reference_model = copy.deepcopy(base)
    model = get_peft_model(base, LoFiTConfig(heads=HEADS, use_scaling=True, use_offset=True))
    values = hand_set_vectors(model)
    assert set(values) == {tuple(pair) for pair in HEADS}
    with torch.no_grad():
        adapted = model(inputs).logits
    expected = reference_logits(reference_model, values, inputs)
    torch.testing.assert_close(adapted, expected, atol=1e-6, rtol=0)
    baseline = reference_logits(reference_model, {}, inputs)
    assert (adapted - baseline).abs().max() > 1e-3  # the edit is visible


@pytest.mark.parametrize("arch", ["llama_gqa", "gemma3", "gpt2"])
@pytest.mark.parametrize("vectors", [dict(use_scaling=True, use_offset=False), dict(use_offset=True)])
def test_golden_values_single_vector(arch, vectors, inputs):
    base = tiny_model(arch)
    reference_model = copy.deepcopy(base)
    model = get_peft_model(base, LoFiTConfig(heads=HEADS, **vectors))
    values = hand_set_vectors(model)
    with torch.no_grad():
        adapted = model(inputs).logits
    expected = reference_logits(
        reference_model,
        values,
        inputs,
        use_scaling=vectors.get("use_scaling", False),
        use_offset=vectors["use_offset"],
    )
    torch.testing.assert_close(adapted, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_init_is_identity_bit_for_bit(arch, inputs):
    base = tiny_model(arch)
    with torch.no_grad():
        expected = base(inputs).logits
    model = get_peft_model(base, LoFiTConfig(use_scaling=True, use_offset=True))
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, expected)


def test_random_init_changes_outputs(inputs):
    base = tiny_model("llama")
    with torch.no_grad():
        expected = base(inputs).logits
    model = get_peft_model(base, LoFiTConfig(heads=HEADS, init_weights=False))
    with torch.no_grad():
        assert (model(inputs).logits - expected).abs().max() > 1e-2


def test_normal_init_uses_init_std():
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(use_scaling=True, use_offset=False, init_weights="normal"))
    values = torch.cat([p.flatten() for n, p in model.named_parameters() if "lofit_scaling" in n])
    assert values.numel() == 2 * 4 * 8
    assert 2e-4 < values.std().item() < 5e-3


def test_only_lofit_parameters_train(inputs):
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, use_scaling=True, init_weights="normal"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lofit_" in n for n in trainable)
    assert sum(model.get_nb_trainable_parameters()[:1]) == 2 * len(HEADS) * 8
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2", "gemma3"])
def test_save_load_round_trip(arch, inputs, tmp_path):
    model = get_peft_model(tiny_model(arch), LoFiTConfig(heads=HEADS, use_scaling=True, init_weights=False))
    with torch.no_grad():
        expected = model(inputs).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".json", ".safetensors"}) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    head_dim = model.base_model.model.config.head_dim if arch == "gemma3" else 8
    for vector in ("lofit_scaling", "lofit_offset"):
        assert sum(t.numel() for k, t in tensors.items() if vector in k) == len(HEADS) * head_dim
    assert not any("head_index" in key for key in tensors)

    assert isinstance(PeftConfig.from_pretrained(tmp_path), LoFiTConfig)
    loaded = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, expected)


def test_auto_peft_model_loads_base_and_adapter(inputs, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoFiTConfig(heads=HEADS, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(inputs).logits
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, expected)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_scaling_only_adapter_merges_without_bias(arch, inputs):
    model = get_peft_model(
        tiny_model(arch), LoFiTConfig(heads=HEADS, use_scaling=True, use_offset=False, init_weights=False)
    )
    with torch.no_grad():
        expected = model(inputs).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(inputs).logits, expected, atol=1e-5, rtol=1e-5)


def two_adapter_model():
    model = get_peft_model(tiny_model("llama_gqa"), LoFiTConfig(heads=[[0, 1], [1, 2]], init_weights=False))
    model.add_adapter("other", LoFiTConfig(heads=[[0, 3], [1, 2]], use_scaling=True, init_weights=False))
    return model.eval()


def test_delete_adapter_removes_every_trace(inputs):
    model = two_adapter_model()
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any("other" in name for name, _ in model.named_parameters())
    assert not any("other" in name for name, _ in model.named_buffers())
    for module in model.modules():
        if isinstance(module, LoFiTLayer):
            assert "other" not in module.lofit_head_index and "other" not in module.lofit_scaling
    assert model.active_adapters == ["default"]


def test_add_weighted_adapter_same_heads_is_linear_combination(inputs):
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, init_weights=False))
    model.add_adapter("b", LoFiTConfig(heads=HEADS, init_weights=False))
    model.add_weighted_adapter(["default", "b"], [0.5, -2.0], "mix")
    for module in model.modules():
        if isinstance(module, LoFiTLayer):
            expected = 0.5 * module.lofit_offset["default"] - 2.0 * module.lofit_offset["b"]
            torch.testing.assert_close(module.lofit_offset["mix"], expected)
    assert model.peft_config["mix"].heads == HEADS


def test_add_weighted_adapter_different_heads_takes_union():
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=[[0, 1], [1, 2]], init_weights=False))
    model.add_adapter("b", LoFiTConfig(heads=[[1, 2], [1, 3]], use_scaling=True, init_weights=False))
    model.add_weighted_adapter(["default", "b"], [1.0, 3.0], "mix")
    config = model.peft_config["mix"]
    assert config.heads == [[0, 1], [1, 2], [1, 3]] and config.use_scaling and config.use_offset
    layer1 = projection_of(model.base_model.model, 1)
    offsets = dict(zip(layer1.heads_of("mix"), layer1.lofit_offset["mix"]))
    default = dict(zip(layer1.heads_of("default"), layer1.lofit_offset["default"]))
    other = dict(zip(layer1.heads_of("b"), layer1.lofit_offset["b"]))
    torch.testing.assert_close(offsets[2], default[2] + 3.0 * other[2])
    torch.testing.assert_close(offsets[3], 3.0 * other[3])
    scalings = dict(zip(layer1.heads_of("mix"), layer1.lofit_scaling["mix"]))
    torch.testing.assert_close(scalings[2], 3.0 * dict(zip(layer1.heads_of("b"), layer1.lofit_scaling["b"]))[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_half_precision(dtype, autocast_adapter_dtype, inputs):
    reference = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, use_scaling=True, init_weights=False))
    with torch.no_grad():
        expected = reference(inputs).logits
    model = get_peft_model(
        tiny_model("llama", dtype=dtype),
        LoFiTConfig(heads=HEADS, use_scaling=True, init_weights=False),
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    adapter_dtype = torch.float32 if autocast_adapter_dtype else dtype
    assert {p.dtype for n, p in model.named_parameters() if "lofit_" in n} == {adapter_dtype}
    with torch.no_grad():
        logits = model(inputs).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.05)
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits.float(), expected, atol=0.1, rtol=0.05)


def test_deleting_the_active_adapter_leaves_one_consistent_active_set(inputs):
    model = get_peft_model(
        tiny_model("llama"), LoFiTConfig(heads=[[0, 1], [1, 1]], init_weights=False), adapter_name="a"
    )
    model.add_adapter("b", LoFiTConfig(heads=[[0, 2]], init_weights=False))
    model.add_adapter("c", LoFiTConfig(heads=[[1, 3]], init_weights=False))
    model.delete_adapter("a")
    assert model.active_adapters == ["b"]
    assert {tuple(m.active_adapters) for m in model.modules() if isinstance(m, LoFiTLayer)} == {("b",)}
    with torch.no_grad():
        out = model(inputs).logits
        model.set_adapter("b")
        assert torch.equal(model(inputs).logits, out)


def test_mixed_batch_routes_modules_to_save(inputs):
    model = get_peft_model(
        tiny_model("llama"), LoFiTConfig(heads=HEADS, init_weights=False, modules_to_save=["lm_head"])
    )
    model.add_adapter("b", LoFiTConfig(heads=HEADS, init_weights=False, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["b"].weight.add_(0.5)  # the copies differ
    model.eval()
    with torch.no_grad():
        mixed = model(inputs[:2], adapter_names=["default", "b"]).logits
        model.set_adapter("b")
        only_b = model(inputs[:2]).logits
    torch.testing.assert_close(mixed[1], only_b[1], atol=1e-5, rtol=1e-5)


def test_merge_adapter_refuses_non_invertible_scaling_but_merge_and_unload_works(inputs):
    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, use_scaling=True, init_weights=False))
    layer = projection_of(model.base_model.model, 1)
    with torch.no_grad():
        layer.lofit_scaling["default"][0] = -1.0  # head silenced: 1 + A = 0
        expected = model(inputs).logits
    with pytest.raises(ValueError, match="\\|prod \\(1 \\+ A\\)\\| = 0.*could not be undone.*merge_and_unload"):
        model.merge_adapter()
    assert not layer.merged
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_after_merge_adapter_checks_bias_first():
    model = get_peft_model(tiny_model("mistral", sliding_window=4), LoFiTConfig(heads=HEADS, init_weights=False))
    model.merge_adapter()  # in memory the offsets sit in a bias created for the purpose
    with pytest.raises(ValueError, match="no bias.*Keep the adapter unmerged"):
        model.merge_and_unload()
    assert sum(isinstance(m, LoFiTLayer) for m in model.modules()) == 2


def test_parameter_subclass_weights_count_as_quantized():
    from peft_lofit.tuner.layer import has_plain_weight

    class Params4bit(torch.nn.Parameter):  # what bitsandbytes stores
        pass

    linear = torch.nn.Linear(4, 4)
    assert has_plain_weight(linear)
    linear.weight = Params4bit(torch.zeros(4, 4))
    assert not has_plain_weight(linear)
    linear.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert not has_plain_weight(linear)


def test_weighted_adapter_keeps_adapter_precision():
    model = get_peft_model(tiny_model("llama", dtype=torch.bfloat16), LoFiTConfig(heads=HEADS, init_weights=False))
    model.add_adapter("b", LoFiTConfig(heads=HEADS, init_weights=False))
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix")
    assert {p.dtype for n, p in model.named_parameters() if ".mix" in n} == {torch.float32}


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
