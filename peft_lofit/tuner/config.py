"""LoFiTConfig: which heads are edited, and how."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig

from ._peft_type import ensure_lofit_peft_type
from ._version import __version__
from .compat import CONFIG_FORMAT, upgrade_config_dict

INIT_CHOICES = (True, False, "normal")


def normalize_heads(heads) -> list[list[int]]:
    """Validate a head list and return it as sorted ``[layer, head]`` pairs.

    Accepts any iterable of pairs of non-negative integers (lists, tuples, a ``HeadSelection``'s output). Raises a
    ValueError that names the offending entry for anything else, for duplicates and for an empty list.
    """
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise ValueError(
            f"`heads` must be a list of [layer, head] pairs, e.g. [[3, 1], [10, 7]]; got {type(heads).__name__} "
            f"{heads!r}."
        )
    pairs = []
    for position, pair in enumerate(heads):
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ValueError(
                f"`heads[{position}]` is {pair!r}: each entry must be a [layer, head] pair of two integers."
            )
        layer, head = pair
        for name, value in (("layer", layer), ("head", head)):
            if not _is_index(value):
                raise ValueError(
                    f"`heads[{position}]` = {pair!r}: the {name} index must be an integer, got "
                    f"{type(value).__name__} {value!r}."
                )
            if int(value) < 0:
                raise ValueError(
                    f"`heads[{position}]` = {pair!r}: the {name} index must be >= 0 (indices count from 0)."
                )
        pairs.append((int(layer), int(head)))
    if not pairs:
        raise ValueError(
            "`heads` is empty: a LoFiT adapter needs at least one [layer, head] pair. Pass `heads=None` to edit every "
            "head (the localization step), or the result of `localize(...).top(k)`."
        )
    seen = set()
    for pair in pairs:
        if pair in seen:
            raise ValueError(f"`heads` lists [layer {pair[0]}, head {pair[1]}] more than once; remove the duplicate.")
        seen.add(pair)
    return [list(pair) for pair in sorted(pairs)]


def _is_positive_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_index(value) -> bool:
    """True for Python, numpy and single-element torch integers (what ``argsort`` or ``topk`` give); not for bools."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not value.is_floating_point()
        and (value.dtype != torch.bool)
    )


@dataclass
class LoFiTConfig(PeftConfig):
    """Configuration of a LoFiT adapter (Yin et al., 2024, "LoFiT: Localized Fine-tuning on LLM Representations").

    For each selected head ``h`` of layer ``l``, the input of the attention output projection is edited as

        z_lh  <-  (1 + A_lh) * z_lh + v_lh        (elementwise; A_lh, v_lh in R^head_dim)

    Step 1 (localization) uses ``heads=None, use_scaling=True, use_offset=False, init_weights="normal"``; step 2 uses
    the top heads with ``use_offset=True`` only (the default).
    """

    heads: Optional[list[list[int]]] = field(
        default=None,
        metadata={
            "help": (
                "The heads to edit, as [layer, head] pairs counted from 0, e.g. [[3, 1], [10, 7]] (what "
                "`localize(...).top(k)` returns). None edits every head of every targeted layer, as the localization "
                "step does."
            )
        },
    )
    use_scaling: bool = field(
        default=False,
        metadata={
            "help": (
                "Learn the per-head scaling A (z <- (1 + A) * z). Trained alone in the localization step; off in "
                "the paper's step 2."
            )
        },
    )
    use_offset: bool = field(
        default=True,
        metadata={"help": "Learn the per-head offset v (z <- z + v). The vector trained in the paper's step 2."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "The attention output projection(s) whose input is the concatenation of the heads. Names are matched "
                "as suffixes (e.g. 'self_attn.o_proj'), a string as a regex. Default: found from the model type "
                "(o_proj for Llama, Mistral, Qwen2, Gemma; attn.c_proj for GPT-2; attention.dense for GPT-NeoX; "
                "self_attn.out_proj for OPT)."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffixes) or a regex of modules never to adapt."},
    )
    num_heads: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Number of heads the projection input splits into. Default: `num_attention_heads` of the model "
                "config (the query heads under grouped-query attention)."
            )
        },
    )
    head_dim: Optional[int] = field(
        default=None,
        metadata={"help": "Width of one head. Default: projection input width / num_heads."},
    )
    init_weights: Union[bool, str] = field(
        default=True,
        metadata={
            "help": (
                "True: A = v = 0, an identity adapter. 'normal': A, v ~ N(0, init_std^2), the paper's initialisation "
                "for training (std 1e-3). False: A ~ N(0, 0.1^2), v ~ N(0, 1), a clearly non-identity adapter for tests."
            )
        },
    )
    init_std: float = field(
        default=1e-3,
        metadata={"help": "Standard deviation of the 'normal' initialisation (the paper uses 1e-3)."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Other modules to train and save with the adapter (PEFT's usual meaning)."},
    )
    lofit_version: Optional[str] = field(
        default=None, metadata={"help": "peft_lofit version that wrote this config (filled in automatically)."}
    )
    lofit_format: int = field(
        default=CONFIG_FORMAT,
        metadata={"help": "Version of this config's layout; newer layouts need a newer peft_lofit."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_lofit_peft_type()
        if self.lofit_version is None:
            self.lofit_version = __version__
        if self.heads is not None:
            self.heads = normalize_heads(self.heads)
        for name in ("use_scaling", "use_offset"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False; got {getattr(self, name)!r}.")
        if not (self.use_scaling or self.use_offset):
            raise ValueError(
                "LoFiTConfig with use_scaling=False and use_offset=False has nothing to learn; enable at least one "
                "(use_scaling=True for localization, use_offset=True for fine-tuning)."
            )
        if not any(
            self.init_weights is choice or (isinstance(choice, str) and self.init_weights == choice)
            for choice in INIT_CHOICES
        ):
            raise ValueError(f"`init_weights` must be True, False or 'normal'; got {self.init_weights!r}.")
        if not _is_positive_finite(self.init_std):
            raise ValueError(
                f"`init_std` must be a positive finite number (the paper uses 1e-3); got {self.init_std!r}."
            )
        for name in ("num_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer or None; got {value!r}.")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Make a config dict written by another peft_lofit version loadable, or say why it is not (see compat)."""
        return upgrade_config_dict(cls, super().check_kwargs(**kwargs), __version__)

    @property
    def trained_vectors(self) -> tuple[str, ...]:
        """Names of the vectors this adapter has: a subset of ('scaling', 'offset')."""
        return tuple(name for name, on in (("scaling", self.use_scaling), ("offset", self.use_offset)) if on)
