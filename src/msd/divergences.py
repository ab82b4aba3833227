"""Token divergences D_t (paper Eq. 5) and the `DIVERGENCES` registry.

A divergence maps the student's and the teacher's log-probs (..., V) to one value per token
(...). Inputs are log-probs in (at least) float32; the teacher's carry no gradient.

An entry (`Divergence`) is the value function plus, optionally, its gradient with respect to
the student's logits in closed form, which the fused chunked loss (`msd.chunked`) uses instead
of autograd. A divergence registered with its value alone works everywhere: the chunked loss
then takes its checkpointed autograd path. Parameters (jsd's beta) are `LossSpec` fields that
the entry names in `params`; they reach the value and gradient functions as keywords.

Closed-form gradients of D_t with respect to the student's logits z (p = p_S, q = p_T,
l = log p):

    rkl  KL(p||q)        p * (l_p - l_q - D)
    fkl  KL(q||p)        p - q
    jsd  (beta, M)       p * (a - sum_v p a),   a = (1 - beta) (l_p - log M)
    tvd  1/2 |p - q|_1   p * (a - sum_v p a),   a = 1/2 sign(p - q)
    akl  g KL(q||p) + (1 - g) KL(p||q) with the detached gate g: the same mix of the two above

Shape letters: C tokens (a chunk, or any leading shape), V vocabulary, R rows per row block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from msd.registry import Registry

Tensor = torch.Tensor


@dataclass(frozen=True)
class Divergence:
    """A registered token divergence."""

    # (logp_s (..., V), logp_t (..., V), **params) -> D (...)
    value: Callable[..., Tensor]
    # (logp_s (C, V), logp_t (C, V), **params) -> (D (C,), dD/dz_s (C, V)); leaves its inputs alone
    grad: Callable[..., tuple[Tensor, Tensor]] | None = None
    # (logp_s (C, V), logp_t (C, V), rows (2, R, V), with_grad) -> (D (C,), dD/dz_s (C, V) or
    # None): the gradient with no (C, V) temporary, overwriting its inputs (`chunk_kernels`)
    grad_in_place: Callable[..., tuple[Tensor, Tensor | None]] | None = None
    params: tuple[str, ...] = ()  # names of the `LossSpec` fields passed as keywords

    def options(self, spec) -> dict:
        """The keyword arguments this divergence takes from a `LossSpec`."""
        return {name: getattr(spec, name) for name in self.params}


DIVERGENCES: Registry[Divergence] = Registry("divergence", where="loss.divergence")


# ----------------------------------------------------------------------------- values

def kl_student_teacher(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """Reverse KL, KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)); (B, T, V) -> (B, T).

    The paper's default token divergence D_t (Eq. 5), over the full vocabulary.
    """
    return (logp_s_BTV.exp() * (logp_s_BTV - logp_t_BTV)).sum(-1)


def kl_teacher_student(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """Forward KL, KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)); (B, T, V) -> (B, T).

    The paper's ablation of D in Eq. 5 (worse than reverse KL there).
    """
    return (logp_t_BTV.exp() * (logp_t_BTV - logp_s_BTV)).sum(-1)


def _log_mixture(logp_s_BTV: Tensor, logp_t_BTV: Tensor, beta: float) -> Tensor:
    """log M, M = beta * p_T + (1 - beta) * p_S, with logaddexp (never log of a sum)."""
    log_beta = torch.tensor(beta, dtype=logp_s_BTV.dtype, device=logp_s_BTV.device).log()
    log_rest = torch.tensor(1.0 - beta, dtype=logp_s_BTV.dtype, device=logp_s_BTV.device).log()
    return torch.logaddexp(logp_t_BTV + log_beta, logp_s_BTV + log_rest)


def jsd(logp_s_BTV: Tensor, logp_t_BTV: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence; (B, T, V) -> (B, T).

        M   = beta * p_T + (1 - beta) * p_S
        JSD = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)

    The paper's ablation of D in Eq. 5 uses beta = 0.5. beta is the teacher's share of M; at
    beta in {0, 1} the divergence is 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    logm_BTV = _log_mixture(logp_s_BTV, logp_t_BTV, beta)
    kl_t_m = (logp_t_BTV.exp() * (logp_t_BTV - logm_BTV)).sum(-1)
    kl_s_m = (logp_s_BTV.exp() * (logp_s_BTV - logm_BTV)).sum(-1)
    return beta * kl_t_m + (1.0 - beta) * kl_s_m


def tvd(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """Total variation distance, 1/2 sum_v |p_S(v) - p_T(v)|; (B, T, V) -> (B, T). [ours]"""
    return 0.5 * (logp_s_BTV.exp() - logp_t_BTV.exp()).abs().sum(-1)


AKL_HEAD_MASS = 0.5


def akl(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
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
def akl_gate(logp_s_BTV: Tensor, logp_t_BTV: Tensor) -> Tensor:
    """AKL's head gate g_head (see `akl`), detached; (B, T, V) -> (B, T)."""
    p_t_BTV = logp_t_BTV.exp()
    sorted_t_BTV, order_BTV = p_t_BTV.sort(dim=-1, descending=True)
    mass_before_BTV = sorted_t_BTV.cumsum(-1) - sorted_t_BTV
    head_BTV = mass_before_BTV < AKL_HEAD_MASS
    gap_BTV = (sorted_t_BTV - logp_s_BTV.exp().gather(-1, order_BTV)).abs()
    gap_head_BT = (gap_BTV * head_BTV).sum(-1)
    gap_all_BT = gap_BTV.sum(-1)
    return gap_head_BT / gap_all_BT.clamp_min(torch.finfo(gap_all_BT.dtype).tiny)


# ----------------------------------------------------------------------------- gradients

def _softmax_backward(p_CV: Tensor, a_CV: Tensor) -> Tensor:
    """p * (a - sum_v p a): the gradient wrt logits of a function whose gradient wrt p is a.
    Overwrites a_CV."""
    return a_CV.sub_((p_CV * a_CV).sum(-1, keepdim=True)).mul_(p_CV)


def rkl_grad(logp_s_CV: Tensor, logp_t_CV: Tensor) -> tuple[Tensor, Tensor]:
    p_s_CV = logp_s_CV.exp()
    diff_CV = logp_s_CV - logp_t_CV
    div_C = (p_s_CV * diff_CV).sum(-1)
    return div_C, diff_CV.sub_(div_C[:, None]).mul_(p_s_CV)


def fkl_grad(logp_s_CV: Tensor, logp_t_CV: Tensor) -> tuple[Tensor, Tensor]:
    div_C = kl_teacher_student(logp_s_CV, logp_t_CV)
    return div_C, logp_s_CV.exp().sub_(logp_t_CV.exp())


def jsd_grad(logp_s_CV: Tensor, logp_t_CV: Tensor, beta: float = 0.5) -> tuple[Tensor, Tensor]:
    div_C = jsd(logp_s_CV, logp_t_CV, beta)
    p_s_CV = logp_s_CV.exp()
    if beta >= 1.0:  # M = p_T: the divergence is 0 whatever p_S is
        return div_C, torch.zeros_like(p_s_CV)
    a_CV = (logp_s_CV - _log_mixture(logp_s_CV, logp_t_CV, beta)).mul_(1.0 - beta)
    return div_C, _softmax_backward(p_s_CV, a_CV)


def tvd_grad(logp_s_CV: Tensor, logp_t_CV: Tensor) -> tuple[Tensor, Tensor]:
    div_C = tvd(logp_s_CV, logp_t_CV)
    p_s_CV = logp_s_CV.exp()
    a_CV = (p_s_CV - logp_t_CV.exp()).sign_().mul_(0.5)
    return div_C, _softmax_backward(p_s_CV, a_CV)


def akl_grad(logp_s_CV: Tensor, logp_t_CV: Tensor) -> tuple[Tensor, Tensor]:
    gate_C = akl_gate(logp_s_CV, logp_t_CV)
    fkl_C, g_fkl_CV = fkl_grad(logp_s_CV, logp_t_CV)
    rkl_C, g_rkl_CV = rkl_grad(logp_s_CV, logp_t_CV)
    div_C = gate_C * fkl_C + (1.0 - gate_C) * rkl_C
    return div_C, g_fkl_CV.mul_(gate_C[:, None]).add_(g_rkl_CV.mul_((1.0 - gate_C)[:, None]))


# ----------------------------------------------------------------------------- in place (KL only)

def _row_sums(fn, n: int, rows_2RV: Tensor) -> Tensor:
    """(n,) sums over V of fn(row slice, out blocks) -> (r, V), R rows at a time."""
    sums = rows_2RV.new_empty(n)
    R = rows_2RV.shape[1]
    for r0 in range(0, n, R):
        rows = slice(r0, min(r0 + R, n))
        sums[rows] = fn(rows, rows_2RV[0, : rows.stop - r0], rows_2RV[1, : rows.stop - r0]).sum(-1)
    return sums


def rkl_grad_in_place(logp_s_CV, logp_t_CV, rows_2RV, with_grad: bool):
    """D = sum p_S (l_S - l_T); dD/dz = p_S (l_S - l_T - D)."""
    diff_CV = torch.sub(logp_s_CV, logp_t_CV, out=logp_t_CV)
    p_s_CV = logp_s_CV.exp_()
    div_C = _row_sums(lambda r, out, _: torch.mul(p_s_CV[r], diff_CV[r], out=out),
                      len(p_s_CV), rows_2RV)
    return div_C, diff_CV.sub_(div_C[:, None]).mul_(p_s_CV) if with_grad else None


def fkl_grad_in_place(logp_s_CV, logp_t_CV, rows_2RV, with_grad: bool):
    """D = sum p_T (l_T - l_S); dD/dz = p_S - p_T."""
    div_C = _row_sums(lambda r, out, tmp: torch.sub(logp_t_CV[r], logp_s_CV[r], out=out)
                      .mul_(torch.exp(logp_t_CV[r], out=tmp)), len(logp_s_CV), rows_2RV)
    if not with_grad:
        return div_C, None
    return div_C, torch.sub(logp_s_CV.exp_(), logp_t_CV.exp_(), out=logp_t_CV)


DIVERGENCES.register("rkl", Divergence(kl_student_teacher, rkl_grad, rkl_grad_in_place))
DIVERGENCES.register("fkl", Divergence(kl_teacher_student, fkl_grad, fkl_grad_in_place))
DIVERGENCES.register("jsd", Divergence(jsd, jsd_grad, params=("beta",)))
DIVERGENCES.register("tvd", Divergence(tvd, tvd_grad))
DIVERGENCES.register("akl", Divergence(akl, akl_grad))
