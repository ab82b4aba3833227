"""msd's own decode loop (the CPU default) and its sampler.

The loop calls the model's backbone with a DynamicCache and does the output projection and the
sampling itself, because on CPU both dominate a decode step with a large vocabulary: it computes
the (V, B) product `W h^T` (a GEMM layout MKL runs 2-3x faster than `h W^T` for few rows) and
samples by inverse CDF (one cumsum and a binary search) instead of `torch.multinomial`, which
draws V exponentials per row. Models whose logits are post-processed (soft-capping, logit
scales), sharded models and models without a plain linear head go through the `hf` backend.

Shapes: B rows, P prompt columns, S prompt + generated columns, G generated tokens, H hidden
size, V vocabulary, M vocabulary blocks of the two-level sampler, K ids in a block.
"""

from __future__ import annotations

import inspect

import torch

from msd import families
from msd.generation.weights import is_peft, is_sharded

LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                        "output_multiplier", "lm_head_multiplier")
SAMPLE_BLOCK = 1024  # inverse-CDF sampling: vocabulary block size of the two-level search


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end a response: the generation config's EOS ids, the tokenizer's, and the
    chat template's end-of-turn token. Fixed bug: Llama-3 files from before May 2024 list only
    <|end_of_text|>, so rollouts ran past <|eot_id|>."""
    ids = families.end_of_turn_ids(tokenizer, families.model_config(model))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
    return ids


def cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS (the student must learn where to stop)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def draw(w_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
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
    cdf_BM = torch.cat(mass, 1).double().cumsum(-1)
    u_B2 = torch.rand((B, 2), generator=generator, dtype=torch.float64, device=w_BV.device)
    top_B1 = torch.nextafter(cdf_BM[:, -1:], torch.zeros_like(cdf_BM[:, -1:]))
    u_B1 = torch.minimum(u_B2[:, :1] * cdf_BM[:, -1:], top_B1)
    block_B = torch.searchsorted(cdf_BM, u_B1, right=True).squeeze(-1).clamp_(max=cdf_BM.shape[1] - 1)
    idx_BK = block_B[:, None] * K + torch.arange(K, device=w_BV.device)
    inside_BK = idx_BK < V
    idx_BK = idx_BK.clamp_(max=V - 1)
    cdf_BK = (w_BV.gather(1, idx_BK) * inside_BK).double().cumsum(-1)
    top_B1 = torch.nextafter(cdf_BK[:, -1:], torch.zeros_like(cdf_BK[:, -1:]))
    u_B1 = torch.minimum(u_B2[:, 1:] * cdf_BK[:, -1:], top_B1)
    pos_B1 = torch.searchsorted(cdf_BK, u_B1, right=True).clamp_(max=K - 1)
    return idx_BK.gather(1, pos_B1).squeeze(-1)


def top_p_floor(z_BV: torch.Tensor, top_p: float) -> torch.Tensor:
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
                generator: torch.Generator | None, *, out_BV: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (B,) next ids from softmax(logits / temperature) after top-k / top-p filtering
    (temperature 0 = greedy), and return them with their log-probs at temperature 1 without
    filtering, i.e. the student's distribution the scoring pass computes. out_BV: a float32
    (B, V) buffer for the unnormalised probabilities (reused across decode steps)."""
    logits_BV = logits_BV.float().contiguous()
    max_B1 = logits_BV.amax(-1, keepdim=True)
    w_BV = torch.sub(logits_BV, max_B1, out=out_BV).exp_()  # unnormalised p at temperature 1
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
                floor_B1 = top_p_floor(z_BV, top_p)
                z_BV = z_BV.masked_fill(z_BV.softmax(-1) < floor_B1, float("-inf"))
            w_BV = (z_BV - z_BV.amax(-1, keepdim=True)).exp_()
        tok_B = draw(w_BV, generator)
    logp_B = logits_BV.gather(1, tok_B[:, None]).squeeze(-1) - lse_B
    return tok_B, logp_B


def split_head(model):
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


class DecodeBuffers:
    """The (B, V) blocks one CPU decode step needs, allocated once per rollout and reused: a
    fresh block every step lets small allocations settle in the freed ones, and the heap then
    grows by tens of MB over a rollout (docs/PERFORMANCE.md). logits: the float32 projection's
    two blocks; weights: the sampler's block of unnormalised probabilities."""

    def __init__(self, rows: int, head: torch.nn.Linear, *, logits: bool, weights: bool):
        V, dtype, device = head.weight.shape[0], head.weight.dtype, head.weight.device
        on = dtype == torch.float32 and device.type == "cpu"
        self.t_VB = torch.empty(V, rows, dtype=dtype) if on and logits else None
        self.z_BV = torch.empty(rows, V, dtype=dtype) if on and logits else None
        self.w_BV = torch.empty(rows, V, dtype=torch.float32) if on and weights else None


def project(h_BH: torch.Tensor, head: torch.nn.Linear, buffers: DecodeBuffers | None = None) -> torch.Tensor:
    """(B, V) float32 logits of a few rows. On CPU as (W h^T)^T, which MKL runs 2-3x faster,
    into `buffers` when they fit. Fixed bug: off CPU the bias was added twice (the head's call
    adds it already)."""
    if h_BH.device.type != "cpu":
        return head(h_BH).float()
    weight_VH, h_BH = head.weight, h_BH.to(head.weight.dtype)
    if buffers is not None and buffers.t_VB is not None and buffers.t_VB.shape[1] == len(h_BH):
        logits_BV = buffers.z_BV.copy_(torch.mm(weight_VH, h_BH.T, out=buffers.t_VB).T)
    else:
        logits_BV = (weight_VH @ h_BH.T).T.contiguous()
    if head.bias is not None:
        logits_BV.add_(head.bias)
    return logits_BV.float()


def _new_cache(model):
    from transformers import DynamicCache

    lm = model.get_base_model() if is_peft(model) else model
    try:
        return DynamicCache(config=lm.config)
    except TypeError:  # older transformers
        return DynamicCache()


@torch.no_grad()
def decode_loop(model, split, ids_BP, mask_BP, *, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, num_samples: int, eos: set[int], pad_id: int,
                generator: torch.Generator | None, logprobs: bool = True,
                fast_head=None):
    """Sample with a DynamicCache; returns (B*num_samples, G) new ids and, with logprobs, their
    log-probs at temperature 1 (what the scoring pass computes), both as lists of lists (the
    log-probs None without). fast_head: a `msd.generation.bf16head.Bf16Head` of the head, to
    project through its bfloat16 copy with float32 results (greedy or plain temperature
    sampling)."""
    backbone, head, cache_kw = split
    if fast_head is not None and logprobs:
        raise ValueError("decode_loop: the bfloat16 head returns no log-probs; pass logprobs=False")
    cache = _new_cache(model)
    pos_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=ids_BP, attention_mask=mask_BP, position_ids=pos_BP, use_cache=True,
                   **{cache_kw: cache})
    h_BH = out.last_hidden_state[:, -1]
    mask_BS, pos_B1 = mask_BP, pos_BP[:, -1:]
    if num_samples > 1:  # prefill once per prompt, then copy the cache per sample
        cache.batch_repeat_interleave(num_samples)
        h_BH = h_BH.repeat_interleave(num_samples, 0)
        mask_BS = mask_BS.repeat_interleave(num_samples, 0)
        pos_B1 = pos_B1.repeat_interleave(num_samples, 0)
    eos_t = torch.tensor(sorted(eos) or [-1], device=ids_BP.device)
    done_B = torch.zeros(h_BH.shape[0], dtype=torch.bool, device=ids_BP.device)
    toks, logps = [], []
    buffers = DecodeBuffers(h_BH.shape[0], head, logits=fast_head is None,
                            weights=fast_head is None or temperature > 0)
    for g in range(max_new_tokens):
        if fast_head is not None and temperature <= 0:
            tok_B = fast_head.argmax(h_BH)
        elif fast_head is not None:
            tok_B = fast_head.sample(h_BH, temperature, generator, buffers.w_BV)
        else:
            tok_B, logp_B = sample_next(project(h_BH, head, buffers), temperature, top_p, top_k,
                                        generator, out_BV=buffers.w_BV)
            logps.append(logp_B)
        tok_B = tok_B.masked_fill(done_B, pad_id)
        toks.append(tok_B)
        done_B |= torch.isin(tok_B, eos_t)
        if g + 1 == max_new_tokens or bool(done_B.all()):
            break
        mask_BS = torch.cat([mask_BS, mask_BS.new_ones((mask_BS.shape[0], 1))], dim=1)
        pos_B1 = pos_B1 + 1
        out = backbone(input_ids=tok_B[:, None], attention_mask=mask_BS, position_ids=pos_B1,
                       use_cache=True, **{cache_kw: cache})
        h_BH = out.last_hidden_state[:, -1]
    return torch.stack(toks, 1).tolist(), torch.stack(logps, 1).tolist() if logprobs else None
