"""Atomic checkpoints with everything needed to continue a run exactly.

A checkpoint folder `checkpoints/step_<N>/` holds the trainable weights (safetensors), the
optimizer and scheduler states, every RNG state, and `state.json` (step, data position,
off-policy cache pointer, config fingerprint). It is written to a temporary folder and renamed,
so a kill mid-write leaves the previous checkpoint intact. Everything is read back with
`weights_only=True` (no arbitrary pickles).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from msd.errors import MsdError
from msd.io import atomic_replace_dir, atomic_write_json

STEP_DIR = re.compile(r"^step_(\d+)$")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise MsdError(f"checkpoint does not match the model (e.g. {missing[0]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step}."))
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    atomic_write_json(tmp / "state.json", {**state, "step": step})
    for f in tmp.iterdir():  # on disk before the rename publishes the folder (a node crash too)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    final = ckpt_root / f"step_{step}"
    atomic_replace_dir(tmp, final)
    prune(ckpt_root, keep)
    return final


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune(ckpt_root: Path, keep: int) -> None:
    for stale in ckpt_root.glob(".step_*"):  # temp folders of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    found = list_checkpoints(ckpt_root.parent)
    for _, path in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict:
    """A checkpoint's state.json (step, data position, config and its fingerprint)."""
    try:
        return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MsdError(f"cannot read checkpoint state ({type(e).__name__}: {e}); remove this "
                       "folder to resume from the one before", str(path)) from None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    path = Path(path)
    try:
        load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return json.loads((path / "state.json").read_text())
    # Fixed bug: a damaged file (SafetensorError, UnpicklingError, EOFError) raised a traceback.
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
            SafetensorError) as e:
        first = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise MsdError(f"cannot read checkpoint ({first}); remove this folder to resume from "
                       "the one before, or start over with --no-resume", str(path)) from None
