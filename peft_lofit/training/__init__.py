"""Training LoFiT on TRL's trainers: step 1 (``localize``: scalings under L1, heads ranked) and step 2
(``train_adapter``: offsets on the chosen heads), with the exact speed-ups they use.

- ``settings``: ``TrainSettings``, with the paper's step-1 and step-2 recipes
- ``trainers``: the DPO / SFT trainers with the L1 penalty and the exact speed-ups, ``build_trainer``,
  ``train_adapter``
- ``localize``: step 1, returning a ``HeadSelection``
- ``heads``: ``HeadSelection`` (scores, top-K, save / load, heatmap), random heads
- ``frozen_prefix``: the frozen layers below the adapter computed once per sequence
- ``shared_prompt``: each DPO pair's prompt run once
"""

import importlib

from .settings import TrainSettings

# The trainers need the [train] extra (TRL, datasets): their names load on first use, so that the settings (and the
# command line built from them) import without it. ``localize`` (the function) is imported as
# ``from peft_lofit.localize import localize``: re-exported here it would hide the ``training.localize`` module.
_LAZY = {"HeadSelection": "heads", "build_trainer": "trainers", "scaling_l1": "trainers", "train_adapter": "trainers"}
__all__ = ["HeadSelection", "TrainSettings", "build_trainer", "scaling_l1", "train_adapter"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
