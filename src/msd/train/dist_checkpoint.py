"""Checkpoints through the engine: every process saves and loads its own part.

- one process / DDP ("plain"): `msd.train.checkpoint` on process 0 (full weights everywhere);
- FSDP2 (msd's sharding): `torch.distributed.checkpoint` (DCP) writes the trainable weights and
  the optimizer state as shards under `dcp/`, each process its own (a resumed run may use another
  number of processes: DCP reshards on load);
- DeepSpeed ZeRO-3: accelerate's `save_state` / `load_state` under `engine/` (the engine's own
  partitioned checkpoint: `zero_pp_rank_<r>_*` files, one set per process); tested on CPU
  over gloo (tests/test_zero3.py), not run on GPUs.

Beside them, the same files as a one-process checkpoint: `scheduler.pt`, `state.json` (step,
data position, config fingerprint), and one RNG state per process (`rng_<rank>.pt`). All
processes write into one temporary folder (process 0 makes it and tells the others), wait for
each other, and process 0 renames it into place: a kill mid-write leaves the previous
checkpoint intact. The final model is gathered to process 0 and written in Hugging Face format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from msd.errors import MsdError
from msd.io import atomic_replace_dir, atomic_write_json
from msd.train import checkpoint, sharding


def _fsync_tree(folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _dcp_state(run) -> dict:
    """{"model": trainable shards, "optim": optimizer shards}, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    keep = _trainable_names(run.model)
    return {"model": {k: v for k, v in model_sd.items() if k in keep}, "optim": optim_sd}


def save_checkpoint(run, out_dir: Path, step: int, state: dict, keep: int) -> None:
    """`out_dir/checkpoints/step_<step>`; called on every process."""
    acc = run.accelerator
    if run.engine == "plain":
        if acc.is_main_process:
            checkpoint.save_checkpoint(out_dir, step, run.unwrapped, run.optimizer, run.scheduler,
                                       state, keep)
        acc.wait_for_everyone()
        return
    root = Path(out_dir) / "checkpoints"
    tmp = None
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=f".step_{step}.")
    tmp = Path(sharding.broadcast_object(tmp))
    try:
        if run.engine == "fsdp2":
            import torch.distributed.checkpoint as dcp

            dcp.save(_dcp_state(run), checkpoint_id=str(tmp / "dcp"))
        else:
            acc.save_state(str(tmp / "engine"))
        torch.save(checkpoint.rng_state(), tmp / f"rng_{acc.process_index}.pt")
        if acc.is_main_process:
            torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
            atomic_write_json(tmp / "state.json", {**state, "step": step,
                                                   "processes": acc.num_processes, "engine": run.engine})
    except BaseException:  # a full disk or a kill: leave no half-written folder taking the space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()  # every process's files are written
    if acc.is_main_process:
        _fsync_tree(tmp)  # on disk before the rename publishes the folder
        atomic_replace_dir(tmp, root / f"step_{step}")
        checkpoint.prune(root, keep)
    acc.wait_for_everyone()


def load_checkpoint(run, path: Path) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; returns state.json."""
    path, acc = Path(path), run.accelerator
    saved = checkpoint.read_state(path)
    if saved.get("engine", "plain") != run.engine:
        raise MsdError(f"checkpoint was written by a {saved.get('engine', 'plain')} run, this is a "
                       f"{run.engine} run; launch it the same way or use a new train.output_dir",
                       str(path))
    if run.engine == "plain":
        return checkpoint.load_checkpoint(path, run.unwrapped, run.optimizer, run.scheduler)
    try:
        if run.engine == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            sd = _dcp_state(run)
            dcp.load(sd, checkpoint_id=str(path / "dcp"))
            set_state_dict(run.model, run.optimizer, model_state_dict=sd["model"],
                           optim_state_dict=sd["optim"], options=StateDictOptions(strict=False))
        else:
            acc.load_state(str(path / "engine"))
        run.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = path / f"rng_{acc.process_index}.pt"
        if rng.exists():  # absent when resumed with more processes: seeds are explicit anyway
            checkpoint.set_rng_state(torch.load(rng, weights_only=True))
    except checkpoint.DAMAGED as e:
        raise checkpoint.unreadable(e, path) from None
    return saved


def full_state_dict(run) -> dict | None:
    """The full (unsharded) weights, on process 0 (None elsewhere for FSDP2); collective."""
    if run.engine == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))
    return run.accelerator.get_state_dict(run.model)  # ZeRO-3: gathers the 16-bit weights


def save_final(run, tokenizer, out_dir: Path, config_yaml: str) -> Path:
    """`out_dir/final` in Hugging Face format (model or PEFT adapter), from any sharding."""
    state = full_state_dict(run) if run.engine != "plain" else None
    return checkpoint.save_final(run.model, tokenizer, out_dir, config_yaml, run.accelerator,
                                 state_dict=state)
