"""Wall-clock timing: one helper for the phase times that runs record."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def timed(record: dict, key: str) -> Iterator[None]:
    """``with timed(timings, "train_s"): ...`` stores the block's wall-clock seconds in ``record[key]`` (only when the
    block finishes)."""
    start = time.perf_counter()
    yield
    record[key] = time.perf_counter() - start
