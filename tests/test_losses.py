"""msd.losses against float64 references written the slow, obvious way, plus edge cases and
gradient checks. Shape letters: B batch, T response tokens, V vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from msd import divergences, losses
from msd.losses import LossSpec

B, T, V = 3, 7, 50
KINDS = list(losses.DIVERGENCES)
WEIGHTINGS = list(losses.WEIGHTINGS)
DPSW_VARIANTS = [w for w in WEIGHTINGS if w != "uniform"]


def close(actual, expected, rtol=1e-6, atol=1e-12):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    s_BTV = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t_BTV = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask_BT = torch.rand(B, T, generator=g) > 0.3
    mask_BT[:, 0] = True  # every row has at least one token here; empty rows are tested apart
    return s_BTV, t_BTV, mask_BT


# ----------------------------------------------------------------------------- references

def ref_probs(logits_V):
    e = [math.exp(z - max(logits_V)) for z in logits_V]
    return [x / sum(e) for x in e]


def ref_divergence(p_s, p_t, kind, beta=0.5):
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    if kind == "rkl":
        return kl(p_s, p_t)
    if kind == "fkl":
        return kl(p_t, p_s)
    if kind == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if kind == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p_s, p_t))
    assert kind == "akl"
    g_head = ref_akl_head_gate(p_s, p_t)
    return g_head * kl(p_t, p_s) + (1 - g_head) * kl(p_s, p_t)


def ref_akl_head_gate(p_s, p_t):
    """Head = the most likely teacher tokens until their mass reaches 0.5 (crossing token in)."""
    order = sorted(range(len(p_t)), key=lambda v: -p_t[v])
    gap_head = gap_tail = mass = 0.0
    for v in order:
        gap = abs(p_t[v] - p_s[v])
        if mass < 0.5:
            gap_head += gap
        else:
            gap_tail += gap
        mass += p_t[v]
    return gap_head / (gap_head + gap_tail)


def ref_per_token(s_BTV, t_BTV, fn):
    return torch.tensor(
        [[fn(ref_probs(s_BTV[b, t].tolist()), ref_probs(t_BTV[b, t].tolist())) for t in range(s_BTV.shape[1])]
         for b in range(s_BTV.shape[0])],
        dtype=torch.float64,
    )


def ref_raw_weight(p_s, p_t, variant, top_k):
    def confidence(p):
        if len(p) == 1:
            return 1.0
        return 1 + sum(x * math.log(x) for x in p) / math.log(len(p))

    top = sorted(range(len(p_t)), key=lambda v: -p_t[v])[: min(top_k, len(p_t))]
    p_bar = [p_t[v] / sum(p_t[u] for u in top) for v in top]
    w_teacher = confidence(p_t) if variant == "dpsw_fullvocab" else confidence(p_bar)
    w_student = 1 - p_s[top[0]]
    return {
        "dpsw": w_teacher * w_student,
        "dpsw_fullvocab": w_teacher * w_student,
        "teacher_only": w_teacher,
        "student_only": w_student,
        "uniform": 1.0,
    }[variant]


def ref_weights(s_BTV, t_BTV, mask_BT, variant, top_k=32):
    raw = ref_per_token(s_BTV, t_BTV, lambda p_s, p_t: ref_raw_weight(p_s, p_t, variant, top_k))
    out = torch.zeros_like(raw)
    for b in range(raw.shape[0]):
        kept = [t for t in range(raw.shape[1]) if mask_BT[b, t]]
        if variant == "uniform":
            total = len(kept)
        else:
            total = sum(raw[b, t].item() for t in kept) + losses.WEIGHT_EPS
        for t in kept:
            out[b, t] = len(kept) * raw[b, t] / total
    return out


def ref_loss(s_BTV, t_BTV, mask_BT, kind, weighting, top_k=32, beta=0.5):
    div = ref_per_token(s_BTV, t_BTV, lambda p_s, p_t: ref_divergence(p_s, p_t, kind, beta))
    w = ref_weights(s_BTV, t_BTV, mask_BT, weighting, top_k)
    rows = []
    for b in range(div.shape[0]):
        kept = [t for t in range(div.shape[1]) if mask_BT[b, t]]
        rows.append(sum(w[b, t].item() * div[b, t].item() for t in kept) / max(len(kept), 1))
    return torch.tensor(sum(rows) / len(rows), dtype=torch.float64)


# ----------------------------------------------------------------------------- against references

@pytest.mark.parametrize("kind", KINDS)
def test_divergence_matches_reference(inputs, kind):
    s_BTV, t_BTV, _ = inputs
    expected = ref_per_token(s_BTV, t_BTV, lambda p_s, p_t: ref_divergence(p_s, p_t, kind))
    close(losses.token_divergence(s_BTV, t_BTV, LossSpec(kind)), expected)
    # The registry's value functions take log-probs directly.
    logp_s, logp_t = torch.log_softmax(s_BTV, -1), torch.log_softmax(t_BTV, -1)
    close(losses.DIVERGENCES.get(kind).value(logp_s, logp_t), expected)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.9, 1.0])
def test_jsd_beta_matches_reference(inputs, beta):
    s_BTV, t_BTV, _ = inputs
    expected = ref_per_token(s_BTV, t_BTV, lambda p_s, p_t: ref_divergence(p_s, p_t, "jsd", beta))
    close(losses.token_divergence(s_BTV, t_BTV, LossSpec("jsd", beta=beta)), expected, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_and_bfloat16_inputs_compute_in_float32(inputs, kind):
    s_BTV, t_BTV, _ = inputs
    expected = ref_per_token(s_BTV, t_BTV, lambda p_s, p_t: ref_divergence(p_s, p_t, kind))
    out = losses.token_divergence(s_BTV.float(), t_BTV.float(), LossSpec(kind))
    assert out.dtype == torch.float32
    close(out, expected, rtol=1e-5, atol=1e-5)
    assert losses.token_divergence(s_BTV.bfloat16(), t_BTV.bfloat16(), LossSpec(kind)).dtype == torch.float32


@pytest.mark.parametrize("variant", DPSW_VARIANTS)
@pytest.mark.parametrize("top_k", [1, 4, 32])
def test_dpsw_weights_match_reference(inputs, variant, top_k):
    s_BTV, t_BTV, mask_BT = inputs
    w_BT = losses.token_weights(s_BTV, t_BTV, mask_BT, LossSpec(weighting=variant, top_k=top_k))
    close(w_BT, ref_weights(s_BTV, t_BTV, mask_BT, variant, top_k))
    assert not w_BT.requires_grad


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_msd_loss_matches_reference(inputs, kind, weighting):
    s_BTV, t_BTV, mask_BT = inputs
    expected = ref_loss(s_BTV, t_BTV, mask_BT, kind, weighting)
    close(losses.msd_loss(s_BTV, t_BTV, mask_BT, LossSpec(kind, weighting)), expected)
    out = losses.msd_loss_with_stats(s_BTV, t_BTV, mask_BT, LossSpec(kind, weighting))
    close(out.loss, expected)
    close(out.w_BT, ref_weights(s_BTV, t_BTV, mask_BT, weighting))
    # the per-token stats are 0 on masked tokens (padding), like the weights
    div_BT = losses.token_divergence(s_BTV, t_BTV, LossSpec(kind))
    close(out.div_BT, torch.where(mask_BT.bool(), div_BT, torch.zeros_like(div_BT)))
    assert (out.div_BT[~mask_BT.bool()] == 0).all()
    assert out.div_BT.grad_fn is None and out.w_BT.grad_fn is None


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero(inputs, kind):
    s_BTV, _, mask_BT = inputs
    close(losses.token_divergence(s_BTV, s_BTV.clone(), LossSpec(kind)), torch.zeros(B, T), atol=1e-12)
    for weighting in WEIGHTINGS:
        close(losses.msd_loss(s_BTV, s_BTV.clone(), mask_BT, LossSpec(kind, weighting)), torch.tensor(0.0), atol=1e-12)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_row_contributes_zero(inputs, kind, weighting):
    s_BTV, t_BTV, mask_BT = inputs
    s_BTV = s_BTV.float().requires_grad_()
    mask_BT = mask_BT.clone()
    mask_BT[1] = False
    out = losses.msd_loss_with_stats(s_BTV, t_BTV.float(), mask_BT, LossSpec(kind, weighting))
    assert out.loss.grad_fn is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(s_BTV.grad).all()
    assert (s_BTV.grad[1] == 0).all()
    assert (out.w_BT[1] == 0).all()
    # Row 1 adds 0 and still counts in the mean over B rows.
    kept = [0, 2]
    alone = losses.msd_loss(s_BTV[kept], t_BTV.float()[kept], mask_BT[kept], LossSpec(kind, weighting))
    close(out.loss, alone * 2 / 3, rtol=1e-6, atol=1e-7)


def test_all_masked_batch_is_zero_and_stays_in_graph(inputs):
    s_BTV, t_BTV, _ = inputs
    s_BTV = s_BTV.requires_grad_()
    loss = losses.msd_loss(s_BTV, t_BTV, torch.zeros(B, T, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert (s_BTV.grad == 0).all()


def test_nonfinite_logits_on_padding_do_not_leak(inputs):
    s_BTV, t_BTV, mask_BT = inputs
    mask_BT = mask_BT.clone()
    mask_BT[0, -1] = False
    s_bad, t_bad = s_BTV.clone(), t_BTV.clone()
    s_bad[0, -1] = float("nan")
    t_bad[0, -1] = float("inf")
    close(losses.msd_loss(s_bad, t_bad, mask_BT), losses.msd_loss(s_BTV, t_BTV, mask_BT))


@pytest.mark.parametrize("variant", WEIGHTINGS)
def test_weights_are_zero_on_masked_tokens_and_mean_one(inputs, variant):
    s_BTV, t_BTV, mask_BT = inputs
    w_BT = losses.token_weights(s_BTV, t_BTV, mask_BT, LossSpec(weighting=variant))
    assert (w_BT[~mask_BT] == 0).all()
    mean_B = w_BT.sum(-1) / mask_BT.sum(-1)
    close(mean_B, torch.ones(B), rtol=1e-6, atol=1e-6)


def test_uniform_weights_are_the_mask(inputs):
    s_BTV, t_BTV, mask_BT = inputs
    assert torch.equal(losses.token_weights(s_BTV, t_BTV, mask_BT, LossSpec(weighting="uniform")), mask_BT.double())


def test_top_k_larger_than_vocabulary(inputs):
    s_BTV, t_BTV, mask_BT = inputs
    w_big = losses.token_weights(s_BTV, t_BTV, mask_BT, LossSpec(top_k=10 * V))
    close(w_big, losses.token_weights(s_BTV, t_BTV, mask_BT, LossSpec(top_k=V)))
    close(w_big, ref_weights(s_BTV, t_BTV, mask_BT, "dpsw", top_k=V))


def test_confident_teacher_and_agreeing_student_get_low_student_weight():
    t_BTV = torch.full((1, 2, 10), -20.0)
    t_BTV[..., 3] = 20.0  # teacher nearly one-hot on token 3
    s_BTV = t_BTV.clone()
    s_BTV[0, 1] = 0.0  # token 1: the student is uniform, i.e. disagrees
    mask_BT = torch.ones(1, 2, dtype=torch.bool)
    logp_s, logp_t = losses.log_probs(s_BTV), losses.log_probs(t_BTV)
    w_student = losses.raw_token_weights(logp_s, logp_t, mask_BT, LossSpec(weighting="student_only"))
    w_teacher = losses.raw_token_weights(logp_s, logp_t, mask_BT, LossSpec(weighting="teacher_only"))
    assert w_student[0, 0] < 1e-6 and w_student[0, 1] == pytest.approx(0.9)
    close(w_teacher, torch.ones(1, 2), rtol=0, atol=1e-6)
    # After normalisation the safety-critical token takes (almost) all the weight.
    w_BT = losses.token_weights(s_BTV, t_BTV, mask_BT, LossSpec())
    assert w_BT[0, 0] < 1e-5 and w_BT[0, 1] == pytest.approx(2.0, rel=1e-5)


def test_flat_teacher_gets_zero_teacher_weight():
    s_BTV, t_BTV = torch.randn(1, 1, 40), torch.zeros(1, 1, 40)
    mask_BT = torch.ones(1, 1, dtype=torch.bool)
    for variant in ("teacher_only", "dpsw_fullvocab"):
        w_raw = losses.raw_token_weights(losses.log_probs(s_BTV), losses.log_probs(t_BTV), mask_BT,
                                         LossSpec(weighting=variant))
        assert 0.0 <= w_raw.item() < 1e-6


def test_unknown_names_list_choices(inputs):
    s_BTV, t_BTV, mask_BT = inputs
    with pytest.raises(ValueError, match="rkl, fkl, jsd, tvd, akl"):
        losses.token_divergence(s_BTV, t_BTV, LossSpec("kl"))
    with pytest.raises(ValueError, match="dpsw, uniform"):
        losses.msd_loss(s_BTV, t_BTV, mask_BT, LossSpec(weighting="entropy"))
    with pytest.raises(ValueError, match="beta"):
        losses.token_divergence(s_BTV, t_BTV, LossSpec("jsd", beta=1.5))


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_gets_no_gradient(inputs, kind):
    s_BTV, t_BTV, mask_BT = inputs
    s_BTV, t_BTV = s_BTV.requires_grad_(), t_BTV.requires_grad_()
    losses.msd_loss(s_BTV, t_BTV, mask_BT, LossSpec(kind)).backward()
    assert t_BTV.grad is None and s_BTV.grad is not None


# ----------------------------------------------------------------------------- gradients

def small_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    s_BTV = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t_BTV = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask_BT = torch.tensor([[True, True, False], [True, False, True]])
    return s_BTV, t_BTV, mask_BT


# AKL's head/tail gates are detached, so finite differences (which move the gates) disagree with
# autograd by design; it is checked below against its two KL gradients with the gates fixed.
GRADCHECK_KINDS = [k for k in KINDS if k != "akl"]


@pytest.mark.parametrize("kind", GRADCHECK_KINDS)
def test_gradcheck_uniform_loss(kind):
    s_BTV, t_BTV, mask_BT = small_inputs()
    assert torch.autograd.gradcheck(lambda s: losses.msd_loss(s, t_BTV, mask_BT, LossSpec(kind, "uniform")), (s_BTV,))


@pytest.mark.parametrize("kind", GRADCHECK_KINDS)
def test_gradcheck_with_fixed_weights(kind):
    # DPSW weights are detached: finite differences would move them, so hold them fixed.
    s_BTV, t_BTV, mask_BT = small_inputs()
    w_BT = losses.token_weights(s_BTV, t_BTV, mask_BT, LossSpec(top_k=3))

    def fixed(s):
        return losses.masked_row_mean(losses.token_divergence(s, t_BTV, LossSpec(kind)), w_BT, mask_BT)

    assert torch.autograd.gradcheck(fixed, (s_BTV,))
    # ... and the full loss has exactly that gradient.
    (grad,) = torch.autograd.grad(losses.msd_loss(s_BTV, t_BTV, mask_BT, LossSpec(kind, "dpsw", top_k=3)), s_BTV)
    (expected,) = torch.autograd.grad(fixed(s_BTV), s_BTV)
    close(grad, expected)


def test_akl_gradient_is_gated_kl_gradients():
    s_BTV, t_BTV, _ = small_inputs()
    g_head_BT = ref_per_token(s_BTV.detach(), t_BTV, ref_akl_head_gate)
    (grad,) = torch.autograd.grad(losses.token_divergence(s_BTV, t_BTV, LossSpec("akl")).sum(), s_BTV)
    logp_s, logp_t = torch.log_softmax(s_BTV, -1), torch.log_softmax(t_BTV, -1)
    gated_BT = g_head_BT * divergences.kl_teacher_student(logp_s, logp_t) + (1 - g_head_BT) * divergences.kl_student_teacher(
        logp_s, logp_t
    )
    (expected,) = torch.autograd.grad(gated_BT.sum(), s_BTV)
    close(grad, expected, rtol=1e-6, atol=1e-10)
