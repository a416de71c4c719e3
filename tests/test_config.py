"""LoFiTConfig: its fields and head lists, clear errors for bad ones, and configs saved by other versions."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HEADS, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel

from peft_lofit import LoFiTConfig
from peft_lofit.tuner.config import normalize_heads


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


FIXTURES = Path(__file__).parent / "fixtures" / "configs"


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
