"""Token-level self-distillation losses and DPSW token weights (paper Eq. 5-8).

Pure functions of tensors: no model, config or distributed code. Shape letters used in names:

    B  batch (responses)
    T  response tokens
    V  vocabulary
    K  teacher top-K tokens (DPSW)

Conventions
- Inputs are raw logits at temperature 1 (or log-probs for the divergence functions).
- All maths runs in float32; bfloat16/float16 inputs are upcast. float64 inputs stay float64
  (the precision is "at least float32"), which the float64 references and gradchecks rely on.
- Gradients flow through the student only: teacher logits are detached inside.
- `mask_BT` marks response tokens (nonzero = counted); padding and prompt tokens are 0.
- Rows are averaged over all B rows: an all-masked row contributes exactly 0 to the loss (it is
  not dropped from the count), so the gradient scale does not depend on which rows are empty.
  `msd.chunked` reduces the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Added to the per-row weight total before normalising (paper Eq. 8 has none) [ours].
WEIGHT_EPS = 1e-8


@dataclass
class LossOutput:
    """The loss and the per-token values behind it (for logging and token reports)."""

    loss: torch.Tensor  # () scalar, carries the student's gradient
    div_BT: torch.Tensor  # (B, T) per-token divergence D_t, detached; 0 on masked tokens
    w_BT: torch.Tensor  # (B, T) normalised token weights w~_t, detached; 0 on masked tokens
    mask_BT: torch.Tensor  # (B, T) the mask used
    w_raw_BT: torch.Tensor | None = None  # (B, T) unnormalised weights w_t (Eq. 6-7), detached


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def log_probs(logits_BTV: torch.Tensor) -> torch.Tensor:
    """log_softmax over V in (at least) float32."""
    return torch.log_softmax(logits_BTV.to(_compute_dtype(logits_BTV)), dim=-1)


# ----------------------------------------------------------------------------- divergences

def kl_student_teacher(logp_s_BTV: torch.Tensor, logp_t_BTV: torch.Tensor) -> torch.Tensor:
    """Reverse KL, KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)); (B, T, V) -> (B, T).

    The paper's default token divergence D_t (Eq. 5), over the full vocabulary.
    """
    return (logp_s_BTV.exp() * (logp_s_BTV - logp_t_BTV)).sum(-1)


def kl_teacher_student(logp_s_BTV: torch.Tensor, logp_t_BTV: torch.Tensor) -> torch.Tensor:
    """Forward KL, KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)); (B, T, V) -> (B, T).

    The paper's ablation of D in Eq. 5 (worse than reverse KL there).
    """
    return (logp_t_BTV.exp() * (logp_t_BTV - logp_s_BTV)).sum(-1)


def jsd(logp_s_BTV: torch.Tensor, logp_t_BTV: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence; (B, T, V) -> (B, T).

        M   = beta * p_T + (1 - beta) * p_S
        JSD = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)

    The paper's ablation of D in Eq. 5 uses beta = 0.5. beta is the teacher's share of M; at
    beta in {0, 1} the divergence is 0. log M is taken with logsumexp, never log of a sum.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    log_beta = torch.tensor(beta, dtype=logp_s_BTV.dtype, device=logp_s_BTV.device).log()
    log_rest = torch.tensor(1.0 - beta, dtype=logp_s_BTV.dtype, device=logp_s_BTV.device).log()
    logm_BTV = torch.logaddexp(logp_t_BTV + log_beta, logp_s_BTV + log_rest)
    kl_t_m = (logp_t_BTV.exp() * (logp_t_BTV - logm_BTV)).sum(-1)
    kl_s_m = (logp_s_BTV.exp() * (logp_s_BTV - logm_BTV)).sum(-1)
    return beta * kl_t_m + (1.0 - beta) * kl_s_m


def tvd(logp_s_BTV: torch.Tensor, logp_t_BTV: torch.Tensor) -> torch.Tensor:
    """Total variation distance, 1/2 sum_v |p_S(v) - p_T(v)|; (B, T, V) -> (B, T). [ours]"""
    return 0.5 * (logp_s_BTV.exp() - logp_t_BTV.exp()).abs().sum(-1)


AKL_HEAD_MASS = 0.5


def akl(logp_s_BTV: torch.Tensor, logp_t_BTV: torch.Tensor) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models"); (B, T, V) -> (B, T). Not in the MSD paper [ours].

        AKL = g_head * KL(p_T || p_S) + g_tail * KL(p_S || p_T)

    Choices [ours]: the vocabulary is sorted by teacher probability; the head is the shortest
    prefix whose teacher mass reaches 0.5 (so it includes the token that crosses 0.5), the tail
    is the rest. gap_head / gap_tail = sum of |p_T - p_S| over head / tail,
    g_head = gap_head / (gap_head + gap_tail), g_tail = 1 - g_head. The gates are detached.
    When p_S = p_T exactly (no gap anywhere) g_head = 0; both KLs are 0 then anyway.
    """
    g_head_BT = akl_gate(logp_s_BTV, logp_t_BTV)
    fkl_BT = kl_teacher_student(logp_s_BTV, logp_t_BTV)
    rkl_BT = kl_student_teacher(logp_s_BTV, logp_t_BTV)
    return g_head_BT * fkl_BT + (1.0 - g_head_BT) * rkl_BT


@torch.no_grad()
def akl_gate(logp_s_BTV: torch.Tensor, logp_t_BTV: torch.Tensor) -> torch.Tensor:
    """AKL's head gate g_head (see `akl`), detached; (B, T, V) -> (B, T)."""
    p_t_BTV = logp_t_BTV.exp()
    sorted_t_BTV, order_BTV = p_t_BTV.sort(dim=-1, descending=True)
    mass_before_BTV = sorted_t_BTV.cumsum(-1) - sorted_t_BTV
    head_BTV = mass_before_BTV < AKL_HEAD_MASS
    gap_BTV = (sorted_t_BTV - logp_s_BTV.exp().gather(-1, order_BTV)).abs()
    gap_head_BT = (gap_BTV * head_BTV).sum(-1)
    gap_all_BT = gap_BTV.sum(-1)
    return gap_head_BT / gap_all_BT.clamp_min(torch.finfo(gap_all_BT.dtype).tiny)


DIVERGENCES = {
    "rkl": kl_student_teacher,
    "fkl": kl_teacher_student,
    "jsd": jsd,
    "tvd": tvd,
    "akl": akl,
}

WEIGHTINGS = ("dpsw", "uniform", "teacher_only", "student_only", "dpsw_fullvocab")


def check_options(kind: str = "rkl", weighting: str = "dpsw") -> None:
    """Raise ValueError, listing the choices, for an unknown divergence or weighting."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choices: {', '.join(DIVERGENCES)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choices: {', '.join(WEIGHTINGS)}")


def divergence_from_log_probs(logp_s_BTV, logp_t_BTV, kind: str = "rkl", beta: float = 0.5):
    """D_t from log-probs through the `DIVERGENCES` registry; (B, T, V) -> (B, T)."""
    check_options(kind=kind)
    if kind == "jsd":
        return jsd(logp_s_BTV, logp_t_BTV, beta=beta)
    return DIVERGENCES[kind](logp_s_BTV, logp_t_BTV)


def token_divergence(student_logits_BTV, teacher_logits_BTV, kind: str = "rkl", beta: float = 0.5):
    """Per-token divergence D_t from raw logits (teacher detached); (B, T, V) -> (B, T)."""
    return divergence_from_log_probs(
        log_probs(student_logits_BTV), log_probs(teacher_logits_BTV.detach()), kind, beta
    )


# ----------------------------------------------------------------------------- DPSW weights

def _confidence(logp_BTK: torch.Tensor) -> torch.Tensor:
    """1 - H(softmax(logp)) / log K over the last axis; (B, T, K) -> (B, T) in [0, 1]."""
    k = logp_BTK.shape[-1]
    if k == 1:  # a single token is fully confident; log 1 = 0 would divide by zero
        return torch.ones(logp_BTK.shape[:-1], dtype=logp_BTK.dtype, device=logp_BTK.device)
    entropy_BT = torch.special.entr(torch.softmax(logp_BTK, dim=-1)).sum(-1)
    # Rounding can put H a hair above log K for a flat distribution.
    return (1.0 - entropy_BT / math.log(k)).clamp_min(0.0)


@torch.no_grad()
def raw_token_weights(logp_s_BTV, logp_t_BTV, mask_BT, weighting: str = "dpsw", top_k: int = 32):
    """Unnormalised token weights w_t (paper Eq. 6-7), 0 on masked tokens; (B, T).

    teacher term  w^T_t = 1 - H(p_bar) / log K, p_bar = teacher top-K probs renormalised (Eq. 6)
                  (dpsw_fullvocab: entropy of the full p_T over log |V| [ours, ablation])
    student term  w^S_t = 1 - p_S(argmax_v p_T(v))                                     (Eq. 7)
    dpsw: w^T * w^S; teacher_only: w^T; student_only: w^S; uniform: 1.
    """
    check_options(weighting=weighting)
    mask_BT = mask_BT.bool()
    dtype = logp_s_BTV.dtype
    w_BT = torch.ones(mask_BT.shape, dtype=dtype, device=logp_s_BTV.device)
    if weighting in ("dpsw", "teacher_only"):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        top_logp_BTK = logp_t_BTV.topk(min(top_k, logp_t_BTV.shape[-1]), dim=-1).values
        w_BT = w_BT * _confidence(top_logp_BTK)
    if weighting == "dpsw_fullvocab":
        w_BT = w_BT * _confidence(logp_t_BTV)
    if weighting in ("dpsw", "student_only", "dpsw_fullvocab"):
        top1_BT1 = logp_t_BTV.argmax(-1, keepdim=True)
        w_BT = w_BT * (1.0 - logp_s_BTV.gather(-1, top1_BT1).squeeze(-1).exp())
    return torch.where(mask_BT, w_BT, torch.zeros((), dtype=dtype, device=w_BT.device))


def row_lengths(mask_BT: torch.Tensor) -> torch.Tensor:
    """L_y per row, clamped to >= 1 so an all-masked row divides 0 by 1; (B, T) -> (B,)."""
    return mask_BT.bool().sum(-1).clamp_min(1)


def weight_totals(w_raw_BT: torch.Tensor, mask_BT: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-row denominator of the weight normalisation; (B, T) -> (B,).

    sum_j w_j + eps for weighted schemes (Eq. 8), L_y for uniform (so uniform w~ is exactly 1).
    """
    if weighting == "uniform":
        return row_lengths(mask_BT).to(w_raw_BT.dtype)
    return w_raw_BT.sum(-1) + WEIGHT_EPS


def normalise_weights(w_raw_BT: torch.Tensor, totals_B: torch.Tensor, mask_BT: torch.Tensor):
    """w~_t = L_y * w_t / totals (Eq. 8): mean 1 over unmasked tokens, 0 on masked; (B, T)."""
    n_B = mask_BT.bool().sum(-1).to(w_raw_BT.dtype)
    return n_B[:, None] * w_raw_BT / totals_B[:, None]


def _weights_from_log_probs(logp_s_BTV, logp_t_BTV, mask_BT, weighting, top_k):
    w_raw_BT = raw_token_weights(logp_s_BTV, logp_t_BTV, mask_BT, weighting, top_k)
    return normalise_weights(w_raw_BT, weight_totals(w_raw_BT, mask_BT, weighting), mask_BT)


def dpsw_weights(student_logits_BTV, teacher_logits_BTV, mask_BT, top_k: int = 32, variant: str = "dpsw"):
    """Normalised DPSW weights w~_t (paper Eq. 6-8), detached; (B, T, V) -> (B, T).

    variant: dpsw, teacher_only, student_only or dpsw_fullvocab (see `raw_token_weights`).
    Per row the weights average 1 over unmasked tokens; masked tokens get exactly 0 and an
    all-masked row is all zeros. top_k > V uses V.
    """
    if variant == "uniform":
        raise ValueError("dpsw_weights: use token_weights(..., weighting='uniform') for uniform")
    return token_weights(student_logits_BTV, teacher_logits_BTV, mask_BT, variant, top_k)


@torch.no_grad()
def token_weights(student_logits_BTV, teacher_logits_BTV, mask_BT, weighting: str = "dpsw", top_k: int = 32):
    """w~_t for any weighting: uniform gives the mask as float, else the DPSW variant; (B, T)."""
    logp_s_BTV, logp_t_BTV = log_probs(student_logits_BTV), log_probs(teacher_logits_BTV)
    return _weights_from_log_probs(logp_s_BTV, logp_t_BTV, mask_BT, weighting, top_k)


# ----------------------------------------------------------------------------- reduction

def masked_row_sum(values_BT: torch.Tensor, weights_BT: torch.Tensor, mask_BT: torch.Tensor):
    """sum_t w_t * D_t over unmasked tokens; (B, T) -> (B,). Masked entries are selected away
    (not multiplied by 0) so a non-finite value on a padding position cannot leak in."""
    terms_BT = torch.where(mask_BT.bool(), weights_BT * values_BT, torch.zeros_like(values_BT))
    return terms_BT.sum(-1)


def masked_row_mean(values_BT: torch.Tensor, weights_BT: torch.Tensor, mask_BT: torch.Tensor):
    """The loss reduction of Eq. 5/8: mean over the B rows of sum_t w_t D_t / L_y; -> ().

    An all-masked row contributes 0 and stays in the graph.
    """
    row_B = masked_row_sum(values_BT, weights_BT, mask_BT) / row_lengths(mask_BT)
    return row_B.mean()


# ----------------------------------------------------------------------------- the MSD loss

def msd_loss_with_stats(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    kind: str = "rkl",
    weighting: str = "dpsw",
    top_k: int = 32,
    beta: float = 0.5,
) -> LossOutput:
    """The MSD objective (Eq. 8) on full logits; (B, T, V) -> LossOutput.

    loss = mean_b [ sum_t w~_t D_t / L_y ], D = `kind` divergence, w~ = `weighting` weights
    (uniform: w~ = 1, Eq. 5). Only the student logits receive gradient.
    """
    check_options(kind, weighting)
    logp_s_BTV = log_probs(student_logits_BTV)
    logp_t_BTV = log_probs(teacher_logits_BTV.detach())
    div_BT = divergence_from_log_probs(logp_s_BTV, logp_t_BTV, kind, beta)
    w_raw_BT = raw_token_weights(logp_s_BTV, logp_t_BTV, mask_BT, weighting, top_k)
    w_BT = normalise_weights(w_raw_BT, weight_totals(w_raw_BT, mask_BT, weighting), mask_BT)
    loss = masked_row_mean(div_BT, w_BT, mask_BT)
    div_BT = torch.where(mask_BT.bool(), div_BT.detach(), torch.zeros((), dtype=div_BT.dtype))
    return LossOutput(loss=loss, div_BT=div_BT, w_BT=w_BT, mask_BT=mask_BT, w_raw_BT=w_raw_BT)


def msd_loss(student_logits_BTV, teacher_logits_BTV, mask_BT, kind="rkl", weighting="dpsw", top_k=32, beta=0.5):
    """Scalar MSD loss; see `msd_loss_with_stats`."""
    return msd_loss_with_stats(
        student_logits_BTV, teacher_logits_BTV, mask_BT, kind, weighting, top_k, beta
    ).loss
