"""LoFiT under ``torchrun`` or ``accelerate launch``: every process trains its shard, the main process writes.

The trainers (TRL / Trainer) set up the process group and the data sharding; a script around them needs three more
things, which live here: the device of this process, who writes files and prints, and a clean end.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True in the process that writes files and prints (rank 0), and in a plain single-process run.

    Before the trainer has created the process group, the launcher's ``RANK`` variable says it.
    """
    if is_distributed():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def has_accelerator() -> bool:
    """Whether torch sees a GPU or other accelerator (``torch.accelerator`` from torch 2.6, CUDA before)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def local_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK``, 0 outside a launcher) where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (nothing to do in a single process)."""
    if is_distributed():
        dist.barrier()


def finish() -> None:
    """Wait for every process, then destroy the process group; nothing to do in a single process.

    Call once at the end of a successful launched run. A process that exits with a live process group can abort at
    interpreter shutdown (gloo: SIGABRT, "terminate called without an active exception"), failing the whole launch
    after the work is done. Do not call it after an error: the other processes may be inside a collective.
    """
    if is_distributed():
        barrier()
        dist.destroy_process_group()
