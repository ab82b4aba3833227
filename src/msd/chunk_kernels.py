"""One chunk of the fused chunked loss (`msd.chunked`): both linear heads, the per-token
divergence, the raw token weights and the divergence's closed-form gradient wrt the student's
logits, with an optional reusable workspace that keeps the (C, V) blocks out of the allocator.

Shape letters: C tokens per chunk, H hidden size, V vocabulary, R rows per row block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msd import losses
from msd.divergences import DIVERGENCES, Divergence

LinearParts = tuple[torch.Tensor, torch.Tensor | None]  # a linear head: weight (V, H), bias (V,)


def linear_logits(h_CH, weight_VH, bias_V, softcap: float | None, scale: float = 1.0):
    """A linear head's logits, upcast to at least float32, scaled and soft-capped as the model
    does (`msd.families.LogitTransform`)."""
    z_CV = F.linear(h_CH, weight_VH, bias_V)
    z_CV = z_CV.to(torch.promote_types(z_CV.dtype, torch.float32))
    if scale != 1.0:
        z_CV = z_CV.mul_(scale)
    if softcap:
        z_CV = torch.tanh(z_CV / softcap).mul_(softcap)
    return z_CV


def chunk_logits(h_s_CH, h_t_CH, s_head: LinearParts, t_head: LinearParts, softcap, scale=1.0):
    """(student, teacher) logits of one chunk; one GEMM when both use the same weights."""
    if s_head[0] is t_head[0] and s_head[1] is t_head[1] and h_s_CH.dtype == h_t_CH.dtype:
        z_2CV = linear_logits(torch.cat([h_s_CH, h_t_CH]), *s_head, softcap, scale)
        return z_2CV[: len(h_s_CH)], z_2CV[len(h_s_CH):]
    return (linear_logits(h_s_CH, *s_head, softcap, scale),
            linear_logits(h_t_CH, *t_head, softcap, scale))


class Workspace:
    """A reusable (2C, V) block, plus two (R, V) row blocks, for divergences with an in-place
    gradient (`Divergence.grad_in_place`: the two KLs).

    On CPU a fresh tensor of this size is new pages from the kernel on every allocation (glibc
    hands blocks over 32 MB back to the system), and faulting them in costs as much as the
    maths it holds; reusing one block makes the elementwise work about 3x faster and caps the
    loss's memory at 2 C V floats (plus 2 R V). Covers float32 and float64 heads without
    soft-capping; other cases take the allocating path.
    """

    ROWS = {"cpu": 8}  # R: rows per step of the row-wise reductions (GPU: 256, fewer launches)

    def __init__(self, chunk_size: int, weight_VH: torch.Tensor, t_weight_VH: torch.Tensor):
        self.chunk_size = chunk_size
        self.weight = weight_VH
        self.usable = (weight_VH.dtype in (torch.float32, torch.float64)
                       and t_weight_VH.dtype == weight_VH.dtype)
        self.z_2CV = self.rows_2RV = None

    def fits(self, spec: losses.LossSpec, entry: Divergence) -> bool:
        return (self.usable and entry.grad_in_place is not None and not spec.softcap
                and spec.logit_scale == 1.0)

    def blocks(self, c: int):
        """(the (2c, V) logits block, the (2, R, V) row blocks)."""
        if self.z_2CV is None:
            V, dtype, device = self.weight.shape[0], self.weight.dtype, self.weight.device
            self.z_2CV = torch.empty(2 * self.chunk_size, V, dtype=dtype, device=device)
            rows = min(self.ROWS.get(device.type, 256), self.chunk_size)
            self.rows_2RV = torch.empty(2, rows, V, dtype=dtype, device=device)
        return self.z_2CV[: 2 * c], self.rows_2RV


def chunk_terms(h_s_CH, h_t_CH, s_head: LinearParts, t_head: LinearParts, spec: losses.LossSpec,
                *, with_grad: bool, workspace: Workspace | None = None):
    """One chunk: (D (C,), unnormalised weights w (C,), dD/dz_s (C, V) or None).

    with_grad needs the divergence's closed-form `grad`. With a `Workspace` that fits the case,
    the returned gradient is a view into it, valid until the next call."""
    entry = DIVERGENCES.get(spec.divergence)
    if workspace is not None and workspace.fits(spec, entry):
        return _chunk_terms_in_place(h_s_CH, h_t_CH, s_head, t_head, spec, entry, workspace,
                                     with_grad)
    z_s_CV, z_t_CV = chunk_logits(h_s_CH, h_t_CH, s_head, t_head, spec.softcap, spec.logit_scale)
    logp_s_CV, logp_t_CV = torch.log_softmax(z_s_CV, -1), torch.log_softmax(z_t_CV, -1)
    del z_t_CV
    ones_C = torch.ones(len(h_s_CH), dtype=torch.bool, device=h_s_CH.device)
    w_C = losses.raw_token_weights(logp_s_CV, logp_t_CV, ones_C, spec)
    if not with_grad:
        return losses.divergence_from_log_probs(logp_s_CV, logp_t_CV, spec), w_C, None
    div_C, g_CV = entry.grad(logp_s_CV, logp_t_CV, **entry.options(spec))
    if spec.softcap:  # z = cap tanh(x / cap): dz/dx = 1 - (z / cap)^2
        g_CV.mul_(z_s_CV.div_(spec.softcap).square_().neg_().add_(1.0))
    if spec.logit_scale != 1.0:  # z = scale x: dz/dx = scale
        g_CV.mul_(spec.logit_scale)
    return div_C, w_C, g_CV


def _log_softmax_(z_CV, rows_2RV):
    """z <- log_softmax(z) in place, R rows at a time, with no (C, V) temporary (torch's
    last-dimension kernel reads a row before writing it, so the output may alias the input;
    tests/test_chunked.py checks the result bitwise). torch's own kernel, so the values are
    bitwise those of `losses.log_probs`: DPSW's
    1 - p_S(argmax p_T) cancels for confident tokens, and another rounding of log p (an
    exp/sum/log of our own was ~1e-6 off for p near 1) moved such a token's weight by ~1e-3
    relative, enough to send an on-policy run down another path than the plain loss's."""
    R = rows_2RV.shape[1]
    for r0 in range(0, len(z_CV), R):
        rows_RV = z_CV[r0:r0 + R]
        torch.log_softmax(rows_RV, -1, out=rows_RV)


def _chunk_terms_in_place(h_s_CH, h_t_CH, s_head, t_head, spec, entry: Divergence,
                          ws: Workspace, with_grad: bool):
    """`chunk_terms` with every (C, V) intermediate in the workspace's block."""
    c = len(h_s_CH)
    z_2CV, rows_2RV = ws.blocks(c)
    if s_head[0] is t_head[0] and s_head[1] is t_head[1]:
        torch.mm(torch.cat([h_s_CH, h_t_CH]), s_head[0].T, out=z_2CV)
        if s_head[1] is not None:
            z_2CV.add_(s_head[1])
    else:
        for head, h_CH, z_CV in ((s_head, h_s_CH, z_2CV[:c]), (t_head, h_t_CH, z_2CV[c:])):
            torch.mm(h_CH, head[0].T, out=z_CV)
            if head[1] is not None:
                z_CV.add_(head[1])
    _log_softmax_(z_2CV, rows_2RV)
    logp_s_CV, logp_t_CV = z_2CV[:c], z_2CV[c:]
    ones_C = torch.ones(c, dtype=torch.bool, device=h_s_CH.device)
    w_C = losses.raw_token_weights(logp_s_CV, logp_t_CV, ones_C, spec)
    div_C, grad_CV = entry.grad_in_place(logp_s_CV, logp_t_CV, rows_2RV, with_grad,
                                         **entry.options(spec))
    return div_C, w_C, grad_CV
