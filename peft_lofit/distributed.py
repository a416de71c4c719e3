"""LoFiT under ``torchrun`` or ``accelerate launch``: every process trains its shard, the main process writes.

The trainers (TRL / Trainer) shard the data; a script around them needs three more things: the device of this
process, who writes files and prints, and a clean end. All three come from ``accelerate.PartialState`` (the state the
trainers themselves use; the first call sets up the process group under a launcher).
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def is_main_process() -> bool:
    """True in the process that writes files and prints (rank 0), and in a plain single-process run."""
    return PartialState().is_main_process


def has_accelerator() -> bool:
    """Whether torch sees a GPU or other accelerator (``torch.accelerator`` from torch 2.6, CUDA before)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def local_device() -> torch.device:
    """This process's accelerator where there is one, else the CPU."""
    return PartialState().device


def barrier() -> None:
    """Wait until every process gets here (nothing to do in a single process)."""
    PartialState().wait_for_everyone()


def finish() -> None:
    """Wait for every process, then destroy the process group; nothing to do in a single process.

    Call once at the end of a successful launched run. A process that exits with a live process group can abort at
    interpreter shutdown (gloo: SIGABRT, "terminate called without an active exception"), failing the whole launch
    after the work is done. Do not call it after an error: the other processes may be inside a collective.
    """
    state = PartialState()
    if state.use_distributed:
        state.wait_for_everyone()
        state.destroy_process_group()
