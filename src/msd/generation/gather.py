"""Full weights of a sharded model, gathered once per rollout so it samples at full speed.

A sharded model (FSDP2 `fully_shard`, DeepSpeed ZeRO-3) holds 1/N of every weight per process and
all-gathers a module's weights inside its forward. Sampling through those hooks would gather
every weight again at every decoding step, and keep all processes stepping in lockstep
(`synced_gpus`). Instead, `gathered(model)` all-gathers every weight once, switches the
re-sharding hooks off, and yields: the model then behaves like an unsharded one, each process
samples its own prompts with the normal backends (no collective calls while decoding), and the
weights are sharded again on exit. Cost: one full copy of the weights per process while sampling
(in the engine's compute dtype), on top of the shards, the optimizer state and the KV cache —
see docs/SCALING.md for when that does not fit.
"""

from __future__ import annotations

import contextlib
import os


def fsdp2_modules(model) -> list:
    """The `fully_shard`-ed modules of `model`, outermost (the root) first."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard_policy(model) -> None:
    """When each FSDP2 unit frees its gathered weights after forward: the layers always; the root
    (embeddings, final norm, head) only for a frozen model. The root of a trained model keeps them
    until backward, which needs them straight away (FSDP2's own default for the root).
    `FSDP_RESHARD_AFTER_FORWARD=false` (accelerate's FSDP setting) keeps the layers' too. Set
    explicitly, so it can be restored exactly after a rollout."""
    mods = fsdp2_modules(model)
    if not mods:
        return
    layers = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    for m in mods:
        m.set_reshard_after_forward(layers, recurse=False)
    trainable = any(p.requires_grad for p in mods[0].parameters())
    mods[0].set_reshard_after_forward(not trainable, recurse=False)


def fsdp2_fits(model, free_bytes: int, share: float) -> bool:
    """Whether the gathered weights (full size, compute dtype) fit in `share` of the free memory
    on every process (agreed: all must gather, or none)."""
    import torch
    import torch.distributed as dist

    mods = fsdp2_modules(model)
    policy = mods[0]._get_fsdp_state()._mp_policy if mods else None
    size = torch.tensor([], dtype=policy.param_dtype).element_size() \
        if policy is not None and policy.param_dtype is not None else None
    need = sum(p.numel() * (size or p.element_size()) for p in model.parameters())
    free = torch.tensor([float(free_bytes)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            free = free.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return need <= share * float(free[0])


@contextlib.contextmanager
def fsdp2_gathered(model):
    """All-gather every FSDP2 unit's weights once; no re-sharding until exit. Collective: every
    process must enter together (the rollout and teacher-sampling steps do)."""
    mods = fsdp2_modules(model)
    # The root must be initialised as the root before any inner unit runs forward on its own (the
    # decode loop calls the backbone, not the root); FSDP2 does this lazily in the root's forward.
    mods[0]._get_fsdp_state()._lazy_init()
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        handles = [m.unshard(async_op=True) for m in mods]
        for h in handles:
            if h is not None:
                h.wait()
        yield
    finally:
        for m in mods:
            m.reshard()
        reshard_policy(model)


def _zero3_offload(engine):
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    return getattr(optimizer, "parameter_offload", optimizer)


@contextlib.contextmanager
def zero3_gathered(engine, params):
    """DeepSpeed ZeRO-3: gather every weight (one full copy per process) and take the engine's
    fetch/release hooks off the modules while sampling (as TRL's `unwrap_model_for_generation`),
    so decoding runs without collective calls. Tested on CPU over gloo (tests/test_zero3.py);
    not run on GPUs."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        offload = _zero3_offload(engine)
        removed = offload is not None and hasattr(offload, "forward_hooks")
        if removed:
            for p in offload.module.parameters():
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            if removed:  # the method was renamed in deepspeed 0.16.4
                register = getattr(offload, "_register_deepspeed_module", None) \
                    or getattr(offload, "_register_hooks_recursively")
                register(offload.module)
