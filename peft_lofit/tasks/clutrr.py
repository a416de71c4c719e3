"""CLUTRR task 1.2 (family-relation reasoning) as LoFiT uses it; see ``peft_lofit/data/clutrr/PROTOCOL.md``.

The prompt asks how ``per2`` is related to ``per1`` and ends with ``Answer: {per2} is {per1} 's`` and a newline; SFT
target ``target_text`` then EOS; evaluation: greedy generation up to the first full stop or newline, stripped and
lower-cased, exact match against ``target_text``.
"""

from __future__ import annotations

import ast

from .base import (
    GenerationExample,
    data_root,
    evaluate_exact_match,
    existing_file,
    read_json_rows,
    require_fields,
    up_to_stop,
)

NAME = "clutrr"
OBJECTIVE = "sft"


def persons(query: str) -> tuple[str, str]:
    first, second = ast.literal_eval(query)
    return first, second


def prompt(story: str, per1: str, per2: str) -> str:
    return (
        f'Read the following story about a family. "{story}" Assume the relations described in the story are all '
        "true. Based on relations between the fictional characters in the story (assume the relations are all true) "
        f"and your commonsense knowledge about family relationship, how is {per2} related to {per1}? "
        f"Answer: {per2} is {per1} 's\n"
    )


def load(split: str, data_dir=None) -> list[GenerationExample]:
    path = existing_file(data_root(data_dir) / "clutrr" / f"{split}.json", f"CLUTRR {split} split")
    examples = []
    for number, row in enumerate(read_json_rows(path), start=1):
        require_fields(row, ("clean_story", "query", "target_text"), path, number)
        try:
            per1, per2 = persons(row["query"])
        except (ValueError, SyntaxError):
            raise ValueError(
                f"{path}, row {number}: column 'query' is {row['query']!r}; expected a pair like \"('Ann', 'Bob')\"."
            ) from None
        story = row["clean_story"].replace("[", "").replace("]", "")
        examples.append(
            GenerationExample(
                prompt=prompt(story, per1, per2), answers=[row["target_text"]], completion=row["target_text"]
            )
        )
    return examples


def evaluate(model, tokenizer, examples: list[GenerationExample], batch_size: int = 16, desc: str = "CLUTRR EM"):
    return evaluate_exact_match(model, tokenizer, examples, up_to_stop, batch_size=batch_size, desc=desc)
