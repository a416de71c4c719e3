"""HeadSelection: every head's localization score, the top-K list LoFiTConfig takes, JSON and a heatmap."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..extras import require
from ..io import atomic_write_figure, atomic_write_text

FORMAT_VERSION = 1


@dataclass
class HeadSelection:
    """Scores of all heads, ``scores[layer][head]`` (``||A_lh||_2`` after localization), and where they came from."""

    scores: list[list[float]]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.scores, list) or not self.scores:
            raise ValueError(f"HeadSelection scores must be a non-empty list of layers, got {self.scores!r:.80}.")
        for layer, row in enumerate(self.scores):
            if not isinstance(row, list) or not row:
                raise ValueError(
                    f"HeadSelection scores[{layer}] is {row!r:.80}; each layer must be a non-empty list of head scores "
                    "(scores[layer][head])."
                )
        if len({len(row) for row in self.scores}) > 1:
            raise ValueError(
                f"HeadSelection layers have different numbers of heads ({[len(row) for row in self.scores]}); every "
                "layer of a decoder has the same number of attention heads."
            )
        for layer, row in enumerate(self.scores):
            for head, value in enumerate(row):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(
                        f"HeadSelection score [{layer}][{head}] is {value!r}; scores must be finite numbers (an "
                        "infinite or NaN score means the localization diverged: lower its learning rate)."
                    )

    @property
    def num_heads_total(self) -> int:
        return sum(len(row) for row in self.scores)

    def check_fits(self, per_layer: list[int], source: str = "the head selection") -> None:
        """A ValueError unless the scores have the model's shape (``per_layer``: heads of each layer)."""
        shape = [len(row) for row in self.scores]
        if shape != per_layer:
            raise ValueError(
                f"{source} scores {len(shape)} layers x {shape[0]} heads, but the model has "
                f"{len(per_layer)} layers x {per_layer[0]} heads: it was localized on another model."
            )

    def ranked(self) -> list[list[int]]:
        """All ``[layer, head]`` pairs, highest score first (ties: lower layer, then lower head first)."""
        pairs = [(layer, head) for layer, row in enumerate(self.scores) for head in range(len(row))]
        pairs.sort(key=lambda pair: (-self.scores[pair[0]][pair[1]], pair))
        return [list(pair) for pair in pairs]

    def top(self, k: Optional[int] = None, fraction: Optional[float] = None) -> list[list[int]]:
        """The ``k`` best heads, or the best ``fraction`` of all heads (rounded, at least one), sorted by position."""
        k = resolve_k(self.num_heads_total, k, fraction)
        return sorted(self.ranked()[:k])

    def save(self, path) -> Path:
        """Write JSON atomically (a temporary file renamed into place)."""
        payload = {"format_version": FORMAT_VERSION, "scores": self.scores, "metadata": self.metadata}
        return atomic_write_text(Path(path), json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path) -> "HeadSelection":
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a head-selection JSON file ({error.msg}).") from None
        if not isinstance(payload, dict) or "scores" not in payload:
            raise ValueError(f"{path} has no 'scores'; it was not written by HeadSelection.save().")
        try:
            return cls(scores=payload["scores"], metadata=payload.get("metadata", {}))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def heatmap(self, path, title: Optional[str] = None, k: Optional[int] = None) -> Path:
        """Layer x head heatmap of the scores as a PNG; the top ``k`` heads are outlined."""
        require("matplotlib", "HeadSelection.heatmap")
        import numpy as np
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        width = max(len(row) for row in self.scores)
        grid = np.full((len(self.scores), width), np.nan)
        for layer, row in enumerate(self.scores):
            grid[layer, : len(row)] = row
        figure = Figure(figsize=(2 + 0.35 * width, 1.5 + 0.25 * len(self.scores)))  # no pyplot: no global backend
        axes = figure.subplots()
        image = axes.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        for layer, head in self.top(k) if k else []:
            axes.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        axes.set_xlabel("head")
        axes.set_ylabel("layer")
        axes.set_title(title or "LoFiT head scores ||A||")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        return atomic_write_figure(path, figure)


def resolve_k(total: int, k: Optional[int] = None, fraction: Optional[float] = None) -> int:
    """Number of heads for ``k`` or ``fraction`` (exactly one of them), checked against ``total``."""
    if (k is None) == (fraction is None):
        raise ValueError("Pass exactly one of k (a number of heads) or fraction (a share of all heads, e.g. 0.03).")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
        k = max(1, round(fraction * total))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"k must be an integer from 1 to {total} (the number of heads), got {k!r}.")
    return k


def random_heads(heads_per_layer: list[int], k: int, seed: int = 0) -> list[list[int]]:
    """``k`` heads drawn uniformly without replacement, for the random-selection ablation."""
    pairs = [(layer, head) for layer, count in enumerate(heads_per_layer) for head in range(count)]
    k = resolve_k(len(pairs), k)
    return sorted(list(pair) for pair in random.Random(seed).sample(pairs, k))
