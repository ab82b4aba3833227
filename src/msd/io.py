"""Atomic file writes and crash-tolerant JSONL.

Every file msd writes goes through here: write to a temporary file in the same folder, fsync,
then rename, so a crash never leaves a half-written file. JSONL logs are appended line by line
and flushed; a torn last line (a crash mid-write) is detected and dropped on read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from msd.errors import MsdError
from msd.limits import MAX_DEPTH, depth


CACHE_ENV = "MSD_CACHE"


def cache_root() -> Path:
    """Where msd caches what it builds or pays for (the organism, judge verdicts):
    $MSD_CACHE, else ~/.cache/msd."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    try:
        return Path.home() / ".cache" / "msd"
    except RuntimeError:  # no HOME and no passwd entry
        raise MsdError(f"cannot find the home folder for msd's cache; set ${CACHE_ENV}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    """0o666 under the process umask: what `open()` would give (mkstemp makes files 0o600)."""
    return 0o666 & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, _umask_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fresh_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, empty hidden folder in `parent` with the permissions `mkdir` would give (mkdtemp
    makes them 0o700), for a folder written whole and then renamed into place."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is replaced."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        trash = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def read_jsonl(path: str | os.PathLike, *, tolerate_torn_tail: bool = True) -> Iterator[dict]:
    """Yield the objects of a JSONL file (see `read_jsonl_numbered`)."""
    for _, obj in read_jsonl_numbered(path, tolerate_torn_tail=tolerate_torn_tail):
        yield obj


def read_jsonl_numbered(path: str | os.PathLike, *, tolerate_torn_tail: bool = True) -> Iterator[tuple[int, dict]]:
    """Yield the objects of a JSONL file.

    A malformed *last* line without a newline is the mark of a crash mid-write: it is dropped
    with a warning when `tolerate_torn_tail`. Any other malformed line is an error naming the
    file and line.
    """
    path = Path(path)
    if not path.exists():
        raise MsdError("file not found", str(path))
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MsdError(f"cannot read file ({e.__class__.__name__}: {e})", str(path)) from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:  # Fixed bug: deeply nested JSON raised a traceback
            raise MsdError("JSON nested too deeply", f"{path}:{i}") from None
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{path}:{i}: dropped a partly written last line")
                return
            raise MsdError(f"malformed JSON ({e.msg})", f"{path}:{i}") from None
        if not isinstance(obj, dict):
            raise MsdError("expected a JSON object on each line", f"{path}:{i}")
        if depth(obj) > MAX_DEPTH:
            raise MsdError(f"JSON nested more than {MAX_DEPTH} levels deep", f"{path}:{i}")
        yield i, obj


def repair_jsonl(path: str | os.PathLike) -> int:
    """Truncate a torn last line (no trailing newline, not valid JSON). Returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:].decode("utf-8"))
        with open(path, "ab") as f:  # a complete object that only lacks its newline
            f.write(b"\n")
        return 0
    except (json.JSONDecodeError, UnicodeDecodeError):
        with open(path, "r+b") as f:
            f.truncate(cut)
        return len(data) - cut


class JsonlWriter:
    """Append-only JSONL writer: one object per line, flushed (and fsynced) per batch."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def write_many(self, objs: Iterable[dict]) -> None:
        for obj in objs:
            self.write(obj)
        self.flush()

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".msd-write-probe", delete=True)
        probe.close()
    except OSError as e:
        raise MsdError(f"output folder is not writable ({e.strerror or e})", str(path)) from None
    return path


def build_once(final: Path, build, complete) -> Path:
    """`final`, built by `build(tmp_folder)` unless `complete(final)` already holds.

    The build writes a temporary folder beside `final`, which is renamed into place, so an
    interrupted build never leaves a half-written folder; a lock file makes a second process
    wait for a build in progress and reuse it instead of building it again. Used for what msd
    caches: the model organism, converted GGUF models, downloaded model sources.
    """
    final = Path(final)
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if not complete(final):  # another process may have built it while we waited
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.build-"))
            try:
                build(tmp)
                atomic_replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


class _file_lock:
    """An exclusive `flock` on `path` for the `with` block (no lock where flock is missing:
    a concurrent build then only wastes time)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.file = open(self.path, "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
