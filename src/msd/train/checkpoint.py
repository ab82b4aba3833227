"""Atomic checkpoints with everything needed to continue a run exactly, and the config check
that refuses to resume a run with different settings.

A checkpoint folder `checkpoints/step_<N>/` holds the trainable weights (safetensors), the
optimizer and scheduler states, every RNG state, and `state.json` (step, data position,
off-policy cache pointer, config fingerprint). It is written to a temporary folder and renamed,
so a kill mid-write leaves the previous checkpoint intact. Everything is read back with
`weights_only=True` (no arbitrary pickles).
"""

from __future__ import annotations

import hashlib
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
from msd.io import atomic_replace_dir, atomic_write_json, atomic_write_text, fresh_temp_dir

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
    for stale in ckpt_root.glob(".step_*"):  # an interrupted save's space, freed first
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step}."))
    try:  # Fixed bug: a failed save (a full disk) left its temporary folder, so a rerun failed too
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        state = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise MsdError(f"cannot read checkpoint state ({type(e).__name__}: {str(e)[:100]}); remove this "
                       "folder to resume from the one before", str(path)) from None
    # Fixed bug: a state.json of [] or {} or with a text step crashed, and {} skipped the check.
    bad = ("not a JSON object" if not isinstance(state, dict) else
           "no whole-number step" if type(state.get("step")) is not int or state["step"] < 0 else None)
    if bad:
        raise _damaged(bad, path)
    return state


def _damaged(problem: str, path: Path) -> MsdError:
    return MsdError(f"damaged checkpoint state.json ({problem}); remove this folder to resume from "
                    "the one before, or start over with --no-resume", str(path))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    path = Path(path)
    try:
        load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
        fused = [group.get("fused") for group in optimizer.param_groups]
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        for group, flag in zip(optimizer.param_groups, fused):  # the run's choice, not the file's
            group["fused"] = flag
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return read_state(path)
    # Fixed bug: a damaged file (SafetensorError, UnpicklingError, EOFError) raised a traceback.
    except DAMAGED as e:
        raise unreadable(e, path) from None


# What reading a damaged or foreign checkpoint file raises (any of its content may be garbage).
DAMAGED = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
           SafetensorError, IndexError, TypeError, AttributeError)


def unreadable(e: BaseException, path: Path) -> MsdError:
    """The one-line error for a checkpoint whose files cannot be read back."""
    first = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    if isinstance(e, pickle.UnpicklingError):  # torch's message advises weights_only=False
        first = "it holds objects other than plain tensors; refused to unpickle them"
    return MsdError(f"cannot read checkpoint ({first}); remove this folder to resume from "
                    "the one before, or start over with --no-resume", str(path))


# ----------------------------------------------------------------------------- resume check

# Train keys that may change between a run and its resumption: they do not change what is trained.
RESUMABLE_KEYS = ("save_every", "keep_checkpoints", "log_every", "tensorboard", "wandb", "max_steps",
                  "output_dir", "threads")


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_keys(cfg_dict: dict) -> dict:
    """The resolved config minus the keys a resumed run may change."""
    d = dict(cfg_dict)
    d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE_KEYS}
    return d


def changes(old: dict | None, new: dict) -> str:
    """' (train.lr: 0.001 -> 0.002)': the resume-relevant keys that differ from `old`."""
    old = old if isinstance(old, dict) else {}
    sec = lambda d, s: d.get(s) if isinstance(d.get(s), dict) else {}  # noqa: E731
    diff = [f"{s}.{k}: {sec(old, s).get(k)!r} -> {sec(new, s).get(k)!r}" for s in {**old, **new}
            for k in {**sec(old, s), **sec(new, s)} if old and sec(old, s).get(k) != sec(new, s).get(k)]
    return f" ({', '.join(diff)})" if diff else ""


def check_config(ckpt: Path, keys: dict) -> None:
    """Refuse to resume from a checkpoint made with other settings, naming what changed."""
    saved = read_state(ckpt)
    if not isinstance(saved.get("config_fingerprint"), str):  # never skip the check
        raise _damaged("no config fingerprint", ckpt)
    if saved["config_fingerprint"] != fingerprint(keys):
        raise MsdError("checkpoint was made with a different config"
                       f"{changes(saved.get('config'), keys)}; use a new train.output_dir or "
                       "start over with --no-resume", str(ckpt))


def check_resume_step(ckpt: Path, step: int, total: int) -> bool:
    """Whether a run resumed from `ckpt` (at `step`) is already finished. A checkpoint beyond
    the run's last step is refused: its weights would be saved again under a smaller step.
    Fixed bug: lowering train.max_steps from 6 to 3 wrote a step_3 checkpoint of step-6 weights."""
    if step > total:
        raise MsdError(f"this checkpoint is at step {step}, past the run's last step {total} "
                       "(was train.max_steps lowered?); raise train.max_steps to at least "
                       f"{step}, use a new train.output_dir, or start over with --no-resume", str(ckpt))
    return step == total


def run_state(keys: dict, step: int, grad_accum: int, cache_entries: int | None) -> dict:
    """What state.json records beside the step (data position, off-policy cache, config)."""
    return {"micro_batches_done": step * grad_accum, "offpolicy_cache_entries": cache_entries,
            "config_fingerprint": fingerprint(keys), "config": keys}


# ----------------------------------------------------------------------------- the final model

def save_final(model, tokenizer, out_dir: Path, config_yaml: str, accelerator,
               state_dict: dict | None = None) -> Path:
    """`<out_dir>/final`: the model (or adapter) in Hugging Face format, its tokenizer and the
    resolved config, written to a temporary folder and renamed. `state_dict`: the full weights,
    gathered by the caller on every process for sharded runs (`msd.train.dist_checkpoint`)."""
    final = out_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        # A fresh temporary folder each time: a save killed midway left `.final.tmp` holding
        # its files, and the next save wrote beside them (fixed bug: a full fine-tune shipped
        # the adapter files of a killed LoRA save in its final/).
        for stale in out_dir.glob(".final.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = fresh_temp_dir(out_dir, ".final.tmp.")
        try:
            unwrapped.save_pretrained(tmp, safe_serialization=True,
                                      state_dict=state_dict if state_dict is not None
                                      else accelerator.get_state_dict(model))
            tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / "msd_config.yaml", config_yaml)
            atomic_replace_dir(tmp, final)
        except BaseException:  # a full disk: free the space for the rerun
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    return final
