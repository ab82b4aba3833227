"""Left padding of token-id lists into batch tensors (rollout prompts and scoring inputs)."""

from __future__ import annotations

import torch


def left_pad(seqs: list[list[int]], pad_id: int, device=None, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and mask, each row right-aligned at column P (default: the longest row)."""
    width = max(width or 0, max((len(s) for s in seqs), default=0))
    ids_BP = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids_BP[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask_BP[i, width - len(s):] = 1
    return ids_BP.to(device), mask_BP.to(device)
