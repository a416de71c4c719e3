"""The pipeline's optional dependencies, and the one-line error that names the extra to install.

The tuner (``import peft_lofit``, ``get_peft_model``, save / load / merge) needs torch, transformers, peft and
safetensors only. Localization, training, the tasks, the command line, heatmaps and the default GGUF model need the
``train`` extra: ``pip install "peft_lofit[train]"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PIPELINE_EXTRA = "train"


class MissingExtraError(ImportError):
    """An optional dependency of the pipeline is not installed."""


def missing_extra(error: ImportError, feature: str) -> MissingExtraError:
    """The error to raise (``from error``) when importing one of the pipeline's optional packages failed."""
    return MissingExtraError(
        f"{feature} needs the package {error.name or 'that is missing'!r}, which is not installed: "
        f'pip install "peft_lofit[{PIPELINE_EXTRA}]"',
        name=error.name,
    )


def require(module_name: str, feature: str) -> ModuleType:
    """Import ``module_name`` or raise ``MissingExtraError`` naming ``feature`` and the extra."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise missing_extra(error, feature) from error
