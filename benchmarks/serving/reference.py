"""Build the models of the plugin-free serving check and compute the transformers reference (repository .venv).

For each family (``llama``: the embedded default SmolLM2-135M-Instruct; ``qwen2`` and ``mistral``: tiny random models
built here with the transformers config classes and SmolLM2's tokenizer) this writes, under ``--work``:

- ``<family>/base``: the base checkpoint (the default model's converted cache folder for ``llama``);
- ``<family>/adapter``: a random, clearly non-identity LoFiT adapter with scalings and offsets on heads of several
  layers: ``init_weights=False`` (A ~ N(0, 0.1^2), v ~ N(0, 1)) times ``ADAPTER_SCALE`` = 0.3. At full scale the
  SmolLM2 adapter drives the model into a regime so ill-conditioned that float32 rounding alone moves log-probs by
  ~1e-3 (transformers, unmerged, float32 vs float64); at 0.3 the float32 noise is that of the base model (~5e-5)
  while the adapter still moves log-probs by ~20;
- ``<family>/merged``: what ``lofit export --model <base> --adapter <adapter> --merged <merged>`` writes;
- ``<family>/prompt<i>.npy``: the float32 log-probabilities (every vocabulary entry, positions 1..n-1) that the
  UNMERGED LoFiT model (base + adapter loaded with ``load_adapter``, run in transformers, float32) gives each prompt;
- ``reference.json``: prompt token ids, greedy continuations of the unmerged model (no EOS stop) with the top-1 /
  top-2 logit margin of every step, the prompt tokens' log-probabilities, and two sanity numbers: how far the BASE
  model is from the reference (what a check that ignored the adapter would see) and how far the merged folder
  reloaded in transformers is; plus the float32 noise floor: the unmerged model in float32 vs in float64.

The engine-side scripts (``check_vllm.py``, ``check_llama_cpp.py``) only read these files: their virtual environments
cannot import this repository's torch / transformers. Existing folders are reused unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from peft_lofit import LoFiTConfig  # noqa: E402
from peft_lofit.app import cli  # noqa: E402
from peft_lofit.app.default_model import default_model_path  # noqa: E402
from peft_lofit.checkpoint import load_adapter, save_adapter  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]
NEW_TOKENS = 16
# Heads on several layers of each model: [layer, head] pairs.
HEADS = {
    "llama": [[0, 1], [3, 4], [7, 8], [12, 0], [18, 5], [24, 2], [29, 6]],
    "qwen2": [[0, 1], [0, 3], [1, 0], [1, 2]],
    "mistral": [[0, 0], [0, 2], [1, 1], [1, 3]],
}
# Tiny random models: 2 layers, 4 query heads of width 64 (a head size every engine has kernels for), 2 KV heads,
# SmolLM2's vocabulary so that its tokenizer serves. initializer_range 0.1 gives peaked logits (clear greedy choices).
TINY = dict(
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
FAMILIES = ("llama", "qwen2", "mistral")
ADAPTER_SCALE = 0.3


def build_tiny_base(family: str, folder: Path, tokenizer) -> None:
    """A tiny random Qwen2 (with random q/k/v biases, which the Llama form must keep) or Mistral (no sliding window)."""
    torch.manual_seed({"qwen2": 10, "mistral": 20}[family])
    if family == "qwen2":
        config = transformers.Qwen2Config(**TINY, use_sliding_window=False)
    else:
        config = transformers.MistralConfig(**TINY, sliding_window=None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if family == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    projection.bias.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@torch.no_grad()
def log_probs(model, ids: list[int]) -> torch.Tensor:
    """float32 log-probabilities of the next token at every position (shape [len(ids), vocab])."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits.double(), dim=-1).float()


@torch.no_grad()
def log_probs_f64(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation without an EOS stop, and the top-1 minus top-2 logit margin of every step."""
    tokens, margins, sequence = [], [], list(ids)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([sequence])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        sequence.append(tokens[-1])
    return tokens, margins


def build_models(family: str, base: Path, adapter: Path, merged: Path, tokenizer) -> dict:
    """The base (tiny families), the random adapter and the merged folder ``lofit export`` writes; what exists is kept."""
    timings = {}
    start = time.perf_counter()
    if family != "llama" and not (base / "config.json").is_file():
        build_tiny_base(family, base, tokenizer)
    if not (adapter / "adapter_config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        config = LoFiTConfig(heads=HEADS[family], use_scaling=True, use_offset=True, init_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lofit_" in name:
                    parameter.mul_(ADAPTER_SCALE)
        save_adapter(peft_model, adapter)
    timings["build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if not (merged / "config.json").is_file():
        command = ["export", "--model", str(base), "--adapter", str(adapter), "--merged", str(merged)]
        print("+ lofit " + " ".join(command), flush=True)
        if cli.main(command) != 0:
            raise SystemExit(f"lofit export failed for {family}")
    timings["export_s"] = time.perf_counter() - start
    return timings


def max_abs_diff(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Largest |difference| over every prompt position that predicts a prompt token (the last row predicts none)."""
    return max(float((a[:-1].double() - b[:-1].double()).abs().max()) for a, b in zip(first, second))


def reference_numbers(root: Path, base: Path, adapter: Path, merged: Path) -> dict:
    """The unmerged model's log-probabilities (saved as ``prompt<i>.npy``) and greedy continuations, and how far the
    base model, the merged folder reloaded and the float64 model are from them."""
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_lp = [log_probs(base_model, ids) for ids in PROMPT_IDS]
    lofit = load_adapter(base_model, adapter).eval()  # the UNMERGED LoFiT model: the reference
    reference_lp, continuations, margins = [], [], []
    for index, ids in enumerate(PROMPT_IDS):
        lp = log_probs(lofit, ids)
        reference_lp.append(lp)
        np.save(root / f"prompt{index}.npy", lp[:-1].numpy())  # row i: log p(. | ids[:i+1]), i.e. for token i+1
        tokens, step_margins = greedy(lofit, ids, NEW_TOKENS)
        continuations.append(tokens)
        margins.append(step_margins)
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    reloaded_lp = [log_probs(reloaded, ids) for ids in PROMPT_IDS]
    del lofit, base_model
    exact = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), adapter).double().eval()
    exact_lp = [log_probs_f64(exact, ids) for ids in PROMPT_IDS]
    del exact
    return {
        "prompt_ids": PROMPT_IDS,
        "logprob_files": [str(root / f"prompt{index}.npy") for index in range(len(PROMPT_IDS))],
        "prompt_token_logprobs": [
            [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)] for lp, ids in zip(reference_lp, PROMPT_IDS)
        ],
        "greedy": continuations,
        "greedy_margins": margins,
        "min_greedy_margin": min(min(m) for m in margins),
        "transformers_base_vs_lofit_max_abs_logprob": max_abs_diff(base_lp, reference_lp),
        "transformers_merged_folder_vs_lofit_max_abs_logprob": max_abs_diff(reloaded_lp, reference_lp),
        "transformers_float32_vs_float64_max_abs_logprob": max_abs_diff(reference_lp, exact_lp),
        "transformers_merged_folder_greedy_equal": all(
            greedy(reloaded, ids, NEW_TOKENS)[0] == tokens for ids, tokens in zip(PROMPT_IDS, continuations)
        ),
    }


def prepare_family(family: str, work: Path, tokenizer, force: bool) -> dict:
    """The models of ``family`` (``build_models``) and their reference entry (``reference_numbers``)."""
    root = work / family
    base = Path(default_model_path()) if family == "llama" else root / "base"
    adapter, merged = root / "adapter", root / "merged"
    if force and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    timings = build_models(family, base, adapter, merged, tokenizer)
    start = time.perf_counter()
    numbers = reference_numbers(root, base, adapter, merged)
    timings["reference_s"] = time.perf_counter() - start
    config = json.loads((merged / "config.json").read_text())
    return {
        "base": str(base),
        "adapter": str(adapter),
        "merged": str(merged),
        "base_architectures": json.loads((base / "config.json").read_text())["architectures"],
        "merged_architectures": config["architectures"],
        "merged_attention_bias": config.get("attention_bias"),
        "tokenizer_source": str(default_model_path()),  # the tokenizer every family was built with
        "heads": HEADS[family],
        **numbers,
        "timings": timings,
    }


def main(argv=None) -> int:
    global PROMPT_IDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the models and the reference")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--force", action="store_true", help="rebuild models and reference")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.work.mkdir(parents=True, exist_ok=True)
    target = args.work / "reference.json"
    existing = json.loads(target.read_text()) if target.is_file() and not args.force else {"families": {}}
    todo = [family for family in args.families if family not in existing["families"]]
    if not todo:
        print(f"reference up to date: {target} (--force rebuilds)")
        return 0
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    PROMPT_IDS = [tokenizer(text)["input_ids"] for text in PROMPTS]
    for family in todo:
        start = time.perf_counter()
        existing["families"][family] = prepare_family(family, args.work, tokenizer, args.force)
        entry = existing["families"][family]
        print(
            f"{family}: base vs LoFiT max |dlogprob| {entry['transformers_base_vs_lofit_max_abs_logprob']:.3f}, "
            f"merged folder vs LoFiT {entry['transformers_merged_folder_vs_lofit_max_abs_logprob']:.2e}, "
            f"float32 vs float64 {entry['transformers_float32_vs_float64_max_abs_logprob']:.2e}, "
            f"min greedy margin {entry['min_greedy_margin']:.3f} ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    existing["settings"] = {
        "prompts": PROMPTS,
        "new_tokens": NEW_TOKENS,
        "dtype": "float32",
        "adapter_scale": ADAPTER_SCALE,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    target.write_text(json.dumps(existing, indent=1))
    print(f"wrote {target}")
    return 0


PROMPT_IDS: list[list[int]] = []

if __name__ == "__main__":
    sys.exit(main())
