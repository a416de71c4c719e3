"""MQuAKE (counterfactual multi-hop knowledge editing) as LoFiT uses it; see ``peft_lofit/data/mquake/PROTOCOL.md``.

prompt: ``Q: Imagine that {edited fact}. {questions[0]} A:``; SFT target ``" " + new_answer`` then EOS; evaluation:
greedy generation, first line, case-insensitive exact match against ``new_answer`` and its aliases.
"""

from __future__ import annotations

from .base import (
    GenerationExample,
    data_root,
    evaluate_exact_match,
    existing_file,
    first_line,
    read_json_rows,
    require_fields,
)

NAME = "mquake"
OBJECTIVE = "sft"


def edited_fact(rewrite: dict) -> str:
    return rewrite["prompt"].format(rewrite["subject"]) + " " + rewrite["target_new"]["str"]


def prompt(row: dict) -> str:
    return f"Q: Imagine that {edited_fact(row['requested_rewrite'][0])}. {row['questions'][0]} A:"


def load(split: str, data_dir=None) -> list[GenerationExample]:
    path = existing_file(data_root(data_dir) / "mquake" / f"{split}.jsonl", f"MQuAKE {split} split")
    examples = []
    for number, row in enumerate(read_json_rows(path), start=1):
        require_fields(row, ("requested_rewrite", "questions", "new_answer"), path, number)
        rewrite = row["requested_rewrite"][0]
        require_fields(rewrite, ("prompt", "subject", "target_new"), path, number)
        require_fields(rewrite["target_new"], ("str",), path, number)
        if rewrite["prompt"].count("{}") != 1:
            raise ValueError(
                f"{path}, row {number}: requested_rewrite[0].prompt must contain exactly one '{{}}' for the subject; "
                f"got {rewrite['prompt']!r}."
            )
        answers = [row["new_answer"], *row.get("new_answer_alias", [])]
        examples.append(GenerationExample(prompt=prompt(row), answers=answers, completion=" " + row["new_answer"]))
    return examples


def normalize(text: str) -> str:
    return first_line(text).lower()


def evaluate(model, tokenizer, examples: list[GenerationExample], batch_size: int = 16, desc: str = "MQuAKE EM"):
    return evaluate_exact_match(model, tokenizer, examples, normalize, batch_size=batch_size, desc=desc)
