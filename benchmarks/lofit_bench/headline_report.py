"""Tables and plot of the headline comparison, from ``headline.json`` alone.

For each task (and each TruthfulQA fold) every method's metrics are the mean and spread (population std) over its
seeds. The TruthfulQA row the paper reports is the mean of the two folds: per seed the mean of its two fold scores,
then mean and spread over the seeds both folds have. ``write_report`` writes ``headline.md`` and ``headline.png`` and
puts the table and plot between the ``<!-- headline:start -->`` and ``<!-- headline:end -->`` lines of each README.
The report opens with ``TARGETS``: whether tuned LoFiT reaches tuned LoRA r8 on each task, judged from the same means.
"""

from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass
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
    """Per method and seed both folds ran, one row of the two folds' means: metrics, trained numbers (K is tuned per
    fold), adapter bytes and training seconds; its settings list both folds'."""
    metrics = get_task("truthfulqa").metrics
    means = {}
    for method in first.keys() & second.keys():
        by_seed = {row["seed"]: row for row in second[method]}
        pairs = [(row, by_seed[row["seed"]]) for row in first[method] if row["seed"] in by_seed]
        means[method] = [
            {
                "task": "truthfulqa",
                "fold": TWO_FOLDS,
                "method": method,
                "seed": one["seed"],
                "metrics": {name: (one["metrics"][name] + two["metrics"][name]) / 2 for name in metrics},
                **{
                    name: _mean([one[name], two[name]])
                    for name in ("trained_numbers", "adapter_bytes", "train_seconds")
                },
                "settings": {"folds": [one["settings"], two["settings"]]},
            }
            for one, two in pairs
        ]
    return {method: members for method, members in means.items() if members}


def _mean(values: list):
    """The mean, or None when a value is not known (a training time a resumed search could not read back)."""
    return None if None in values else statistics.mean(values)


def _title(task: str, fold) -> str:
    if fold is None:
        return task
    return f"{task}, {TWO_FOLDS} 0 and 1" if fold == TWO_FOLDS else f"{task}, fold {fold}"


def summary(members: list[dict], metrics: tuple[str, ...]) -> dict:
    """Mean and spread over seeds of each metric, and the seeds' mean training time."""
    entry = {"seeds": len(members), "trained_numbers": members[0]["trained_numbers"]}
    entry["adapter_bytes"] = members[0]["adapter_bytes"]
    entry["train_seconds"] = _mean([row["train_seconds"] for row in members])
    entry["settings"] = members[0]["settings"]
    for name in metrics:
        values = [row["metrics"][name] for row in members]
        entry[name], entry[f"{name}_std"] = statistics.mean(values), statistics.pstdev(values)
    return entry


def _grid_edge(settings: dict) -> str:
    """The mark of a tuned learning rate: an up arrow when it is the largest of the grid its tuning tried
    (``settings["grid"]``), a down arrow when the smallest, else nothing."""
    grid, learning_rate = settings.get("grid", ()), settings["learning_rate"]
    if len(grid) < 2:
        return ""
    return " ↑" if learning_rate == max(grid) else " ↓" if learning_rate == min(grid) else ""


def _tuned(settings: dict) -> str:
    """The tuned values of a row's settings ("lr 0.002", "lr 0.01 ↑, K 27", marked by ``_grid_edge``); per fold for
    a mean of folds."""
    if "folds" in settings:
        return " / ".join(_tuned(fold) for fold in settings["folds"])
    parts = [f"lr {settings['learning_rate']:g}{_grid_edge(settings)}"] if "learning_rate" in settings else []
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
                f"{e['trained_numbers']:,.0f}",
                fewer,
                f"{e['adapter_bytes'] / 1024:.1f}",
                "–" if e["train_seconds"] is None else f"{e['train_seconds']:.0f}",
                _tuned(e["settings"]),
            ]
        )
    header = ("method", "seeds", *metrics, "trained numbers", "fewer than LoRA r8", "adapter KB", "train s", "tuned")
    return f"**{_title(task, fold)}** (test split; mean ± spread over seeds)\n\n{markdown_table(header, lines)}"


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
        axes.set_title(_title(task, fold))
        axes.legend(fontsize=7)
    figure.tight_layout()
    return atomic_write_figure(path, figure)


@dataclass(frozen=True)
class Target:
    """Tuned LoFiT's mean selection metric is at least LoRA r8's minus ``margin``, with ``fewer`` times fewer
    trained numbers, over ``seeds`` seeds of each."""

    task: str
    fold: object  # None, or TWO_FOLDS for TruthfulQA
    margin: float
    fewer: float
    seeds: int = 3

    def describe(self, metric: str) -> str:
        reach = "≥ LoRA r8's" if self.margin == 0 else f"within {self.margin:g} of LoRA r8's"
        return f"{_title(self.task, self.fold)}: LoFiT {metric} {reach}, with {self.fewer:g}x fewer numbers"


TARGETS = (
    Target("truthfulqa", TWO_FOLDS, margin=0.0, fewer=100),
    Target("mquake", None, margin=0.01, fewer=20),
    Target("clutrr", None, margin=0.01, fewer=20),
)


def target_line(target: Target, methods: dict[str, list[dict]]) -> list[str]:
    """One row of the targets table: both means, their gap, the ratio of trained numbers, the seeds and the verdict:
    "yes" / "no", with the seeds so far while either method has fewer than ``target.seeds``; "not run" without rows."""
    metric = get_task(target.task).selection_metric
    description = target.describe(metric)
    if not methods.get("lofit") or not methods.get("lora_r8"):
        return [description, "–", "–", "–", "–", "–", "not run"]
    lofit, lora = (summary(methods[name], (metric,)) for name in ("lofit", "lora_r8"))
    gap, fewer = lofit[metric] - lora[metric], lora["trained_numbers"] / lofit["trained_numbers"]
    met = "yes" if round(gap, 9) >= -target.margin and fewer >= target.fewer else "no"  # round: 0.54 - 0.55
    seeds = min(lofit["seeds"], lora["seeds"])
    verdict = met if seeds >= target.seeds else f"{met} ({seeds} of {target.seeds} seeds)"
    scores = (f"{entry[metric]:.3f} ± {entry[metric + '_std']:.3f}" for entry in (lofit, lora))
    return [description, *scores, f"{gap:+.3f}", f"{fewer:.0f}x", f"{lofit['seeds']} / {lora['seeds']}", verdict]


def targets_table(grouped: dict) -> str:
    lines = [target_line(target, grouped.get((target.task, target.fold), {})) for target in TARGETS]
    header = ("target", "LoFiT", "LoRA r8", "LoFiT − LoRA r8", "fewer numbers", "seeds (LoFiT / LoRA r8)", "met")
    return f"**Targets** (test split; means over seeds)\n\n{markdown_table(header, lines)}"


EDGE_NOTE = (
    "↑ / ↓: the tuned learning rate is the largest / smallest its tuning tried; the best one may lie beyond the grid."
)


def report(rows: list[dict]) -> str:
    grouped = groups(rows)
    order = sorted(grouped, key=lambda key: (key[0], str(key[1])))
    tables = "\n\n".join([targets_table(grouped), *(table(task, fold, grouped[task, fold]) for task, fold in order)])
    return f"{tables}\n\n{EDGE_NOTE}" if "↑" in tables or "↓" in tables else tables


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
