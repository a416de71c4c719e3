"""The lofit command line: options built from the settings, help, and errors in one line (bugs with a traceback)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_model_folder

from peft_lofit.app import cli
from peft_lofit.app.arguments import settings_from
from peft_lofit.app.pipeline import PipelineSettings
from peft_lofit.app.search import SearchSpace
from peft_lofit.training import TrainSettings


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


def test_missing_model_folder_says_so(capsys):
    assert cli.main(["eval", "--model", "/nonexistent/model", "--limit", "1"]) == 2
    assert "Model folder /nonexistent/model not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "scores, message",
    [
        ([[0.5] * 8] * 3, r"scores 3 layers x 8 heads, but the model has 2 layers x 4 heads"),
        ([[0.5] * 4, [0.5] * 3], r"layers have different numbers of heads \(\[4, 3\]\)"),
        ([1, 2, 3], r"scores\[0\] is 1; each layer must be a non-empty list of head scores"),
        ("abc", r"scores must be a non-empty list of layers"),
        ([[0.5, True, 0.1, 0.2]] * 2, r"score \[0\]\[1\] is True"),
    ],
)
@pytest.mark.parametrize("command", ["train", "run"])
def test_every_command_checks_a_head_selection_against_the_model(tmp_path, capsys, scores, message, command):
    selection = tmp_path / "heads.json"
    selection.write_text(json.dumps({"format_version": 1, "scores": scores}))
    model = tiny_model_folder(tmp_path / "model")
    arguments = [command, "--model", str(model), "--heads", str(selection), "--train-limit", "2", "--epochs", "1"]
    assert cli.main(arguments + ["--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: progress bars
    assert error.startswith("lofit: error: ") and re.search(message, error), error
    assert not (tmp_path / "out" / "adapter").exists()


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
        (["run", "--heads", "random", "--l1-search", "1e-3", "2e-3"], "--search chooses lambda and K itself"),
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
    assert settings_of("run", "--l1-search", "5e-4", "2e-3").search == SearchSpace(l1=[5e-4, 2e-3])  # the older name
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
