"""What every task shares: where the data lives, reading rows with clear errors, and exact-match evaluation."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ...distributed import is_main_process

# The task data shipped inside the package (installed with the wheel; see peft_lofit/data/README.md).
PACKAGED_DATA = Path(__file__).resolve().parents[2] / "data"
DATA_DIR_VARIABLE = "LOFIT_DATA_DIR"


def data_root(data_dir: Optional[str | os.PathLike] = None) -> Path:
    """``data_dir`` if given, else ``$LOFIT_DATA_DIR``, else the copy shipped in the package."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_VARIABLE):
        return Path(os.environ[DATA_DIR_VARIABLE])
    return PACKAGED_DATA


def existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found at {path}. Point the loaders at a folder with the task's files: `--data-dir DIR` on "
            f"the command line, `data_dir=` in Python, or ${DATA_DIR_VARIABLE} (default: the copy shipped in "
            f"peft_lofit/data)."
        )
    return path


@dataclass
class GenerationExample:
    """A prompt to complete greedily, and the answers that count as correct."""

    prompt: str
    answers: list[str]
    completion: str = ""  # the training target (answer text the model should produce)


def generate_greedy(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not is_main_process()):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def exact_match_accuracy(
    predictions: list[str], examples: list[GenerationExample], normalize: Callable[[str], str]
) -> float:
    """Fraction of predictions equal, after ``normalize``, to one of their example's answers (also normalized)."""
    if not examples:
        return float("nan")
    hits = sum(
        normalize(prediction) in {normalize(answer) for answer in example.answers}
        for prediction, example in zip(predictions, examples)
    )
    return hits / len(examples)


def evaluate_exact_match(model, tokenizer, examples, normalize, max_new_tokens=16, batch_size=16, desc="eval"):
    """Greedy generation then exact match: ``{"accuracy": ..., "n": ...}`` and the predictions."""
    predictions = generate_greedy(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size, desc)
    accuracy = exact_match_accuracy(predictions, examples, normalize)
    return {"accuracy": accuracy, "n": len(examples)}, predictions


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def up_to_stop(text: str) -> str:
    """Text up to the first full stop or newline, stripped and lower-cased (CLUTRR's prediction rule)."""
    return re.split(r"[.\n]", text, maxsplit=1)[0].strip().lower()
