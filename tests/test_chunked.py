"""msd.chunked must equal the plain loss on full logits: value, gradients (student hidden states
and head weight) and stats, for every divergence and weighting. Shape letters: B batch,
T response tokens, H hidden size, V vocabulary."""

from __future__ import annotations

import contextlib

import pytest
import torch

from msd import chunked, divergences, losses
from msd.chunked import chunked_msd_loss
from msd.losses import Divergence, LossSpec, Weighting

B, T, H, V = 3, 11, 16, 300
CHUNK_SIZES = [4, 16]  # 4 does not divide T; 16 >= T is a single chunk


def make_case(seed=0, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(H, V, bias=True)
    teacher_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V, H, generator=g))
        student_head.bias.copy_(torch.randn(V, generator=g))
        teacher_head.weight.copy_(student_head.weight + 0.5 * torch.randn(V, H, generator=g))
    h_s_BTH = torch.randn(B, T, H, generator=g)
    h_t_BTH = h_s_BTH + 0.3 * torch.randn(B, T, H, generator=g)
    mask_BT = torch.rand(B, T, generator=g) > 0.3
    mask_BT[:, 0] = True
    if empty_row:
        mask_BT[1] = False
    return student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT


def run(student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT, chunk_size, spec=LossSpec()):
    """Loss stats and gradients wrt student hidden states, head weight and head bias."""
    student_head.zero_grad(set_to_none=True)
    h_s_BTH = h_s_BTH.clone().requires_grad_()
    if chunk_size is None:  # the reference: the plain loss on full logits
        out = losses.msd_loss_with_stats(student_head(h_s_BTH), teacher_head(h_t_BTH), mask_BT, spec)
    else:
        out = chunked_msd_loss(h_s_BTH, h_t_BTH, student_head, teacher_head, mask_BT, spec, chunk_size=chunk_size)
    out.loss.backward()
    return out, (h_s_BTH.grad, student_head.weight.grad, student_head.bias.grad)


def assert_same(actual, expected):
    out_c, grads_c = actual
    out_p, grads_p = expected
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=1e-5, atol=1e-7)
    for g_c, g_p in zip(grads_c, grads_p):
        torch.testing.assert_close(g_c, g_p, rtol=1e-5, atol=1e-5 * g_p.abs().max().item())
    torch.testing.assert_close(out_c.div_BT, out_p.div_BT, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_c.w_BT, out_p.w_BT, rtol=1e-5, atol=1e-7)
    assert out_c.div_BT.grad_fn is None and out_c.w_BT.grad_fn is None


@pytest.mark.parametrize("weighting", list(losses.WEIGHTINGS))
@pytest.mark.parametrize("kind", list(losses.DIVERGENCES))
def test_chunked_equals_plain(kind, weighting):
    case = make_case()
    spec = LossSpec(kind, weighting, top_k=8)
    expected = run(*case, chunk_size=None, spec=spec)
    for chunk_size in CHUNK_SIZES:
        assert_same(run(*case, chunk_size=chunk_size, spec=spec), expected)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, T - 1, T])
def test_chunked_equals_plain_for_any_chunk_size(chunk_size):
    case = make_case(seed=2)
    assert_same(run(*case, chunk_size=chunk_size), run(*case, chunk_size=None))


@pytest.mark.parametrize("weighting", ["uniform", "dpsw"])
@pytest.mark.parametrize("kind", list(losses.DIVERGENCES))
def test_chunked_all_masked_row(kind, weighting):
    case = make_case(seed=1, empty_row=True)
    expected = run(*case, chunk_size=None, spec=LossSpec(kind, weighting))
    out, grads = run(*case, chunk_size=4, spec=LossSpec(kind, weighting))
    assert out.loss.grad_fn is not None and torch.isfinite(out.loss)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1] == 0).all() and (out.w_BT[1] == 0).all()
    assert_same((out, grads), expected)


def test_chunked_all_masked_batch_is_zero_and_stays_in_graph():
    student_head, teacher_head, h_s_BTH, h_t_BTH, _ = make_case()
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    out, grads = run(student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT, chunk_size=4)
    assert out.loss.item() == 0.0 and out.loss.grad_fn is not None
    assert all((g == 0).all() for g in grads)


def test_chunk_size_zero_is_the_plain_loss():
    case = make_case()
    assert_same(run(*case, chunk_size=0), run(*case, chunk_size=None))


def test_heads_only_see_one_chunk_and_teacher_gets_no_gradient():
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = make_case()
    seen = []

    def recording(head):
        def call(h_CH):
            seen.append(h_CH.shape[0])
            return head(h_CH)

        return call

    teacher_head.requires_grad_(True)  # would collect gradient if the teacher were in the graph
    h_t_BTH = h_t_BTH.clone().requires_grad_()
    out = chunked_msd_loss(
        h_s_BTH.requires_grad_(), h_t_BTH, recording(student_head), recording(teacher_head), mask_BT, chunk_size=4
    )
    out.loss.backward()
    assert max(seen) == 4
    assert teacher_head.weight.grad is None and h_t_BTH.grad is None


def test_unknown_names_fail_before_the_heads_run():
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = make_case()

    def never(h_BCH):
        raise AssertionError("head ran")

    with pytest.raises(ValueError, match="choices"):
        chunked_msd_loss(h_s_BTH, h_t_BTH, never, never, mask_BT, LossSpec("kl"))
    with pytest.raises(ValueError, match="choices"):
        chunked_msd_loss(h_s_BTH, h_t_BTH, never, never, mask_BT, LossSpec(weighting="entropy"))


# ----------------------------------------------------------------------------- the fused path

@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", list(losses.DIVERGENCES))
def test_closed_form_gradient_equals_autograd(kind, beta):
    g = torch.Generator().manual_seed(3)
    z_s_CV = (2 * torch.randn(6, 40, generator=g, dtype=torch.float64)).requires_grad_()
    z_t_CV = 2 * torch.randn(6, 40, generator=g, dtype=torch.float64)
    logp_s_CV, logp_t_CV = torch.log_softmax(z_s_CV, -1), torch.log_softmax(z_t_CV, -1)
    spec = LossSpec(kind, beta=beta)
    div_C = losses.divergence_from_log_probs(logp_s_CV, logp_t_CV, spec)
    coef_C = torch.rand(6, generator=g, dtype=torch.float64)
    (expected_CV,) = torch.autograd.grad((coef_C * div_C).sum(), z_s_CV)
    entry = losses.DIVERGENCES.get(kind)
    div2_C, grad_CV = entry.grad(logp_s_CV.detach(), logp_t_CV, **entry.options(spec))
    torch.testing.assert_close(div2_C, div_C.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_CV * coef_C[:, None], expected_CV, rtol=1e-9, atol=1e-12)


def count_head_passes(monkeypatch):
    calls = []
    real = chunked.chunk_terms

    def counting(*args, **kw):
        calls.append(len(args[0]))
        return real(*args, **kw)

    monkeypatch.setattr(chunked, "chunk_terms", counting)
    return calls


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("kind", list(losses.DIVERGENCES))
def test_frozen_head_backward_reruns_no_head(monkeypatch, kind, shared):
    """The LoRA case: a frozen lm_head, shared with the teacher or not. The backward only
    scales what the forward stored, and the result equals the plain loss."""
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = make_case(seed=4)
    student_head.requires_grad_(False)
    if shared:
        teacher_head = student_head
    h_s_BTH = h_s_BTH.clone().requires_grad_()
    expected = losses.msd_loss_with_stats(student_head(h_s_BTH), teacher_head(h_t_BTH), mask_BT, LossSpec(kind))
    (grad_expected,) = torch.autograd.grad(expected.loss, h_s_BTH)
    calls = count_head_passes(monkeypatch)
    out = chunked_msd_loss(h_s_BTH, h_t_BTH, student_head, teacher_head, mask_BT, LossSpec(kind), chunk_size=5)
    n_forward = len(calls)
    (grad,) = torch.autograd.grad(out.loss, h_s_BTH)
    assert n_forward == -(-int(mask_BT.sum()) // 5) and len(calls) == n_forward
    assert max(calls) == 5
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-5, atol=1e-5 * grad_expected.abs().max().item())
    torch.testing.assert_close(out.div_BT, expected.div_BT, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_softcap_is_applied_after_the_head(fused):
    """Gemma 2 caps its logits after lm_head; the chunked loss must do the same. In float64:
    where tanh saturates, float32 rounding alone moves both losses' gradients by ~1e-4 relative."""
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = make_case(seed=5)
    student_head, teacher_head = student_head.double(), teacher_head.double()
    h_s_BTH, h_t_BTH = h_s_BTH.double(), h_t_BTH.double()
    cap = 3.0
    capped = lambda head: (lambda h: torch.tanh(head(h) / cap) * cap)  # noqa: E731
    h = h_s_BTH.clone().requires_grad_()
    ref = losses.msd_loss_with_stats(capped(student_head)(h), capped(teacher_head)(h_t_BTH), mask_BT, LossSpec("jsd"))
    ref.loss.backward()
    expected = ref, (h.grad, student_head.weight.grad, student_head.bias.grad)
    heads = (student_head, teacher_head) if fused else (lambda h: student_head(h), lambda h: teacher_head(h))
    student_head.zero_grad(set_to_none=True)
    h = h_s_BTH.clone().requires_grad_()
    out = chunked_msd_loss(h, h_t_BTH, *heads, mask_BT, LossSpec("jsd", softcap=cap), chunk_size=4)
    out.loss.backward()
    assert_same((out, (h.grad, student_head.weight.grad, student_head.bias.grad)), expected)
    uncapped = chunked_msd_loss(h_s_BTH, h_t_BTH, student_head, teacher_head, mask_BT, LossSpec("jsd"), chunk_size=4)
    assert abs(uncapped.loss.item() - out.loss.item()) > 1e-3


def test_bfloat16_head_is_close_to_the_plain_loss():
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = make_case(seed=6)
    head = student_head.to(torch.bfloat16).requires_grad_(False)
    h_s_BTH, h_t_BTH = h_s_BTH.bfloat16().requires_grad_(), h_t_BTH.bfloat16()
    expected = losses.msd_loss_with_stats(head(h_s_BTH), head(h_t_BTH + 0.1), mask_BT)
    (grad_expected,) = torch.autograd.grad(expected.loss, h_s_BTH)
    out = chunked_msd_loss(h_s_BTH, h_t_BTH + 0.1, head, head, mask_BT, chunk_size=4)
    (grad,) = torch.autograd.grad(out.loss, h_s_BTH)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.float(), grad_expected.float(), rtol=2e-2, atol=2e-2 * grad_expected.abs().max().item())


def test_chunk_plan_keeps_rows_whole_when_the_head_trains():
    from msd.chunked import _chunk_plan

    row_N = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4])  # row 1 empty; row 3 is 7 long
    plan = _chunk_plan(row_N, 4, whole_rows=True)
    assert [(s.start, s.stop, closes) for s, closes in plan] == [
        (0, 3, True), (3, 5, True), (5, 9, False), (9, 12, True), (12, 13, True)]
    fixed = _chunk_plan(row_N, 4, whole_rows=False)
    assert [(s.start, s.stop) for s, _ in fixed] == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert _chunk_plan(row_N[:0], 4, whole_rows=True) == []


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_trained_head_gradient_is_formed_in_the_forward(monkeypatch, chunk_size):
    """Full fine-tuning: the head's gradient is accumulated row by row in the forward (rows
    longer than a chunk included), so the backward reruns no head, and it equals the plain one."""
    case = make_case(seed=7)
    expected = run(*case, chunk_size=None, spec=LossSpec("rkl"))
    calls = count_head_passes(monkeypatch)
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = case
    student_head.zero_grad(set_to_none=True)
    h = h_s_BTH.clone().requires_grad_()
    out = chunked_msd_loss(h, h_t_BTH, student_head, teacher_head, mask_BT, chunk_size=chunk_size)
    n_forward = len(calls)
    out.loss.backward()
    assert len(calls) == n_forward and max(calls) <= chunk_size
    assert_same((out, (h.grad, student_head.weight.grad, student_head.bias.grad)), expected)


def test_trained_head_gradient_scaled_by_the_incoming_gradient_and_used_once():
    """The backward scales the head's gradient by dL/dloss (here 0.25, as gradient accumulation
    over 4 micro-batches gives); a second backward through a retained graph is refused rather
    than scaling it twice."""
    case = make_case(seed=3)
    expected = run(*case, chunk_size=None, spec=LossSpec("rkl"))
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = case
    student_head.zero_grad(set_to_none=True)
    out = chunked_msd_loss(h_s_BTH, h_t_BTH, student_head, teacher_head, mask_BT, LossSpec("rkl"), chunk_size=5)
    (0.25 * out.loss).backward(retain_graph=True)
    want = expected[1][1] * 0.25
    torch.testing.assert_close(student_head.weight.grad, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with pytest.raises(RuntimeError, match="one backward per forward"):
        out.loss.backward()


# ----------------------------------------------------------------------------- registering new entries

def hellinger_sq(logp_s_CV, logp_t_CV):
    """Squared Hellinger distance, 1/2 sum_v (sqrt p_S - sqrt p_T)^2."""
    return 0.5 * ((0.5 * logp_s_CV).exp() - (0.5 * logp_t_CV).exp()).square().sum(-1)


def kl_mix(logp_s_CV, logp_t_CV, beta=0.5):
    """beta KL(p_T||p_S) + (1 - beta) KL(p_S||p_T): a parameter taken from the LossSpec."""
    return (beta * divergences.kl_teacher_student(logp_s_CV, logp_t_CV)
            + (1 - beta) * divergences.kl_student_teacher(logp_s_CV, logp_t_CV))


def teacher_top_mass(logp_s_CV, logp_t_CV, top_k=32):
    """The teacher's probability mass on its top-K tokens."""
    return logp_t_CV.topk(min(top_k, logp_t_CV.shape[-1]), dim=-1).values.logsumexp(-1).exp()


NEW_DIVERGENCES = {"hellinger_sq": Divergence(hellinger_sq), "kl_mix": Divergence(kl_mix, params=("beta",))}


@contextlib.contextmanager
def registered(registry, name, entry):
    registry.register(name, entry)
    try:
        yield name
    finally:
        registry.unregister(name)


class WrappedHead(torch.nn.Module):
    """A head that is not a plain nn.Linear (like a LoRA-wrapped lm_head): the checkpointed path."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, h):
        return self.linear(h)


def by_hand(case, spec, value, raw):
    """The plain loss written out with the new entry's functions (Eq. 8)."""
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = case
    with torch.no_grad():
        logp_s, logp_t = losses.log_probs(student_head(h_s_BTH)), losses.log_probs(teacher_head(h_t_BTH))
    w_raw_BT = torch.where(mask_BT, raw(logp_s, logp_t), torch.zeros(()))
    w_BT = mask_BT.sum(-1, keepdim=True) * w_raw_BT / (w_raw_BT.sum(-1, keepdim=True) + losses.WEIGHT_EPS)
    return losses.masked_row_mean(value(logp_s, logp_t), w_BT, mask_BT)


@pytest.mark.parametrize("name", list(NEW_DIVERGENCES))
def test_registered_divergence_without_gradient_works_plain_and_chunked(monkeypatch, name):
    """A divergence registered with its value only: the plain loss uses it, with its parameter
    from the spec, and the chunked loss (a Linear head or any other) equals the plain loss."""
    case = make_case(seed=8)
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = case
    spec = LossSpec(name, "dpsw", top_k=8, beta=0.3)
    with registered(losses.DIVERGENCES, name, NEW_DIVERGENCES[name]):
        assert name in losses.DIVERGENCES.names()
        expected = run(*case, chunk_size=None, spec=spec)
        value = lambda s, t: NEW_DIVERGENCES[name].value(s, t, **NEW_DIVERGENCES[name].options(spec))  # noqa: E731
        raw = lambda s, t: losses.teacher_confidence(t, 8) * losses.student_doubt(s, t)  # noqa: E731
        torch.testing.assert_close(expected[0].loss, by_hand(case, spec, value, raw), rtol=1e-5, atol=1e-7)
        if name == "kl_mix":  # beta reached the divergence
            other = run(*case, chunk_size=None, spec=LossSpec(name, "dpsw", top_k=8, beta=0.9))
            assert abs(other[0].loss.item() - expected[0].loss.item()) > 1e-4
        calls = count_head_passes(monkeypatch)
        for chunk_size in (0, 4, 16):
            assert_same(run(*case, chunk_size=chunk_size, spec=spec), expected)
        assert calls == []  # no closed-form gradient: the checkpointed path, not the fused one
        wrapped = WrappedHead(student_head)
        for chunk_size in (4, 16):
            assert_same(run(wrapped, WrappedHead(teacher_head), h_s_BTH, h_t_BTH, mask_BT, chunk_size, spec),
                        expected)
    assert name not in losses.DIVERGENCES
    with pytest.raises(ValueError, match="choices"):
        losses.check_options(spec)


@pytest.mark.parametrize("kind", ["rkl", "jsd", "hellinger_sq"])
def test_registered_weighting_works_plain_and_chunked(kind):
    """A new token weighting, with a parameter (top_k) from the spec, in the plain loss and in
    the chunked loss: fused (rkl, jsd) and checkpointed (a value-only divergence, a wrapped head)."""
    case = make_case(seed=9)
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = case
    spec = LossSpec(kind, "teacher_top_mass", top_k=3)
    with registered(losses.DIVERGENCES, "hellinger_sq", NEW_DIVERGENCES["hellinger_sq"]), \
            registered(losses.WEIGHTINGS, "teacher_top_mass", Weighting(teacher_top_mass, params=("top_k",))):
        assert "teacher_top_mass" in losses.WEIGHTINGS.names()
        expected = run(*case, chunk_size=None, spec=spec)
        value = lambda s, t: losses.divergence_from_log_probs(s, t, spec)  # noqa: E731
        raw = lambda s, t: teacher_top_mass(s, t, top_k=3)  # noqa: E731
        torch.testing.assert_close(expected[0].loss, by_hand(case, spec, value, raw), rtol=1e-5, atol=1e-7)
        mean_B = expected[0].w_BT.sum(-1) / mask_BT.sum(-1)
        torch.testing.assert_close(mean_B, torch.ones(B), rtol=1e-6, atol=1e-6)
        for chunk_size in CHUNK_SIZES:
            assert_same(run(*case, chunk_size=chunk_size, spec=spec), expected)
            assert_same(run(WrappedHead(student_head), WrappedHead(teacher_head), h_s_BTH, h_t_BTH, mask_BT,
                            chunk_size, spec), expected)
    assert "teacher_top_mass" not in losses.WEIGHTINGS and "hellinger_sq" not in losses.DIVERGENCES


def test_in_place_log_softmax_is_bitwise_torchs():
    """The workspace's log-softmax writes over its input row block by row block; the result is
    bitwise `torch.log_softmax` (DPSW's 1 - p_S(argmax p_T) is sensitive to its last bit)."""
    from msd.chunk_kernels import _log_softmax_

    z = torch.randn(21, 5000, generator=torch.Generator().manual_seed(0)) * 7
    want = torch.log_softmax(z, -1)
    _log_softmax_(z, torch.empty(2, 8, 5000))
    assert torch.equal(z, want)
