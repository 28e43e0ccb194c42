"""Writing a user's output files so that a failure never leaves a cut one: each file is written beside its
target under a temporary name, flushed to disk, and renamed over the target in one step. A full disk or a
killed process leaves the earlier file as it was."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def replacing(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """An open file that becomes `path` when the block ends without error (its folder is made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """`text` written to `path` atomically."""
    with replacing(path) as handle:
        handle.write(text)
    return Path(path)
