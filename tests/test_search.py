"""Choosing lambda, K, the step-2 learning rate and epochs on the validation split: ``lofit run --search-*``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_settings, tiny_tokenizer
from safetensors.torch import load_file

from peft_lofit.app import pipeline
from peft_lofit.app import search as search_module
from peft_lofit.app.pipeline import run_pipeline
from peft_lofit.app.search import SearchSpace


def test_the_winner_is_the_first_of_equal_scores(tmp_path, monkeypatch):
    val_scores = {3e-1: 0.5, 1e-4: 0.5, 1e-2: 0.4}
    monkeypatch.setattr(search_module, "_localize_once", lambda *args: None)
    monkeypatch.setattr(
        pipeline,
        "run_pipeline",
        lambda trial, model, tokenizer: {
            "lofit": {"mc2": val_scores[trial.localize.l1_lambda]},
            "num_heads_selected": 2,
        },
    )
    settings = tiny_settings(tmp_path)
    search = search_module.run_search(settings, SearchSpace(l1=[3e-1, 1e-4, 1e-2]), model=None, tokenizer=None)
    assert [trial["score"] for trial in search["trials"]] == [0.5, 0.5, 0.4]
    assert search["best"]["l1"] == 3e-1
    first = tmp_path / "run" / "search" / "trial_l1-0.3_k2_lr0.01_ep1"  # the first trial, named by its point
    assert search["head_selection"] == str(first / "head_selection.json")


def test_a_stopped_search_resumes_without_training_finished_trials_again(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path, search=SearchSpace(k=[1, 2], learning_rate=[1e-2, 5e-2]))
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    first = search_module.run_search(settings, settings.search, model, tokenizer)
    root = tmp_path / "run" / "search"
    third = root / "trial_l1-0.001_k2_lr0.01_ep1"
    (third / search_module.TRIAL_FILE).unlink()  # as if killed while the third trial ran
    ran = []
    original, localize_once = pipeline.run_pipeline, search_module._localize_once

    def counted(trial, *args):
        ran.append(trial.output_dir)
        return original(trial, *args)

    def no_localization(*args):
        raise AssertionError("the finished localization ran again")

    monkeypatch.setattr(pipeline, "run_pipeline", counted)
    monkeypatch.setattr(search_module, "_localize_once", no_localization)
    resumed = search_module.run_search(settings, settings.search, model, tokenizer)
    assert ran == [str(third)]
    assert [t["score"] for t in resumed["trials"]] == pytest.approx([t["score"] for t in first["trials"]], abs=1e-6)
    assert resumed["best"]["output_dir"] == first["best"]["output_dir"]
    ran.clear()  # a grid grown by one learning rate: only its new points train, on the same localization
    grown = SearchSpace(k=[1, 2], learning_rate=[1e-2, 5e-2, 1e-1])
    widened = search_module.run_search(settings, grown, model, tokenizer)
    assert ran == [str(root / "trial_l1-0.001_k1_lr0.1_ep1"), str(root / "trial_l1-0.001_k2_lr0.1_ep1")]
    assert widened["trials"][:2] == resumed["trials"][:2] and len(widened["trials"]) == 6
    changed = tiny_settings(tmp_path, search=settings.search, seed=7)  # other settings: nothing is reused
    ran.clear()
    monkeypatch.setattr(search_module, "_localize_once", localize_once)
    search_module.run_search(changed, changed.search, model, tokenizer)
    assert len(ran) == 4


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
    # The final run trains the winner's settings on its lambda's heads, with the same seed: the winning trial's adapter.
    assert results["heads"] == json.loads((Path(best["output_dir"]) / "metrics.json").read_text())["heads"]
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    trial = load_file(Path(best["output_dir"]) / "adapter" / "adapter_model.safetensors")
    for key in final:
        torch.testing.assert_close(final[key], trial[key], atol=1e-6, rtol=1e-5)
    assert "| lambda | K | learning rate | epochs | val mc2 | seconds |" in (run / "search" / "trials.md").read_text()
    card = (run / "adapter" / "README.md").read_text()
    assert "## Hyperparameter search" in card and f"K = {best['k']}, learning rate {best['learning_rate']:g}" in card
    assert (
        f"with L1 weight {best['l1']}" in card and "K and the weight were chosen by the hyperparameter search" in card
    )


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
        (dict(search=SearchSpace(k=[2]), heads="random"), "--search chooses lambda and K itself: it needs --heads"),
        (dict(search=SearchSpace(k=[2]), eval_split="val"), "--search chooses on the val split"),
    ],
)
def test_search_settings_are_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_settings(tmp_path, **overrides)
    with pytest.raises(ValueError, match="must differ"):
        SearchSpace(k=[2, 2])
    with pytest.raises(ValueError, match=r"search values for l1 must be > 0, got \[0.001, 0.0\]"):
        SearchSpace(l1=[1e-3, 0.0])
    with pytest.raises(ValueError, match="must differ \\(to 6 significant digits\\)"):  # they would share a folder
        SearchSpace(l1=[1e-3, 1.0000001e-3])
