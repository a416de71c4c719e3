"""Atomic writes of files and folders: write beside the target, then rename into place.

An interruption leaves either the old complete file or folder or the new complete one, never half of one. A folder is
replaced in two renames (old one away into ``.NAME.old-*``, new one from ``.NAME.new-*`` into place); a kill between
them leaves no folder at the target, which ``recover_interrupted_replace`` (run by the next replace, and by LoFiT's
adapter loaders) puts back, deleting stale temporaries. Two processes must not replace the same folder at once.
Temporary files and
folders get the permissions that ``open`` / ``mkdir`` (and so ``save_pretrained``) would give under the current umask,
not ``tempfile``'s private 0600 / 0700, so what is renamed into place is readable by whoever could read a plain save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process umask, read from /proc where it can be (setting it, even briefly, races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_mode(directory: bool) -> int:
    """The permissions a new file (0666) or folder (0777) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def staging_dir(target: Path, kind: str = "new") -> Path:
    """An empty hidden folder ``.NAME.KIND-*`` beside ``target``, with a plain ``mkdir``'s permissions."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    os.chmod(path, default_mode(directory=True))
    return path


def recover_interrupted_replace(target, clean: bool = False) -> None:
    """Undo what an interrupted ``replace_directory`` left beside ``target``: put the previous folder back if the
    target is missing. With ``clean`` (a writer about to replace ``target``), also delete the temporaries that earlier
    interrupted replaces left (``.NAME.new-*`` / ``.NAME.old-*``); readers leave them alone."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for backup in sorted(target.parent.glob(f".{target.name}.old-*")):
        previous = backup / target.name
        if not target.exists() and previous.exists():
            os.replace(previous, target)
        if clean:
            shutil.rmtree(backup, ignore_errors=True)
    for staging in target.parent.glob(f".{target.name}.new-*") if clean else ():
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def replace_directory(target) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block succeeds, it becomes ``target``.

    The previous ``target`` (if any) stays whole until the new folder is complete; on an error it is untouched.
    """
    target = Path(target)
    recover_interrupted_replace(target, clean=True)
    staging = staging_dir(target, "new")
    try:
        yield staging
        if target.exists():
            backup = staging_dir(target, "old")
            os.replace(target, backup / target.name)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it (fsynced, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(temporary, default_mode(directory=False))
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, payload) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json_if_complete(path: Path):
    """The JSON in ``path``, or None when it is missing or unreadable (half-written by a killed run): a cache or
    record that is then computed again."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def atomic_write_figure(path: Path, figure, dpi: int = 100) -> Path:
    """A ``matplotlib.figure.Figure`` as a PNG file."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())
