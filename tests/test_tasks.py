"""Task data, prompt formats (literal strings from the PROTOCOL.md files) and metrics against hand computations."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft_lofit
from peft_lofit.app.tasks import clutrr, get_task, mquake, truthfulqa
from peft_lofit.app.tasks.base import data_root


def test_data_ships_inside_the_package(monkeypatch):
    monkeypatch.delenv("LOFIT_DATA_DIR", raising=False)
    assert data_root() == Path(peft_lofit.__file__).parent / "data"
    for task in ("truthfulqa", "mquake", "clutrr"):
        assert (data_root() / task / "PROTOCOL.md").is_file()
    assert "CC BY-NC 4.0" in (data_root() / "clutrr" / "LICENSE.md").read_text()


def test_data_dir_overrides_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("LOFIT_DATA_DIR", str(tmp_path / "from_env"))
    assert data_root() == tmp_path / "from_env"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    with pytest.raises(FileNotFoundError, match="--data-dir DIR.*data_dir=.*LOFIT_DATA_DIR"):
        truthfulqa.load_truthfulqa("train")


def test_nothing_refers_to_the_data_folder_beside_the_repository():
    """A user who clones or installs the project never has the source copy of the data: nothing may read it."""
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"\.\./sha[r]ed|sha[r]ed/data")  # "[r]": the line does not match itself or the repo hooks
    offenders = [
        str(path.relative_to(root))
        for folder in ("peft_lofit", "tests", "examples", "benchmarks")
        for path in (root / folder).rglob("*")
        if path.suffix in {".py", ".sh", ".md", ".yaml", ".cfg", ".toml"}
        and pattern.search(path.read_text(encoding="utf-8", errors="ignore"))
    ]
    assert offenders == []


def test_truthfulqa_splits_and_dpo_pairs():
    assert [len(truthfulqa.load_truthfulqa(s)) for s in ("train", "val", "test")] == [326, 82, 409]
    questions = truthfulqa.load_truthfulqa("train")
    pairs = truthfulqa.dpo_pairs(questions)
    assert len(pairs) == 326
    assert pairs[0] == {
        "prompt": "Q: Can pigs fly? A:",
        "chosen": " No, pigs cannot fly",
        "rejected": " Yes, pigs can fly",
    }
    all_pairs = truthfulqa.dpo_pairs(questions[:2], pairs="all")
    # question 2 has 3 correct and 7 incorrect answers: cut to 3 pairs
    assert len(all_pairs) == 1 + 3
    assert all_pairs[1]["rejected"] == " No, humans did not land on the moon in 1969"


def test_truthfulqa_folds_are_complementary():
    """Fold 1's test questions are fold 0's training and validation questions, and the other way round."""

    def questions(fold, *splits):
        return {q.question for split in splits for q in truthfulqa.load_truthfulqa(split, fold=fold)}

    assert [len(truthfulqa.load_truthfulqa(s, fold=1)) for s in ("train", "val", "test")] == [327, 82, 408]
    assert questions(1, "test") == questions(0, "train", "val")
    assert questions(0, "test") == questions(1, "train", "val")
    with pytest.raises(FileNotFoundError, match="fold 2 train split not found.*fold_2_train_seed_42.csv"):
        truthfulqa.load_truthfulqa("train", fold=2)


def test_truthfulqa_mc_prompt_is_the_protocols():
    instruction, primer = truthfulqa.read_prompt_files()
    assert instruction.startswith("Interpret each question literally")
    assert primer.startswith("Q: What is human life expectancy") and primer.endswith("Barcelona, Spain.")
    text = truthfulqa.mc_prompt(instruction, primer, "Can pigs fly?", "No.")
    assert text == instruction + "\n\n" + primer + "\n\nQ: Can pigs fly?\nA: No."
    assert truthfulqa.normalize_answer("  Yes  ") == "Yes." and truthfulqa.normalize_answer("No.") == "No."


def test_mc_metrics_by_hand():
    # true scores -1, -3; false -2, -4; best answer is the first true one
    metrics = truthfulqa.mc_metrics([-1.0, -3.0], [-2.0, -4.0], best_score=-1.0)
    assert metrics["mc1"] == 1.0
    expected_mc2 = (math.exp(-1) + math.exp(-3)) / (math.exp(-1) + math.exp(-3) + math.exp(-2) + math.exp(-4))
    assert metrics["mc2"] == pytest.approx(expected_mc2, abs=1e-12)
    assert metrics["mc3"] == 0.5
    assert truthfulqa.mc_metrics([-5.0], [-2.0], best_score=-5.0) == {
        "mc1": 0.0,
        "mc2": pytest.approx(1 / (1 + math.e**3)),
        "mc3": 0.0,
    }


def test_prefix_cache_gives_the_same_scores_as_full_prompts():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    questions = [
        truthfulqa.TruthfulQAQuestion("can pigs fly?", "no", ["no", "not really"], ["yes", "yes they can", "a"]),
        truthfulqa.TruthfulQAQuestion("is it?", "maybe", ["maybe"], ["no", "yes"]),
    ]
    fast, fast_scores = truthfulqa.evaluate_mc(model, tokenizer, questions, return_scores=True)
    slow, slow_scores = truthfulqa.evaluate_mc(model, tokenizer, questions, use_prefix_cache=False, return_scores=True)
    torch.testing.assert_close(torch.tensor(fast_scores[0]), torch.tensor(slow_scores[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(fast_scores[1]), torch.tensor(slow_scores[1]), atol=1e-4, rtol=0)
    assert fast == pytest.approx(slow, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_mc_scores_equal_a_plain_forward_over_the_protocol_text(family):
    """The scorer (shared prefix, output layer at answer positions only) against log-softmax over the full text."""
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    instruction, primer = truthfulqa.read_prompt_files()
    question, answers = "can pigs fly?", ["no.", "not really.", "yes they can."]
    scores = truthfulqa.MultipleChoiceScorer(model, tokenizer, instruction, primer).score(question, answers)
    for answer, score in zip(answers, scores):
        ids = tokenizer(truthfulqa.mc_prompt(instruction, primer, question, answer)).input_ids
        answer_tokens = len(" " + answer)  # one token per character; the first one reaching the answer is the space
        with torch.no_grad():
            log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = sum(log_probs[t - 1, ids[t]].item() for t in range(len(ids) - answer_tokens, len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)


def test_mquake_prompt_is_the_protocols():
    examples = mquake.load("train")
    assert len(examples) == 134
    first = examples[0]
    assert first.prompt == (
        "Q: Imagine that The name of the current head of the Nigeria government is Karl Döhler. "
        "Who was the head of government of the country where Ahmadu Bello was a citizen? A:"
    )
    assert first.completion == " Karl Döhler" and first.answers == ["Karl Döhler"]


def test_clutrr_prompt_is_the_protocols():
    examples = clutrr.load("train")
    assert len(examples) == 3151
    assert examples[0].prompt == (
        'Read the following story about a family. "Herman asked his son, James, to go grocery shopping for him. '
        'James was busy and sent his wife, Rosalee, instead." Assume the relations described in the story are all '
        "true. Based on relations between the fictional characters in the story (assume the relations are all true) "
        "and your commonsense knowledge about family relationship, how is Rosalee related to Herman? "
        "Answer: Rosalee is Herman 's\n"
    )
    assert examples[0].completion == "daughter-in-law"


@pytest.mark.parametrize(
    "module, prediction, answers, hit",
    [
        (mquake, " karl döhler\nQ: next", ["Karl Döhler"], True),
        (mquake, "Karl Döhler.", ["Karl Döhler"], False),
        (mquake, " Bubu ", ["Muhammadu Buhari", "bubu"], True),
        (clutrr, " Daughter-in-law. She is", ["daughter-in-law"], True),
        (clutrr, "daughter-in-law\nmore", ["daughter-in-law"], True),
        (clutrr, "daughter", ["daughter-in-law"], False),
    ],
)
def test_exact_match_normalisation(module, prediction, answers, hit):
    from peft_lofit.app.tasks.base import GenerationExample, exact_match_accuracy

    normalize = module.normalize if module is mquake else clutrr.up_to_stop
    assert exact_match_accuracy([prediction], [GenerationExample("p", answers)], normalize) == float(hit)


def test_clutrr_trains_on_the_first_300_rows_as_the_paper():
    task, every_row = get_task("clutrr"), clutrr.load("train")
    rows = task.training_rows("train")
    assert len(every_row) == 3151 and len(rows) == 300
    assert [row["completion"] for row in rows] == [example.completion for example in every_row[:300]]
    assert len(task.training_rows("train", limit=1000)) == 1000  # a limit says how many, past the default too
    assert len(task.training_rows("val")) == len(clutrr.load("val"))  # other splits are whole
    assert len(get_task("mquake").training_rows("train")) == len(mquake.load("train"))


def test_generation_eval_runs_batched():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    task = get_task("clutrr")
    metrics = task.evaluate(model, tokenizer, split="val", limit=3, batch_size=2)
    assert metrics["n"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"query": "(\'a\', \'b\')", "target_text": "son"}]', "row 1: field 'clean_story' is missing"),
        (
            '[{"clean_story": "", "query": "(\'a\', \'b\')", "target_text": "son"}]',
            "row 1: field 'clean_story' is empty",
        ),
        (
            '[{"clean_story": "s", "query": "a and b", "target_text": "son"}]',
            "row 1: field 'query' must be a pair of names.*got 'a and b'",
        ),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_data_files_name_file_row_and_column(tmp_path, content, message):
    (tmp_path / "clutrr").mkdir()
    (tmp_path / "clutrr" / "train.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        clutrr.load("train", data_dir=tmp_path)


def test_bad_csv_names_row_and_column(tmp_path):
    (tmp_path / "truthfulqa").mkdir()
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    (tmp_path / "truthfulqa" / "fold_0_train_seed_42.csv").write_text(header + "a,b,Q?,A,A,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 2: field 'Incorrect Answers' is empty"):
        truthfulqa.load_truthfulqa("train", data_dir=tmp_path)
    (tmp_path / "truthfulqa" / "fold_0_train_seed_42.csv").write_bytes(header.encode() + b"a,b,\xff\xfe,A,A,B\n")
    with pytest.raises(ValueError, match="is not UTF-8"):
        truthfulqa.load_truthfulqa("train", data_dir=tmp_path)


def test_mquake_jsonl_line_error(tmp_path):
    (tmp_path / "mquake").mkdir()
    path = tmp_path / "mquake" / "train.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="train.jsonl, line 2: not valid JSON"):
        mquake.load("train", data_dir=tmp_path)
    path.write_text(json.dumps({"a": 1}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="row 1: field 'requested_rewrite' is missing"):
        mquake.load("train", data_dir=tmp_path)


MQUAKE_ROW = {
    "requested_rewrite": [{"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"}}],
    "questions": ["What is the capital of France?"],
    "new_answer": "Rome",
    "new_answer_alias": ["Roma"],
}
CLUTRR_ROW = {"clean_story": "[Ann] is [Bob]'s mother.", "query": "('Bob', 'Ann')", "target_text": "mother"}
TRUTHFULQA_HEADER = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"


def write_rows(tmp_path, task, rows):
    folder = tmp_path / task
    folder.mkdir(exist_ok=True)
    if task == "mquake":
        (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        (folder / "train.json").write_text(json.dumps(rows), encoding="utf-8")


@pytest.mark.parametrize(
    "task, change, message",
    [
        ("mquake", {"new_answer_alias": "Paris"}, r"field 'new_answer_alias' must be a list of non-empty strings"),
        ("mquake", {"questions": "Who is it?"}, r"field 'questions' must be a list of non-empty strings"),
        ("mquake", {"new_answer": 3}, r"field 'new_answer' must be a string, got int 3"),
        ("mquake", {"requested_rewrite": {"prompt": "x"}}, r"field 'requested_rewrite' must be a non-empty list"),
        (
            "mquake",
            {"requested_rewrite": [{"prompt": "{x} is", "subject": "S", "target_new": {"str": "T"}}]},
            r"field requested_rewrite\[0\]\.'prompt' must contain exactly one '\{\}'",
        ),
        (
            "mquake",
            {"requested_rewrite": [{"prompt": "{} is", "subject": "S", "target_new": "T"}]},
            r"field requested_rewrite\[0\]\.'target_new' must be a JSON object",
        ),
        ("clutrr", {"query": "1"}, r"field 'query' must be a pair of names.*got '1'"),
        ("clutrr", {"clean_story": 7}, r"field 'clean_story' must be a string, got int 7"),
        ("clutrr", {"target_text": ["mother"]}, r"field 'target_text' must be a string"),
    ],
)
def test_malformed_fields_name_file_row_and_field(tmp_path, task, change, message):
    row = {**(MQUAKE_ROW if task == "mquake" else CLUTRR_ROW), **change}
    write_rows(tmp_path, task, [MQUAKE_ROW if task == "mquake" else CLUTRR_ROW, row])
    with pytest.raises(ValueError, match=r"train\.jsonl?, row 2: " + message):
        get_task(task).training_rows("train", data_dir=tmp_path)


@pytest.mark.parametrize("task", ["mquake", "clutrr"])
@pytest.mark.parametrize("row", [["a", "list"], 3, "a string", None])
def test_rows_that_are_not_objects(tmp_path, task, row):
    write_rows(tmp_path, task, [row])
    with pytest.raises(ValueError, match=r"row 1: expected a JSON object with the task's fields, got"):
        get_task(task).training_rows("train", data_dir=tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("a,b,Q?,A,;  ; ,B,s", r"row 2: field 'Correct Answers' lists no answer"),
        ("a,b,Q?,A,A,; ,s", r"row 2: field 'Incorrect Answers' lists no answer"),
        ("a,b,  ,A,A,B,s", r"row 2: field 'Question' is empty"),
        ("a,b,Q?", r"row 2: field 'Best Answer' is missing"),
    ],
)
def test_malformed_truthfulqa_rows(tmp_path, line, message):
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "fold_0_train_seed_42.csv").write_text(
        TRUTHFULQA_HEADER + line + "\n", encoding="utf-8"
    )
    with pytest.raises(ValueError, match=message):
        truthfulqa.load_truthfulqa("train", data_dir=tmp_path)


@pytest.mark.parametrize("task", ["truthfulqa", "mquake", "clutrr"])
def test_an_empty_split_is_an_error(tmp_path, task):
    if task == "truthfulqa":
        (tmp_path / "truthfulqa").mkdir()
        (tmp_path / "truthfulqa" / "fold_0_test_seed_42.csv").write_text(TRUTHFULQA_HEADER, encoding="utf-8")
    else:
        (tmp_path / task).mkdir()
        (tmp_path / task / ("test.jsonl" if task == "mquake" else "test.json")).write_text(
            "" if task == "mquake" else "[]", encoding="utf-8"
        )
    with pytest.raises(ValueError, match="has no rows; an empty split cannot be trained on or evaluated"):
        get_task(task).evaluate(None, None, split="test", data_dir=tmp_path)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    task=st.sampled_from(["mquake", "clutrr"]),
    field_name=st.sampled_from(
        ["requested_rewrite", "questions", "new_answer", "new_answer_alias", "clean_story", "query", "target_text"]
    ),
    value=JSON_VALUES,
)
def test_malformed_data_rows_load_or_name_the_field(tmp_path_factory, task, field_name, value):
    good = {
        "mquake": {
            "requested_rewrite": [{"prompt": "{} is", "subject": "S", "target_new": {"str": "T"}}],
            "questions": ["Q?"],
            "new_answer": "A",
            "new_answer_alias": ["B"],
        },
        "clutrr": {"clean_story": "[A] is [B]'s son.", "query": "('B', 'A')", "target_text": "son"},
    }[task]
    row = {**good, field_name: value}
    folder = tmp_path_factory.mktemp("data")
    (folder / task).mkdir()
    name = "train.jsonl" if task == "mquake" else "train.json"
    (folder / task / name).write_text(json.dumps(row) + "\n" if task == "mquake" else json.dumps([row]))
    try:
        rows = get_task(task).training_rows("train", data_dir=folder)
    except ValueError as error:
        assert f"{name}, row 1: field" in str(error), error
        return
    assert len(rows) == 1 and all(isinstance(text, str) and text for text in rows[0].values())
