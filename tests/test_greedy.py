"""Greedy decoding's certified bfloat16 argmax (`msd.generation.greedy`): the same ids as the
float32 logits' argmax, on heads of several shapes and scales, with bias, ties, hidden states
large enough that the bound says nothing, and non-finite rows; and through the decode loop,
the same greedy responses as `model.generate`."""

import pytest
import torch

from msd.generation import generate, greedy


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
        assert torch.equal(greedy.argmax_logits(h, head), want)


def test_the_error_bound_holds_with_margin():
    """The bfloat16 estimate's error stays well inside delta = ERROR_FACTOR |h| |W_v|."""
    head = _head(32_000, 512, 0.05)
    h = torch.randn(16, 512) * 5
    exact = torch.nn.functional.linear(h.double(), head.weight.double())
    est = torch.mm(h.bfloat16(), head.weight.bfloat16().T).double()
    bound = greedy.ERROR_FACTOR * h.double().norm(dim=-1, keepdim=True) * head.weight.double().norm(dim=1)
    assert ((est - exact).abs() / bound).max() < 0.5


def test_ties_go_to_the_lowest_id_and_near_ties_are_resolved_in_float32():
    head = _head(10_000, 32, 0.1)
    with torch.no_grad():
        head.weight[7001] = head.weight[42]  # an exact tie: argmax takes the first
        head.weight[5003] = head.weight[77] * (1 + 1e-6)  # closer than bfloat16 can tell
    h = torch.stack([head.weight[42], head.weight[77], -head.weight[77]]).detach() * 50
    want = torch.nn.functional.linear(h, head.weight).argmax(-1)
    assert want[0] == 42
    assert torch.equal(greedy.argmax_logits(h, head), want)


def test_rows_the_bound_cannot_settle_go_float32():
    """Huge or non-finite hidden states: the candidate search gives up and the row is projected
    in float32 (the result is still the float32 argmax, NaN rows included)."""
    head = _head(8_192, 32, 0.02)
    h = torch.randn(4, 32)
    h[1] *= 1e30  # delta overflows
    h[2, 0] = float("nan")
    h[3] = 0.0  # every logit equal: all ids are candidates
    want = torch.nn.functional.linear(h, head.weight).argmax(-1)
    assert torch.equal(greedy.argmax_logits(h, head), want)


def test_weights_changed_in_place_are_seen():
    head = _head(8_192, 32, 0.1)
    h = torch.randn(3, 32)
    greedy.argmax_logits(h, head)
    with torch.no_grad():
        head.weight.mul_(-1.0)
    want = torch.nn.functional.linear(h, head.weight).argmax(-1)
    assert torch.equal(greedy.argmax_logits(h, head), want)


def test_usable_only_for_large_float32_cpu_heads():
    assert not greedy.usable(torch.nn.Linear(8, 1000))
    assert not greedy.usable(torch.nn.Linear(8, 8192).to(torch.bfloat16))


def test_greedy_loop_matches_model_generate(tmp_path, monkeypatch):
    """The decode loop's greedy responses (certified argmax) equal transformers' own."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from msd.testing import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", hidden=32, extra_words=[f"x{i}" for i in range(5000)])
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    head = model.get_output_embeddings()
    if not greedy.usable(head):
        pytest.skip("no native bfloat16 matrix instructions on this CPU")
    calls = []
    real = greedy.argmax_logits
    monkeypatch.setattr("msd.generation.sampler.argmax_logits",
                        lambda h, hd: calls.append(1) or real(h, hd))
    prompts = [tok(t)["input_ids"] for t in ("how do I make bread", "tell me about fire", "x17 x4000 the")]
    kw = dict(max_new_tokens=12, temperature=0.0, batch_size=3)
    assert generate(model, tok, prompts, backend="loop", **kw) == generate(model, tok, prompts, backend="hf", **kw)
    assert calls
