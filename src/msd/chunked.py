"""The MSD loss computed from hidden states, a chunk of response tokens at a time.

The plain loss needs the student's and the teacher's (B, T, V) logits at once, plus the
autograd buffers of the student's; with a 150k vocabulary that is several GB per tensor. Here
only the N unmasked response tokens are scored, C of them at a time (`chunk_size`, counted over
the whole batch), so at most a few (C, V) blocks are alive at once, whatever B and T are.

Two paths, with the same value, gradients and statistics (tests/test_chunked.py):

- fused (the head is a plain `nn.Linear`, the usual `lm_head`): one autograd function runs both
  heads per chunk, writes the gradient of each token's divergence with respect to the student's
  logits in closed form (below), and forms the loss's gradients in the forward: one (N, H)
  block for the hidden states and, when the head trains (full fine-tuning), the head's own
  (V, H) gradient, accumulated over chunks that hold whole rows. The backward only scales them:
  nothing over the vocabulary is recomputed.
- checkpointed (any other head callable): each chunk runs under a non-reentrant activation
  checkpoint, and the backward rebuilds the chunk and backpropagates through it.

Gradients of D_t with respect to the student's logits z (p = p_S, q = p_T, l = log p):

    rkl  KL(p||q)        p * (l_p - l_q - D)
    fkl  KL(q||p)        p - q
    jsd  (beta, M)       p * (a - sum_v p a),   a = (1 - beta) (l_p - log M)
    tvd  1/2 |p - q|_1   p * (a - sum_v p a),   a = 1/2 sign(p - q)
    akl  g KL(q||p) + (1 - g) KL(p||q) with the detached gate g: the same mix of the two above

The DPSW weights carry no gradient (paper Eq. 6-8), so the loss is sum_t c_t D_t with constant
c_t, and each token's divergence depends only on its own hidden state.

Why tokens can be reduced independently: with unnormalised weights w_t,

    sum_t w~_t D_t / L_y = sum_t w_t D_t / W,   W = sum_j w_j + eps  (uniform: w = 1, W = L_y)

Shape letters: B batch, T response tokens, N unmasked tokens, C tokens per chunk, H hidden
size, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from msd import losses
from msd.losses import LossOutput
from msd.memory import trim_heap

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden (..., H) -> logits (..., V)


# ----------------------------------------------------------------------------- closed-form parts

def _softmax_backward(p_CV: torch.Tensor, a_CV: torch.Tensor) -> torch.Tensor:
    """p * (a - sum_v p a): the gradient wrt logits of a function whose gradient wrt p is a.
    Overwrites a_CV."""
    return a_CV.sub_((p_CV * a_CV).sum(-1, keepdim=True)).mul_(p_CV)


def divergence_and_grad(logp_s_CV, logp_t_CV, kind: str, beta: float = 0.5):
    """Per-token divergence D (C,) and its gradient wrt the student's logits (C, V).

    Equal to `losses.divergence_from_log_probs` and to autograd through it (tests)."""
    p_s_CV = logp_s_CV.exp()
    if kind == "rkl":
        diff_CV = logp_s_CV - logp_t_CV
        div_C = (p_s_CV * diff_CV).sum(-1)
        return div_C, diff_CV.sub_(div_C[:, None]).mul_(p_s_CV)
    if kind == "fkl":
        div_C = losses.kl_teacher_student(logp_s_CV, logp_t_CV)
        return div_C, p_s_CV.sub_(logp_t_CV.exp())
    if kind == "jsd":
        div_C = losses.jsd(logp_s_CV, logp_t_CV, beta)
        if beta >= 1.0:  # M = p_T: the divergence is 0 whatever p_S is
            return div_C, torch.zeros_like(p_s_CV)
        logm_CV = torch.logaddexp(logp_t_CV + torch.tensor(beta, dtype=p_s_CV.dtype).log(),
                                  logp_s_CV + torch.tensor(1.0 - beta, dtype=p_s_CV.dtype).log())
        a_CV = (logp_s_CV - logm_CV).mul_(1.0 - beta)
        return div_C, _softmax_backward(p_s_CV, a_CV)
    if kind == "tvd":
        div_C = losses.tvd(logp_s_CV, logp_t_CV)
        a_CV = (p_s_CV - logp_t_CV.exp()).sign_().mul_(0.5)
        return div_C, _softmax_backward(p_s_CV, a_CV)
    if kind == "akl":
        gate_C = losses.akl_gate(logp_s_CV, logp_t_CV)
        fkl_C, g_fkl_CV = divergence_and_grad(logp_s_CV, logp_t_CV, "fkl")
        rkl_C, g_rkl_CV = divergence_and_grad(logp_s_CV, logp_t_CV, "rkl")
        div_C = gate_C * fkl_C + (1.0 - gate_C) * rkl_C
        return div_C, g_fkl_CV.mul_(gate_C[:, None]).add_(g_rkl_CV.mul_((1.0 - gate_C)[:, None]))
    losses.check_options(kind=kind)
    raise AssertionError(kind)


def _logits(h_CH, weight_VH, bias_V, softcap: float | None):
    """A linear head's logits, upcast to at least float32, soft-capped as the model does."""
    z_CV = F.linear(h_CH, weight_VH, bias_V)
    z_CV = z_CV.to(torch.promote_types(z_CV.dtype, torch.float32))
    if softcap:
        z_CV = torch.tanh(z_CV / softcap).mul_(softcap)
    return z_CV


def _chunk_logits(h_s_CH, h_t_CH, s_head, t_head, softcap):
    """(student, teacher) logits of one chunk; one GEMM when both use the same weights."""
    if s_head[0] is t_head[0] and s_head[1] is t_head[1] and h_s_CH.dtype == h_t_CH.dtype:
        z_2CV = _logits(torch.cat([h_s_CH, h_t_CH]), *s_head, softcap)
        return z_2CV[: len(h_s_CH)], z_2CV[len(h_s_CH):]
    return _logits(h_s_CH, *s_head, softcap), _logits(h_t_CH, *t_head, softcap)


def _chunk_grad(h_s_CH, h_t_CH, s_head, t_head, spec, *, with_grad: bool, workspace=None):
    """One chunk: (D (C,), unnormalised weights w (C,), dD/dz_s (C, V) or None).

    With a `_Workspace` that fits the case, the returned gradient is a view into it, valid
    until the next call."""
    if workspace is not None and workspace.fits(spec):
        return _chunk_grad_in_place(h_s_CH, h_t_CH, s_head, t_head, spec, workspace, with_grad)
    kind, weighting, top_k, beta, softcap = spec
    z_s_CV, z_t_CV = _chunk_logits(h_s_CH, h_t_CH, s_head, t_head, softcap)
    logp_s_CV, logp_t_CV = torch.log_softmax(z_s_CV, -1), torch.log_softmax(z_t_CV, -1)
    del z_t_CV
    ones_C = torch.ones(len(h_s_CH), dtype=torch.bool, device=h_s_CH.device)
    w_C = losses.raw_token_weights(logp_s_CV, logp_t_CV, ones_C, weighting, top_k)
    if not with_grad:
        return losses.divergence_from_log_probs(logp_s_CV, logp_t_CV, kind, beta), w_C, None
    div_C, g_CV = divergence_and_grad(logp_s_CV, logp_t_CV, kind, beta)
    if softcap:  # z = cap tanh(x / cap): dz/dx = 1 - (z / cap)^2
        g_CV.mul_(z_s_CV.div_(softcap).square_().neg_().add_(1.0))
    return div_C, w_C, g_CV


class _Workspace:
    """A reusable (2C, V) block, plus two (R, V) row blocks, for `_chunk_grad_in_place`.

    On CPU a fresh tensor of this size is new pages from the kernel on every allocation (glibc
    hands blocks over 32 MB back to the system), and faulting them in costs as much as the
    maths it holds; reusing one block makes the elementwise work about 3x faster and caps the
    loss's memory at 2 C V floats (plus 2 R V). Covers the two KL divergences in float32 or
    float64 without soft-capping; other cases take the allocating path.
    """

    KINDS = ("rkl", "fkl")
    ROWS = {"cpu": 8}  # R: rows per step of the row-wise reductions (GPU: 256, fewer launches)

    def __init__(self, chunk_size: int, weight_VH: torch.Tensor, t_weight_VH: torch.Tensor):
        self.chunk_size = chunk_size
        self.weight = weight_VH
        self.usable = (weight_VH.dtype in (torch.float32, torch.float64)
                       and t_weight_VH.dtype == weight_VH.dtype)
        self.z_2CV = self.rows_2RV = None

    def fits(self, spec) -> bool:
        kind, _, _, _, softcap = spec
        return self.usable and kind in self.KINDS and not softcap

    def blocks(self, c: int):
        """(the (2c, V) logits block, the (2, R, V) row blocks)."""
        if self.z_2CV is None:
            V, dtype, device = self.weight.shape[0], self.weight.dtype, self.weight.device
            self.z_2CV = torch.empty(2 * self.chunk_size, V, dtype=dtype, device=device)
            rows = min(self.ROWS.get(device.type, 256), self.chunk_size)
            self.rows_2RV = torch.empty(2, rows, V, dtype=dtype, device=device)
        return self.z_2CV[: 2 * c], self.rows_2RV


def _row_sums(fn, n: int, rows_2RV) -> torch.Tensor:
    """(n,) sums over V of fn(row slice, out blocks) -> (r, V), R rows at a time."""
    sums = rows_2RV.new_empty(n)
    R = rows_2RV.shape[1]
    for r0 in range(0, n, R):
        rows = slice(r0, min(r0 + R, n))
        sums[rows] = fn(rows, rows_2RV[0, : rows.stop - r0], rows_2RV[1, : rows.stop - r0]).sum(-1)
    return sums


def _log_softmax_(z_CV, rows_2RV):
    """z <- log_softmax(z) in place, R rows at a time through a row block, with no (C, V)
    temporary. torch's own kernel, so the values are bitwise those of `losses.log_probs`: DPSW's
    1 - p_S(argmax p_T) cancels for confident tokens, and another rounding of log p (an
    exp/sum/log of our own was ~1e-6 off for p near 1) moved such a token's weight by ~1e-3
    relative, enough to send an on-policy run down another path than the plain loss's."""
    R = rows_2RV.shape[1]
    for r0 in range(0, len(z_CV), R):
        rows_RV = z_CV[r0:r0 + R]
        out_RV = rows_2RV[0, : len(rows_RV)]
        torch.log_softmax(rows_RV, -1, out=out_RV)
        rows_RV.copy_(out_RV)


def _chunk_grad_in_place(h_s_CH, h_t_CH, s_head, t_head, spec, ws: _Workspace, with_grad: bool):
    """`_chunk_grad` for rkl / fkl with every (C, V) intermediate in the workspace's block."""
    kind, weighting, top_k, _, _ = spec
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
    w_C = losses.raw_token_weights(logp_s_CV, logp_t_CV, ones_C, weighting, top_k)
    if kind == "rkl":  # D = sum p_S (l_S - l_T); dD/dz = p_S (l_S - l_T - D)
        diff_CV = torch.sub(logp_s_CV, logp_t_CV, out=logp_t_CV)
        p_s_CV = logp_s_CV.exp_()
        div_C = _row_sums(lambda r, out, _: torch.mul(p_s_CV[r], diff_CV[r], out=out), c, rows_2RV)
        grad_CV = diff_CV.sub_(div_C[:, None]).mul_(p_s_CV) if with_grad else None
    else:  # fkl: D = sum p_T (l_T - l_S); dD/dz = p_S - p_T
        div_C = _row_sums(lambda r, out, tmp: torch.sub(logp_t_CV[r], logp_s_CV[r], out=out)
                          .mul_(torch.exp(logp_t_CV[r], out=tmp)), c, rows_2RV)
        grad_CV = torch.sub(logp_s_CV.exp_(), logp_t_CV.exp_(), out=logp_t_CV) if with_grad else None
    return div_C, w_C, grad_CV


def _chunk_plan(row_N: torch.Tensor, chunk_size: int, whole_rows: bool) -> list[tuple[slice, bool]]:
    """Spans of at most chunk_size tokens, each with `closes_row` (True: every row in it ends in it).

    whole_rows=False: fixed-size spans. True: spans hold whole rows, except a row longer than
    chunk_size, which gets spans of its own (closes_row False on all but its last)."""
    N = len(row_N)
    if not whole_rows:
        return [(slice(s, min(s + chunk_size, N)), True) for s in range(0, N, chunk_size)]
    ends = (torch.nonzero(row_N[1:] != row_N[:-1]).squeeze(-1) + 1).tolist() + [N] if N else []
    plan, start, row_start = [], 0, 0
    for end in ends:  # one row: row_start .. end
        if end - start > chunk_size and row_start > start:  # flush the rows gathered so far
            plan.append((slice(start, row_start), True))
            start = row_start
        if end - row_start > chunk_size:  # a long row alone, in pieces
            for s in range(row_start, end, chunk_size):
                plan.append((slice(s, min(s + chunk_size, end)), s + chunk_size >= end))
            start = end
        row_start = end
    if start < N:
        plan.append((slice(start, N), True))
    return plan


class _FusedLoss(torch.autograd.Function):
    """(h_s (N, H), student head, h_t (N, H), teacher head, rows) -> (loss, D (N,), w (N,)).

    The loss is Eq. 8 over the N tokens (row r(i) of n_rows): sum_i w_i D_i / W_r(i) / n_rows.
    Everything the backward needs is formed in the forward: dL/dh_i = c_i (dD_i/dz_i) W per
    token and, for a trainable head, dL/dW = sum_i c_i (dD_i/dz_i)^T h_i (c_i = w_i / W_r / n_rows),
    accumulated chunk by chunk: chunks then hold whole rows, so W_r is known when a chunk ends
    (a row longer than a chunk collects its part in one extra (V, H) block until it ends).
    The backward scales them by dL/dloss. D and w carry no gradient.
    """

    @staticmethod
    def forward(ctx, h_s_NH, weight_VH, bias_V, h_t_NH, t_weight_VH, t_bias_V, row_N, n_rows, spec,
                chunk_size):
        s_head, t_head = (weight_VH, bias_V), (t_weight_VH, t_bias_V)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head_grad = need_w or need_b
        uniform = spec[1] == "uniform"
        N = len(h_s_NH)
        dtype = torch.promote_types(weight_VH.dtype, torch.float32)
        div_N = h_s_NH.new_empty(N, dtype=dtype)
        w_N = h_s_NH.new_empty(N, dtype=dtype)
        dh_NH = torch.empty_like(h_s_NH) if need_h else None
        grad_w = torch.zeros_like(weight_VH, dtype=dtype) if need_w else None
        grad_b = torch.zeros_like(bias_V, dtype=dtype) if need_b else None
        open_row = None  # [W_r so far, (V, H) block, (V,) block] of a row split over chunks
        workspace = _Workspace(min(chunk_size, max(N, 1)), weight_VH, t_weight_VH)
        if weight_VH.device.type == "cpu":
            trim_heap()  # so the block below is not stacked on freed but resident memory
        for span, closes_row in _chunk_plan(row_N, chunk_size, whole_rows=head_grad):
            div_N[span], w_N[span], g_CV = _chunk_grad(h_s_NH[span], h_t_NH[span], s_head, t_head,
                                                       spec, with_grad=need_h or head_grad,
                                                       workspace=workspace)
            if need_h:  # unscaled dD/dh; scaled by c once every W_r is known
                torch.mm(g_CV.to(weight_VH.dtype), weight_VH, out=dh_NH[span])
            if head_grad:
                w_C = torch.ones_like(w_N[span]) if uniform else w_N[span]
                if open_row is None and closes_row:  # whole rows: W_r from this chunk alone
                    local_C = row_N[span] - row_N[span][0]
                    totals = w_C.new_zeros(int(local_C[-1]) + 1).index_add_(0, local_C, w_C)
                    coef_C = w_C / (totals if uniform else totals + losses.WEIGHT_EPS)[local_C]
                    _add_head_grad(grad_w, grad_b, g_CV, coef_C, h_s_NH[span])
                else:
                    if open_row is None:
                        open_row = [0.0, torch.zeros_like(grad_w) if need_w else None,
                                    torch.zeros_like(grad_b) if need_b else None]
                    open_row[0] += float(w_C.sum())
                    _add_head_grad(open_row[1], open_row[2], g_CV, w_C, h_s_NH[span])
                    if closes_row:
                        total = open_row[0] if uniform else open_row[0] + losses.WEIGHT_EPS
                        for acc, part in ((grad_w, open_row[1]), (grad_b, open_row[2])):
                            if acc is not None:
                                acc.add_(part, alpha=1.0 / total)
                        open_row = None
            del g_CV
        del workspace, open_row
        if uniform:
            totals_R = torch.bincount(row_N, minlength=n_rows).clamp_min(1).to(dtype)
        else:
            totals_R = w_N.new_zeros(n_rows).index_add_(0, row_N, w_N) + losses.WEIGHT_EPS
        coef_N = (torch.ones_like(w_N) if uniform else w_N) / totals_R[row_N] / n_rows
        loss = (div_N * coef_N).sum()
        if need_h:
            dh_NH.mul_(coef_N[:, None].to(dh_NH.dtype))
        for acc in (grad_w, grad_b):
            if acc is not None:
                acc.div_(n_rows)
        ctx.mark_non_differentiable(div_N, w_N)
        ctx.save_for_backward(dh_NH, grad_w, grad_b)
        ctx.dtypes = (weight_VH.dtype, bias_V.dtype if bias_V is not None else None)
        return loss, div_N, w_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_div_N, _grad_w_N):
        dh_NH, grad_w, grad_b = ctx.saved_tensors
        grad_h = dh_NH * grad_loss.to(dh_NH.dtype) if dh_NH is not None else None
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _add_head_grad(acc_w, acc_b, g_CV, coef_C, h_CH) -> None:
    """acc_w += (coef * g)^T h and acc_b += sum (coef * g) over the chunk; scales g in place."""
    g_CV.mul_(coef_C[:, None].to(g_CV.dtype))
    if acc_w is not None:
        acc_w.addmm_(g_CV.T.to(acc_w.dtype), h_CH.to(acc_w.dtype))
    if acc_b is not None:
        acc_b += g_CV.sum(0).to(acc_b.dtype)


def _linear_parts(head) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain `nn.Linear` head; None for anything else (LoRA, quantised...)."""
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    return None


def _capped_logits(head: Head, h: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """head(h), soft-capped as the model does after its head (Gemma 2), upcast if capped."""
    z = head(h)
    if not softcap:
        return z
    return torch.tanh(z.to(torch.promote_types(z.dtype, torch.float32)) / softcap) * softcap


def _checkpointed_terms(student_head: Head, teacher_head: Head, spec):
    """Per-chunk function of the generic path: (h_s (C, H), h_t (C, H)) -> (D (C,), w (C,))."""
    kind, weighting, top_k, beta, softcap = spec

    def terms(h_s_CH, h_t_CH):
        logp_s_CV = losses.log_probs(_capped_logits(student_head, h_s_CH, softcap))
        with torch.no_grad():
            logp_t_CV = losses.log_probs(_capped_logits(teacher_head, h_t_CH, softcap))
        div_C = losses.divergence_from_log_probs(logp_s_CV, logp_t_CV, kind, beta)
        ones_C = torch.ones(len(h_s_CH), dtype=torch.bool, device=h_s_CH.device)
        return div_C, losses.raw_token_weights(logp_s_CV, logp_t_CV, ones_C, weighting, top_k)

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
    chunk_size: int = 256,
    softcap: float | None = None,
) -> LossOutput:
    """MSD loss (paper Eq. 8) from final hidden states, chunk_size response tokens at a time.

    student_head / teacher_head map hidden (..., H) to logits (..., V), e.g. the model's
    `lm_head`; the student head may hold trainable weights (they get gradient). The teacher
    runs without gradient. `softcap` is the model's final logit soft-capping (Gemma 2:
    `config.final_logit_softcapping`), applied after the heads. chunk_size counts unmasked
    response tokens over the whole batch; chunk_size <= 0 computes the full logits and calls
    `losses.msd_loss_with_stats`. Value, gradients and stats equal the plain loss.
    """
    teacher_hidden_BTH = teacher_hidden_BTH.detach()
    spec = (kind, weighting, top_k, beta, softcap)
    if chunk_size <= 0 or student_hidden_BTH.shape[1] == 0:
        with torch.no_grad():
            teacher_logits_BTV = _capped_logits(teacher_head, teacher_hidden_BTH, softcap)
        return losses.msd_loss_with_stats(_capped_logits(student_head, student_hidden_BTH, softcap),
                                          teacher_logits_BTV, mask_BT, kind, weighting, top_k, beta)
    losses.check_options(kind, weighting)  # fail before any head runs

    B, T, H = student_hidden_BTH.shape
    mask_BT = mask_BT.bool()
    idx_N = mask_BT.flatten().nonzero().squeeze(-1)
    h_s_NH = student_hidden_BTH.reshape(B * T, H).index_select(0, idx_N)
    h_t_NH = teacher_hidden_BTH.reshape(B * T, -1).index_select(0, idx_N)
    s_parts, t_parts = _linear_parts(student_head), _linear_parts(teacher_head)
    if s_parts is not None and t_parts is not None:
        loss, div_N, w_raw_N = _FusedLoss.apply(h_s_NH, *s_parts, h_t_NH, *t_parts, idx_N // T, B, spec,
                                                chunk_size)
        return _reduce(div_N, w_raw_N, idx_N, mask_BT, weighting, loss=loss)
    else:
        terms = _checkpointed_terms(student_head, teacher_head, spec)
        div_parts, w_parts = [], []
        for start in range(0, len(idx_N), chunk_size):
            span = slice(start, start + chunk_size)
            div_C, w_C = checkpoint(terms, h_s_NH[span], h_t_NH[span], use_reentrant=False)
            div_parts.append(div_C)
            w_parts.append(w_C)
        dtype = torch.promote_types(student_hidden_BTH.dtype, torch.float32)
        div_N = torch.cat(div_parts) if div_parts else h_s_NH.sum(-1).to(dtype)  # empty, in the graph
        w_raw_N = torch.cat(w_parts) if w_parts else div_N.detach()
    return _reduce(div_N, w_raw_N, idx_N, mask_BT, weighting)


def _reduce(div_N, w_raw_N, idx_N, mask_BT, weighting, loss=None) -> LossOutput:
    """Eq. 8 over the N scored tokens (unless `loss` is given), and the per-token stats
    scattered back to (B, T)."""
    B, T = mask_BT.shape
    row_N = idx_N // T
    if weighting == "uniform":
        totals_B = losses.row_lengths(mask_BT).to(w_raw_N.dtype)
    else:
        totals_B = w_raw_N.new_zeros(B).index_add_(0, row_N, w_raw_N) + losses.WEIGHT_EPS
    if loss is None:
        loss = (div_N * (w_raw_N / totals_B[row_N])).sum() / B  # mean over all B rows

    def to_BT(x_N):
        return x_N.new_zeros(B * T).index_copy_(0, idx_N, x_N.detach()).view(B, T)

    w_raw_BT = to_BT(w_raw_N)
    return LossOutput(
        loss=loss,
        div_BT=to_BT(div_N),
        w_BT=losses.normalise_weights(w_raw_BT, totals_B, mask_BT),
        mask_BT=mask_BT,
        w_raw_BT=w_raw_BT,
    )
