"""msd's own sharding layer: FSDP2 (`torch.distributed.fsdp.fully_shard`), the same code on CPU
(gloo) and GPU (nccl), and the cross-process agreements the loop needs under any engine.

Requested by the launch alone, through the environment `accelerate launch` sets for an FSDP
config (`ACCELERATE_USE_FSDP=true`, `FSDP_VERSION=2`); with `torchrun`, set those two variables
yourself. accelerate is then kept out of the way (its FSDP plugin does not shard without a GPU):
it starts the process group and owns nothing else, and msd shards every decoder layer
(`_no_split_modules`) and then the root, its optimizer works on the shards, gradients are
reduce-scattered (averaged, as DDP), and checkpoints go through `torch.distributed.checkpoint`
(`msd.train.dist_checkpoint`). `FSDP_RESHARD_AFTER_FORWARD=false` keeps each layer's gathered
weights from forward to backward (faster, more memory). DeepSpeed ZeRO-3 stays with accelerate.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys

import torch

from msd.errors import MsdError
from msd.generation.gather import reshard_policy

FSDP_ENV = "ACCELERATE_USE_FSDP"


def fsdp_requested() -> bool:
    """Whether the launch asks for FSDP (then msd shards with FSDP2 itself)."""
    if os.environ.get(FSDP_ENV, "false").lower() != "true" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False  # one process: nothing to shard
    if os.environ.get("FSDP_VERSION", "2").strip() != "2":
        raise MsdError("msd shards with FSDP2 only: set `fsdp_version: 2` in the accelerate config "
                       "(or FSDP_VERSION=2 with torchrun)", "FSDP_VERSION")
    return True


@contextlib.contextmanager
def accelerate_fsdp_hidden():
    """Build the Accelerator without accelerate's own FSDP: msd shards the model itself."""
    saved = os.environ.pop(FSDP_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[FSDP_ENV] = saved


def die_with_launcher() -> None:
    """Under torchrun / `accelerate launch` (Linux): have the kernel SIGKILL this worker when its
    launcher dies. torchrun starts every worker in its own session, so a launcher killed alone
    (SIGKILL, a crashed node agent) used to leave the workers training on and writing into the
    output folder, racing the rerun that resumes it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the call
            os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def decoder_layers(model) -> list:
    """The repeated blocks to shard one by one: the classes a Hugging Face model names in
    `_no_split_modules`, else the modules of its longest ModuleList."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model, device: torch.device, mixed_precision: str) -> None:
    """FSDP2 in place: each decoder layer, then the root (embeddings, final norm, head). The full
    weights move to `device` one unit at a time, so a process never holds the whole model there."""
    if model is None:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if mixed_precision == "fp16":
        raise MsdError("FSDP: train.mixed_precision=fp16 needs loss scaling msd does not do with "
                       "FSDP2; use bf16", "train.mixed_precision")
    mesh = init_device_mesh(device.type, (int(os.environ.get("WORLD_SIZE", "1")),))
    # Weights are kept (and updated) in their loaded dtype; forward/backward run in bf16 if
    # asked, gradients are reduced in float32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    sync_adapter(model, device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # PEFT's generate skips the root's forward (and its gathering hooks): route it through them,
    # for rollouts too big to gather at once (`msd.generation.full_weights`).
    register_fsdp_forward_method(model, "generate")
    reshard_policy(model)


def sync_adapter(model, device: torch.device) -> None:
    """Process 0's adapter weights on every process. Unlike DDP, `fully_shard` does not
    broadcast: each process would keep its own slice of its own random LoRA init, a model no
    process ever had. (Loaded weights come from one file and agree already.)"""
    if not hasattr(model, "peft_config"):
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                t = p.data.to(device)
                torch.distributed.broadcast(t, src=0)
                p.data.copy_(t.to(p.device))


def local_share(model) -> tuple[int, int]:
    """(elements this process holds, elements of the full model) of the parameters: FSDP2's
    local shards (DTensor), ZeRO-3's partitions (`ds_tensor`, padded to equal sizes)."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            full += p.ds_numel
            local += p.ds_tensor.numel()
            continue
        full += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, full


def share_line(model, accelerator, engine: str) -> str:
    local, full = local_share(model)
    return (f"msd: {engine} process {accelerator.process_index} of {accelerator.num_processes} "
            f"holds {local} of {full} parameter elements")


def grad_norm(params) -> float:
    """The global L2 norm of the gradients: shards (DTensor) are summed over processes."""
    sq = torch.zeros((), dtype=torch.float64)
    sharded = False
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.detach()
        if hasattr(g, "to_local"):
            g, sharded = g.to_local(), True
        sq += g.float().pow(2).sum().double().cpu()
    if sharded and torch.distributed.is_initialized():
        sq = all_reduce(sq, torch.distributed.ReduceOp.SUM)
    return math.sqrt(float(sq))


def clip_grad(params, max_norm: float, total_norm: float) -> None:
    """Scale the gradients (shards too) by max_norm / total_norm when that is below 1."""
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)


def all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """`t` reduced over all processes (on the process group's device), returned on the CPU."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    t = t.to(device)
    dist.all_reduce(t, op=op)
    return t.cpu()


def all_agree(flag: bool) -> bool:
    """True only if `flag` is true on every process: the non-finite check before a step must
    agree, or one process steps while another skips (and the collectives then hang)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), dist.ReduceOp.MIN)[0] > 0)


def broadcast_object(obj):
    """`obj` from process 0 on every process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def same_everywhere(value, what: str, difference) -> None:
    """Every process holds the same `value`, or every process stops with one line naming
    `difference(value of process 0, value of the first other)`. One gather at the start, where
    every process arrives: a process that fails before it ends the launch (torchrun stops the
    others), so the wait is bounded.
    Fixed bug: with a different config on each rank, training hung until killed."""
    values = gather_objects(value)
    other = next((i for i, v in enumerate(values) if v != values[0]), None)
    if other is not None:
        # Every process stops here; its process group goes first, so no gloo thread is left to
        # abort the exit (a rank once died with SIGABRT after printing the line).
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise MsdError(f"{what} differs between process 0 and process {other}"
                       f"{difference(values[0], values[other])}; give every process the same one")
