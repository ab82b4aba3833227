"""Token-level self-distillation losses and DPSW token weights (paper Eq. 5-8).

Pure functions of tensors: no model, config or distributed code. Shape letters used in names:

    B  batch (responses)
    T  response tokens
    V  vocabulary
    K  teacher top-K tokens (DPSW)

What the loss computes is a `LossSpec`: a divergence from `DIVERGENCES` (msd.divergences), a
token weighting from `WEIGHTINGS`, and their parameters. Adding either is one `register` call.

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
from dataclasses import dataclass, fields
from typing import Callable

import torch

from msd.divergences import DIVERGENCES, Divergence  # noqa: F401  (the loss's registries live here)
from msd.errors import MsdError
from msd.registry import Registry

# Added to the per-row weight total before normalising (paper Eq. 8 has none) [ours].
WEIGHT_EPS = 1e-8


@dataclass(frozen=True)
class LossSpec:
    """What the MSD loss computes: divergence and weighting names (registry keys) and the
    parameters their entries take by field name (top_k: DPSW's teacher top-K; beta: jsd's
    teacher share; logit_scale and softcap: what the model does to its output head's logits,
    z = softcap tanh(logit_scale x / softcap), applied by the chunked loss; see
    `msd.families.LogitTransform`; 1 and None = nothing)."""

    divergence: str = "rkl"
    weighting: str = "dpsw"
    top_k: int = 32
    beta: float = 0.5
    softcap: float | None = None
    logit_scale: float = 1.0

    @classmethod
    def of(cls, section) -> "LossSpec":
        """The spec from a config section's attributes of the same names (missing: default)."""
        names = [f.name for f in fields(cls) if hasattr(section, f.name)]
        return cls(**{name: getattr(section, name) for name in names})


@dataclass
class LossOutput:
    """The loss and the per-token values behind it (for logging and token reports)."""

    loss: torch.Tensor  # () scalar, carries the student's gradient
    div_BT: torch.Tensor  # (B, T) per-token divergence D_t, detached; 0 on masked tokens
    w_BT: torch.Tensor  # (B, T) normalised token weights w~_t, detached; 0 on masked tokens
    mask_BT: torch.Tensor  # (B, T) the mask used
    w_raw_BT: torch.Tensor | None = None  # (B, T) unnormalised weights w_t (Eq. 6-7), detached


@dataclass(frozen=True)
class Weighting:
    """A registered token weighting: unnormalised weights w_t >= 0, normalised per response by
    `weight_totals` (Eq. 8)."""

    raw: Callable[..., torch.Tensor]  # (logp_s (..., V), logp_t (..., V), **params) -> w (...)
    params: tuple[str, ...] = ()  # names of the `LossSpec` fields passed as keywords
    unit: bool = False  # w = 1 on every token: the row total is L_y itself, no eps, so w~ = 1

    def options(self, spec: LossSpec) -> dict:
        return {name: getattr(spec, name) for name in self.params}


WEIGHTINGS: Registry[Weighting] = Registry("weighting", where="loss.weighting")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def log_probs(logits_BTV: torch.Tensor) -> torch.Tensor:
    """log_softmax over V in (at least) float32."""
    return torch.log_softmax(logits_BTV.to(_compute_dtype(logits_BTV)), dim=-1)


def check_jsd_beta(loss, where: str = "loss.beta") -> None:
    """MsdError unless jsd's beta lies strictly inside (0, 1) (`loss`: a LossConfig or LossSpec).
    At 0 or 1 the mixture is one of the two distributions and jsd is identically 0, so it would
    train nothing; TRL users read those ends as forward / reverse KL."""
    if loss.divergence == "jsd" and not 0.0 < loss.beta < 1.0:
        raise MsdError(f"loss.beta must lie strictly between 0 and 1 for jsd, got {loss.beta}; for "
                       "the ends use loss.divergence=fkl (KL(teacher||student)) or rkl "
                       "(KL(student||teacher))", where)


def check_options(spec: LossSpec) -> None:
    """Raise ValueError, listing the choices, for an unknown divergence or weighting."""
    for name, registry in ((spec.divergence, DIVERGENCES), (spec.weighting, WEIGHTINGS)):
        if name not in registry:
            raise ValueError(f"unknown {registry.kind} {name!r}; choices: {', '.join(registry)}")


# ----------------------------------------------------------------------------- divergences

def divergence_from_log_probs(logp_s_BTV, logp_t_BTV, spec: LossSpec):
    """D_t from log-probs through the `DIVERGENCES` registry; (B, T, V) -> (B, T)."""
    check_options(spec)
    entry = DIVERGENCES.get(spec.divergence)
    return entry.value(logp_s_BTV, logp_t_BTV, **entry.options(spec))


def token_divergence(student_logits_BTV, teacher_logits_BTV, spec: LossSpec):
    """Per-token divergence D_t from raw logits (teacher detached); (B, T, V) -> (B, T)."""
    return divergence_from_log_probs(
        log_probs(student_logits_BTV), log_probs(teacher_logits_BTV.detach()), spec
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


def teacher_confidence(logp_t_BTV: torch.Tensor, top_k: int = 32) -> torch.Tensor:
    """w^T_t = 1 - H(p_bar) / log K, p_bar = the teacher's top-K probs renormalised (Eq. 6)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return _confidence(logp_t_BTV.topk(min(top_k, logp_t_BTV.shape[-1]), dim=-1).values)


def student_doubt(logp_s_BTV: torch.Tensor, logp_t_BTV: torch.Tensor) -> torch.Tensor:
    """w^S_t = 1 - p_S(argmax_v p_T(v)) (Eq. 7)."""
    top1_BT1 = logp_t_BTV.argmax(-1, keepdim=True)
    return 1.0 - logp_s_BTV.gather(-1, top1_BT1).squeeze(-1).exp()


def _dpsw(logp_s_BTV, logp_t_BTV, top_k: int = 32):
    return teacher_confidence(logp_t_BTV, top_k) * student_doubt(logp_s_BTV, logp_t_BTV)


def _uniform(logp_s_BTV, logp_t_BTV):
    return torch.ones(logp_s_BTV.shape[:-1], dtype=logp_s_BTV.dtype, device=logp_s_BTV.device)


def _teacher_only(logp_s_BTV, logp_t_BTV, top_k: int = 32):
    return teacher_confidence(logp_t_BTV, top_k)


def _dpsw_fullvocab(logp_s_BTV, logp_t_BTV):
    """The teacher term over the full p_T, over log |V| [ours, ablation]."""
    return _confidence(logp_t_BTV) * student_doubt(logp_s_BTV, logp_t_BTV)


WEIGHTINGS.register("dpsw", Weighting(_dpsw, params=("top_k",)))
WEIGHTINGS.register("uniform", Weighting(_uniform, unit=True))
WEIGHTINGS.register("teacher_only", Weighting(_teacher_only, params=("top_k",)))
WEIGHTINGS.register("student_only", Weighting(student_doubt))
WEIGHTINGS.register("dpsw_fullvocab", Weighting(_dpsw_fullvocab))


@torch.no_grad()
def raw_token_weights(logp_s_BTV, logp_t_BTV, mask_BT, spec: LossSpec):
    """Unnormalised token weights w_t (paper Eq. 6-7) of `spec.weighting`, 0 on masked tokens;
    (B, T). dpsw: w^T * w^S; teacher_only: w^T; student_only: w^S; uniform: 1."""
    check_options(spec)
    entry = WEIGHTINGS.get(spec.weighting)
    w_BT = entry.raw(logp_s_BTV, logp_t_BTV, **entry.options(spec))
    return torch.where(mask_BT.bool(), w_BT, torch.zeros((), dtype=w_BT.dtype, device=w_BT.device))


def row_lengths(mask_BT: torch.Tensor) -> torch.Tensor:
    """L_y per row, clamped to >= 1 so an all-masked row divides 0 by 1; (B, T) -> (B,)."""
    return mask_BT.bool().sum(-1).clamp_min(1)


def weight_totals(w_sum_R: torch.Tensor, weighting: str) -> torch.Tensor:
    """W, the per-response denominator of the weight normalisation (Eq. 8), from the sums of
    the raw weights over each response's tokens; (R,) -> (R,). Every loss path uses this.

    sum_j w_j + eps for weighted schemes; for unit weights (uniform) the sum is L_y, clamped to
    >= 1 for an empty row, with no eps, so uniform w~ is exactly 1.
    """
    if WEIGHTINGS.get(weighting).unit:
        return w_sum_R.clamp_min(1)
    return w_sum_R + WEIGHT_EPS


def normalise_weights(w_raw_BT: torch.Tensor, totals_B: torch.Tensor, mask_BT: torch.Tensor):
    """w~_t = L_y * w_t / totals (Eq. 8): mean 1 over unmasked tokens, 0 on masked; (B, T)."""
    n_B = mask_BT.bool().sum(-1).to(w_raw_BT.dtype)
    return n_B[:, None] * w_raw_BT / totals_B[:, None]


@torch.no_grad()
def token_weights(student_logits_BTV, teacher_logits_BTV, mask_BT, spec: LossSpec):
    """Normalised weights w~_t (paper Eq. 6-8) of `spec.weighting`, detached; (B, T, V) -> (B, T).

    Per row the weights average 1 over unmasked tokens; masked tokens get exactly 0 and an
    all-masked row is all zeros; uniform gives the mask as float. top_k > V uses V.
    """
    logp_s_BTV, logp_t_BTV = log_probs(student_logits_BTV), log_probs(teacher_logits_BTV)
    w_raw_BT = raw_token_weights(logp_s_BTV, logp_t_BTV, mask_BT, spec)
    return normalise_weights(w_raw_BT, weight_totals(w_raw_BT.sum(-1), spec.weighting), mask_BT)


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
    spec: LossSpec = LossSpec(),
) -> LossOutput:
    """The MSD objective (Eq. 8) on full logits; (B, T, V) -> LossOutput.

    loss = mean_b [ sum_t w~_t D_t / L_y ], D = the spec's divergence, w~ = its weighting's
    normalised weights (uniform: w~ = 1, Eq. 5). Only the student logits receive gradient.
    `spec.softcap` is not applied here: the logits are taken as the model gives them.
    """
    check_options(spec)
    logp_s_BTV = log_probs(student_logits_BTV)
    logp_t_BTV = log_probs(teacher_logits_BTV.detach())
    div_BT = divergence_from_log_probs(logp_s_BTV, logp_t_BTV, spec)
    w_raw_BT = raw_token_weights(logp_s_BTV, logp_t_BTV, mask_BT, spec)
    w_BT = normalise_weights(w_raw_BT, weight_totals(w_raw_BT.sum(-1), spec.weighting), mask_BT)
    loss = masked_row_mean(div_BT, w_BT, mask_BT)
    div_BT = torch.where(mask_BT.bool(), div_BT.detach(), torch.zeros((), dtype=div_BT.dtype))
    return LossOutput(loss=loss, div_BT=div_BT, w_BT=w_BT, mask_BT=mask_BT, w_raw_BT=w_raw_BT)


def msd_loss(student_logits_BTV, teacher_logits_BTV, mask_BT, spec: LossSpec = LossSpec()):
    """Scalar MSD loss; see `msd_loss_with_stats`."""
    return msd_loss_with_stats(student_logits_BTV, teacher_logits_BTV, mask_BT, spec).loss
