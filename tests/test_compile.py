"""torch.compile: LoFiT adds no graph breaks, and a hot-swapped adapter does not recompile."""

from __future__ import annotations

import torch
from conftest import HEADS, tiny_model
from peft import get_peft_model

from peft_lofit import LoFiTConfig, LoFiTLayer
from peft_lofit.checkpoint import hotswap_adapter, save_adapter


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
