"""TruthfulQA as LoFiT uses it: DPO on (best answer, first incorrect answer) pairs; MC1/MC2/MC3 by log-likelihood.

See ``peft_lofit/data/truthfulqa/PROTOCOL.md``. Scoring text for an answer ``a`` to question ``q``:

    instruction + "\\n\\n" + primer + "\\n\\nQ: " + q + "\\nA: " + a        (only a's tokens are scored)

It is tokenized in three pieces, ``[instruction ... "Q:"] [" " q "\\nA:"] [" " a]``. The first piece is the same for
every question, so its key/value cache is computed once and every answer of a question is scored in one batch.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...distributed import is_main_process
from .base import data_root, existing_file
from .rows import read_csv_rows


@dataclass
class TruthfulQAQuestion:
    question: str
    best_answer: str
    correct: list[str]
    incorrect: list[str]


def split_path(split: str, fold: int = 0, seed: int = 42, data_dir=None) -> Path:
    return data_root(data_dir) / "truthfulqa" / f"fold_{fold}_{split}_seed_{seed}.csv"


def split_file(split: str, fold: int = 0, seed: int = 42, data_dir=None) -> Path:
    """``split_path``, checked to exist."""
    return existing_file(split_path(split, fold, seed, data_dir), f"TruthfulQA fold {fold} {split} split")


def load_truthfulqa(split: str, fold: int = 0, seed: int = 42, data_dir=None) -> list[TruthfulQAQuestion]:
    """Questions of ``fold_{fold}_{split}_seed_{seed}.csv``; the answer lists are ``; ``-separated."""
    path = split_file(split, fold, seed, data_dir)
    questions = []
    for row in read_csv_rows(path):
        question, best_answer = row.text("Question").strip(), row.text("Best Answer").strip()
        answers = {}
        for column in ("Correct Answers", "Incorrect Answers"):
            answers[column] = split_answers(row.text(column))
            if not answers[column]:
                raise row.error(column, f"lists no answer (answers are '; '-separated); got {row.text(column)!r}.")
        questions.append(
            TruthfulQAQuestion(question, best_answer, answers["Correct Answers"], answers["Incorrect Answers"])
        )
    return questions


def split_answers(text: str) -> list[str]:
    return [answer.strip() for answer in text.split("; ") if answer.strip()]


def normalize_answer(answer: str) -> str:
    """Stripped, with a full stop appended where missing."""
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


# ------------------------------------------------------------------------------------------------------ training
def dpo_prompt(question: str) -> str:
    return f"Q: {question} A:"


def dpo_pairs(questions: list[TruthfulQAQuestion], pairs: str = "best") -> list[dict]:
    """DPO rows ``{prompt, chosen, rejected}``.

    ``pairs="best"`` (the LoFiT authors' default): the best answer against the first incorrect answer, one pair per
    question. ``pairs="all"``: correct and incorrect lists cut to equal length and zipped.
    """
    if pairs not in ("best", "all"):
        raise ValueError(f"pairs must be 'best' or 'all', got {pairs!r}")
    rows = []
    for item in questions:
        chosen = [item.best_answer] if pairs == "best" else item.correct
        for good, bad in zip(chosen, item.incorrect):
            rows.append({"prompt": dpo_prompt(item.question), "chosen": " " + good, "rejected": " " + bad})
    return rows


# ---------------------------------------------------------------------------------------------------- evaluation
def prompt_files(data_dir=None) -> tuple[Path, Path]:
    folder = data_root(data_dir) / "truthfulqa"
    return (
        existing_file(folder / "instruction.txt", "TruthfulQA instruction"),
        existing_file(folder / "qa_primer.txt", "TruthfulQA primer"),
    )


def read_prompt_files(data_dir=None) -> tuple[str, str]:
    instruction, primer = (path.read_text(encoding="utf-8").strip() for path in prompt_files(data_dir))
    return instruction, primer


def mc_prompt(instruction: str, primer: str, question: str, answer: str) -> str:
    """The full scoring text of the protocol (for reading and tests; scoring uses its three pieces)."""
    return f"{instruction}\n\n{primer}\n\nQ: {question}\nA: {answer}"


def mc_metrics(true_scores: list[float], false_scores: list[float], best_score: float) -> dict[str, float]:
    """MC1: best answer beats every false one. MC2: probability mass on true answers. MC3: share of true answers
    that beat every false one."""
    top_false = max(false_scores)
    log_true = torch.logsumexp(torch.tensor(true_scores, dtype=torch.float64), 0)
    log_all = torch.logsumexp(torch.tensor(true_scores + false_scores, dtype=torch.float64), 0)
    return {
        "mc1": float(best_score > top_false),
        "mc2": math.exp(float(log_true - log_all)),
        "mc3": sum(score > top_false for score in true_scores) / len(true_scores),
    }


class MultipleChoiceScorer:
    """Sums the log-probabilities of each answer's tokens; what all answers share is computed once.

    Every answer's text is tokenized whole, exactly as the protocol writes it, and its tokens are those that reach
    into the answer's characters. When every sequence of a question starts with the tokens of the shared prefix
    (instruction, primer, ``"\n\nQ:"``), which holds for BPE tokenizers, the prefix's key/value cache (computed once
    for the whole split) is extended by the tokens the question's sequences have in common before the answers, and
    only the rest is run per answer; otherwise that question is scored from scratch. The output layer runs only at
    the positions that predict answer tokens (``logits_to_keep``, where the model takes it).
    ``use_prefix_cache=False`` scores everything from scratch; both paths see the same token ids.
    """

    def __init__(self, model, tokenizer, instruction: str, primer: str, use_prefix_cache: bool = True):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("TruthfulQA scoring needs a fast tokenizer (offsets of the answer's tokens).")
        self.model, self.tokenizer = model, tokenizer
        self.use_prefix_cache = use_prefix_cache
        self.prefix_text = f"{instruction}\n\n{primer}\n\nQ:"
        self.prefix_ids = tokenizer(self.prefix_text).input_ids
        self._prefix_cache = None
        # transformers >= 5.3x names the argument `cache`; earlier 5.x releases `past_key_values`
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        parameters = inspect.signature(base.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_logits = "logits_to_keep" in parameters

    def _logits_kept(self, count: int) -> dict:
        return {"logits_to_keep": count} if self._keeps_logits else {}

    def _cache_of(self, ids: list[int]):
        """Key/value cache of ``ids`` (which start with the prefix): a copy of the prefix's, extended by the rest."""
        device = self.model.device
        with torch.no_grad():
            if self._prefix_cache is None:
                output = self.model(torch.tensor([self.prefix_ids], device=device), use_cache=True)
                self._prefix_cache = getattr(output, "cache", None) or output.past_key_values
            cache = copy.deepcopy(self._prefix_cache)  # forward appends to the cache; keep the original clean
            rest = ids[len(self.prefix_ids) :]
            if rest:
                mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
                inputs = {self._cache_argument: cache, **self._logits_kept(1)}
                self.model(torch.tensor([rest], device=device), attention_mask=mask, use_cache=True, **inputs)
        return cache

    def _shared_length(self, rows: list[tuple[list[int], int]]) -> int:
        """How many leading tokens are computed once for all answers: those every sequence shares, up to the one
        before the earliest answer token (the logits there predict it, so it is fed with the answers); 0 when the
        sequences do not all start with the prefix."""
        prefix = len(self.prefix_ids)
        if not self.use_prefix_cache or any(ids[:prefix] != self.prefix_ids for ids, _ in rows):
            return 0
        limit, reference = min(first for _, first in rows) - 1, rows[0][0]
        length = prefix
        while length < limit and all(ids[length] == reference[length] for ids, _ in rows):
            length += 1
        return length if length <= limit else 0  # an answer inside the prefix: score from scratch

    def _tokens(self, question: str, answer: str) -> tuple[list[int], int]:
        """Token ids of the full scoring text, and the index of the first token that reaches into the answer."""
        before = f"{self.prefix_text} {question}\nA:"
        encoding = self.tokenizer(f"{before} {answer}", return_offsets_mapping=True)
        first = next(i for i, (_, end) in enumerate(encoding.offset_mapping) if end > len(before))
        return encoding.input_ids, first

    def score(self, question: str, answers: list[str]) -> list[float]:
        """Summed log-probability of each answer (already normalised) given the prompt, in one batch."""
        rows = [self._tokens(question, answer) for answer in answers]
        skip = self._shared_length(rows)  # tokens not fed in this batch (they are in the cache)
        suffixes = [ids[skip:] for ids, _ in rows]
        width = max(map(len, suffixes))
        pad = self.tokenizer.pad_token_id
        device = self.model.device
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in suffixes], device=device)  # (n, W)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in suffixes], device=device)
        start = min(first for _, first in rows) - skip - 1  # the first position whose logits are read
        inputs = dict(attention_mask=mask, **self._logits_kept(width - start))
        if skip:
            cache = self._cache_of(rows[0][0][:skip])
            cache.batch_repeat_interleave(len(rows))
            inputs.update(attention_mask=torch.cat([mask.new_ones(len(rows), skip), mask], dim=1))  # (n, skip + W)
            inputs[self._cache_argument] = cache
        with torch.no_grad():
            logits = self.model(input_ids, **inputs).logits[:, -(width - start) :]  # (n, W - start, V)
        log_probs = logits.float().log_softmax(-1)
        scores = []
        for row, (ids, first) in enumerate(rows):
            positions = torch.arange(first - skip, len(ids) - skip, device=device)
            targets = input_ids[row, positions]
            # token t is predicted at t - 1, which is row t - 1 - start of the kept logits
            scores.append(log_probs[row, positions - 1 - start, targets].sum().item())
        return scores


def evaluate_mc(
    model,
    tokenizer,
    questions: list[TruthfulQAQuestion],
    data_dir=None,
    use_prefix_cache: bool = True,
    desc: str = "TruthfulQA MC",
    return_scores: bool = False,
):
    """Mean MC1, MC2, MC3 over ``questions`` (and the per-question answer scores if ``return_scores``)."""
    instruction, primer = read_prompt_files(data_dir)
    scorer = MultipleChoiceScorer(model, tokenizer, instruction, primer, use_prefix_cache=use_prefix_cache)
    totals = {"mc1": 0.0, "mc2": 0.0, "mc3": 0.0}
    all_scores = []
    for item in tqdm(questions, desc=desc, unit="q", disable=not is_main_process()):
        true_answers = [normalize_answer(a) for a in item.correct]
        false_answers = [normalize_answer(a) for a in item.incorrect]
        best = normalize_answer(item.best_answer)
        extra = [] if best in true_answers else [best]
        scores = scorer.score(item.question, true_answers + false_answers + extra)
        true_scores = scores[: len(true_answers)]
        false_scores = scores[len(true_answers) : len(true_answers) + len(false_answers)]
        best_score = scores[-1] if extra else true_scores[true_answers.index(best)]
        for key, value in mc_metrics(true_scores, false_scores, best_score).items():
            totals[key] += value
        all_scores.append(scores)
    metrics = {key: value / max(len(questions), 1) for key, value in totals.items()}
    metrics["n"] = len(questions)
    return (metrics, all_scores) if return_scores else metrics
