"""An exclusive advisory lock on a file, shared by every process of this project that holds it."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeld(RuntimeError):
    """`file_lock(..., wait=False)` found the lock held by another process (or another open of the file)."""


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created, with its folder, if missing) for the block; with
    `wait=False`, raise LockHeld at once instead of waiting for another holder to let go.

    Without fcntl (not POSIX) there is no lock: the block runs unguarded.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(str(path)) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
