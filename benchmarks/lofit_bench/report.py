"""Summaries of the grid's rows (mean and spread over seeds), the Markdown table and the plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from peft_lofit.io import atomic_write_figure, atomic_write_text
from peft_lofit.markdown import markdown_table


def summarize(rows: list[dict], metrics: tuple[str, ...]) -> list[dict]:
    """Mean and spread (population std) over seeds for each (method, train_rows, k)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["train_rows"], row["k"]), []).append(row)
    summary = []
    for (method, train_rows, k), members in groups.items():
        entry = {
            "method": method,
            "train_rows": train_rows,
            "k": k,
            "seeds": [m["seed"] for m in members],
            "trainable_parameters": members[0]["trainable_parameters"],
            "adapter_bytes": members[0]["adapter_bytes"],
        }
        for name in metrics:
            values = [m["metrics"][name] for m in members]
            entry[name] = statistics.mean(values)
            entry[f"{name}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        for name in ("localize_s", "train_s", "step_s", "peak_memory_mb"):
            values = [m[name] for m in members if m[name] is not None]
            entry[name] = statistics.mean(values) if values else None
        latencies = [m["latency"] for m in members if m["latency"]]
        if latencies:
            for which in ("unmerged_vs_base", "merged_vs_base"):
                for key in ("prefill_s", "decode_s"):
                    entry[f"{which}_{key}"] = statistics.mean(run[which][key] for run in latencies)
        summary.append(entry)
    return summary


def results_table(summary: list[dict], metrics: tuple[str, ...]) -> str:
    """One line per summary entry: metrics (mean ± std), size, times, memory and latency ratios."""

    def fmt(value, pattern="{:.3f}"):
        return "–" if value is None else pattern.format(value)

    header = [
        "method",
        "train rows",
        "K",
        "seeds",
        *metrics,
        "trained numbers",
        "adapter KB",
        "localize s",
        "train s",
        "s / step",
        "peak MB",
        "prefill x base (unmerged / merged)",
        "decode x base (unmerged / merged)",
    ]
    lines = []
    for e in summary:
        cells = [e["method"], str(e["train_rows"]), fmt(e["k"], "{}"), str(len(e["seeds"]))]
        cells += [f"{e[m]:.3f} ± {e[m + '_std']:.3f}" for m in metrics]
        cells += [
            f"{e['trainable_parameters']:,}",
            fmt(e["adapter_bytes"] / 1024, "{:.1f}"),
            fmt(e["localize_s"], "{:.0f}"),
            fmt(e["train_s"], "{:.0f}"),
            fmt(e["step_s"], "{:.2f}"),
            fmt(e["peak_memory_mb"], "{:.0f}"),
        ]
        for key in ("prefill_s", "decode_s"):
            unmerged, merged = e.get(f"unmerged_vs_base_{key}"), e.get(f"merged_vs_base_{key}")
            cells.append(f"{fmt(unmerged)} / {fmt(merged)}")
        lines.append(cells)
    return markdown_table(header, lines)


def sweep_curves(summary: list[dict], field: str, metric: str) -> dict[str, list[tuple]]:
    """Per method, the ``(x, mean, std)`` points of a sweep over ``field`` ("train_rows" or "k") with the other
    field held at the value that has the most points; methods with fewer than 2 points are left out."""
    other = "k" if field == "train_rows" else "train_rows"
    curves = {}
    for method in sorted({e["method"] for e in summary}):
        groups: dict = {}
        for e in summary:
            if e["method"] == method and e[field]:
                groups.setdefault(e[other], []).append((e[field], e[metric], e[f"{metric}_std"]))
        points = max(groups.values(), key=len, default=[])
        if len(points) >= 2:
            curves[method] = sorted(points)
    return curves


def plot(summary: list[dict], metric: str, output: Path) -> list[str]:
    """Metric vs trained numbers (all runs); metric vs training rows and vs K (a line per method) where sweeps ran."""
    from matplotlib.figure import Figure  # the object API: no global backend switch

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for e in summary:
        if e["trainable_parameters"]:
            axes.errorbar(e["trainable_parameters"], e[metric], yerr=e[f"{metric}_std"], fmt="o", capsize=3)
            axes.annotate(
                f"{e['method']} ({e['train_rows']}, K={e['k']})", (e["trainable_parameters"], e[metric]), fontsize=7
            )
        else:
            axes.axhline(e[metric], color="grey", linestyle="--", label="base")
    axes.set_xscale("log")
    axes.set_xlabel("trained numbers (log)")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} against adapter size")
    figure.tight_layout()
    atomic_write_figure(output / f"{metric}_vs_parameters.png", figure)
    written = [f"{metric}_vs_parameters.png"]
    for field, name, label in (("train_rows", "data", "training rows"), ("k", "k", "K (heads trained)")):
        curves = sweep_curves(summary, field, metric)
        if not curves:
            continue
        figure = Figure(figsize=(5.5, 3.8))
        axes = figure.subplots()
        for method, points in curves.items():
            xs, ys, errors = zip(*points)
            axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        base = [e[metric] for e in summary if e["method"] == "base"]
        if base:
            axes.axhline(base[0], color="grey", linestyle="--", label="base")
        axes.set_xscale("log", base=2)
        axes.set_xlabel(f"{label} (log)")
        axes.set_ylabel(metric)
        axes.set_title(f"{metric} against {'training data' if name == 'data' else 'K'}")
        axes.legend(fontsize=7)
        figure.tight_layout()
        atomic_write_figure(output / f"{metric}_vs_{name}.png", figure)
        written.append(f"{metric}_vs_{name}.png")
    return written


def combine(files: list[str], metrics: tuple[str, ...], output: Path) -> str:
    """One table (and the plots) from the rows of several runs, e.g. a headline run and an ablation run with the same
    settings."""
    rows, commands = [], []
    for file in files:
        results = json.loads(Path(file).read_text())
        rows += [row for row in results["rows"] if row["metrics"]]
        commands.append(f"- `{results['command']}` ({results['date']})")
    summary = summarize(rows, metrics)
    table = results_table(summary, metrics)
    for metric in metrics[:2]:
        plot(summary, metric, output)
    atomic_write_text(output / "combined.md", "Rows from:\n" + "\n".join(commands) + f"\n\n{table}\n")
    return table
