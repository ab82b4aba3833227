"""Batched sampling of responses (rollouts).

Prompts are sorted by length and left-padded so each batch wastes little compute; outputs are
returned in the caller's order. Each response is cut after its first EOS (the EOS is kept: the
student must learn where to stop). Shapes: B rows, P prompt tokens, N new tokens, H hidden
size, V vocabulary.

Backends (`rollout.backend`):
- `auto`: `compiled` on CUDA; on CPU msd's own decode loop (below; `generate(backend="loop")`).
- `hf`: plain `model.generate` with a dynamic KV cache (the reference path).
- `compiled`: `model.generate` with a static KV cache; on CUDA transformers compiles the decode
  step. Shapes are kept fixed so it compiles once per run, not per step: every batch is padded
  to `batch_size * num_samples` rows and the cache length is pinned to a bucketed ceiling
  (prompt length rounded up to `PROMPT_BUCKET`, plus `max_new_tokens`), which transformers only
  ever raises.
- `vllm`: a vLLM engine in this process, with the merged student weights pushed into it before
  each rollout. Untested here (no GPU); see docs/PERFORMANCE.md.

The decode loop (CPU default) calls the model's backbone with a DynamicCache and does the
output projection and the sampling itself, because on CPU both dominate a decode step with a
large vocabulary: it computes the (V, B) product `W h^T` (a GEMM layout MKL runs 2-3x faster
than `h W^T` for few rows) and samples by inverse CDF (one cumsum and a binary search) instead
of `torch.multinomial`, which draws V exponentials per row. Models whose logits are post-
processed (soft-capping, logit scales), sharded models and models without a plain linear head
go through `hf`.

LoRA is folded into the weights for sampling (`rollout_weights`): in place for float32 weights
(round-trip error ~1 ulp, `models.merged_lora`); for half-precision weights into a persistent
generation copy of the adapted matrices when memory allows (the base weights, i.e. the
teacher, are never modified, so no drift); otherwise the unmerged adapter samples.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from msd.models import is_peft, merged_lora

PROMPT_BUCKET = 64  # `compiled`: prompt widths are rounded up to a multiple of this
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                        "output_multiplier", "lm_head_multiplier")
COPY_MEMORY_SHARE = 0.5  # half-precision LoRA: the merged copy may use this share of free memory


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
    return ids


def left_pad(seqs: list[list[int]], pad_id: int, device, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and mask, left-padded to `width` (default: the longest sequence)."""
    width = max(width or 0, max(len(s) for s in seqs))
    ids_BP = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids_BP[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask_BP[i, width - len(s):] = 1
    return ids_BP.to(device), mask_BP.to(device)


def cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


# ----------------------------------------------------------------------------- weights

def is_sharded(model) -> bool:
    """True for FSDP / DeepSpeed ZeRO-3 / DTensor-sharded parameters (their .data is not the weight)."""
    for p in model.parameters():
        if hasattr(p, "ds_id") or getattr(p, "_is_flat_param", False) or type(p.data).__name__ == "DTensor":
            return True
    return False


@contextlib.contextmanager
def full_weights(wrapped):
    """Make the weights of a sharded training model usable for `generate` on every process.

    FSDP (v1): the root unit's parameters (embeddings, final norm, head) are gathered; the inner
    units gather their own in their forward. DeepSpeed ZeRO-3: every parameter is gathered (one
    full copy per process, as TRL's `ds3_gather_for_generation`). No-op for DDP / one process.
    Untested here (CPU, gloo): see docs/PERFORMANCE.md.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        FSDP = None
    if FSDP is not None and isinstance(wrapped, FSDP):
        with FSDP.summon_full_params(wrapped, recurse=False, writeback=False):
            yield
        return
    params = [p for p in wrapped.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    yield


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and hasattr(m, "get_delta_weight") and not m.merged]


@contextlib.contextmanager
def _merged_copy(model, layers):
    """Point each adapted layer at a persistent buffer holding W + delta (the base W is kept aside
    untouched) and disable the adapters; restore the pointers afterwards. The buffers are reused
    across rollouts, so compiled graphs see stable addresses."""
    copies = model.__dict__.setdefault("_msd_merged_copy", {})
    saved = []
    try:
        with torch.no_grad():
            for name, layer in layers:
                base = layer.get_base_layer()
                w = base.weight
                buf = copies.get(name)
                if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                    buf = copies[name] = torch.empty_like(w.data)
                merged = w.data.float()
                for a in layer.active_adapters:
                    if a in layer.lora_A:
                        merged += layer.get_delta_weight(a).float()
                buf.copy_(merged)
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
    "merged" (in place, float32), "merged_copy" (persistent half-precision copy).
    """
    if not is_peft(model) or getattr(model, "_msd_merged", False):
        yield "plain"
        return
    if not merge or is_sharded(model):
        yield "adapter"
        return
    base = next(p for n, p in model.named_parameters() if "lora_" not in n)
    if base.dtype == torch.float32:
        with merged_lora(model, True):
            yield "merged"
        return
    layers = _lora_layers(model)
    need = sum(m.get_base_layer().weight.numel() for _, m in layers) * base.element_size()
    have = sum(b.numel() * b.element_size() for b in model.__dict__.get("_msd_merged_copy", {}).values())
    if layers and need - have <= COPY_MEMORY_SHARE * _free_bytes(base.device):
        with _merged_copy(model, layers):
            yield "merged_copy"
        return
    yield "adapter"


# ----------------------------------------------------------------------------- sampling

SAMPLE_BLOCK = 1024  # inverse-CDF sampling: vocabulary block size of the two-level search


def _draw(w_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) ids drawn with probability w / sum(w) (w >= 0, unnormalised), by inverse CDF in two
    levels: a block of SAMPLE_BLOCK ids in proportion to its mass, then an id inside it. Each
    level uses its own uniform, so P(id) = (mass_b / total) * (w_id / mass_b) exactly, up to the
    float64 rounding of two short cumulative sums (one float32 cumsum over 152k ids could bias
    the distribution by up to ~1% total variation; torch.multinomial draws V exponentials)."""
    B, V = w_BV.shape
    K = SAMPLE_BLOCK
    V0 = V - V % K
    mass = [w_BV[:, :V0].view(B, V0 // K, K).sum(-1)] if V0 else []
    if V0 < V:
        mass.append(w_BV[:, V0:].sum(-1, keepdim=True))
    cdf_BN = torch.cat(mass, 1).double().cumsum(-1)  # N = number of blocks
    u_B2 = torch.rand((B, 2), generator=generator, dtype=torch.float64, device=w_BV.device)
    top_B1 = torch.nextafter(cdf_BN[:, -1:], torch.zeros_like(cdf_BN[:, -1:]))
    u_B1 = torch.minimum(u_B2[:, :1] * cdf_BN[:, -1:], top_B1)
    block_B = torch.searchsorted(cdf_BN, u_B1, right=True).squeeze(-1).clamp_(max=cdf_BN.shape[1] - 1)
    idx_BK = block_B[:, None] * K + torch.arange(K, device=w_BV.device)
    inside_BK = idx_BK < V
    idx_BK = idx_BK.clamp_(max=V - 1)
    cdf_BK = (w_BV.gather(1, idx_BK) * inside_BK).double().cumsum(-1)
    top_B1 = torch.nextafter(cdf_BK[:, -1:], torch.zeros_like(cdf_BK[:, -1:]))
    u_B1 = torch.minimum(u_B2[:, 1:] * cdf_BK[:, -1:], top_B1)
    pos_B1 = torch.searchsorted(cdf_BK, u_B1, right=True).clamp_(max=K - 1)
    return idx_BK.gather(1, pos_B1).squeeze(-1)


def _top_p_floor(z_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, 1) probability of the last id kept by nucleus filtering (the shortest prefix of the
    sorted distribution whose mass reaches top_p). Sorts only the top k, k growing x16, not V."""
    p_BV = z_BV.softmax(-1)
    k = 256
    while True:
        k = min(k, z_BV.shape[-1])
        vals_BK, _ = p_BV.topk(k, dim=-1)
        before_BK = vals_BK.cumsum(-1) - vals_BK  # mass strictly above each candidate
        if k == z_BV.shape[-1] or bool((before_BK[:, -1] >= top_p).all()):
            keep_BK = before_BK < top_p
            n_B1 = keep_BK.sum(-1, keepdim=True).clamp(min=1)
            return vals_BK.gather(1, n_B1 - 1)
        k *= 16


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (B,) next ids from softmax(logits / temperature) after top-k / top-p filtering
    (temperature 0 = greedy), and return them with their log-probs at temperature 1 without
    filtering, i.e. the student's distribution the scoring pass computes."""
    logits_BV = logits_BV.float().contiguous()
    max_B1 = logits_BV.amax(-1, keepdim=True)
    w_BV = (logits_BV - max_B1).exp_()  # unnormalised p at temperature 1
    lse_B = max_B1.squeeze(-1) + w_BV.sum(-1).log()
    if temperature <= 0:
        tok_B = logits_BV.argmax(-1)
    else:
        if temperature != 1.0 or top_k > 0 or top_p < 1.0:
            z_BV = logits_BV / temperature
            if 0 < top_k < z_BV.shape[-1]:
                kth_B1 = z_BV.topk(top_k, dim=-1).values[:, -1:]
                z_BV = z_BV.masked_fill(z_BV < kth_B1, float("-inf"))
            if top_p < 1.0:
                floor_B1 = _top_p_floor(z_BV, top_p)
                z_BV = z_BV.masked_fill(z_BV.softmax(-1) < floor_B1, float("-inf"))
            w_BV = (z_BV - z_BV.amax(-1, keepdim=True)).exp_()
        tok_B = _draw(w_BV, generator)
    logp_B = logits_BV.gather(1, tok_B[:, None]).squeeze(-1) - lse_B
    return tok_B, logp_B


def _split_head(model):
    """(backbone, head Linear, cache keyword) for the decode loop, or None if the loop can't run it."""
    lm = model.get_base_model() if is_peft(model) else model
    backbone = getattr(lm, "base_model", lm)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is lm or type(head) is not torch.nn.Linear or is_sharded(model):
        return None
    text_cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if any(getattr(text_cfg, k, None) not in (None, 1, 1.0) for k in LOGIT_POSTPROCESSING):
        return None
    params = inspect.signature(backbone.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    return None if cache_kw is None else (backbone, head, cache_kw)


def project(h_BH: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """(B, V) float32 logits of a few rows. On CPU as (W h^T)^T, which MKL runs 2-3x faster."""
    if h_BH.device.type == "cpu":
        logits_BV = (head.weight @ h_BH.to(head.weight.dtype).T).T.contiguous()
    else:
        logits_BV = head(h_BH)
    if head.bias is not None:
        logits_BV = logits_BV + head.bias
    return logits_BV.float()


@torch.no_grad()
def decode_loop(model, split, ids_BP, mask_BP, *, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, num_samples: int, eos: set[int], pad_id: int,
                generator: torch.Generator | None):
    """Sample with a DynamicCache; returns (B*num_samples, N) new ids and their log-probs at
    temperature 1 (what the scoring pass computes), both as lists of lists."""
    from transformers import DynamicCache

    backbone, head, cache_kw = split
    lm = model.get_base_model() if is_peft(model) else model
    try:
        cache = DynamicCache(config=lm.config)
    except TypeError:  # older transformers
        cache = DynamicCache()
    pos_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=ids_BP, attention_mask=mask_BP, position_ids=pos_BP, use_cache=True,
                   **{cache_kw: cache})
    h_BH = out.last_hidden_state[:, -1]
    mask_BL, pos_B1 = mask_BP, pos_BP[:, -1:]
    if num_samples > 1:  # prefill once per prompt, then copy the cache per sample
        cache.batch_repeat_interleave(num_samples)
        h_BH = h_BH.repeat_interleave(num_samples, 0)
        mask_BL = mask_BL.repeat_interleave(num_samples, 0)
        pos_B1 = pos_B1.repeat_interleave(num_samples, 0)
    eos_t = torch.tensor(sorted(eos) or [-1], device=ids_BP.device)
    done_B = torch.zeros(h_BH.shape[0], dtype=torch.bool, device=ids_BP.device)
    toks, logps = [], []
    for n in range(max_new_tokens):
        logits_BV = project(h_BH, head)
        tok_B, logp_B = sample_next(logits_BV, temperature, top_p, top_k, generator)
        logps.append(logp_B)
        tok_B = tok_B.masked_fill(done_B, pad_id)
        toks.append(tok_B)
        done_B |= torch.isin(tok_B, eos_t)
        if n + 1 == max_new_tokens or bool(done_B.all()):
            break
        mask_BL = torch.cat([mask_BL, mask_BL.new_ones((mask_BL.shape[0], 1))], dim=1)
        pos_B1 = pos_B1 + 1
        out = backbone(input_ids=tok_B[:, None], attention_mask=mask_BL, position_ids=pos_B1,
                       use_cache=True, **{cache_kw: cache})
        h_BH = out.last_hidden_state[:, -1]
    return torch.stack(toks, 1).tolist(), torch.stack(logps, 1).tolist()


def _hf_generate(model, ids_BP, mask_BP, *, max_new_tokens, temperature, top_p, top_k,
                 num_samples, eos, pad_id, static: bool, want_logprobs: bool, synced: bool = False):
    kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                  pad_token_id=pad_id, eos_token_id=sorted(eos) or None)
    if synced:
        kwargs["synced_gpus"] = True
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p,
                      top_k=top_k if top_k > 0 else None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if static:
        # A fixed cache length: transformers keeps the largest seen, so the compiled decode
        # step sees one shape per run (batch rows are padded by the caller).
        ceiling = -(-ids_BP.shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET + max_new_tokens
        kwargs.update(cache_implementation="static", max_cache_len=ceiling)
    if want_logprobs:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    out = model.generate(input_ids=ids_BP, attention_mask=mask_BP, **kwargs)
    seqs = out.sequences if want_logprobs else out
    new_BN = seqs[:, ids_BP.shape[1]:]
    logp = None
    if want_logprobs:
        logits_BNV = torch.stack(out.logits, 1).float()
        logp = logits_BNV.log_softmax(-1).gather(-1, new_BN[..., None]).squeeze(-1).tolist()
    return new_BN.tolist(), logp


# ----------------------------------------------------------------------------- vLLM (untested here)

def merged_state(model):
    """(name, tensor) pairs of the student with LoRA folded in, in the base checkpoint's naming,
    one adapted matrix at a time (W + delta is built per layer; the base W is not modified)."""
    lm = model.get_base_model() if is_peft(model) else model
    lora = dict(_lora_layers(lm)) if is_peft(model) else {}
    for name, p in lm.named_parameters():
        if "lora_" in name:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner in lora and name.endswith("base_layer.weight"):
            layer = lora[owner]
            w = p.detach().float()
            for a in layer.active_adapters:
                if a in layer.lora_A:
                    w = w + layer.get_delta_weight(a).float()
            yield owner + ".weight", w.to(p.dtype)
        else:
            yield name.replace(".base_layer.", "."), p.detach()


def _vllm_engine(model):
    """One in-process vLLM engine per model, built from the base checkpoint on disk."""
    engine = model.__dict__.get("_msd_vllm")
    if engine is not None:
        return engine
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process
    from vllm import LLM

    lm = model.get_base_model() if is_peft(model) else model
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    engine = LLM(model=lm.config._name_or_path, dtype=str(lm.dtype).removeprefix("torch."),
                 gpu_memory_utilization=float(os.environ.get("MSD_VLLM_GPU_MEMORY", "0.3")),
                 max_model_len=int(os.environ.get("MSD_VLLM_MAX_LEN", "4096")),
                 enable_prefix_caching=False, seed=0,
                 distributed_executor_backend="external_launcher" if dist else None)
    model.__dict__["_msd_vllm"] = engine
    return engine


def _vllm_load(engine, weights) -> None:
    try:
        runner_model = engine.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:  # newer vLLM: run the loader on the worker
        engine.collective_rpc(lambda self: self.model_runner.model.load_weights(list(weights)))
        return
    runner_model.load_weights(weights)


def vllm_generate(model, prompts, *, max_new_tokens, temperature, top_p, top_k, num_samples, seed,
                  eos, return_logprobs):
    """Sample through vLLM after pushing the current merged student weights into it."""
    from vllm import SamplingParams

    engine = _vllm_engine(model)
    _vllm_load(engine, merged_state(model))
    if hasattr(engine, "reset_prefix_cache"):
        engine.reset_prefix_cache()
    params = [SamplingParams(n=num_samples, temperature=max(temperature, 0.0), top_p=top_p,
                             top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
                             seed=seed + i, stop_token_ids=sorted(eos), detokenize=False,
                             logprobs=0 if return_logprobs else None)
              for i in range(len(prompts))]
    outs = engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [[cut_after_eos(list(o.token_ids), eos) for o in out.outputs] for out in outs]
    if not return_logprobs:
        return tokens
    logprobs = [[[step[t].logprob for step, t in zip(o.logprobs, toks)]
                 for o, toks in zip(out.outputs, per)] for out, per in zip(outs, tokens)]
    return tokens, logprobs


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "compiled" if device.type == "cuda" else "loop"
    return backend


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 128,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
             batch_size: int = 32, seed: int = 0, progress: bool = False, merge_lora: bool = True,
             backend: str = "auto", return_logprobs: bool = False, sharded: bool = False):
    """Sample `num_samples` responses per prompt: result[i][j] = token ids of sample j of prompt i.

    temperature 0 means greedy. Seeding is per batch (seed + batch index), so results do not
    depend on what ran before or on how the caller's prompts were ordered. With
    return_logprobs=True, also returns logp[i][j][n] = log p(token n | ...) at temperature 1
    under the sampling weights (for checking the rollout against the scoring pass).
    sharded=True (FSDP / ZeRO-3, called inside `full_weights`): plain `generate` through the
    modules, adapter unmerged, and every process keeps stepping until all are done
    (`synced_gpus`), since each forward gathers weights collectively.
    """
    if not prompts or max_new_tokens <= 0:
        empty = [[[] for _ in range(num_samples)] for _ in prompts]
        return (empty, [[[] for _ in range(num_samples)] for _ in prompts]) if return_logprobs else empty
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    backend = "hf" if sharded else resolve_backend(backend, device)
    merge_lora = merge_lora and not sharded
    if backend == "vllm":
        return vllm_generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, num_samples=num_samples, seed=seed,
                             eos=eos, return_logprobs=return_logprobs)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    tokens: list = [None] * len(prompts)
    logprobs: list = [None] * len(prompts)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", leave=False)
    was_training = model.training
    model.eval()
    try:
        with rollout_weights(model, merge_lora):
            split = _split_head(model) if backend == "loop" else None
            for b, idx in enumerate(batches):
                rows = [prompts[i] for i in idx]
                if backend == "compiled":  # fixed row count: one compiled shape
                    rows += [rows[0]] * (batch_size - len(rows))
                ids_BP, mask_BP = left_pad(rows, pad_id, device)
                kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, num_samples=num_samples, eos=eos, pad_id=pad_id)
                if split is not None:
                    gen = torch.Generator(device=device).manual_seed(seed + b)
                    new_BN, logp_BN = decode_loop(model, split, ids_BP, mask_BP, generator=gen, **kw)
                else:
                    torch.manual_seed(seed + b)
                    new_BN, logp_BN = _hf_generate(model, ids_BP, mask_BP, static=backend == "compiled",
                                                   want_logprobs=return_logprobs, synced=sharded, **kw)
                for k, i in enumerate(idx):
                    span = slice(k * num_samples, (k + 1) * num_samples)
                    tokens[i] = [cut_after_eos(r, eos) for r in new_BN[span]]
                    if return_logprobs:
                        logprobs[i] = [lp[:len(t)] for lp, t in zip(logp_BN[span], tokens[i])]
                if bar:
                    bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar:
            bar.close()
    return (tokens, logprobs) if return_logprobs else tokens
