"""Atomic file writes: write a temporary file beside the target, then rename it into place.

An interruption leaves either the old complete file or the new complete one, never half of one. Temporary files and
folders get the permissions that ``open`` / ``mkdir`` (and so ``save_pretrained``) would give under the current umask,
not ``tempfile``'s private 0600 / 0700, so what is renamed into place is readable by whoever could read a plain save.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def default_mode(directory: bool) -> int:
    """The permissions a new file (0666) or folder (0777) gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def staging_dir(target: Path, kind: str = "new") -> Path:
    """An empty hidden folder ``.NAME.KIND-*`` beside ``target``, with a plain ``mkdir``'s permissions."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    os.chmod(path, default_mode(directory=True))
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(temporary, default_mode(directory=False))
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, payload) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
