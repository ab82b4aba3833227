"""msd.chunked must equal the plain loss on full logits: value, gradients (student hidden states
and head weight) and stats, for every divergence and weighting. Shape letters: B batch,
T response tokens, H hidden size, V vocabulary."""

from __future__ import annotations

import pytest
import torch

from msd import losses
from msd.chunked import chunked_msd_loss

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


def run(student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT, chunk_size, **kw):
    """Loss stats and gradients wrt student hidden states, head weight and head bias."""
    student_head.zero_grad(set_to_none=True)
    h_s_BTH = h_s_BTH.clone().requires_grad_()
    if chunk_size is None:  # the reference: the plain loss on full logits
        out = losses.msd_loss_with_stats(student_head(h_s_BTH), teacher_head(h_t_BTH), mask_BT, **kw)
    else:
        out = chunked_msd_loss(h_s_BTH, h_t_BTH, student_head, teacher_head, mask_BT, chunk_size=chunk_size, **kw)
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
    kw = dict(kind=kind, weighting=weighting, top_k=8)
    expected = run(*case, chunk_size=None, **kw)
    for chunk_size in CHUNK_SIZES:
        assert_same(run(*case, chunk_size=chunk_size, **kw), expected)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, T - 1, T])
def test_chunked_equals_plain_for_any_chunk_size(chunk_size):
    case = make_case(seed=2)
    assert_same(run(*case, chunk_size=chunk_size), run(*case, chunk_size=None))


@pytest.mark.parametrize("weighting", ["uniform", "dpsw"])
@pytest.mark.parametrize("kind", list(losses.DIVERGENCES))
def test_chunked_all_masked_row(kind, weighting):
    case = make_case(seed=1, empty_row=True)
    expected = run(*case, chunk_size=None, kind=kind, weighting=weighting)
    out, grads = run(*case, chunk_size=4, kind=kind, weighting=weighting)
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
        def call(h_BCH):
            seen.append(h_BCH.shape[1])
            return head(h_BCH)

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
        chunked_msd_loss(h_s_BTH, h_t_BTH, never, never, mask_BT, kind="kl")
    with pytest.raises(ValueError, match="choices"):
        chunked_msd_loss(h_s_BTH, h_t_BTH, never, never, mask_BT, weighting="entropy")
