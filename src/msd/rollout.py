"""Batched sampling of responses (rollouts) with the KV cache.

Prompts are sorted by length and left-padded so each generate call wastes little compute;
outputs are returned in the caller's order. Each response is cut after its first EOS (the EOS
is kept: the student must learn where to stop). Shapes: B prompts, P prompt tokens,
N new tokens.
"""

from __future__ import annotations

import torch

from msd.models import merged_lora


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(e)
    return ids


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and mask, left-padded."""
    width = max(len(s) for s in seqs)
    ids_BP = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BP[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask_BP[i, width - len(s):] = 1
    return ids_BP.to(device), mask_BP.to(device)


def cut_after_eos(tokens: list[int], eos: set[int], pad_id: int | None = None) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 128,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
             batch_size: int = 32, seed: int = 0, progress: bool = False, merge_lora: bool = True,
             backend: str = "auto") -> list[list[list[int]]]:
    """Sample `num_samples` responses per prompt: result[i][j] = token ids of sample j of prompt i.

    temperature 0 means greedy. Seeding is per batch (seed + batch index), so results do not
    depend on what ran before. backend: 'auto'/'hf' = plain `generate`; 'compiled' = static
    KV cache with compiled decoding (GPU).
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos = eos_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[list[int]] | None] = [None] * len(prompts)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    use_static = backend == "compiled" or (backend == "auto" and device.type == "cuda")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", leave=False)
    was_training = model.training
    model.eval()
    try:
        with merged_lora(model, merge_lora):
            for b, idx in enumerate(batches):
                ids_BP, mask_BP = left_pad([prompts[i] for i in idx], pad_id, device)
                torch.manual_seed(seed + b)
                kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                              pad_token_id=pad_id, eos_token_id=sorted(eos) or None)
                if temperature > 0:
                    kwargs.update(do_sample=True, temperature=temperature, top_p=top_p,
                                  top_k=top_k if top_k > 0 else None)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if use_static:
                    kwargs["cache_implementation"] = "static"
                out = model.generate(input_ids=ids_BP, attention_mask=mask_BP, **kwargs)
                new_BN = out[:, ids_BP.shape[1]:].tolist()
                for k, i in enumerate(idx):
                    rows = new_BN[k * num_samples:(k + 1) * num_samples]
                    results[i] = [cut_after_eos(r, eos) for r in rows]
                if bar:
                    bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar:
            bar.close()
    return results  # type: ignore[return-value]
