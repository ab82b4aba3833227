"""One writer per output folder: an advisory lock held for the whole run.

    with output_lock("runs/ev", "eval"):
        ...  # a second msd process writing to runs/ev now fails at once

Once the lock is held, the folder is claimed for its kind of command (`msd.owner.claim`): a
folder another kind of command wrote is refused, and `fresh` discards the kind's old outputs.

The lock is `fcntl.flock` on `<folder>/.msd.lock`, which holds the holder's pid. The kernel drops
it when the process ends, however it ends (a SIGKILL included), so a stale lock never blocks a
rerun. Within one process the lock is re-entrant (a demo that trains, then evaluates).
Fixed bug: two evaluations into one folder both exited 0 and lost records, because one
compacted records.jsonl while the other appended to the old file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from msd import owner
from msd.errors import MsdError
from msd.identifiers import check_path

LOCK_NAME = ".msd.lock"
_held: dict[str, tuple[int, int]] = {}  # folder -> (fd, depth) of the locks this process holds


def is_main_rank() -> bool:
    """Under a multi-process launch only rank 0 writes shared outputs and takes the lock."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, kind: str, *, fresh: bool = False, writer: bool | None = None):
    """Hold the folder's writer lock (creating the folder) and claim it for `kind`, or fail with
    one line naming the folder and the pid of the process that holds it (or its owner).
    `writer` says whether this process writes the folder's shared files; by default the
    launcher's `RANK` decides. Training passes the accelerator's answer
    (`msd.train.launch.writer_lock`): a launch whose environment says rank 1 while the process
    group says it is alone must still lock."""
    if not (is_main_rank() if writer is None else writer):
        yield
        return
    try:
        import fcntl
    except ImportError:  # not on POSIX: no advisory locks, run unlocked (but claimed)
        Path(folder).mkdir(parents=True, exist_ok=True)
        owner.claim(folder, kind, fresh=fresh)
        yield
        return
    folder = Path(check_path(folder, "output folder"))  # the check msd report reads runs back with
    owner.check_place(folder)  # before anything is created there
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = str(folder.resolve())
    except OSError as e:
        raise MsdError(f"output folder is not writable ({e.strerror or e})", str(folder)) from None
    if key in _held:
        fd, n = _held[key]
        _held[key] = (fd, n + 1)
        try:
            yield
        finally:
            fd, n = _held[key]
            _held[key] = (fd, n - 1)
        return
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MsdError(f"output folder is not writable ({e.strerror or e})", str(folder)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise MsdError(f"another msd process (pid {holder}) is writing to this folder; wait for it "
                       "to finish or use another output folder", str(folder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = (fd, 1)
    try:
        owner.claim(folder, kind, fresh=fresh)
        yield
    finally:
        del _held[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
