"""Hub publishing (HTTP never reached: the client's commit call is captured) and loading from the Hub cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel

from peft_lofit import cli
from peft_lofit.pipeline import PipelineSettings, run_pipeline
from peft_lofit.publish import model_card
from peft_lofit.training import TrainSettings

REPO = "someone/tiny-lofit"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    settings = PipelineSettings(
        train_limit=8, eval_limit=3, k=2, output_dir=str(output),
        localize=TrainSettings(learning_rate=1e-2, l1_lambda=1e-3, epochs=1, batch_size=4),
        train=TrainSettings(learning_rate=1e-2, epochs=1, batch_size=4),
    )
    results = run_pipeline(settings, model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    return output, results


def test_adapter_folder_is_a_complete_hub_repository(run_folder):
    output, results = run_folder
    files = {p.name for p in (output / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head_selection.json", "head_selection.png",
            "metrics.json", "README.md"} <= files
    card = (output / "adapter" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "- lofit" in front and "- truthfulqa" in front and "base_model:" in front
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

    def create_commit(self, repo_id, operations, **kwargs):
        calls["files"] = {op.path_in_repo: op.path_or_fileobj for op in operations}
        calls["commit"] = kwargs.get("commit_message")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert cli.main(["push", str(output / "adapter"), "--repo-id", REPO, "--private"]) == 0
    assert calls["repo"] == (REPO, True)
    assert {"adapter_config.json", "adapter_model.safetensors", "head_selection.json", "head_selection.png",
            "metrics.json", "README.md"} <= set(calls["files"])
    card = (output / "adapter" / "README.md").read_text()
    assert f"PeftModel.from_pretrained(base, {REPO!r})" in card
    metadata = ModelCard(card).data.to_dict()
    assert metadata["library_name"] == "peft" and "lofit" in metadata["tags"] and metadata["base_model"]
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
