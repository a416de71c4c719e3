"""MQuAKE (counterfactual multi-hop knowledge editing) as LoFiT uses it; see ``peft_lofit/data/mquake/PROTOCOL.md``.

prompt: ``Q: Imagine that {edited fact}. {questions[0]} A:``; SFT target ``" " + new_answer`` then EOS; evaluation:
greedy generation, first line, case-insensitive exact match against ``new_answer`` and its aliases.
"""

from __future__ import annotations

from .base import GenerationExample, data_root, evaluate_exact_match, existing_file, first_line
from .rows import Row, read_json_rows

NAME = "mquake"
OBJECTIVE = "sft"


def edited_fact(rewrite: dict) -> str:
    return rewrite["prompt"].format(rewrite["subject"]) + " " + rewrite["target_new"]["str"]


def prompt(row: dict) -> str:
    return f"Q: Imagine that {edited_fact(row['requested_rewrite'][0])}. {row['questions'][0]} A:"


def _checked_row(row: Row) -> dict:
    """The fields ``prompt`` reads, type-checked: the first rewrite, the first question, the answers."""
    rewrite = row.first_child("requested_rewrite")
    template = rewrite.text("prompt")
    try:
        filled = template.format("S")
    except (KeyError, IndexError, ValueError):
        filled = None
    if template.count("{}") != 1 or filled is None:
        raise rewrite.error(
            "prompt", f"must contain exactly one '{{}}' for the subject and no other braces; got {template!r}."
        )
    checked_rewrite = {
        "prompt": template,
        "subject": rewrite.text("subject"),
        "target_new": {"str": rewrite.child("target_new").text("str")},
    }
    return {
        "requested_rewrite": [checked_rewrite],
        "questions": row.texts("questions"),
        "new_answer": row.text("new_answer"),
        "new_answer_alias": row.texts("new_answer_alias", required=False),
    }


def split_file(split: str, data_dir=None):
    return existing_file(data_root(data_dir) / "mquake" / f"{split}.jsonl", f"MQuAKE {split} split")


def load(split: str, data_dir=None) -> list[GenerationExample]:
    path = split_file(split, data_dir)
    examples = []
    for row in read_json_rows(path):
        fields = _checked_row(row)
        answers = [fields["new_answer"], *fields["new_answer_alias"]]
        examples.append(
            GenerationExample(prompt=prompt(fields), answers=answers, completion=" " + fields["new_answer"])
        )
    return examples


def normalize(text: str) -> str:
    return first_line(text).lower()


def evaluate(model, tokenizer, examples: list[GenerationExample], batch_size: int = 16, desc: str = "MQuAKE EM"):
    return evaluate_exact_match(model, tokenizer, examples, normalize, batch_size=batch_size, desc=desc)
