"""Comparison helpers shared by the engine-side checks (json and numpy only: they run in the engines' venvs)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np


def load_reference(work: Path) -> dict:
    path = Path(work) / "reference.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run reference.py (in the repository's .venv) first.")
    return json.loads(path.read_text())


def reference_logprobs(entry: dict) -> list[np.ndarray]:
    """Per prompt, float32 [len(prompt) - 1, vocab]: row i holds log p(. | prompt[: i + 1])."""
    return [np.load(path) for path in entry["logprob_files"]]


def compare_greedy(reference: list[list[int]], margins: list[list[float]], actual: list[list[int]]) -> dict:
    """Whether every continuation is equal; the first mismatch and the reference's top-1/top-2 margin there."""
    mismatches = []
    for prompt, (want, got, margin) in enumerate(zip(reference, actual, margins)):
        got = list(got)
        if want != got:
            step = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            mismatches.append(
                {
                    "prompt": prompt,
                    "step": step,
                    "reference_margin": margin[step] if step < len(margin) else None,
                    "reference": want,
                    "engine": got,
                }
            )
    return {"greedy_equal": not mismatches, "greedy_mismatches": mismatches}


def row(engine: str, family: str, variant: str, dtype: str, tolerance: float, max_diff: float, greedy: dict, **extra):
    """One result row; ``passes`` means within tolerance with equal greedy tokens (what a merged model must do and
    what the base model, which ignores the adapter, must not)."""
    within = bool(max_diff <= tolerance)
    result = {
        "engine": engine,
        "family": family,
        "model": variant,
        "dtype": dtype,
        "tolerance_abs_logprob": tolerance,
        "max_abs_logprob_diff": float(max_diff),
        "within_tolerance": within,
        "exact": bool(max_diff == 0.0),
        **greedy,
        "passes": within and greedy["greedy_equal"],
        **extra,
    }
    mark = "PASS" if result["passes"] else "differs"
    kv = f" KV {extra['kv_cache']}" if "kv_cache" in extra else ""
    print(
        f"[{engine}] {family:8s} {variant:7s} {dtype:5s}{kv} max|dlogprob|={max_diff:.3e} (tol {tolerance:g}) "
        f"greedy equal={greedy['greedy_equal']} -> {mark}",
        flush=True,
    )
    return result


def verdict(rows: list[dict]) -> dict:
    """The check holds when every merged row passes and every base row fails (the check can tell them apart).

    Rows with ``role: "info"`` (lossy settings shown for reference) do not count; a merged model that could not be
    loaded at all (``role: "blocked"``) fails the check."""
    blocked_merged = any(r.get("role") == "blocked" and r["model"] == "merged" for r in rows)
    rows = [r for r in rows if r.get("role", "check") == "check"]
    merged_ok = not blocked_merged and all(r["passes"] for r in rows if r["model"] == "merged")
    base_caught = all(not r["passes"] for r in rows if r["model"] == "base")
    return {"merged_rows_pass": merged_ok, "base_rows_fail": base_caught, "ok": merged_ok and base_caught}


def write_results(path: Path, engine: str, section: dict) -> None:
    """Update ``path`` (results.json) with this engine's section, keeping the other engines' sections."""
    path = Path(path)
    results = json.loads(path.read_text()) if path.is_file() else {}
    section.setdefault("machine", f"{platform.machine()} {platform.processor() or ''}".strip())
    results[engine] = section
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path} [{engine}]")
