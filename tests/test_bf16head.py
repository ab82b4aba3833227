"""The decode loop's bfloat16 head (`msd.generation.bf16head`). Greedy: the same ids as the
float32 logits' argmax, on heads of several shapes and scales, with bias, ties, hidden states
large enough that the bound says nothing, and non-finite rows; through the decode loop, the
same greedy responses as `model.generate`. Sampling: exactly the float32 distribution, even
from a proposal biased as far as the bound allows."""

import pytest
import torch

from msd.generation import generate
from msd.generation.bf16head import ERROR_FACTOR, Bf16Head, usable


def _head(V, H, std, bias=False, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=bias)
    head.weight.data.normal_(0.0, std)
    if bias:
        head.bias.data.normal_(0.0, 1.0)
    return head


@pytest.mark.parametrize("V,H,std,bias", [(151_936, 64, 0.02, False), (50_000, 256, 0.05, True),
                                          (8_192, 16, 1.0, False), (4_099, 48, 0.3, True)])
def test_argmax_equals_the_float32_argmax(V, H, std, bias):
    head = _head(V, H, std, bias)
    for scale in (0.1, 1.0, 30.0):
        h = torch.randn(9, H) * scale
        want = torch.nn.functional.linear(h, head.weight, head.bias).argmax(-1)
        assert torch.equal(Bf16Head(head).argmax(h), want)


def test_the_error_bound_holds_with_margin():
    """The bfloat16 estimate's error stays well inside delta = ERROR_FACTOR |h| |W_v|."""
    head = _head(32_000, 512, 0.05)
    h = torch.randn(16, 512) * 5
    exact = torch.nn.functional.linear(h.double(), head.weight.double())
    est = Bf16Head(head).estimate(h)[0].double()
    bound = ERROR_FACTOR * h.double().norm(dim=-1, keepdim=True) * head.weight.double().norm(dim=1)
    assert ((est - exact).abs() / bound).max() < 0.5


def test_packed_weight_gives_the_plain_bfloat16_product():
    """oneDNN's packed layout (where torch has it) computes the same bfloat16 values as a
    plain matrix multiply, for any row count."""
    head = _head(20_000, 96, 0.05)
    fast = Bf16Head(head, rows=8)
    if fast.packed is None:
        pytest.skip("torch without oneDNN's packed linear")
    for rows in (1, 8, 13):
        h = torch.randn(rows, 96)
        assert torch.equal(fast.estimate(h)[0], torch.mm(h.bfloat16(), head.weight.detach().bfloat16().T))


def test_ties_go_to_the_lowest_id_and_near_ties_are_resolved_in_float32():
    head = _head(10_000, 32, 0.1)
    with torch.no_grad():
        head.weight[7001] = head.weight[42]  # an exact tie: argmax takes the first
        head.weight[5003] = head.weight[77] * (1 + 1e-6)  # closer than bfloat16 can tell
    h = torch.stack([head.weight[42], head.weight[77], -head.weight[77]]).detach() * 50
    want = torch.nn.functional.linear(h, head.weight).argmax(-1)
    assert want[0] == 42
    assert torch.equal(Bf16Head(head).argmax(h), want)


def test_near_ties_bfloat16_cannot_tell_apart_are_settled_in_float32():
    """Each row's best id gets a rival whose weight differs by 1e-4 relative noise: the plain
    bfloat16 argmax picks the wrong one on many rows; the certified argmax never does (a floor
    narrower than the bound, e.g. ERROR_FACTOR = 0, misses some)."""
    torch.manual_seed(0)
    head = _head(50_000, 256, 0.05)
    h = torch.randn(64, 256)
    with torch.no_grad():
        best = torch.nn.functional.linear(h, head.weight).argmax(-1)
        rivals = torch.randperm(50_000)[:64]
        for b, r in zip(best.tolist(), rivals.tolist()):
            if r != b:
                head.weight[r] = head.weight[b] + 1e-4 * torch.randn(256) * head.weight[b].abs().mean()
    # The reference is float64: at 1e-4 noise some rivals lie closer than a float32 GEMM's own
    # rounding, and on some CPUs (oneDNN with AVX-512) the GEMM then picks the wrong id of the
    # two. Fixed bug: the test compared with the GEMM's argmax and failed there, on a row whose
    # float64 order the certified argmax had right. Rows closer than float32 can tell are left out.
    z64_BV = torch.nn.functional.linear(h.double(), head.weight.detach().double())
    top2 = z64_BV.topk(2, dim=-1).values
    f32_error_B = 2.0 ** -20 * (h.double().abs() @ head.weight.detach().double().abs().T).amax(-1)
    clear = (top2[:, 0] - top2[:, 1]) > f32_error_B
    want = z64_BV.argmax(-1)
    plain = torch.mm(h.bfloat16(), head.weight.detach().bfloat16().T).float().argmax(-1)
    assert int((plain[clear] != want[clear]).sum()) >= 5  # the case is really exercised
    assert int(clear.sum()) >= 56
    assert torch.equal(Bf16Head(head).argmax(h)[clear], want[clear])


def test_rows_the_bound_cannot_settle_go_float32():
    """Huge or non-finite hidden states: the candidate search gives up and the row is projected
    in float32 (the result is still the float32 argmax, NaN rows included)."""
    head = _head(8_192, 32, 0.02)
    h = torch.randn(4, 32)
    h[1] *= 1e30  # delta overflows
    h[2, 0] = float("nan")
    h[3] = 0.0  # every logit equal: all ids are candidates
    want = torch.nn.functional.linear(h, head.weight).argmax(-1)
    assert torch.equal(Bf16Head(head).argmax(h), want)


def test_a_new_copy_sees_weights_changed_in_place():
    head = _head(8_192, 32, 0.1)
    h = torch.randn(3, 32)
    Bf16Head(head).argmax(h)
    with torch.no_grad():
        head.weight.mul_(-1.0)
    want = torch.nn.functional.linear(h, head.weight).argmax(-1)
    assert torch.equal(Bf16Head(head).argmax(h), want)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_is_exact_even_from_a_biased_proposal(temperature):
    """The proposal is pushed by up to delta away from the true logits (the worst the bound
    allows); rejection must still return softmax(z / T) exactly: a chi-square test over
    40,000 draws, and the biased proposal alone fails the same test."""
    torch.manual_seed(0)
    V, H, n = 12, 8, 40_000
    head = _head(V, H, 0.4, bias=True)
    h = torch.randn(1, H).expand(n, H).contiguous()
    fast = Bf16Head(head)
    z_V = torch.nn.functional.linear(h[:1], head.weight, head.bias)[0].detach()
    push_V = torch.tensor([1.0, -1.0] * (V // 2))
    delta = 0.3 * temperature

    def biased(hh):
        return z_V.expand(len(hh), V) + delta * push_V, torch.full((len(hh),), delta)

    fast.estimate = biased
    g = torch.Generator().manual_seed(1)
    ids = fast.sample(h, temperature, g)
    p_V = torch.softmax(z_V.double() / temperature, -1)
    counts = torch.bincount(ids, minlength=V).double()
    chi2 = float(((counts - n * p_V) ** 2 / (n * p_V)).sum())
    assert chi2 < 31.3  # 11 degrees of freedom, p = 0.001
    q_V = torch.softmax((z_V.double() + delta * push_V) / temperature, -1)
    proposal = torch.multinomial(q_V, n, replacement=True, generator=g)
    counts_q = torch.bincount(proposal, minlength=V).double()
    assert float(((counts_q - n * p_V) ** 2 / (n * p_V)).sum()) > 100


def test_sampling_rows_the_bound_cannot_settle_go_float32():
    head = _head(8_192, 32, 0.02)
    h = torch.randn(3, 32)
    h[1] *= 1e6  # delta far above MAX_SAMPLING_DELTA: sampled from the float32 logits
    ids = Bf16Head(head).sample(h, 1.0, torch.Generator().manual_seed(0))
    assert ids.shape == (3,) and bool(((ids >= 0) & (ids < 8_192)).all())
    assert ids[1] == torch.nn.functional.linear(h[1:2], head.weight).argmax(-1)[0]  # that peaked


def test_usable_only_for_large_float32_cpu_heads():
    assert not usable(torch.nn.Linear(8, 1000))
    assert not usable(torch.nn.Linear(8, 8192).to(torch.bfloat16))


def test_greedy_loop_matches_model_generate(tmp_path, monkeypatch):
    """The decode loop's greedy responses (certified argmax) equal transformers' own."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from msd.testing import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", hidden=32, extra_words=[f"x{i}" for i in range(5000)])
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    head = model.get_output_embeddings()
    if not usable(head):
        pytest.skip("no native bfloat16 matrix instructions on this CPU")
    calls = []
    real = Bf16Head.argmax
    monkeypatch.setattr(Bf16Head, "argmax", lambda self, h: calls.append(1) or real(self, h))
    prompts = [tok(t)["input_ids"] for t in ("how do I make bread", "tell me about fire", "x17 x4000 the")]
    kw = dict(max_new_tokens=12, temperature=0.0, batch_size=3)
    assert generate(model, tok, prompts, backend="loop", **kw) == generate(model, tok, prompts, backend="hf", **kw)
    assert calls


def test_sampling_loop_uses_the_bfloat16_head(tmp_path, monkeypatch):
    """Plain temperature sampling goes through the bfloat16 head; asking for log-probs or
    filtering (top-k) does not."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from msd.testing import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", hidden=32, extra_words=[f"x{i}" for i in range(5000)])
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    if not usable(model.get_output_embeddings()):
        pytest.skip("no native bfloat16 matrix instructions on this CPU")
    calls = []
    real = Bf16Head.sample
    monkeypatch.setattr(Bf16Head, "sample", lambda self, *a: calls.append(1) or real(self, *a))
    prompts = [tok(t)["input_ids"] for t in ("how do I make bread", "tell me about fire")]
    kw = dict(max_new_tokens=6, batch_size=2, backend="loop", seed=3)
    first = generate(model, tok, prompts, **kw)
    assert calls and first == generate(model, tok, prompts, **kw)  # seeded
    assert all(0 < len(r[0]) <= 6 and max(r[0]) < len(tok) for r in first)
    calls.clear()
    generate(model, tok, prompts, return_logprobs=True, **kw)
    generate(model, tok, prompts, top_k=5, **kw)
    assert not calls
