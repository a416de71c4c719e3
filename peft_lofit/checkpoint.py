"""Saving and loading LoFiT adapters safely.

- ``save_adapter`` writes the adapter into a staging folder beside the target and swaps the folders with renames:
  an interruption leaves the previous adapter or the new one, never a torn file or a config from another save.
- ``validate_adapter_folder`` checks a folder before anything is loaded into a model: the config is a LoFiT config,
  the weights are safetensors (pickled ``.bin`` files are refused: unpickling can run code), the file is complete,
  and every tensor is floating point. Each problem is a ValueError that names the file and says what to do.
- ``load_adapter`` validates, then loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from .io import default_mode, recover_interrupted_replace, replace_directory

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CARD_FILE = "README.md"


def save_adapter(peft_model, folder, **save_kwargs) -> Path:
    """``peft_model.save_pretrained(folder)`` as one atomic replacement of the folder (see ``io.replace_directory``).

    Config and weights always come from the same save; an interruption leaves the previous folder complete, and the
    next save or load puts it back if the kill came between the two renames. Every other file already in the folder
    is kept, the user's model card (``README.md``) included, which wins over PEFT's blank template. Files get a plain
    ``open()``'s permissions (safetensors alone writes 0600).
    """
    folder = Path(folder)
    with replace_directory(folder) as staging:
        peft_model.save_pretrained(staging, **save_kwargs)
        for path in staging.rglob("*"):
            os.chmod(path, default_mode(directory=path.is_dir()))
        for item in folder.iterdir() if folder.is_dir() else ():
            if item.name == CARD_FILE or not (staging / item.name).exists():
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, staging / item.name)
    return folder


def validate_adapter_folder(folder) -> dict:
    """Check a LoFiT adapter folder without loading it into a model; return its config dict.

    First restores the folder if a save was killed between its two renames (``io.recover_interrupted_replace``).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    recover_interrupted_replace(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: a LoFiT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); the file is truncated or corrupted.") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LOFIT":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} describes a {found!r} adapter, not a LoFiT one (peft_type 'LOFIT').")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [name for name in PICKLE_FILES if (folder / name).is_file()]
        if pickled:
            raise ValueError(
                f"{folder / pickled[0]} is a pickle file; peft_lofit loads safetensors only, because unpickling can run "
                f"code. Convert it where you trust it: `safetensors.torch.save_file(torch.load(f, weights_only=True), "
                f"'{WEIGHTS_FILE}')`."
            )
        raise ValueError(f"{weights_path} not found.")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                dtype = tensor.get_dtype()
                if dtype not in ("F16", "BF16", "F32", "F64"):
                    raise ValueError(
                        f"{weights_path}: tensor {key} has dtype {dtype}; LoFiT vectors are floating point. The file "
                        "was not written by a LoFiT adapter."
                    )
    except SafetensorError as error:
        raise ValueError(
            f"{weights_path} cannot be read as safetensors ({error}); the file is truncated or corrupted. "
            "Save the adapter again."
        ) from None
    return config


def load_adapter(model, folder, adapter_name: str = "default", **kwargs) -> PeftModel:
    """Validate ``folder`` and load it onto ``model`` with ``PeftModel.from_pretrained``; every error names it."""
    validate_adapter_folder(folder)
    try:
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, **kwargs)
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from error


def hotswap_adapter(peft_model, folder, adapter_name: str = "default") -> None:
    """Load the vectors saved in ``folder`` into the existing adapter ``adapter_name``, in place.

    The parameters keep their identity, shape and device, so a compiled model does not recompile. The saved adapter
    must have the same heads and vectors as the loaded one; otherwise load it as a new adapter (``load_adapter``).
    """
    from safetensors.torch import load_file

    config = validate_adapter_folder(folder)
    if any(adapter_name in getattr(m, "merged_adapters", []) for m in peft_model.modules()):
        raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before hot-swapping it.")
    current = peft_model.peft_config[adapter_name]
    for name in ("heads", "use_scaling", "use_offset", "target_modules"):
        saved = config.get(name, getattr(current, name))
        if name == "target_modules" and isinstance(saved, list):
            saved = sorted(saved)
        if saved != getattr(current, name):
            raise ValueError(
                f"Cannot hot-swap: the saved adapter has {name}={saved!r}, the loaded one {getattr(current, name)!r}. "
                "Hot-swapping needs identical heads and vectors; load it with load_adapter(..., adapter_name=...)."
            )
    tensors = load_file(Path(folder) / WEIGHTS_FILE)
    broken = sorted(key for key, value in tensors.items() if not torch.isfinite(value).all())
    if broken:
        raise ValueError(f"Cannot hot-swap: tensors {broken} in {folder} hold NaN or inf values.")
    parameters = dict(peft_model.named_parameters())
    targets = {}
    for key, value in tensors.items():
        target = f"{key}.{adapter_name}"
        if target not in parameters or parameters[target].shape != value.shape:
            raise ValueError(f"Cannot hot-swap {key}: no parameter of that name and shape {tuple(value.shape)}.")
        targets[target] = value
    with torch.no_grad():
        for target, value in targets.items():
            parameters[target].copy_(value)
