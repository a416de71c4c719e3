"""Tiny random models, one per architecture family, built locally (tests never download)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# base-model metrics cached by this test session only, never read from or written to the user's cache
os.environ["PEFT_LOFIT_METRICS_CACHE"] = tempfile.mkdtemp(prefix="peft_lofit_metrics_")

import pytest
import torch
import transformers

import peft_lofit  # noqa: F401  (registers LoFiT with PEFT)

VOCAB = 64

# name -> (config class, kwargs). Every model: 2 layers, 4 query heads, hidden 32.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    # no sliding window, as Mistral-7B-v0.2 and later (v0.1's window is tested on its own)
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "gemma2": ("Gemma2Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    # head_dim 12 != hidden 32 / 4 heads: the output projection takes 48 features
    "gemma3": ("Gemma3TextConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_head=4, n_layer=2, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(num_attention_heads=4)),
    "opt": ("OPTConfig", dict(num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)),
}
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
ARCHITECTURES = sorted(TINY_CONFIGS)


def tiny_config(name: str, **overrides):
    class_name, kwargs = TINY_CONFIGS[name]
    config_class = getattr(transformers, class_name)
    common = {} if name == "gpt2" else COMMON
    if name == "opt":
        common = {k: v for k, v in COMMON.items() if k != "intermediate_size"}
    settings = {**common, **kwargs, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return config_class(**{**settings, **overrides})


def tiny_model(name: str, seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(name, **overrides))
    return model.to(dtype).eval()


class ConfiglessWrapper(torch.nn.Module):
    """A decoder held in a ``ModuleList`` by a plain module without ``.config`` that returns log-probabilities: the
    shape of PEFT's custom-model tests and of users' own wrappers (module names ``models.0.model.layers.1...``)."""

    def __init__(self, lm):
        super().__init__()
        self.models = torch.nn.ModuleList([lm])

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.models[0](input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return torch.log_softmax(logits, dim=-1)


def outputs_of(model, inputs, **kwargs):
    """Logits of a transformers model, log-probabilities of a wrapper: the tensor a check compares."""
    output = model(input_ids=inputs, **kwargs)
    return output if isinstance(output, torch.Tensor) else output.logits


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (3, 7), generator=generator)


HEADS = [[0, 1], [1, 3]]  # one head on each layer of the tiny models


@pytest.fixture
def adapter_dir(tmp_path, inputs):
    """A saved LoFiT adapter with random vectors on ``HEADS`` of the tiny Llama, and its logits on ``inputs``."""
    from peft import get_peft_model

    from peft_lofit import LoFiTConfig
    from peft_lofit.checkpoint import save_adapter

    model = get_peft_model(tiny_model("llama"), LoFiTConfig(heads=HEADS, init_weights=False))
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(inputs).logits
    return tmp_path / "adapter", expected


def tiny_settings(tmp_path, **overrides):
    """Pipeline settings of a seconds-long run: 8 training rows, 3 evaluation examples, K = 2, one epoch per step."""
    from peft_lofit.app.settings import PipelineSettings
    from peft_lofit.training import TrainSettings

    settings = dict(
        train_limit=8,
        eval_limit=3,
        k=2,
        output_dir=str(tmp_path / "run"),
        localize=TrainSettings(learning_rate=1e-2, l1_lambda=1e-3, epochs=1, batch_size=4),
        train=TrainSettings(learning_rate=1e-2, epochs=1, batch_size=4),
    )
    settings.update(overrides)
    return PipelineSettings(**settings)


def projection_of(model, layer: int):
    """The (unwrapped) attention output projection of ``layer``."""
    from peft_lofit.tuner.architectures import default_target_modules, layer_index

    suffix = default_target_modules(model.config.model_type)[0]
    for name, module in model.named_modules():
        if name.endswith(suffix) and layer_index(name) == layer:
            return module
    raise LookupError(layer)


CHARS = list("abcdefghijklmnopqrstuvwxyz :?.ABQ'\"\n")


def tiny_tokenizer():
    """A character-level tokenizer with <= 64 ids (pad 0, bos 1, eos 2), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>"] + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def small_run(model_dir) -> list[str]:
    """The options of a seconds-long run on a tiny model folder: 8 training rows, 2 evaluation examples, 1 epoch."""
    return ["--model", str(model_dir), "--train-limit", "8", "--eval-limit", "2", "--epochs", "1"]


def tiny_model_folder(folder):
    """The tiny Llama and the tiny tokenizer saved in ``folder``, for anything that takes a ``--model`` path."""
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
