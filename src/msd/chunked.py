"""The MSD loss computed from hidden states in chunks of response tokens.

The plain loss needs the student's and the teacher's (B, T, V) logits at once, plus the
autograd buffers of the student's; with a 150k vocabulary that is several GB per tensor. Here
both heads run on C tokens at a time and each chunk is wrapped in a non-reentrant activation
checkpoint, so its (B, C, V) buffers are freed after the forward and rebuilt, one chunk at a
time, in the backward. The cost is one extra head forward per model and chunk.

Shape letters: B batch, T response tokens, C tokens per chunk, H hidden size, V vocabulary.

Why the chunks can be reduced independently: with unnormalised weights w_t,

    sum_t w~_t D_t / L_y = sum_t w_t D_t / W,   W = sum_j w_j + eps  (uniform: w = 1, W = L_y)

so each chunk adds its part of the numerator (with gradient) and of W (weights carry no
gradient). The result equals `losses.msd_loss_with_stats` on the full logits.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from msd import losses
from msd.losses import LossOutput

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden (B, C, H) -> logits (B, C, V)


def _chunk_terms(student_head: Head, teacher_head: Head, kind, weighting, top_k, beta):
    """The per-chunk function: (h_s_BCH, h_t_BCH, mask_BC) -> (num_B, div_BC, w_raw_BC)."""

    def terms(h_s_BCH, h_t_BCH, mask_BC):
        logp_s_BCV = losses.log_probs(student_head(h_s_BCH))
        with torch.no_grad():
            logp_t_BCV = losses.log_probs(teacher_head(h_t_BCH))
        div_BC = losses.divergence_from_log_probs(logp_s_BCV, logp_t_BCV, kind, beta)
        w_raw_BC = losses.raw_token_weights(logp_s_BCV, logp_t_BCV, mask_BC, weighting, top_k)
        num_B = losses.masked_row_sum(div_BC, w_raw_BC, mask_BC)
        return num_B, div_BC.detach(), w_raw_BC

    return terms


def chunked_msd_loss(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    mask_BT: torch.Tensor,
    *,
    kind: str = "rkl",
    weighting: str = "dpsw",
    top_k: int = 32,
    beta: float = 0.5,
    chunk_size: int = 128,
) -> LossOutput:
    """MSD loss (paper Eq. 8) from final hidden states, C = chunk_size response tokens at a time.

    student_head / teacher_head map hidden (B, C, H) to logits (B, C, V), e.g. the model's
    `lm_head`; the student head may hold trainable weights (they get gradient). The teacher
    runs without gradient. chunk_size <= 0 computes the full logits and calls
    `losses.msd_loss_with_stats`. Value, gradients and stats equal the plain loss.
    """
    teacher_hidden_BTH = teacher_hidden_BTH.detach()
    if chunk_size <= 0 or student_hidden_BTH.shape[1] == 0:
        with torch.no_grad():
            teacher_logits_BTV = teacher_head(teacher_hidden_BTH)
        return losses.msd_loss_with_stats(
            student_head(student_hidden_BTH), teacher_logits_BTV, mask_BT, kind, weighting, top_k, beta
        )
    losses.check_options(kind, weighting)  # fail before any head runs

    terms = _chunk_terms(student_head, teacher_head, kind, weighting, top_k, beta)
    num_B, div_parts, w_parts = 0.0, [], []
    for start in range(0, student_hidden_BTH.shape[1], chunk_size):
        span = slice(start, start + chunk_size)
        num_chunk_B, div_BC, w_raw_BC = checkpoint(
            terms,
            student_hidden_BTH[:, span].contiguous(),  # a strided slice sends the head matmul to slow bmm
            teacher_hidden_BTH[:, span].contiguous(),
            mask_BT[:, span],
            use_reentrant=False,
        )
        num_B = num_B + num_chunk_B
        div_parts.append(div_BC)
        w_parts.append(w_raw_BC)

    w_raw_BT = torch.cat(w_parts, dim=1)
    totals_B = losses.weight_totals(w_raw_BT, mask_BT, weighting)
    loss = (num_B / totals_B).mean()  # mean over all B rows, as losses.masked_row_mean
    return LossOutput(
        loss=loss,
        div_BT=torch.cat(div_parts, dim=1),
        w_BT=losses.normalise_weights(w_raw_BT, totals_B, mask_BT),
        mask_BT=mask_BT,
        w_raw_BT=w_raw_BT,
    )
