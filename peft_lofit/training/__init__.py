"""Training LoFiT on TRL's trainers: step 1 (``localize``: scalings under L1, heads ranked) and step 2
(``train_adapter``: offsets on the chosen heads), with the exact speed-ups they use.

- ``trainers``: ``TrainSettings``, the DPO / SFT trainers with the L1 penalty, ``build_trainer``, ``train_adapter``
- ``localize``: step 1, returning a ``HeadSelection``
- ``heads``: ``HeadSelection`` (scores, top-K, save / load, heatmap), random heads
- ``frozen_prefix``: the frozen layers below the adapter computed once per sequence
- ``shared_prompt``: each DPO pair's prompt run once
"""

from .heads import HeadSelection
from .trainers import TrainSettings, build_trainer, scaling_l1, train_adapter

# ``localize`` (the function) is imported as ``from peft_lofit.localize import localize``: re-exported here it would
# hide the ``training.localize`` module.
__all__ = ["HeadSelection", "TrainSettings", "build_trainer", "scaling_l1", "train_adapter"]
