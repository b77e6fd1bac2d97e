"""Replacing a file atomically: readers see the old file or the new one, never a part of either."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_replace(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on leaving without an error it replaces `path`.

    The new file is flushed to disk before the rename, and the rename before returning, so a crash leaves
    the old file or the new one. `mode` is the new file's (mkstemp makes it 0600; the reader, a server, may
    run as another user). On an error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (where the platform lets a directory be opened for it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
