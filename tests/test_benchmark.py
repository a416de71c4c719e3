"""The LoFiT vs LoRA benchmark runs end to end on a tiny model, and its JSON has every field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_run, tiny_model, tiny_model_folder, tiny_tokenizer

from benchmarks.lofit_bench import cli, grid, measure, report, speed
from benchmarks.lofit_bench.methods import COMPUTED, METHODS
from peft_lofit.training.heads import HeadSelection


def layer_one_selection(tmp_path) -> Path:
    """Scores for the tiny model (2 layers x 4 heads) whose top 2 heads are [1, 1] and [1, 3]."""
    return HeadSelection(scores=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.9, 0.6, 0.8]]).save(tmp_path / "other.json")


def test_benchmark_end_to_end_on_tiny_model(tmp_path):
    model_dir = tiny_model_folder(tmp_path / "tiny")
    output = tmp_path / "results"
    options = "--localize-epochs 1 --batch-size 4 --fraction 0.25 --seeds 1 --sweep-data 4 --sweep-k 0.5"
    options += " --prefill-tokens 16 --decode-tokens 4 --repeats 1 --eval-speed-questions 3"
    heads = ["--other-heads", str(layer_one_selection(tmp_path))]
    cli.main(["grid", *small_run(model_dir), *options.split(), "--methods", *METHODS, *heads, "--output", str(output)])
    results = json.loads((output / "results.json").read_text())
    assert {"date", "command", "machine", "settings", "rows", "summary", "eval_prefix_cache"} <= set(results)
    speed = results["eval_prefix_cache"]
    assert speed["questions"] == 3 and speed["speedup"] > 0 and speed["max_score_difference"] < 1e-4
    methods = {row["method"] for row in results["rows"]}
    assert methods == set(METHODS)
    computed = [r for r in results["rows"] if r["method"] in COMPUTED]
    assert {r["method"] for r in computed} == {"iti", "repe"} and all(r["trainable_parameters"] == 0 for r in computed)
    assert next(r for r in computed if r["method"] == "repe")["k"] == 4  # all heads of the middle layer (1 of 2)
    for row in results["rows"]:
        assert set(grid.ROW_FIELDS) <= set(row)
        assert {"mc1", "mc2", "mc3", "n"} <= set(row["metrics"])
        if row["method"] not in ("base", *COMPUTED):
            assert row["trainable_parameters"] > 0 and row["step_s"] > 0
        if row["method"] != "base":
            assert row["adapter_bytes"] > 0 and row["train_s"] > 0 and row["peak_memory_mb"] is not None
            latency = row["latency"]
            assert {"unmerged_vs_base", "merged_vs_base"} <= set(latency)
            assert set(latency["unmerged_vs_base"]) == {"prefill_s", "decode_s"}
    lofit = [r for r in results["rows"] if r["method"] == "lofit"]
    assert all(r["localize_s"] > 0 for r in lofit)
    assert {r["k"] for r in lofit} == {2, 4}  # K sweep: 25% and 50% of 8 heads
    assert {r["train_rows"] for r in lofit} == {8, 4}  # data sweep
    by_method = {r["method"]: r for r in results["rows"]}
    assert by_method["lofit_all_heads"]["k"] == 8 and by_method["lofit_iti_heads"]["k"] == 2
    assert by_method["lofit_other_heads"]["k"] == 2 and by_method["lofit_random"]["k"] == 2
    lora = next(r for r in results["rows"] if r["method"] == "lora_r8")
    assert lora["trainable_parameters"] == 2 * 2 * 8 * (32 + 32)  # 2 layers x (q, v) x rank 8 x (in + out)
    assert next(r for r in results["rows"] if r["method"] == "lofit")["trainable_parameters"] == 2 * 8  # K=2 x d=8
    assert (output / "results.md").read_text().count("\n|") >= len(results["summary"])
    assert all((output / f"mc1_vs_{name}.png").is_file() for name in ("parameters", "k", "data"))
    table = cli.main(["combine", str(output / "results.json"), str(output / "results.json"), "--output", str(output)])
    assert table["combined"].count("\n|") == len(results["summary"]) + 1  # rows of one method/size/K merged
    assert "| lofit | 8 | 2 | 2 |" in table["combined"]  # two copies of seed 1 -> 2 seeds


def test_summary_mean_and_spread_over_seeds():
    rows = [
        dict(
            method="lofit",
            seed=seed,
            train_rows=8,
            k=2,
            trainable_parameters=16,
            adapter_bytes=100,
            localize_s=1.0,
            train_s=2.0,
            step_s=0.5,
            peak_memory_mb=10.0,
            metrics={"mc1": mc1},
            latency=None,
        )
        for seed, mc1 in ((1, 0.2), (2, 0.4), (3, 0.6))
    ]
    (entry,) = report.summarize(rows, ("mc1",))
    assert entry["seeds"] == [1, 2, 3] and abs(entry["mc1"] - 0.4) < 1e-12
    assert abs(entry["mc1_std"] - (0.08 / 3) ** 0.5) < 1e-12
    assert "0.400 ± 0.163" in report.results_table([entry], ("mc1",))


def test_other_heads_must_fit_the_model(tmp_path):
    wrong = HeadSelection(scores=[[1.0, 2.0]] * 3).save(tmp_path / "wrong.json")
    with pytest.raises(ValueError, match="scores 3 layers x 2 heads, but the model has 2 layers x 4 heads"):
        cli.main(
            [
                "grid",
                "--model",
                str(tiny_model_folder(tmp_path / "tiny")),
                "--methods",
                "lofit_other_heads",
                "--other-heads",
                str(wrong),
                "--train-limit",
                "4",
                "--eval-limit",
                "1",
                "--skip-latency",
                "--eval-speed-questions",
                "0",
                "--output",
                str(tmp_path / "out"),
            ]
        )


def test_train_speed_mode(tmp_path):
    result = cli.main(
        [
            "train-speed",
            "--model",
            str(tiny_model_folder(tmp_path / "tiny")),
            "--head-selection",
            str(layer_one_selection(tmp_path)),
            "--fraction",
            "0.25",
            "--train-limit",
            "8",
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--repeats",
            "1",
            "--output",
            str(tmp_path / "out"),
        ]
    )["train_speed"]
    variants = result["variants"]
    assert set(variants) == set(speed.SPEED_VARIANTS) and result["train_rows"] == 8
    for value in variants.values():
        assert len(value["runs"][0]["epoch_s"]) == 2 and value["epoch_s"] > 0 and value["total_s"] > 0
    assert variants["lora_r8"]["epoch_s_vs_lora_r8"] == 1.0
    cache = variants["lofit_step2_cached"]["runs"][0]["cache"]
    assert (cache["misses"], cache["hits"]) == (2, 2)  # 2 steps per epoch: epoch 1 fills the cache, epoch 2 hits
    assert variants["lofit_step2_plain"]["runs"][0]["cache"] is None
    # Step 2's heads are all in layer 1: nothing of layer 0 is kept for backward, cached or not.
    kept = {variant: value["saved_activations_mb"] for variant, value in variants.items()}
    assert 0 < kept["lofit_step2_cached"] == kept["lofit_step2_plain"] < min(kept["lofit_step1"], kept["lora_r8"])
    assert json.loads((tmp_path / "out" / "train_speed.json").read_text()) == result


def test_saved_activations_counts_what_backward_keeps():
    layer = torch.nn.Linear(4, 3)
    saved = measure.SavedActivations()
    saved.on_train_begin(None, None, None, model=layer)
    with saved:
        saved.on_step_begin(None, None, None)
        inputs = torch.randn(5, 4, requires_grad=True)
        outputs = layer(inputs)  # keeps the input (5 x 4 floats) and the weight (excluded: a parameter)
        (outputs * outputs).sum()  # keeps the output twice: one storage (5 x 3), counted once
        saved.on_step_end(None, None, None)
        saved.on_step_begin(None, None, None)
        layer(torch.randn(2, 4, requires_grad=True)).sum()  # a smaller step: 2 x 4 floats, counted afresh
        with torch.no_grad():
            layer(torch.randn(50, 4)).relu()  # nothing kept without autograd
        saved.on_step_end(None, None, None)
    assert saved.peak_bytes == (5 * 4 + 5 * 3) * 4


def test_sweep_curves_hold_the_other_field_fixed():
    def entry(method, rows, k, mc1):
        return dict(method=method, train_rows=rows, k=k, mc1=mc1, mc1_std=0.0)

    summary = [
        entry("lofit", 16, 8, 0.1),
        entry("lofit", 32, 8, 0.2),
        entry("lofit", 32, 4, 0.3),
        entry("lofit", 32, 16, 0.4),
        entry("lora_r8", 16, None, 0.5),
        entry("lora_r8", 32, None, 0.6),
    ]
    assert report.sweep_curves(summary, "train_rows", "mc1") == {
        "lofit": [(16, 0.1, 0.0), (32, 0.2, 0.0)],
        "lora_r8": [(16, 0.5, 0.0), (32, 0.6, 0.0)],
    }
    assert report.sweep_curves(summary, "k", "mc1") == {"lofit": [(4, 0.3, 0.0), (8, 0.2, 0.0), (16, 0.4, 0.0)]}


def test_latency_only_mode(tmp_path):
    model_dir = tiny_model_folder(tmp_path / "tiny")
    result = cli.main(
        [
            "latency",
            "--model",
            str(model_dir),
            "--methods",
            "lofit",
            "lora_r8",
            "--fraction",
            "0.25",
            "--prefill-tokens",
            "8",
            "--decode-tokens",
            "2",
            "--repeats",
            "2",
            "--output",
            str(tmp_path / "out"),
        ]
    )["latency"]
    assert set(result) == {"base", "lofit_unmerged", "lofit_merged", "lora_r8_unmerged", "lora_r8_merged"}
    assert result["base"]["prefill_s_vs_base"] == 1.0 and all(v["decode_s"] > 0 for v in result.values())
    assert json.loads((tmp_path / "out" / "latency.json").read_text()) == result


def test_the_grid_runs_on_other_families(tmp_path):
    """GPT-NeoX: LoRA on PEFT's default target (query_key_value), IA3 and LoFiT on the dense output projection."""
    folder = tmp_path / "neox"
    tiny_model("gpt_neox").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    results = cli.main(
        ["grid", "--model", str(folder), "--methods", "lofit", "lora_r8", "ia3", "--train-limit", "4"]
        + ["--eval-limit", "1", "--epochs", "1", "--localize-epochs", "1", "--batch-size", "2", "--skip-latency"]
        + ["--eval-speed-questions", "0", "--output", str(tmp_path / "out")]
    )
    trained = {row["method"]: row["trainable_parameters"] for row in results["rows"]}
    # hidden 32, 2 layers: LoRA r8 on the fused qkv (32 -> 96) = 2 x 8 x (32 + 96); IA3 one scale per input feature
    # LoFiT: K = 3% of 8 heads, at least 1, with 8 features
    assert trained == {"lofit": 8, "lora_r8": 2 * 8 * (32 + 96), "ia3": 2 * 32}


def test_thread_split_mode(tmp_path):
    argv = ["thread-split", "--model", str(tiny_model_folder(tmp_path / "tiny")), "--train-limit", "8"]
    argv += ["--batch-size", "4", "--jobs", "2", "--repeats", "1", "--output", str(tmp_path / "out")]
    result = cli.main(argv)["thread_split"]
    assert result["jobs"] == 2 and len(result["epoch_s"]["one_run"]) == 1 and len(result["epoch_s"]["split"]) == 2
    assert result["threads"] == {"one_run": result["cores"], "split": max(1, result["cores"] // 2)}
    one, shared = result["epoch_s"]["one_run"][0], sorted(result["epoch_s"]["split"])
    assert result["throughput_ratio"] == pytest.approx(2 / ((shared[0] + shared[1]) / 2) * one)
    assert json.loads((tmp_path / "out" / "thread_split.json").read_text()) == result
