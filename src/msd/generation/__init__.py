"""Batched sampling of responses (rollouts).

Prompts are sorted by length and left-padded so each batch wastes little compute; outputs are
returned in the caller's order. Each response is cut after its first EOS (the EOS is kept: the
student must learn where to stop). Where the pieces live:

- `backends`: the registry `BACKENDS` (loop, hf, compiled, vllm; `rollout.backend`), how to add one;
- `sampler`: msd's own decode loop (the CPU default) and its inverse-CDF sampler;
- `weights`: the student's weights for sampling (LoRA folded in), sharded weights gathered.
"""

from __future__ import annotations

import torch

from msd.generation.backends import BACKENDS, Sampling, resolve_backend
from msd.generation.sampler import cut_after_eos, draw, eos_ids, sample_next
from msd.generation.weights import full_weights, is_peft, is_sharded, merged_lora, rollout_weights

__all__ = ["BACKENDS", "Sampling", "cut_after_eos", "draw", "eos_ids", "full_weights", "generate",
           "is_peft", "is_sharded", "merged_lora", "resolve_backend", "rollout_weights", "sample_next"]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 128,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
             batch_size: int = 32, seed: int = 0, progress: bool = False, merge_lora: bool = True,
             backend: str = "auto", return_logprobs: bool = False, sharded: bool = False):
    """Sample `num_samples` responses per prompt: result[i][j] = token ids of sample j of prompt i.

    temperature 0 means greedy. Seeding is per batch (seed + batch index), so results do not
    depend on what ran before or on how the caller's prompts were ordered. With
    return_logprobs=True, also returns logp[i][j][g] = log p(token g | ...) at temperature 1
    under the sampling weights (for checking the rollout against the scoring pass).
    merge_lora: sample with LoRA folded into a copy of the adapted weights (`rollout_weights`);
    on an accelerator only: a CPU decode step is bound by reading the weights, which a merged
    copy does not change (it saved 2 % of a benchmark step and cost a second copy of every
    adapted matrix, docs/PERFORMANCE.md), so on CPU the adapter samples unmerged.
    sharded=True (FSDP / ZeRO-3, called inside `full_weights`): plain `generate` through the
    modules, adapter unmerged, and every process keeps stepping until all are done
    (`synced_gpus`), since each forward gathers weights collectively.
    """
    if not prompts or max_new_tokens <= 0:
        empty = [[[] for _ in range(num_samples)] for _ in prompts]
        return (empty, [[[] for _ in range(num_samples)] for _ in prompts]) if return_logprobs else empty
    device = next(model.parameters()).device
    name = "hf" if sharded else resolve_backend(backend, device)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, num_samples=num_samples, batch_size=batch_size, seed=seed,
                        eos=frozenset(eos_ids(model, tokenizer)), pad_id=tokenizer.pad_token_id,
                        progress=progress, merge_lora=merge_lora and not sharded and device.type != "cpu",
                        return_logprobs=return_logprobs, sharded=sharded)
    tokens, logprobs = BACKENDS.get(name)(model, prompts, sampling)
    return (tokens, logprobs) if return_logprobs else tokens
