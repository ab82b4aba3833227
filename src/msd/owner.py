"""Every output folder has one owner: the kind of command that made it.

    with output_lock("runs/a", "train"):   # msd.lock: the writer lock, then claim() here
        ...

`<folder>/msd-owner.json` names the kind (`train`, `baseline`, `eval`, `report`, `demo`); it is
written atomically when a command first writes to the folder. Every writer claims its folder
before it writes anything, and a claim fails with one line when:

- the folder belongs to another kind of command (a baseline into an MSD run folder, a training
  run into an evaluation folder, ...). A folder written before msd recorded owners is known by
  the files in it (`checkpoints/step_*` is a training run, `baseline_data.jsonl` a baseline,
  `records.jsonl` with `run.json` an evaluation, ...);
- the folder lies inside what another run rewrites (`<run>/final`, `<run>/checkpoints`, ...):
  an evaluation there would be deleted by the run's next save.

Starting over (`--fresh`, `--no-resume`) discards only the files of the folder's own kind
(`OUTPUTS`), and only once the claim has succeeded: another command's files are never touched.
Fixed bugs: `msd baseline` replaced an MSD run's logs, config and final/; `msd train` appended
to a baseline's logs; an evaluation in `<run>/final` was deleted by a training rerun; `--fresh`
deleted a `records.jsonl` that no msd evaluation had written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from msd.errors import MsdError
from msd.io import atomic_write_json

OWNER = "msd-owner.json"
KINDS = ("train", "baseline", "eval", "report", "demo")
COMMANDS = {"train": "msd train", "baseline": "msd baseline", "eval": "msd eval",
            "report": "msd report", "demo": "msd demo"}
# What a kind writes into its folder: what --fresh / --no-resume discard. Caches whose file
# names carry the fingerprint of what made them (offpolicy_cache, baseline_cache) are kept.
OUTPUTS = {
    "train": ("logs.jsonl", "config.yaml", "checkpoints", "final", "token_batches", "tb"),
    "baseline": ("logs.jsonl", "config.yaml", "baseline_data.jsonl", "checkpoints", "final", "tb"),
    "eval": ("records.jsonl", "metrics.json", "run.json", "lm_eval_results.json"),
    "report": (), "demo": (),
}
# Subfolders a run replaces as a whole: no other command may write inside them.
REPLACED = {"train": ("final", "checkpoints"), "baseline": ("final", "checkpoints")}


def found_kind(folder: Path) -> str | None:
    """The kind of a folder written before msd recorded owners, from the files in it."""
    ckpts = folder / "checkpoints"
    names = {p.name for p in ckpts.iterdir()} if ckpts.is_dir() else set()
    if (folder / "baseline_data.jsonl").exists() or any(n.startswith("checkpoint-") for n in names):
        return "baseline"
    if any(n.startswith("step_") for n in names) or (folder / "logs.jsonl").exists() \
            or (folder / "final" / "msd_config.yaml").exists():
        return "train"
    if (folder / "summary.json").exists() and (folder / "organism.json").exists():
        return "demo"
    if (folder / "run.json").exists():
        return "eval"
    if (folder / "records.jsonl").exists():
        return "unknown"  # records without the run.json an msd evaluation writes first
    if (folder / "report.md").exists() or (folder / "report.html").exists():
        return "report"
    return None


def owner_of(folder: Path, strict: bool = True) -> str | None:
    """The folder's recorded owner kind, else the kind its files show (None: a new folder).
    A damaged owner file is an error when `strict`, else unknown."""
    path = folder / OWNER
    if path.is_file():
        try:
            kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError, RecursionError):
            kind = None
        if kind not in KINDS:
            if not strict:
                return None
            raise MsdError(f"{OWNER} is damaged or not msd's (no known kind); remove it if this "
                           "folder is yours, or use another output folder", str(path))
        return kind
    return found_kind(folder)


def _enclosing(folder: Path) -> tuple[Path, str] | None:
    """An owned run folder whose replaced subfolders hold `folder`, with that subfolder's name."""
    child = folder
    for parent in folder.parents:
        try:
            kind = owner_of(parent, strict=False) if parent.is_dir() else None
        except OSError:  # an unreadable ancestor owns nothing we can see
            kind = None
        if kind in REPLACED and child.name in REPLACED[kind]:
            return parent, kind
        child = parent
    return None


def check_place(folder: str | os.PathLike) -> None:
    """Refuse a folder inside what another run replaces (checked before anything is created)."""
    folder = Path(folder).resolve()
    inside = _enclosing(folder)
    if inside:
        run, owner = inside
        raise MsdError(f"this folder lies inside the {COMMANDS[owner]} run {run}, which replaces "
                       f"{folder.relative_to(run).parts[0]}/ when it saves again; write to a folder "
                       "outside it", str(folder))


def claim(folder: str | os.PathLike, kind: str, *, fresh: bool = False) -> Path:
    """Make `kind` the owner of the existing `folder`, or fail with one line; with `fresh`,
    discard the kind's old outputs once the folder is known to be its own."""
    assert kind in KINDS, kind
    folder = Path(folder).resolve()
    check_place(folder)
    owner = owner_of(folder)
    if owner is not None and owner != kind:
        made = ("files no msd command recorded (records.jsonl without run.json)" if owner == "unknown"
                else f"the outputs of {COMMANDS[owner]}")
        raise MsdError(f"this folder holds {made}; {COMMANDS[kind]} never writes over another "
                       "command's folder: use another output folder", str(folder))
    for sub in REPLACED.get(kind, ()):  # written there before owners were checked
        other = owner_of(folder / sub, strict=False) if (folder / sub).is_dir() else None
        if other is not None:
            raise MsdError(f"{sub}/ holds the outputs of {COMMANDS.get(other, 'another command')}, which "
                           f"this run would replace; move them out of {folder / sub} first", str(folder))
    if not (folder / OWNER).is_file():
        atomic_write_json(folder / OWNER, {"kind": kind, "command": COMMANDS[kind]})
    if fresh:
        discard(folder, OUTPUTS[kind])
    return folder


def discard(folder: Path, names) -> None:
    """Move the named outputs aside (one rename each, in order) and delete them, so an
    interruption never leaves a mix of an old run's and a new run's files."""
    folder = Path(folder)
    for stale in folder.glob(".discarded.*"):
        shutil.rmtree(stale, ignore_errors=True)
    present = [n for n in names if (folder / n).exists()]
    if not present:
        return
    trash = Path(tempfile.mkdtemp(dir=folder, prefix=".discarded."))
    for name in present:
        os.replace(folder / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
