"""The headline comparison on a tiny model: tuning on val with one budget, the winner on test under each seed, rows
written as they finish and resumed, and the report built from the rows alone."""

import json
import shutil
import statistics
from pathlib import Path

import pytest
from conftest import small_run, tiny_model_folder

from benchmarks.lofit_bench import cli, headline
from benchmarks.lofit_bench.headline import ROW_FIELDS, Space
from benchmarks.lofit_bench.headline_report import EDGE_NOTE, END, START, TWO_FOLDS, groups, report, write_report
from benchmarks.lofit_bench.methods import METHODS
from peft_lofit.app import pipeline
from peft_lofit.app import search as search_module

SEEDS = (42, 43)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A whole headline run on TruthfulQA fold 0 with two trials per method and two seeds."""
    folder = tmp_path_factory.mktemp("headline")
    spaces = {
        "lofit": Space((1e-2, 5e-2), k_fractions=(0.25,)),  # K = 2 of the tiny model's 8 heads
        "lora_r8": Space((1e-3, 1e-2)),
        "lora_r1": Space((1e-3, 1e-2)),
        "ia3": Space((1e-3, 1e-2)),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(headline, "SPACES", spaces)
        patch.setenv("PEFT_LOFIT_METRICS_CACHE", str(folder / "metrics_cache"))  # empty: no other test's entries
        args = [*small_run(tiny_model_folder(folder / "tiny")), "--localize-epochs", "1"]
        args += ["--seeds", *map(str, SEEDS), "--output", str(folder / "results"), "--work-dir", str(folder / "work")]
        cli.main(["headline", *args])
    return folder, args, spaces


def rows_and_tuning(folder):
    results = folder / "results"
    return json.loads((results / "headline.json").read_text()), json.loads(
        (results / "headline_tuning.json").read_text()
    )


def test_one_row_per_method_and_seed_with_the_issue_fields(finished):
    folder, _, _ = finished
    rows, _ = rows_and_tuning(folder)
    assert [(row["method"], row["seed"]) for row in rows] == [("base", None)] + [
        (method, seed) for seed in SEEDS for method in ("lofit", "lora_r8", "lora_r1", "ia3")
    ]
    for row in rows:
        assert set(row) == set(ROW_FIELDS) and row["task"] == "truthfulqa" and row["fold"] == 0
        assert row["metrics"]["n"] == 2 and {"mc1", "mc2", "mc3"} <= set(row["metrics"])
    trained = [row for row in rows if row["method"] != "base"]
    assert all(row["trained_numbers"] > 0 and row["adapter_bytes"] > 0 and row["train_seconds"] > 0 for row in trained)
    lofit = [row for row in rows if row["method"] == "lofit"]
    assert all(row["trained_numbers"] == 2 * 8 and row["settings"]["k"] == 2 for row in lofit)  # 2 heads x head_dim 8
    assert {row["trained_numbers"] for row in rows if row["method"] == "lora_r8"} == {8 * 2 * 2 * (32 + 32)}


def test_each_method_is_tuned_on_val_with_the_same_budget_and_tested_with_the_winner(finished):
    folder, _, spaces = finished
    rows, tuning = rows_and_tuning(folder)
    for method, space in spaces.items():
        record = tuning[f"truthfulqa/fold0/{method}"]
        assert record["split"] == "val" and record["metric"] == "mc2" and record["seed"] == SEEDS[0]
        assert len(record["trials"]) == 2 and {trial["learning_rate"] for trial in record["trials"]} == set(
            space.learning_rates
        )
        assert record["best"] == max(record["trials"], key=lambda trial: trial["score"])
        for row in (row for row in rows if row["method"] == method):
            assert row["settings"]["learning_rate"] == record["best"]["learning_rate"]
            assert row["settings"]["tuned_on"] == "val mc2, 2 trials"
            assert row["settings"]["grid"] == sorted(space.learning_rates)


def test_the_first_seed_is_the_winning_trial_trained_again(finished):
    """The first seed's row scores the winning trial's adapter; training those settings anew gives the same scores."""
    folder, _, _ = finished
    rows, tuning = rows_and_tuning(folder)
    best = tuning["truthfulqa/fold0/lora_r8"]["best"]
    row = next(row for row in rows if (row["method"], row["seed"]) == ("lora_r8", SEEDS[0]))
    args = cli.build_parser().parse_args(["headline", *finished[1]])
    again = headline.Headline(args).baseline_run("lora_r8", best["learning_rate"], SEEDS[0], "test")
    assert again["metrics"] == pytest.approx(row["metrics"], abs=1e-6)
    assert again["trained_numbers"] == row["trained_numbers"] and again["adapter_bytes"] == row["adapter_bytes"]


def test_lofit_seeds_localize_again_and_the_first_reuses_the_search(finished):
    folder, args, _ = finished
    rows, tuning = rows_and_tuning(folder)
    record = tuning["truthfulqa/fold0/lofit"]
    assert record["strategy"] == "full grid of 2 trials"
    best, work = record["best"], folder / "work" / "truthfulqa_fold0"
    assert len(json.loads((Path(best["adapter"]) / "adapter_config.json").read_text())["heads"]) == best["k"] == 2
    first = next(row for row in rows if (row["method"], row["seed"]) == ("lofit", SEEDS[0]))
    assert not (work / f"lofit_seed{SEEDS[0]}").exists()  # the first seed scored the winning trial's adapter
    assert [first[key] for key in ("trained_numbers", "adapter_bytes", "train_seconds")] == [
        best[key] for key in ("trained_numbers", "adapter_bytes", "train_seconds")
    ]
    # ... which is what the recipe gives when it localizes and trains again with that seed
    again = headline.Headline(cli.build_parser().parse_args(["headline", *args])).lofit_run(record, SEEDS[0], "test")
    assert again["metrics"] == pytest.approx(first["metrics"], abs=1e-6)
    second = json.loads((work / f"lofit_seed{SEEDS[1]}" / "metrics.json").read_text())
    assert second["settings"]["seed"] == SEEDS[1] and second["settings"]["heads"] == "learned"
    assert second["settings"]["localize"]["l1_lambda"] == best["l1"] and "localize_s" in second["timings_s"]


def test_lofit_seed_rows_reuse_the_base_rows_evaluation(finished):
    """The base row goes through ``lofit run``'s metrics cache, so a LoFiT seed row does not score the base again."""
    folder, _, _ = finished
    rows, _ = rows_and_tuning(folder)
    base = next(row for row in rows if row["method"] == "base")
    second = json.loads((folder / "work" / "truthfulqa_fold0" / f"lofit_seed{SEEDS[1]}" / "metrics.json").read_text())
    assert second["base_metrics_from_cache"] and second["base"] == base["metrics"]


def test_a_finished_run_is_not_trained_again(finished, monkeypatch):
    folder, args, spaces = finished
    before = rows_and_tuning(folder)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished row or trial was trained again")

    monkeypatch.setattr(headline, "SPACES", spaces)
    monkeypatch.setattr(headline, "train_adapter", no_training)
    monkeypatch.setattr(headline, "run_pipeline", no_training)
    cli.main(["headline", *args])
    assert rows_and_tuning(folder) == before


def rerun_one_method(finished, tmp_path, monkeypatch, method: str, record: dict):
    """The headline of ``method`` with seed 42 into a new output whose tuning file holds ``record``: the
    ``baseline_run`` calls it made, and that output folder."""
    _, args, spaces = finished
    output = tmp_path / "results"
    output.mkdir()
    (output / "headline_tuning.json").write_text(json.dumps({f"truthfulqa/fold0/{method}": record}))
    trained = []
    original = headline.Headline.baseline_run
    monkeypatch.setattr(headline, "SPACES", spaces)
    monkeypatch.setattr(headline.Headline, "baseline_run", lambda self, *a: trained.append(a) or original(self, *a))
    again = [*args[: args.index("--output")], "--methods", method, "--seeds", "42", "--output", str(output)]
    cli.main(["headline", *again, "--work-dir", str(tmp_path / "work")])
    return trained, output


def test_an_interrupted_tuning_keeps_its_finished_trials(finished, tmp_path, monkeypatch):
    full = rows_and_tuning(finished[0])[1]["truthfulqa/fold0/ia3"]
    first_trial = full["trials"][0]
    stopped = {**full, "trials": [first_trial], "best": None}
    trained, output = rerun_one_method(finished, tmp_path, monkeypatch, "ia3", stopped)
    assert trained == [("ia3", 1e-2, 42, "val")]  # only the missing trial; the first seed reuses the winner
    assert (
        json.loads((output / "headline_tuning.json").read_text())["truthfulqa/fold0/ia3"]["trials"][0] == first_trial
    )


def test_the_first_seed_trains_again_when_the_winning_adapter_is_gone(finished, tmp_path, monkeypatch):
    full = rows_and_tuning(finished[0])[1]["truthfulqa/fold0/lora_r1"]
    record = {**full, "best": {**full["best"], "adapter": "gone"}}
    trained, output = rerun_one_method(finished, tmp_path, monkeypatch, "lora_r1", record)
    assert trained == [("lora_r1", record["best"]["learning_rate"], 42, "test")]
    row = json.loads((output / "headline.json").read_text())[0]
    first = next(r for r in rows_and_tuning(finished[0])[0] if (r["method"], r["seed"]) == ("lora_r1", 42))
    assert row["metrics"] == pytest.approx(first["metrics"], abs=1e-6)


def resumed_copy(finished, tmp_path, tuning_change=None):
    """The finished run's arguments with ``--output`` a copy of its results (the tuning record changed by
    ``tuning_change``); the work folder stays the same, so its trials and adapters are found."""
    folder, args, _ = finished
    output = tmp_path / "results"
    shutil.copytree(folder / "results", output)
    if tuning_change:
        tuning = json.loads((output / "headline_tuning.json").read_text())
        tuning_change(tuning)
        (output / "headline_tuning.json").write_text(json.dumps(tuning))
    at = args.index("--output")
    return [*args[:at], "--output", str(output), *args[at + 2 :]], output


def test_a_grown_grid_tries_only_its_new_points(finished, tmp_path, monkeypatch):
    _, _, spaces = finished
    grown = {**spaces, "lofit": Space((1e-2, 5e-2, 1e-1), (0.25,)), "lora_r8": Space((1e-3, 1e-2, 5e-2))}
    args, output = resumed_copy(finished, tmp_path)
    trained, searched = [], []
    baseline_run, run_pipeline = headline.Headline.baseline_run, pipeline.run_pipeline
    monkeypatch.setattr(headline, "SPACES", grown)
    monkeypatch.setattr(
        headline.Headline, "baseline_run", lambda self, *a: trained.append(a) or baseline_run(self, *a)
    )
    monkeypatch.setattr(
        pipeline, "run_pipeline", lambda trial, *a: searched.append(trial.output_dir) or run_pipeline(trial, *a)
    )
    monkeypatch.setattr(search_module, "_localize_once", lambda *a: pytest.fail("the finished localization ran again"))
    cli.main(["headline", *args, "--methods", "lofit", "lora_r8"])
    assert [Path(folder).name for folder in searched] == ["trial_l1-0.0005_k2_lr0.1_ep1"]
    assert [call for call in trained if call[-1] == "val"] == [("lora_r8", 5e-2, 42, "val")]
    rows, tuning = rows_and_tuning(output.parent)
    for method in ("lofit", "lora_r8"):
        record = tuning[f"truthfulqa/fold0/{method}"]
        assert len(record["trials"]) == 3 and record["best"] == max(record["trials"], key=lambda t: t["score"])
        assert all(
            row["settings"]["learning_rate"] == record["best"]["learning_rate"]
            for row in rows
            if row["method"] == method
        )


def test_a_slid_grid_keeps_the_dropped_points_trials_but_picks_its_winner_on_the_grid(finished, tmp_path, monkeypatch):
    """A grid that drops its smallest rate and adds a larger one: the dropped trial stays in the record, but even
    with the best score it cannot win, and the rows and their tuning summary follow the winner on the grid."""
    _, _, spaces = finished
    slid = {**spaces, "lofit": Space((5e-2, 1e-1), (0.25,)), "lora_r8": Space((1e-2, 5e-2))}
    dropped = {"lofit": 1e-2, "lora_r8": 1e-3}

    def dropped_point_won(tuning):
        for method, rate in dropped.items():
            record = tuning[f"truthfulqa/fold0/{method}"]
            trial = next(trial for trial in record["trials"] if trial["learning_rate"] == rate)
            trial["score"] = 2.0
            record["best"] = trial

    args, output = resumed_copy(finished, tmp_path, dropped_point_won)
    monkeypatch.setattr(headline, "SPACES", slid)
    cli.main(["headline", *args, "--methods", "lofit", "lora_r8"])
    rows, tuning = rows_and_tuning(output.parent)
    for method, rate in dropped.items():
        record = tuning[f"truthfulqa/fold0/{method}"]
        on_grid = [trial for trial in record["trials"] if trial["learning_rate"] in slid[method].learning_rates]
        assert sorted(trial["learning_rate"] for trial in record["trials"]) == sorted(
            [rate, *slid[method].learning_rates]
        )
        assert record["best"] == max(on_grid, key=lambda trial: trial["score"])
        method_rows = [row for row in rows if row["method"] == method]
        assert sorted(row["seed"] for row in method_rows) == list(SEEDS)
        for row in method_rows:
            assert row["settings"]["learning_rate"] == record["best"]["learning_rate"]
            assert row["settings"]["grid"] == list(slid[method].learning_rates)
            assert row["settings"]["tuned_on"].endswith(" 2 trials")


def test_a_grown_grid_that_keeps_its_winner_updates_the_rows_grid_without_training_them_again(
    finished, tmp_path, monkeypatch
):
    _, _, spaces = finished
    before = rows_and_tuning(finished[0])[0]
    grown = Space((*spaces["lora_r8"].learning_rates, 5e-2))
    args, output = resumed_copy(finished, tmp_path)
    trained = []
    baseline_run = headline.Headline.baseline_run

    def losing_new_trial(self, *call):
        trained.append(call)
        return {**baseline_run(self, *call), "score": -1.0}  # the new point cannot win

    monkeypatch.setattr(headline, "SPACES", {**spaces, "lora_r8": grown})
    monkeypatch.setattr(headline.Headline, "baseline_run", losing_new_trial)
    cli.main(["headline", *args, "--methods", "lora_r8"])
    assert trained == [("lora_r8", 5e-2, 42, "val")]  # no test row is trained again
    rows = json.loads((output / "headline.json").read_text())
    assert [row for row in rows if row["method"] != "lora_r8"] == [row for row in before if row["method"] != "lora_r8"]
    refreshed = [row for row in rows if row["method"] == "lora_r8"]
    assert [row["seed"] for row in refreshed] == [row["seed"] for row in before if row["method"] == "lora_r8"]
    for row in refreshed:
        assert row["settings"]["grid"] == sorted(grown.learning_rates)
        assert row["settings"]["tuned_on"].endswith(f"{len(grown.learning_rates)} trials")


def test_a_row_whose_settings_lost_the_tuning_is_trained_again(finished, tmp_path, monkeypatch):
    """Only the rows of the method whose winner changed are trained again, with the new winner's settings."""
    before = rows_and_tuning(finished[0])[0]

    def other_winner(tuning):
        record = tuning["truthfulqa/fold0/ia3"]
        loser = next(trial for trial in record["trials"] if trial != record["best"])
        loser["score"] = 2.0
        record["best"] = loser

    args, output = resumed_copy(finished, tmp_path, other_winner)
    trained = []
    baseline_run = headline.Headline.baseline_run
    monkeypatch.setattr(headline, "SPACES", finished[2])
    monkeypatch.setattr(
        headline.Headline, "baseline_run", lambda self, *a: trained.append(a) or baseline_run(self, *a)
    )
    cli.main(["headline", *args])
    new_rate = json.loads((output / "headline_tuning.json").read_text())["truthfulqa/fold0/ia3"]["best"][
        "learning_rate"
    ]
    assert trained == [("ia3", new_rate, SEEDS[1], "test")]  # the first seed scores the winning trial's adapter
    rows = json.loads((output / "headline.json").read_text())
    assert [row for row in rows if row["method"] != "ia3"] == [row for row in before if row["method"] != "ia3"]
    assert sorted(row["seed"] for row in rows if row["method"] == "ia3") == list(SEEDS)
    assert all(row["settings"]["learning_rate"] == new_rate for row in rows if row["method"] == "ia3")


def test_rows_of_a_run_with_other_settings_are_refused_not_mixed(finished, monkeypatch):
    folder, args, spaces = finished
    monkeypatch.setattr(headline, "SPACES", spaces)
    other = [*args[: args.index("--epochs")], "--epochs", "2", *args[args.index("--epochs") + 2 :]]
    with pytest.raises(
        ValueError, match=r"row \('truthfulqa', 0, 'base', None\) comes from a run with other settings"
    ):
        cli.main(["headline", *other])


def test_the_headline_options_are_its_own():
    parse = cli.build_parser().parse_args
    assert parse(["headline"]).seeds == [42, 43, 44] and parse(["headline"]).methods == list(headline.HEADLINE_METHODS)
    assert parse(["grid"]).seeds == [42] and parse(["grid"]).methods == list(METHODS)  # the grid's stay its own
    with pytest.raises(SystemExit):
        parse(["headline", "--methods", "iti"])


def synthetic_row(task, fold, method, seed, score, trained=1728, k=27):
    metrics = {"mc1": score / 2, "mc2": score, "mc3": score / 3} if task == "truthfulqa" else {"accuracy": score}
    return dict(
        task=task,
        fold=fold,
        method=method,
        seed=seed,
        metrics={**metrics, "n": 409},
        trained_numbers=trained,
        adapter_bytes=4 * trained,
        train_seconds=10.0 * (seed or 0),
        settings={"learning_rate": 0.01, "k": k},
    )


def test_two_fold_means_are_per_seed_means_of_the_folds():
    rows = [synthetic_row("truthfulqa", 0, "lofit", 1, 0.5), synthetic_row("truthfulqa", 1, "lofit", 1, 0.7, 3456, 54)]
    rows += [
        synthetic_row("truthfulqa", 0, "lofit", 2, 0.6),
        synthetic_row("truthfulqa", 1, "lofit", 2, 0.6, 3456, 54),
    ]
    rows += [synthetic_row("truthfulqa", 0, "lofit", 3, 0.9)]  # fold 1 lacks seed 3: left out of the mean
    mean = groups(rows)["truthfulqa", TWO_FOLDS]["lofit"]
    assert [(r["seed"], r["metrics"]["mc2"]) for r in mean] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.6))]
    assert all(r["trained_numbers"] == (1728 + 3456) / 2 and "n" not in r["metrics"] for r in mean)
    table = report(rows)
    assert "**truthfulqa, mean of folds 0 and 1**" in table and "| lr 0.01, K 27 / lr 0.01, K 54 |" in table
    assert "| 0.600 ± 0.000 |" in table and "| 2,592 |" in table


def test_a_learning_rate_at_the_edge_of_its_grid_is_marked_and_explained():
    rows = [synthetic_row("mquake", None, method, 42, 0.4) for method in ("lofit", "lora_r8", "lora_r1", "ia3")]
    grids = {"lofit": [0.005, 0.01], "lora_r8": [0.01, 0.02], "lora_r1": [0.005, 0.01, 0.02], "ia3": [0.01]}
    for row in rows:
        row["settings"]["grid"] = grids[row["method"]]
    lines = {line.split(" | ")[0][2:]: line for line in report(rows).splitlines() if line.startswith("| ")}
    assert "| lr 0.01 ↑, K 27 |" in lines["lofit"] and "| lr 0.01 ↓, K 27 |" in lines["lora_r8"]
    assert "| lr 0.01, K 27 |" in lines["lora_r1"] and "| lr 0.01, K 27 |" in lines["ia3"]  # inside; a one-point grid
    assert report(rows).endswith(EDGE_NOTE) and EDGE_NOTE not in report(rows[2:])


def test_tasks_without_folds_get_their_own_table():
    rows = [synthetic_row("mquake", None, "base", None, 0.1, 0), synthetic_row("mquake", None, "lofit", 42, 0.4)]
    table = report(rows).split("\n\n**mquake**")[1]
    assert table.startswith(" (test split") and "| accuracy |" in table and "| 0.400 ± 0.000 |" in table


def target_verdicts(rows):
    lines = report(rows).split("\n\n")[1].splitlines()[2:]  # the targets table, under its title and header
    return {line.split(":")[0][2:]: line.split(" | ")[1:] for line in lines}


def test_the_targets_compare_lofit_with_lora_r8_from_the_same_means():
    mquake = [synthetic_row("mquake", None, "lofit", seed, 0.54, 3456) for seed in (42, 43, 44)]
    mquake += [
        synthetic_row("mquake", None, "lora_r8", seed, score, 460800) for seed, score in zip(SEEDS, (0.54, 0.56))
    ]
    clutrr = [
        synthetic_row("clutrr", None, method, seed, 0.5, trained)
        for seed in (42, 43, 44)
        for method, trained in (("lofit", 3456), ("lora_r8", 460800))
    ]
    verdicts = target_verdicts(mquake + clutrr)
    # MQuAKE: LoRA r8 0.550 ± 0.010 over its 2 seeds, LoFiT 0.010 below it with 133x fewer numbers: met, 2 seeds so far
    assert verdicts["mquake"] == ["0.540 ± 0.000", "0.550 ± 0.010", "-0.010", "133x", "3 / 2", "yes (2 of 3 seeds) |"]
    assert verdicts["clutrr"][2:] == ["+0.000", "133x", "3 / 3", "yes |"]
    assert verdicts["truthfulqa, mean of folds 0 and 1"][-1] == "not run |"
    behind = [*clutrr[:5], synthetic_row("clutrr", None, "lora_r8", 44, 0.56, 460800)]  # 0.520 ± 0.028, 0.020 ahead
    assert target_verdicts(behind)["clutrr"][2:] == ["-0.020", "133x", "3 / 3", "no |"]
    too_big = [
        synthetic_row("clutrr", None, "lofit", 42, 0.9, 46080),
        synthetic_row("clutrr", None, "lora_r8", 42, 0.5, 460800),
    ]
    assert target_verdicts(too_big)["clutrr"][3:] == ["10x", "1 / 1", "no (1 of 3 seeds) |"]  # 10x fewer, not 20x


def test_the_truthfulqa_target_needs_lofit_at_or_above_lora_r8_on_the_mean_of_folds():
    rows = [synthetic_row("truthfulqa", fold, "lofit", 42, 0.6, 1728) for fold in (0, 1)]
    rows += [
        synthetic_row("truthfulqa", 0, "lora_r8", 42, 0.58, 460800),
        synthetic_row("truthfulqa", 1, "lora_r8", 42, 0.62, 460800),
    ]
    assert "| truthfulqa, mean of folds 0 and 1: LoFiT mc2 ≥ LoRA r8's, with 100x fewer numbers |" in report(rows)
    assert target_verdicts(rows)["truthfulqa, mean of folds 0 and 1"][-1] == "yes (1 of 3 seeds) |"
    rows[-1]["metrics"]["mc2"] = 0.63  # LoRA r8's mean of folds 0.605 > 0.600
    assert target_verdicts(rows)["truthfulqa, mean of folds 0 and 1"][2:] == [
        "-0.005",
        "267x",
        "1 / 1",
        "no (1 of 3 seeds) |",
    ]


def test_the_report_is_built_from_the_rows_and_put_in_the_readmes(finished, tmp_path):
    folder, _, _ = finished
    rows, _ = rows_and_tuning(folder)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{START}\nold table\n{END}\n\nAfter.\n")
    tables = write_report(rows, tmp_path / "results", [readme], "the command")
    lofit = [row["metrics"]["mc2"] for row in rows if row["method"] == "lofit"]
    line = next(line for line in tables.splitlines() if line.startswith("| lofit "))
    assert f"{statistics.mean(lofit):.3f} ± {statistics.pstdev(lofit):.3f}" in line
    assert all(f"| {method} " in tables for method in ("base", "lofit", "lora_r8", "lora_r1", "ia3"))
    text = readme.read_text()
    assert "old table" not in text and tables in text and "](results/headline.png)" in text
    assert text.startswith("# Title") and text.endswith("After.\n")
    assert (tmp_path / "results" / "headline.png").stat().st_size > 0
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="has no '<!-- headline:start -->'"):
        write_report(rows, tmp_path / "results", [tmp_path / "plain.md"], "the command")


def test_headline_report_command_fills_the_readmes_it_finds_by_default(finished, tmp_path, monkeypatch):
    folder, _, _ = finished
    for readme in (tmp_path / "README.md", tmp_path / "benchmarks" / "README.md"):
        readme.parent.mkdir(exist_ok=True)
        readme.write_text(f"{START}\n{END}\n")
    monkeypatch.chdir(tmp_path)
    cli.main(["headline-report", "--output", str(folder / "results")])
    assert "| lofit |" in (tmp_path / "README.md").read_text()
    assert "| lofit |" in (tmp_path / "benchmarks" / "README.md").read_text()
