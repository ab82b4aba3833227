"""The MSD loss computed from hidden states, a chunk of response tokens at a time.

The plain loss needs the student's and the teacher's (B, T, V) logits at once, plus the
autograd buffers of the student's; with a 150k vocabulary that is several GB per tensor. Here
only the N unmasked response tokens are scored, C of them at a time (`chunk_size`, counted over
the whole batch), so at most a few (C, V) blocks are alive at once, whatever B and T are.

Two paths, with the same value, gradients and statistics (tests/test_chunked.py):

- fused (the head is a plain `nn.Linear`, the usual `lm_head`, and the divergence has a
  closed-form gradient, `msd.divergences`): one autograd function runs both heads per chunk
  (`msd.chunk_kernels`), writes the gradient of each token's divergence with respect to the
  student's logits in closed form, and forms the loss's gradients in the forward: one (N, H)
  block for the hidden states and, when the head trains (full fine-tuning), the head's own
  (V, H) gradient, accumulated over chunks that hold whole rows. The backward only scales them:
  nothing over the vocabulary is recomputed.
- checkpointed (any other head callable, or a divergence registered with its value only): each
  chunk runs under a non-reentrant activation checkpoint, and the backward rebuilds the chunk
  and backpropagates through it.

The DPSW weights carry no gradient (paper Eq. 6-8), so the loss is sum_t c_t D_t with constant
c_t, and each token's divergence depends only on its own hidden state.

Why tokens can be reduced independently: with unnormalised weights w_t,

    sum_t w~_t D_t / L_y = sum_t w_t D_t / W,   W = sum_j w_j + eps  (uniform: w = 1, W = L_y)

(W: `losses.weight_totals`). Shape letters: B batch, T response tokens, N unmasked tokens,
C tokens per chunk, H hidden size, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from msd import losses
from msd.chunk_kernels import Workspace, chunk_terms
from msd.divergences import DIVERGENCES
from msd.losses import LossOutput, LossSpec
from msd.memory import trim_heap

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden (..., H) -> logits (..., V)


def _row_totals(w_N: torch.Tensor, row_N: torch.Tensor, n_rows: int, weighting: str):
    """W_r of each of n_rows rows from the raw weights of their tokens; (N,) -> (n_rows,)."""
    return losses.weight_totals(w_N.new_zeros(n_rows).index_add_(0, row_N, w_N), weighting)


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


class _HeadGrad:
    """A trainable head's share of the loss's gradient, sum_i c_i (dD_i/dz_i)^T h_i with
    c_i = w_i / W_r(i) (the 1 / n_rows comes last), accumulated chunk by chunk in the forward.
    Chunks then hold whole rows, so W_r is known when a chunk ends; a row longer than a chunk
    collects its part in one extra (V, H) block until it ends."""

    def __init__(self, weight_VH, bias_V, need_w: bool, need_b: bool, dtype, weighting: str):
        self.grad_w = torch.zeros_like(weight_VH, dtype=dtype) if need_w else None
        self.grad_b = torch.zeros_like(bias_V, dtype=dtype) if need_b else None
        self.weighting = weighting
        self.open_row = None  # [sum of w so far, (V, H) block, (V,) block] of a split row

    def add(self, g_CV, w_C, row_C, h_CH, closes_row: bool) -> None:
        """Add one chunk (scales g_CV in place)."""
        if self.open_row is None and closes_row:  # whole rows: W_r from this chunk alone
            local_C = row_C - row_C[0]
            totals = _row_totals(w_C, local_C, int(local_C[-1]) + 1, self.weighting)
            _add_head_grad(self.grad_w, self.grad_b, g_CV, w_C / totals[local_C], h_CH)
            return
        if self.open_row is None:
            self.open_row = [0.0, None if self.grad_w is None else torch.zeros_like(self.grad_w),
                             None if self.grad_b is None else torch.zeros_like(self.grad_b)]
        self.open_row[0] += float(w_C.sum())
        _add_head_grad(self.open_row[1], self.open_row[2], g_CV, w_C, h_CH)
        if closes_row:
            w_sum = torch.tensor(self.open_row[0], dtype=torch.float64)
            total = float(losses.weight_totals(w_sum, self.weighting))
            for acc, part in ((self.grad_w, self.open_row[1]), (self.grad_b, self.open_row[2])):
                if acc is not None:
                    acc.add_(part, alpha=1.0 / total)
            self.open_row = None


def _add_head_grad(acc_w, acc_b, g_CV, coef_C, h_CH) -> None:
    """acc_w += (coef * g)^T h and acc_b += sum (coef * g) over the chunk; scales g in place."""
    g_CV.mul_(coef_C[:, None].to(g_CV.dtype))
    if acc_w is not None:
        acc_w.addmm_(g_CV.T.to(acc_w.dtype), h_CH.to(acc_w.dtype))
    if acc_b is not None:
        acc_b += g_CV.sum(0).to(acc_b.dtype)


class _FusedLoss(torch.autograd.Function):
    """(h_s (N, H), student head, h_t (N, H), teacher head, rows) -> (loss, D (N,), w (N,)).

    The loss is Eq. 8 over the N tokens (row r(i) of n_rows): sum_i w_i D_i / W_r(i) / n_rows.
    Everything the backward needs is formed in the forward: dL/dh_i = c_i (dD_i/dz_i) W per
    token and, for a trainable head, dL/dW (`_HeadGrad`). The backward scales them by dL/dloss.
    D and w carry no gradient.
    """

    @staticmethod
    def forward(ctx, h_s_NH, weight_VH, bias_V, h_t_NH, t_weight_VH, t_bias_V, row_N, n_rows,
                spec: LossSpec, chunk_size):
        s_head, t_head = (weight_VH, bias_V), (t_weight_VH, t_bias_V)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N = len(h_s_NH)
        dtype = torch.promote_types(weight_VH.dtype, torch.float32)
        div_N = h_s_NH.new_empty(N, dtype=dtype)
        w_N = h_s_NH.new_empty(N, dtype=dtype)
        dh_NH = torch.empty_like(h_s_NH) if need_h else None
        head = None
        if need_w or need_b:
            head = _HeadGrad(weight_VH, bias_V, need_w, need_b, dtype, spec.weighting)
        workspace = Workspace(min(chunk_size, max(N, 1)), weight_VH, t_weight_VH)
        if weight_VH.device.type == "cpu":
            trim_heap()  # so the block below is not stacked on freed but resident memory
        for span, closes_row in _chunk_plan(row_N, chunk_size, whole_rows=head is not None):
            div_N[span], w_N[span], g_CV = chunk_terms(h_s_NH[span], h_t_NH[span], s_head, t_head,
                                                       spec, with_grad=need_h or head is not None,
                                                       workspace=workspace)
            if need_h:  # unscaled dD/dh; scaled by c once every W_r is known
                torch.mm(g_CV.to(weight_VH.dtype), weight_VH, out=dh_NH[span])
            if head is not None:
                head.add(g_CV, w_N[span], row_N[span], h_s_NH[span], closes_row)
            del g_CV
        del workspace
        coef_N = w_N / _row_totals(w_N, row_N, n_rows, spec.weighting)[row_N] / n_rows
        loss = (div_N * coef_N).sum()
        if need_h:
            dh_NH.mul_(coef_N[:, None].to(dh_NH.dtype))
        grad_w, grad_b = (head.grad_w, head.grad_b) if head is not None else (None, None)
        for acc in (grad_w, grad_b):
            if acc is not None:
                acc.div_(n_rows)
        ctx.mark_non_differentiable(div_N, w_N)
        ctx.save_for_backward(dh_NH, grad_w, grad_b)
        ctx.dtypes = (weight_VH.dtype, bias_V.dtype if bias_V is not None else None)
        return loss, div_N, w_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_div_N, _grad_w_N):
        # The head's (V, H) gradient is scaled in place (a fresh (V, H) block is new memory to
        # fault in: 0.3 s a step on the benchmark model), so it can be used once.
        if getattr(ctx, "head_grad_used", False):
            raise RuntimeError("the fused chunked loss takes one backward per forward when the "
                               "output head trains; set loss.chunk_size=0 to backpropagate twice")
        dh_NH, grad_w, grad_b = ctx.saved_tensors
        grad_h = dh_NH * grad_loss.to(dh_NH.dtype) if dh_NH is not None else None
        ctx.head_grad_used = grad_w is not None or grad_b is not None
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _linear_parts(head) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain `nn.Linear` head; None for anything else (LoRA, quantised...)."""
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    return None


def _capped_logits(head: Head, h: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """head(h), scaled and soft-capped as the model does after its head (Gemma 2: soft-cap;
    Granite, Cohere: a logit scale), upcast if changed."""
    z = _head_input(head, h)
    softcap, scale = spec.softcap, spec.logit_scale
    if not softcap and scale == 1.0:
        return z
    z = z.to(torch.promote_types(z.dtype, torch.float32)) * scale
    return torch.tanh(z / softcap) * softcap if softcap else z


def _head_input(head: Head, h: torch.Tensor) -> torch.Tensor:
    """head(h) with h in the head's dtype (see `_as_head_dtype`)."""
    return head(_as_head_dtype(head, h))


def _as_head_dtype(head, h: torch.Tensor) -> torch.Tensor:
    """h cast to the head's weight dtype. Fixed bug: under accelerate's bf16 mixed precision the
    model's forward returns float32 hidden states while the head stays bfloat16, and the
    head's matmul failed on the dtype mismatch at the first step."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and h.dtype != weight.dtype:
        return h.to(weight.dtype)
    return h


def _checkpointed(h_s_NH, h_t_NH, student_head: Head, teacher_head: Head, spec: LossSpec,
                  chunk_size: int):
    """The generic path: (D (N,), w (N,)), each chunk under an activation checkpoint."""

    def terms(h_s_CH, h_t_CH):
        logp_s_CV = losses.log_probs(_capped_logits(student_head, h_s_CH, spec))
        with torch.no_grad():
            logp_t_CV = losses.log_probs(_capped_logits(teacher_head, h_t_CH, spec))
        div_C = losses.divergence_from_log_probs(logp_s_CV, logp_t_CV, spec)
        ones_C = torch.ones(len(h_s_CH), dtype=torch.bool, device=h_s_CH.device)
        return div_C, losses.raw_token_weights(logp_s_CV, logp_t_CV, ones_C, spec)

    div_parts, w_parts = [], []
    for start in range(0, len(h_s_NH), chunk_size):
        span = slice(start, start + chunk_size)
        div_C, w_C = checkpoint(terms, h_s_NH[span], h_t_NH[span], use_reentrant=False)
        div_parts.append(div_C)
        w_parts.append(w_C)
    dtype = torch.promote_types(h_s_NH.dtype, torch.float32)
    div_N = torch.cat(div_parts) if div_parts else h_s_NH.sum(-1).to(dtype)  # empty, in the graph
    w_raw_N = torch.cat(w_parts) if w_parts else div_N.detach()
    return div_N, w_raw_N


def chunked_msd_loss(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    mask_BT: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    chunk_size: int = 256,
) -> LossOutput:
    """MSD loss (paper Eq. 8) from final hidden states, chunk_size response tokens at a time.

    student_head / teacher_head map hidden (..., H) to logits (..., V), e.g. the model's
    `lm_head`; the student head may hold trainable weights (they get gradient). The teacher
    runs without gradient. `spec.logit_scale` and `spec.softcap` are what the model does to
    its head's logits (`msd.families.logit_transform`: Gemma 2's soft-cap, Granite's and
    Cohere's scales), applied after the heads. chunk_size counts unmasked
    response tokens over the whole batch; chunk_size <= 0 computes the full logits and calls
    `losses.msd_loss_with_stats`. Value, gradients and stats equal the plain loss.
    """
    teacher_hidden_BTH = teacher_hidden_BTH.detach()
    if chunk_size <= 0 or student_hidden_BTH.shape[1] == 0:
        with torch.no_grad():
            teacher_logits_BTV = _capped_logits(teacher_head, teacher_hidden_BTH, spec)
        student_logits_BTV = _capped_logits(student_head, student_hidden_BTH, spec)
        return losses.msd_loss_with_stats(student_logits_BTV, teacher_logits_BTV, mask_BT, spec)
    losses.check_options(spec)  # fail before any head runs

    B, T, H = student_hidden_BTH.shape
    mask_BT = mask_BT.bool()
    idx_N = mask_BT.flatten().nonzero().squeeze(-1)
    h_s_NH = _as_head_dtype(student_head, student_hidden_BTH.reshape(B * T, H).index_select(0, idx_N))
    h_t_NH = _as_head_dtype(teacher_head, teacher_hidden_BTH.reshape(B * T, -1).index_select(0, idx_N))
    s_parts, t_parts = _linear_parts(student_head), _linear_parts(teacher_head)
    closed_form = DIVERGENCES.get(spec.divergence).grad is not None
    if s_parts is not None and t_parts is not None and closed_form:
        loss, div_N, w_raw_N = _FusedLoss.apply(h_s_NH, *s_parts, h_t_NH, *t_parts, idx_N // T, B,
                                                spec, chunk_size)
        return _reduce(div_N, w_raw_N, idx_N, mask_BT, spec.weighting, loss=loss)
    div_N, w_raw_N = _checkpointed(h_s_NH, h_t_NH, student_head, teacher_head, spec, chunk_size)
    return _reduce(div_N, w_raw_N, idx_N, mask_BT, spec.weighting)


def _reduce(div_N, w_raw_N, idx_N, mask_BT, weighting: str, loss=None) -> LossOutput:
    """Eq. 8 over the N scored tokens (unless `loss` is given), and the per-token stats
    scattered back to (B, T)."""
    B, T = mask_BT.shape
    row_N = idx_N // T
    totals_B = _row_totals(w_raw_N, row_N, B, weighting)
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
