"""CLUTRR task 1.2 (family-relation reasoning) as LoFiT uses it; see ``peft_lofit/data/clutrr/PROTOCOL.md``.

The prompt asks how ``per2`` is related to ``per1`` and ends with ``Answer: {per2} is {per1} 's`` and a newline; SFT
target ``target_text`` then EOS; evaluation: greedy generation up to the first full stop or newline, stripped and
lower-cased, exact match against ``target_text``.
"""

from __future__ import annotations

import ast

from .base import GenerationExample, data_root, evaluate_exact_match, existing_file, up_to_stop
from .rows import read_json_rows

NAME = "clutrr"
OBJECTIVE = "sft"


def persons(query: str) -> tuple[str, str]:
    """``"('Ann', 'Bob')"`` -> ``("Ann", "Bob")``; a ValueError for anything but a pair of names."""
    try:
        pair = ast.literal_eval(query)
    except (ValueError, SyntaxError):
        pair = None
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(name, str) and name for name in pair)):
        raise ValueError(f"must be a pair of names like \"('Ann', 'Bob')\"; got {query!r}.")
    return pair


def prompt(story: str, per1: str, per2: str) -> str:
    return (
        f'Read the following story about a family. "{story}" Assume the relations described in the story are all '
        "true. Based on relations between the fictional characters in the story (assume the relations are all true) "
        f"and your commonsense knowledge about family relationship, how is {per2} related to {per1}? "
        f"Answer: {per2} is {per1} 's\n"
    )


def split_file(split: str, data_dir=None):
    return existing_file(data_root(data_dir) / "clutrr" / f"{split}.json", f"CLUTRR {split} split")


def load(split: str, data_dir=None) -> list[GenerationExample]:
    path = split_file(split, data_dir)
    examples = []
    for row in read_json_rows(path):
        story, target = row.text("clean_story").replace("[", "").replace("]", ""), row.text("target_text")
        try:
            per1, per2 = persons(row.text("query"))
        except ValueError as error:
            raise row.error("query", str(error)) from None
        examples.append(GenerationExample(prompt=prompt(story, per1, per2), answers=[target], completion=target))
    return examples


def evaluate(model, tokenizer, examples: list[GenerationExample], batch_size: int = 16, desc: str = "CLUTRR EM"):
    return evaluate_exact_match(model, tokenizer, examples, up_to_stop, batch_size=batch_size, desc=desc)
