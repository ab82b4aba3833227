"""What a launch claims and what it got: msd trains only when the two agree.

A launcher (torchrun, `accelerate launch`, SLURM + torchrun) tells each process how many
processes it started and which one this is (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`); the process
group that torch.distributed forms and the accelerator built on it say what actually exists.
Fixed bug: under `accelerate launch` with a DeepSpeed config on CPU, accelerate reported
"process 0 of 1" in each of two processes, so two full trainings ran into one output folder,
and the writer lock, which trusted `RANK`, was taken by only one of them. Now:

- the claim is read before the accelerator exists (accelerate rewrites these variables on CPU)
  and compared with accelerate's view and torch.distributed's after it: any difference stops
  every process with one line, before anything is written;
- the output folder's writer lock is taken by the process the accelerator makes the writer
  (its main process), whatever the environment says, and every process learns whether it got it;
- the process group has a timeout (`MSD_DIST_TIMEOUT` seconds, default 1800): a process whose
  peer died (a killed node) fails in a collective within that time instead of waiting forever;
- DeepSpeed on CPU: accelerate finds no distributed backend for a CPU device and reports one
  process; msd names gloo for it, and DeepSpeed's ZeRO-3 then partitions over gloo as it does
  over nccl on GPUs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from msd.errors import MsdError
from msd.machine import LOCAL_RANK_VARS, WORLD_SIZE_VARS

TIMEOUT_ENV = "MSD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Claim:
    """What the launcher told this process."""
    world: int
    rank: int
    local_rank: int
    deepspeed: bool

    def __str__(self) -> str:
        engine = ", DeepSpeed" if self.deepspeed else ""
        return (f"launched {self.world} process{'es' if self.world != 1 else ''}{engine} "
                f"(WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}, RANK={self.rank}, "
                f"LOCAL_RANK={self.local_rank})")


# The launcher's variables, torchrun's first, then MPI's (as accelerate reads them on CPU).
WORLD = WORLD_SIZE_VARS
RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK = LOCAL_RANK_VARS


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise MsdError(f"launch: {name}={raw!r} is not a number", name) from None
    return default


def deepspeed_requested() -> bool:
    """Whether the launch asks for DeepSpeed (`accelerate launch` with a DEEPSPEED config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def claimed() -> Claim:
    """The launcher's word, read from the environment; refused when it contradicts itself."""
    world, rank = _env_int(WORLD, 1), _env_int(RANK, 0)
    claim = Claim(world, rank, _env_int(LOCAL_RANK, 0), deepspeed_requested())
    if world < 1 or not 0 <= rank < world or not 0 <= claim.local_rank <= rank:
        raise MsdError(f"inconsistent launch: {claim}; nothing was written")
    if world > 1 and not ("MASTER_ADDR" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
                          or "PMI_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ):
        raise MsdError(f"inconsistent launch: {claim} but no launcher set MASTER_ADDR; start "
                       "msd with torchrun or `accelerate launch`; nothing was written")
    return claim


def timeout() -> timedelta:
    seconds = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(seconds) if seconds else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if value <= 0:
        raise MsdError(f"{TIMEOUT_ENV}={seconds!r}: give a positive number of seconds", TIMEOUT_ENV)
    return timedelta(seconds=value)


def process_group_handlers(claim: Claim) -> list:
    """accelerate's process-group settings: the timeout, and gloo named where accelerate finds
    no backend for the device (DeepSpeed on CPU). None for one process (no group)."""
    if claim.world < 2:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return [InitProcessGroupKwargs(backend=backend, timeout=timeout())]


def found(accelerator) -> str:
    """What the accelerator and torch.distributed report, in words."""
    dist = torch.distributed
    text = (f"accelerate reports process {accelerator.process_index} of {accelerator.num_processes} "
            f"(local {accelerator.local_process_index}, {accelerator.distributed_type.value})")
    if dist.is_available() and dist.is_initialized():
        text += f", torch.distributed rank {dist.get_rank()} of {dist.get_world_size()}"
    return text


def check(accelerator, claim: Claim) -> None:
    """Stop (every process, nothing written) unless the launcher, accelerate and
    torch.distributed agree on the number of processes, this one's rank and the engine."""
    from accelerate.utils import DistributedType

    dist = torch.distributed
    views = [(accelerator.num_processes, accelerator.process_index)]
    if dist.is_available() and dist.is_initialized():
        views.append((dist.get_world_size(), dist.get_rank()))
    agree = all(v == (claim.world, claim.rank) for v in views)
    if claim.world > 1:  # accelerate's local index is -1 when no launcher set LOCAL_RANK
        agree = agree and accelerator.local_process_index == claim.local_rank
    if claim.deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        agree = False  # a DeepSpeed launch that would train as something else
    if not agree:
        raise MsdError(f"inconsistent launch: {claim}, but {found(accelerator)}; nothing was "
                       "written (see docs/SCALING.md for the launches msd supports)")


# What gloo and nccl raise when a peer is gone (killed, its node down) or silent past the
# timeout: plain RuntimeErrors, told apart from msd's own bugs only by their text.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
             "NCCL communicator was aborted", "Broken pipe")


@contextlib.contextmanager
def peer_loss_reported(accelerator):
    """A lost peer becomes one line naming this process, the cause and how to resume, where
    it was a gloo / nccl traceback. The run stops either way: the last whole checkpoint stays."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if accelerator.num_processes < 2 or not (isinstance(e, torch.distributed.DistError)
                                                 or any(s in text for s in PEER_LOST)):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise MsdError(f"process {accelerator.process_index} of {accelerator.num_processes} lost "
                       f"contact with the others (a process or node stopped, or was silent for "
                       f"{TIMEOUT_ENV}={timeout().total_seconds():g} s): {first[:300]}; rerun the same "
                       "launch on every node to resume from the last checkpoint") from e


@contextlib.contextmanager
def writer_lock(folder, accelerator, kind: str = "train", *, fresh: bool = False):
    """The output folder's lock, claimed for `kind` (msd.lock.output_lock), held by the
    accelerator's main process (the one that writes the shared files) for the whole run. A
    refusal reaches every process, so none is left waiting for a main process that stopped."""
    from msd.lock import output_lock
    from msd.train import sharding

    with contextlib.ExitStack() as stack:
        refused = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(output_lock(folder, kind, fresh=fresh, writer=True))
            except MsdError as e:
                refused = str(e)
        refused = sharding.broadcast_object(refused)
        if refused is not None:
            raise MsdError(refused)
        yield
