"""Tables and plot of the headline comparison, from ``headline.json`` alone.

For each task (and each TruthfulQA fold) every method's metrics are the mean and spread (population std) over its
seeds. The TruthfulQA row the paper reports is the mean of the two folds: per seed the mean of its two fold scores,
then mean and spread over the seeds both folds have. ``write_report`` writes ``headline.md`` and ``headline.png`` and
puts the table and plot between the ``<!-- headline:start -->`` and ``<!-- headline:end -->`` lines of each README.
"""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path

from peft_lofit.app.tasks import get_task
from peft_lofit.io import atomic_write_figure, atomic_write_text
from peft_lofit.markdown import markdown_table

METHOD_ORDER = ("base", "lofit", "lora_r8", "lora_r1", "ia3")
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
TWO_FOLDS = "mean of folds"


def groups(rows: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """``{(task, fold): {method: rows}}``, plus ``("truthfulqa", TWO_FOLDS)`` when both folds have rows."""
    grouped: dict = {}
    for row in rows:
        grouped.setdefault((row["task"], row["fold"]), {}).setdefault(row["method"], []).append(row)
    if ("truthfulqa", 0) in grouped and ("truthfulqa", 1) in grouped:
        grouped["truthfulqa", TWO_FOLDS] = _fold_means(grouped["truthfulqa", 0], grouped["truthfulqa", 1])
    return grouped


def _fold_means(first: dict[str, list[dict]], second: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Per method and seed both folds ran, one row whose metrics are the mean of the two folds'."""
    means = {}
    for method in first.keys() & second.keys():
        by_seed = {row["seed"]: row for row in second[method]}
        means[method] = [
            {
                **row,
                "fold": TWO_FOLDS,
                "metrics": {
                    name: (value + by_seed[row["seed"]]["metrics"][name]) / 2 for name, value in row["metrics"].items()
                },
                "train_seconds": (row["train_seconds"] + by_seed[row["seed"]]["train_seconds"]) / 2,
            }
            for row in first[method]
            if row["seed"] in by_seed
        ]
    return {method: members for method, members in means.items() if members}


def summary(members: list[dict], metrics: tuple[str, ...]) -> dict:
    """Mean and spread over seeds of each metric, and the seeds' mean training time."""
    entry = {"seeds": len(members), "trained_numbers": members[0]["trained_numbers"]}
    entry["adapter_bytes"] = members[0]["adapter_bytes"]
    entry["train_seconds"] = statistics.mean(row["train_seconds"] for row in members)
    entry["settings"] = members[0]["settings"]
    for name in metrics:
        values = [row["metrics"][name] for row in members]
        entry[name], entry[f"{name}_std"] = statistics.mean(values), statistics.pstdev(values)
    return entry


def _tuned(settings: dict) -> str:
    parts = [f"lr {settings['learning_rate']:g}"] if "learning_rate" in settings else []
    parts += [f"K {settings['k']}"] if "k" in settings else []
    return ", ".join(parts) or "–"


def table(task: str, fold, methods: dict[str, list[dict]]) -> str:
    metrics = get_task(task).metrics
    entries = {name: summary(methods[name], metrics) for name in METHOD_ORDER if name in methods}
    lora = entries.get("lora_r8")
    lines = []
    for name, e in entries.items():
        fewer = f"{lora['trained_numbers'] / e['trained_numbers']:.0f}x" if lora and e["trained_numbers"] else "–"
        lines.append(
            [
                name,
                str(e["seeds"]),
                *(f"{e[m]:.3f} ± {e[m + '_std']:.3f}" for m in metrics),
                f"{e['trained_numbers']:,}",
                fewer,
                f"{e['adapter_bytes'] / 1024:.1f}",
                f"{e['train_seconds']:.0f}",
                _tuned(e["settings"]),
            ]
        )
    header = ("method", "seeds", *metrics, "trained numbers", "fewer than LoRA r8", "adapter KB", "train s", "tuned")
    title = task if fold is None else f"{task}, {'fold ' + str(fold) if fold != TWO_FOLDS else TWO_FOLDS + ' 0 and 1'}"
    return f"**{title}** (test split; mean ± spread over seeds)\n\n{markdown_table(header, lines)}"


def plot(grouped: dict, path: Path) -> Path:
    """Selection metric against trained numbers (log scale), one panel per task; the base model as a dashed line."""
    from matplotlib.figure import Figure  # the object API: no global backend switch

    both_folds = ("truthfulqa", TWO_FOLDS) in grouped  # then one TruthfulQA panel: the mean of the folds
    panels = [key for key in grouped if not (both_folds and key[0] == "truthfulqa" and key[1] != TWO_FOLDS)]
    figure = Figure(figsize=(4.5 * len(panels), 3.8))
    for axes, (task, fold) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        metric = get_task(task).selection_metric
        for name in METHOD_ORDER:
            members = grouped[task, fold].get(name)
            if not members:
                continue
            e = summary(members, (metric,))
            if e["trained_numbers"]:
                axes.errorbar(e["trained_numbers"], e[metric], yerr=e[f"{metric}_std"], fmt="o", capsize=3, label=name)
            else:
                axes.axhline(e[metric], color="grey", linestyle="--", label="base")
        axes.set_xscale("log")
        axes.set_xlabel("trained numbers (log)")
        axes.set_ylabel(f"test {metric}")
        axes.set_title(task if fold is None else f"{task} ({'fold ' + str(fold) if fold != TWO_FOLDS else TWO_FOLDS})")
        axes.legend(fontsize=7)
    figure.tight_layout()
    return atomic_write_figure(path, figure)


def report(rows: list[dict]) -> str:
    grouped = groups(rows)
    order = sorted(grouped, key=lambda key: (key[0], str(key[1])))
    return "\n\n".join(table(task, fold, grouped[task, fold]) for task, fold in order)


def replace_block(readme: Path, block: str) -> None:
    """Put ``block`` between the START and END lines of ``readme`` (which must have them)."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no '{START}' ... '{END}' lines to put the headline table between.")
    atomic_write_text(readme, pattern.sub(lambda _: f"{START}\n{block}\n{END}", text))


def write_report(rows: list[dict], output: Path, readmes: list[Path], command: str) -> str:
    """``headline.md`` and ``headline.png`` in ``output``, and the same table and plot in each README."""
    tables = report(rows)
    plot(groups(rows), output / "headline.png")
    atomic_write_text(output / "headline.md", f"`{command}`\n\n{tables}\n")
    for readme in readmes:
        image = os.path.relpath(output / "headline.png", readme.parent)
        replace_block(readme, f"{tables}\n\n![test metric against trained numbers]({image})")
    return tables
