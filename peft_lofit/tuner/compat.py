"""Reading adapter configs written by other versions of peft_lofit.

``upgrade_config_dict`` runs on the JSON of ``adapter_config.json`` before a LoFiTConfig is built from it:

- a ``lofit_format`` newer than this package reads is refused, with the command to upgrade;
- renamed fields are renamed, with a warning (``lofit_heads``, the LoFiT authors' name for the head list);
- fields that are missing take their defaults, with a warning, except ``heads`` (without it nobody can tell which
  heads the saved vectors belong to, so that is an error).

Two cases are left to PEFT, so that LoFiT configs load exactly like every other PEFT config: fields this version does
not know (PEFT drops them with one warning, ``Unexpected keyword arguments [...] for class LoFiTConfig, these are
ignored. ...``), and a JSON without ``peft_type``, which is not a PEFT config at all (PEFT raises a TypeError, "...
is missing required keys: {'peft_type'}", when it cannot build the config from it).
"""

from __future__ import annotations

import dataclasses
import warnings

CONFIG_FORMAT = 1
RENAMED_FIELDS = {"lofit_heads": "heads"}
REQUIRED_FIELDS = ("heads",)
# Fields PeftConfig fills in itself; their absence says nothing about LoFiT.
_PEFT_BOOKKEEPING = {
    "peft_type",
    "task_type",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "auto_mapping",
}


def upgrade_config_dict(config_class, values: dict, package_version: str) -> dict:
    """Return ``values`` made loadable by ``config_class`` (see the module docstring for the rules)."""
    values = dict(values)
    if "peft_type" not in values:
        return values  # not a saved PEFT config: PEFT's own checks decide
    written_by = values.get("lofit_version", "an unknown version")
    file_format = values.get("lofit_format", 1)
    if not isinstance(file_format, int) or file_format > CONFIG_FORMAT:
        raise ValueError(
            f"This adapter config has lofit_format={file_format!r} (written by peft_lofit {written_by}); peft_lofit "
            f"{package_version} reads format {CONFIG_FORMAT} and older. Upgrade with `pip install -U peft_lofit`."
        )
    for old, new in RENAMED_FIELDS.items():
        if old not in values:
            continue
        if new in values and values[new] != values[old]:
            raise ValueError(
                f"The adapter config has both `{old}` (old name) and `{new}` with different values; keep only `{new}`."
            )
        warnings.warn(f"Adapter config field `{old}` is now called `{new}`; reading it as `{new}`.")
        values[new] = values.pop(old)
    fields = {field.name for field in dataclasses.fields(config_class)}
    missing_required = [name for name in REQUIRED_FIELDS if name not in values]
    if missing_required:
        raise ValueError(
            f"The adapter config has no {missing_required[0]!r} field, so the saved vectors cannot be matched to heads. "
            "Add the [layer, head] list the adapter was trained with (`heads`: [[3, 1], ...])."
        )
    missing = sorted(fields - set(values) - _PEFT_BOOKKEEPING - {"lofit_version", "lofit_format"})
    if missing:
        warnings.warn(f"Adapter config (peft_lofit {written_by}) lacks fields {missing}; using their defaults.")
    return values
