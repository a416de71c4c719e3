"""Publishing LoFiT adapters to the Hugging Face Hub with a model card that says what the adapter is.

``write_model_card`` writes ``README.md`` (YAML metadata for the Hub, how to load the adapter, its heads, training
data and metrics) into an adapter folder; ``push_adapter`` creates the repository and uploads the folder with
``huggingface_hub``. The folder that ``lofit run`` writes already holds the head selection (JSON and heatmap).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..checkpoint import CARD_FILE, validate_adapter_folder
from ..io import atomic_write_text
from ..markdown import markdown_table
from .default_model import is_hub_id


def _front_matter(base_model: Optional[str], task: Optional[str]) -> str:
    """The card's YAML metadata block (what the Hub indexes), written by ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    tags = ["peft", "lofit", "peft_lofit"] + ([task] if task else [])
    data = ModelCardData(library_name="peft", base_model=base_model, tags=tags)
    return f"---\n{data.to_yaml()}\n---"


def _heads_line(metrics: dict) -> str:
    """Where the adapter's heads came from: step 1 on the same data (with its L1 weight), random, or another run."""
    settings, k, search = metrics.get("settings", {}), metrics.get("num_heads_selected"), metrics.get("search")
    if settings.get("heads") == "random":
        return f"- heads: {k} chosen at random (seed {settings.get('seed')})"
    if settings.get("heads", "learned") != "learned" and not search:
        return f"- heads: top {k} of a head selection from another run (`head_selection.json`)"
    line = (
        f"- heads localized on the same data: top {k} by ||A|| with L1 weight "
        f"{settings.get('localize', {}).get('l1_lambda')} (`head_selection.json`, heatmap `head_selection.png`)"
    )
    chosen = [name for axis, name in (("k", "K"), ("l1", "the weight")) if search and search["space"].get(axis)]
    if not chosen:
        return line
    return f"{line}; {' and '.join(chosen)} {'was' if len(chosen) == 1 else 'were'} chosen by the hyperparameter search below"


def model_card(config: dict, metrics: Optional[dict] = None, repo_id: Optional[str] = None) -> str:
    """The Markdown model card for an adapter with config dict ``config`` (and pipeline ``metrics``, if known).

    ``base_model`` is a Hub id (``metrics["base_model_id"]``, else the config's ``base_model_name_or_path`` when it
    is one), never a local path; without one the card says how to add it.
    """
    metrics = metrics or {}
    base_model = next(
        (name for name in (metrics.get("base_model_id"), config.get("base_model_name_or_path")) if is_hub_id(name)),
        None,
    )
    parts = [
        _front_matter(base_model, metrics.get("task")),
        f"# LoFiT adapter{f' for {base_model}' if base_model else ''}",
        "A [LoFiT](https://arxiv.org/abs/2406.01563) adapter (Localized Fine-tuning on LLM Representations): it adds a "
        "learned vector to the output of a few attention heads, `z_h <- (1 + A_h) * z_h + v_h`, and changes nothing "
        "else in the model.",
        *_loading_section(base_model, repo_id or "path/to/this/adapter"),
        *_adapter_section(config, metrics, base_model),
        *_training_section(metrics),
        *_search_section(metrics),
        *_results_section(metrics),
        "Made with [peft_lofit](https://pypi.org/project/peft_lofit/).",
    ]
    return "\n\n".join(parts) + "\n"


def _loading_section(base_model: Optional[str], load_id: str) -> list[str]:
    return [
        "## How to load",
        "```bash\npip install peft_lofit\n```",
        "```python\nimport peft_lofit  # registers LoFiT with PEFT\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_model or '...'!r})\n"
        f"model = PeftModel.from_pretrained(base, {load_id!r})\n"
        "merged = model.merge_and_unload()  # optional: a plain transformers model, offsets in o_proj's bias\n```",
    ]


def _adapter_section(config: dict, metrics: dict, base_model: Optional[str]) -> list[str]:
    heads = config.get("heads")
    vectors = [
        name for name, on in (("scaling A", config.get("use_scaling")), ("offset v", config.get("use_offset"))) if on
    ]
    if base_model:
        source = metrics.get("base_model_source")
        base_line = f"- base model: {base_model}" + (f", trained on {source}" if source else "")
    else:
        base_line = "- base model: not recorded (a local folder); rerun `lofit run` with `--base-model-id`"
    where = (
        "every head of every targeted layer"
        if heads is None
        else ", ".join(f"[{layer}, {head}]" for layer, head in heads)
    )
    return [
        "## Adapter",
        base_line,
        f"- vectors: {', '.join(vectors) or 'none'}",
        f"- heads ({'all' if heads is None else len(heads)}): {where}",
        f"- target modules: {config.get('target_modules')}",
    ]


def _training_section(metrics: dict) -> list[str]:
    if not metrics.get("task"):
        return []
    settings = metrics.get("settings", {})
    return [
        "## Training",
        f"- task: {metrics['task']} (objective as in the LoFiT paper), training rows: "
        f"{metrics.get('train_rows') or settings.get('train_limit') or 'all'}, fold {settings.get('fold', 0)}",
        _heads_line(metrics),
        f"- trained numbers: {metrics.get('trainable_parameters')}",
    ]


def _search_section(metrics: dict) -> list[str]:
    if not metrics.get("search"):
        return []
    search, best = metrics["search"], metrics["search"]["best"]
    return [
        "## Hyperparameter search",
        f"Chosen by {search['metric']} on the {search['split']} split ({search['strategy']}; every trial in "
        f"`search/trials.md` of the run): L1 weight {best['l1']:g}, K = {best['k']}, learning rate "
        f"{best['learning_rate']:g}, {best['epochs']:g} epochs ({search['metric']} {best['score']:.4f}).",
    ]


def _results_section(metrics: dict) -> list[str]:
    if not (metrics.get("base") and metrics.get("lofit")):
        return []
    names = [key for key in metrics["lofit"] if key != "n"]
    rows = [
        (model, *(f"{metrics[key][n]:.3f}" for n in names)) for model, key in (("base", "base"), ("LoFiT", "lofit"))
    ]
    return [
        "## Results",
        f"{metrics.get('settings', {}).get('eval_split', 'test')} split, {metrics['lofit'].get('n')} examples:",
        markdown_table(("model", *names), rows),
    ]


def write_model_card(folder, metrics: Optional[dict] = None, repo_id: Optional[str] = None) -> Path:
    """Write ``README.md`` for the adapter in ``folder`` (replacing PEFT's generic card)."""
    folder = Path(folder)
    config = validate_adapter_folder(folder)
    return atomic_write_text(folder / CARD_FILE, model_card(config, metrics, repo_id))


def push_adapter(folder, repo_id: str, private: bool = False, token: Optional[str] = None, metrics_file=None):
    """Create ``repo_id`` on the Hub (if needed) and upload the adapter folder (hidden files left out) with a fresh
    model card."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    metrics = None
    metrics_path = Path(metrics_file) if metrics_file else folder / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    write_model_card(folder, metrics, repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message="Upload LoFiT adapter", ignore_patterns=[".*", "**/.*"]
    )
