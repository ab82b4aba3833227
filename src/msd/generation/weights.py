"""The student's weights for sampling: LoRA folded in where that is exact and fits.

`rollout_weights` folds LoRA into the weights for sampling: into a persistent generation copy
of the adapted matrices when memory allows (the base weights, i.e. the teacher, are never
modified, so the teacher stays bit-for-bit theta_0 in every dtype); otherwise the unmerged
adapter samples. (`merged_lora`, in place, is kept for callers that want it.) `full_weights` makes a
sharded model's weights usable for generation; `merged_state` yields the merged weights by name
(for engines that load weights, such as vLLM).

What a model keeps between rollouts (whether LoRA is merged in place, the merged copy's buffers,
a vLLM engine) lives in `rollout_state(model)`, not on the model object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch

from msd.generation.gather import fsdp2_fits, fsdp2_gathered, fsdp2_modules, zero3_gathered

COPY_MEMORY_SHARE = 0.5  # half-precision LoRA: the merged copy may use this share of free memory
GATHER_MEMORY_SHARE = 0.8  # FSDP2: the gathered weights for a rollout may use this share of free memory


@dataclasses.dataclass
class RolloutState:
    """Per-model state kept across rollouts; dropped with the model."""

    merged: bool = False  # LoRA folded into the base weights in place (`merged_lora`)
    copies: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # merged copy, by layer
    engine: object = None  # the model's vLLM engine, built on first use


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rollout_state(model) -> RolloutState:
    """The model's RolloutState (created empty on first use)."""
    state = _STATES.get(model)
    if state is None:
        state = _STATES[model] = RolloutState()
    return state


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def is_sharded(model) -> bool:
    """True for FSDP / DeepSpeed ZeRO-3 / DTensor-sharded parameters (their .data is not the weight)."""
    for p in model.parameters():
        if getattr(p, "_is_flat_param", False) or type(p.data).__name__ == "DTensor":
            return True
        if hasattr(p, "ds_id") and getattr(getattr(p, "ds_status", None), "name", "") != "AVAILABLE":
            return True  # ZeRO-3, unless gathered (`full_weights`)
    return False


@contextlib.contextmanager
def full_weights(wrapped):
    """Make the weights of a sharded training model usable for `generate` on every process;
    yields whether they are now local (sampling needs no collective calls, any backend) or not
    (FSDP v1: plain `generate` with `synced_gpus`).

    FSDP2 and DeepSpeed ZeRO-3: every weight is gathered once and the engine's hooks stand still
    until exit (`msd.generation.gather`); FSDP2 falls back to gathering layer by layer inside
    each forward when the full weights would not fit in GATHER_MEMORY_SHARE of free memory.
    FSDP (v1): the root unit's parameters (embeddings, final norm, head) are gathered; the inner
    units gather their own in their forward. No-op for DDP / one process.
    """
    if fsdp2_modules(wrapped):
        device = next(wrapped.parameters()).device
        if not fsdp2_fits(wrapped, _free_bytes(device), GATHER_MEMORY_SHARE):
            yield False  # too big to gather: each layer gathers itself in forward (slow, fits)
            return
        with fsdp2_gathered(wrapped):
            yield True
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        FSDP = None
    if FSDP is not None and isinstance(wrapped, FSDP):
        with FSDP.summon_full_params(wrapped, recurse=False, writeback=False):
            yield False
        return
    params = [p for p in wrapped.parameters() if hasattr(p, "ds_id")]
    if params:
        with zero3_gathered(wrapped, params):
            yield True
        return
    yield True


@contextlib.contextmanager
def merged_lora(model, enabled: bool = True):
    """Fold LoRA into the base weights for fast sampling, unfold afterwards.

    Only done for float32 weights: merge/unmerge round-trips in bfloat16 would move the frozen
    base weights (the teacher) by up to 2^-8 relative per step. In float32 the round-trip error
    is ~1 ulp. Half-precision models sample through the unmerged adapter instead.
    """
    state = rollout_state(model)
    do = enabled and is_peft(model) and not state.merged
    if do:
        dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
        do = dtype == torch.float32
    if not do:
        yield model
        return
    model.merge_adapter()
    state.merged = True
    try:
        yield model
    finally:
        model.unmerge_adapter()
        state.merged = False


def lora_layers(model):
    """(name, layer) of the LoRA layers whose adapter is not merged into the base weight."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and hasattr(m, "get_delta_weight") and not m.merged]


def _merged_weight(layer) -> torch.Tensor:
    """W + the active adapters' deltas, in float32. Added out of place: for float32 weights
    `.float()` is W itself, which must stay the teacher's."""
    w = layer.get_base_layer().weight.detach().float()
    for a in layer.active_adapters:
        if a in layer.lora_A:
            w = w + layer.get_delta_weight(a).float()
    return w


@contextlib.contextmanager
def _merged_copy(model, layers):
    """Point each adapted layer at a persistent buffer holding W + delta (the base W is kept aside
    untouched) and disable the adapters; restore the pointers afterwards. The buffers are reused
    across rollouts, so compiled graphs see stable addresses."""
    copies = rollout_state(model).copies
    saved = []
    try:
        with torch.no_grad():
            for name, layer in layers:
                base = layer.get_base_layer()
                w = base.weight
                buf = copies.get(name)
                if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                    buf = copies[name] = torch.empty_like(w.data)
                buf.copy_(_merged_weight(layer))
                saved.append((base, w.data))
                w.data = buf
        with model.disable_adapter():
            yield model
    finally:
        for base, data in saved:
            base.weight.data = data


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return 0


@contextlib.contextmanager
def rollout_weights(model, merge: bool = True):
    """The student's weights for sampling, LoRA folded in where that is exact enough and fits.

    Yields how: "plain" (no adapter), "adapter" (sampled through the unmerged adapter),
    "merged_copy" (a persistent merged copy of the adapted matrices).
    """
    if not is_peft(model) or rollout_state(model).merged:
        yield "plain"
        return
    if not merge or is_sharded(model):
        yield "adapter"
        return
    # Fixed bug: float32 weights were merged in place and unmerged after sampling; the rounding
    # of each round trip drifted the base weights, i.e. the teacher theta_0. Every dtype now
    # samples through the merged copy (the base never written), or the unmerged adapter.
    base = next(p for n, p in model.named_parameters() if "lora_" not in n)
    layers = lora_layers(model)
    need = sum(m.get_base_layer().weight.numel() for _, m in layers) * base.element_size()
    have = sum(b.numel() * b.element_size() for b in rollout_state(model).copies.values())
    if layers and need - have <= COPY_MEMORY_SHARE * _free_bytes(base.device):
        with _merged_copy(model, layers):
            yield "merged_copy"
        return
    yield "adapter"


def merged_state(model):
    """(name, tensor) pairs of the student with LoRA folded in, in the base checkpoint's naming,
    one adapted matrix at a time (W + delta is built per layer; the base W is not modified)."""
    lm = model.get_base_model() if is_peft(model) else model
    lora = dict(lora_layers(lm)) if is_peft(model) else {}
    for name, p in lm.named_parameters():
        if "lora_" in name:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner in lora and name.endswith("base_layer.weight"):
            yield owner + ".weight", _merged_weight(lora[owner]).to(p.dtype)
        else:
            yield name.replace(".base_layer.", "."), p.detach()
