"""Rollouts: padding, EOS cutting, several samples, seeding, order, and agreement with scoring."""

import pytest
import torch

from msd.config import LoraConfig, ModelConfig
from msd.models import apply_lora, load_model_and_tokenizer
from msd.generation import BACKENDS, cut_after_eos, draw, generate, rollout_weights, sample_next
from msd.padding import left_pad
from msd.scoring import build_inputs, response_logits

BUILT_IN = ["loop", "hf", "compiled"]


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B matrices are non-zero (so it changes outputs)."""
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model, tok


def _prompts(tok):
    texts = ["how do I make bread", "tell me", "fire water harm the a to you can not", "please help me"]
    return [tok(t)["input_ids"] for t in texts]  # four distinct lengths: sorting permutes them


def test_left_pad_and_width():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu", width=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_cut_after_eos_keeps_the_first_eos():
    assert cut_after_eos([4, 5, 2, 6, 2], {2}) == [4, 5, 2]
    assert cut_after_eos([4, 5], {2}) == [4, 5]
    assert cut_after_eos([2], {2, 3}) == [2]


@pytest.mark.parametrize("backend", BUILT_IN)
def test_several_samples_and_seed_determinism(lora_model, backend):
    model, tok = lora_model
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=6, num_samples=3, batch_size=3, backend=backend)
    a = generate(model, tok, prompts, seed=7, **kw)
    b = generate(model, tok, prompts, seed=7, **kw)
    c = generate(model, tok, prompts, seed=8, **kw)
    assert len(a) == len(prompts) and all(len(per) == 3 for per in a)
    assert all(1 <= len(r) <= 6 for per in a for r in per)
    assert a == b
    assert a != c
    assert len({tuple(r) for per in a for r in per}) > len(prompts)  # samples differ


@pytest.mark.parametrize("backend", BUILT_IN)
def test_eos_cuts_the_response(lora_model, backend):
    """Greedy decoding does not depend on which id is EOS until it stops, so declaring a token
    of a greedy response as EOS must cut that response right after its first occurrence."""
    model, tok = lora_model
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=8, temperature=0.0, batch_size=4, backend=backend)
    before = generate(model, tok, prompts, **kw)
    target = before[0][0][3]
    old_tok, old_gen = tok.eos_token_id, model.generation_config.eos_token_id
    try:
        tok.eos_token_id = target
        model.generation_config.eos_token_id = target
        after = generate(model, tok, prompts, **kw)
    finally:
        tok.eos_token_id, model.generation_config.eos_token_id = old_tok, old_gen
    for per_b, per_a in zip(before, after):
        full = per_b[0]
        cut = full[: full.index(target) + 1] if target in full else full
        # ids after the old EOS differ (the old EOS no longer stops), so compare up to it
        n = min(len(cut), len(per_a[0]))
        assert per_a[0][:n] == cut[:n]
        if target in full:
            assert per_a[0] == cut
    assert after[0][0] == before[0][0][: before[0][0].index(target) + 1]


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("backend", BUILT_IN)
def test_rollout_logprobs_equal_scoring(lora_model, backend, merge):
    """log p(sampled token) at temperature 1 from the rollout equals the student scoring pass
    (`scoring.response_logits`) on the same tokens, LoRA merged or not. This also shows that
    response i belongs to prompt i after the length sort (another prompt scores differently)."""
    model, tok = lora_model
    prompts = _prompts(tok)
    tokens, logps = generate(model, tok, prompts, max_new_tokens=6, num_samples=2, batch_size=3,
                             seed=3, backend=backend, merge_lora=merge, return_logprobs=True)
    flat_p = [p for p in prompts for _ in range(2)]
    flat_r = [r for per in tokens for r in per]
    flat_l = [l for per in logps for l in per]
    batch = build_inputs(flat_p, flat_r, tok.pad_token_id, "cpu")
    T = max(len(r) for r in flat_r)
    with torch.no_grad():
        ref = response_logits(model, batch, T).float().log_softmax(-1)
    for i, (r, lp) in enumerate(zip(flat_r, flat_l)):
        assert len(lp) == len(r)
        got = torch.tensor(lp)
        want = ref[i, torch.arange(len(r)), torch.tensor(r)]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_merge_leaves_no_trace_and_training_mode_is_restored(lora_model):
    model, tok = lora_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    generate(model, tok, _prompts(tok), max_new_tokens=4, merge_lora=True)
    assert model.training
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], atol=1e-6, rtol=0)


def test_half_precision_lora_samples_from_a_merged_copy(tiny_model_dir):
    """bfloat16: the adapter is folded into a separate copy; the base weights stay bit-identical."""
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16"))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base_before = layer.base_layer.weight.detach().clone()
    expect = (base_before.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    x = torch.randn(2, base_before.shape[1], dtype=torch.bfloat16)
    with rollout_weights(model, True) as how:
        assert how == "merged_copy"
        assert torch.equal(layer.base_layer.weight, expect)
        merged_out = layer(x)
    assert torch.equal(layer.base_layer.weight, base_before)  # bitwise: no round trip
    torch.testing.assert_close(merged_out, x @ expect.T, atol=0, rtol=0)


def test_sampler_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 3000) * 2  # spans several sampling blocks plus a partial one
    logits[0, 2999] = 6.0  # a heavy id in the partial last block
    probs = logits.softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    n = 40_000
    draws = torch.cat([draw(probs.expand(1000, -1).contiguous(), g) for _ in range(n // 1000)])
    freq = torch.bincount(draws, minlength=3000).float() / n
    assert (freq - probs).abs().sum() < 0.25  # total variation, sampling noise ~0.15 at n=40k
    assert abs(freq[2999] - probs[2999]) < 0.01


def test_sample_next_filters_and_greedy():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]]).expand(500, -1)
    g = torch.Generator().manual_seed(1)
    tok, logp = sample_next(logits, 1.0, 1.0, 2, g)
    assert set(tok.tolist()) == {2, 3}
    torch.testing.assert_close(logp, logits.log_softmax(-1).gather(1, tok[:, None]).squeeze(1))
    p = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps ids 3 and 2
    assert p[3] < 0.8 < p[3] + p[2]
    tok, _ = sample_next(logits, 1.0, 0.8, 0, g)
    assert set(tok.tolist()) == {2, 3}
    tok, _ = sample_next(logits, 0.0, 1.0, 0, g)
    assert set(tok.tolist()) == {3}


def test_a_backend_registered_from_outside_is_used(lora_model):
    """One `BACKENDS.register` call adds a backend: generate looks it up by name, hands it the
    resolved sampling settings and returns what it returns."""
    model, tok = lora_model
    prompts = _prompts(tok)
    calls = []

    def counting_hf(model, prompts, sampling):
        calls.append((len(prompts), sampling.num_samples, sampling.seed))
        return BACKENDS.get("hf")(model, prompts, sampling)

    kw = dict(max_new_tokens=5, num_samples=2, batch_size=3, seed=4, return_logprobs=True)
    BACKENDS.register("counting_hf", counting_hf)
    try:
        assert "counting_hf" in BACKENDS
        tokens, logps = generate(model, tok, prompts, backend="counting_hf", **kw)
    finally:
        BACKENDS.unregister("counting_hf")
    assert calls == [(len(prompts), 2, 4)]
    assert (tokens, logps) == generate(model, tok, prompts, backend="hf", **kw)
    assert len(tokens) == len(prompts) and all(len(per) == 2 for per in tokens)
    assert all(1 <= len(r) <= 5 and len(lp) == len(r) for per, lps in zip(tokens, logps)
               for r, lp in zip(per, lps))


def test_compiled_pads_to_the_prompt_count_not_the_batch_size(lora_model):
    """3 prompts with rollout.batch_size 32 run as 4 rows (the next power of two), not 32."""
    from msd.generation.backends import row_bucket

    assert [row_bucket(n, 32) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert row_bucket(5, 6) == 6
    model, tok = lora_model
    rows, real = [], model.generate

    def spy(*args, **kw):
        rows.append(kw["input_ids"].shape[0])
        return real(*args, **kw)

    model.generate = spy
    try:
        out = generate(model, tok, _prompts(tok)[:3], max_new_tokens=4, temperature=0, batch_size=32,
                       backend="compiled")
    finally:
        del model.generate
    assert rows == [4]
    assert out == generate(model, tok, _prompts(tok)[:3], max_new_tokens=4, temperature=0,
                           batch_size=32, backend="hf")


class _HeadByHand(torch.nn.Module):
    """A causal LM whose forward uses its head's weight without calling the head module (as
    some remote-code models do): the scoring pass cannot take the head's input from a hook."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, logits_to_keep=0, output_hidden_states=False, **kw):
        from types import SimpleNamespace

        hidden = self.lm.model(**kw).last_hidden_state
        logits = torch.nn.functional.linear(hidden[:, -logits_to_keep:], self.get_output_embeddings().weight)
        return SimpleNamespace(logits=logits, hidden_states=(hidden,) if output_hidden_states else None)


def test_response_hidden_is_the_heads_input_and_never_projects(tiny_model_dir, monkeypatch):
    """The scoring pass takes the response positions' hidden states as they enter the head,
    which projects nothing; they equal the model's last hidden states. A model that does not
    call its head module gets the same states through output_hidden_states."""
    from msd.scoring import response_hidden

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    prompts = [tok(t)["input_ids"] for t in ("how do I make bread", "tell me")]
    responses = [[5, 9, 11], [7]]
    batch = build_inputs(prompts, responses, tok.pad_token_id, "cpu")
    T = 3
    with torch.no_grad():
        out = model(input_ids=batch.ids_BS, attention_mask=batch.mask_BS, position_ids=batch.pos_BS,
                    output_hidden_states=True, use_cache=False)
        want = out.hidden_states[-1][:, batch.prompt_cols - 1:batch.prompt_cols - 1 + T]
        rows = []
        head = model.get_output_embeddings()
        monkeypatch.setattr(head, "forward",
                            lambda input: rows.append(input.shape[-2]) or torch.nn.Linear.forward(head, input))
        got = response_hidden(model, batch, T)
        assert rows == [0]  # the head ran on an empty slice
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(response_hidden(_HeadByHand(model), batch, T), want, rtol=1e-6, atol=1e-6)
        rows.clear()
        torch.testing.assert_close(response_hidden(_HeadByKeyword(model), batch, T), want, rtol=1e-6, atol=1e-6)
        assert rows == [0]  # called with input=..., still handed an empty slice


class _HeadByKeyword(_HeadByHand):
    """Calls its head with a keyword argument and ignores logits_to_keep (every position)."""

    def forward(self, logits_to_keep=0, output_hidden_states=False, **kw):
        from types import SimpleNamespace

        hidden = self.lm.model(**kw).last_hidden_state
        return SimpleNamespace(logits=self.get_output_embeddings()(input=hidden), hidden_states=None)


def test_project_adds_the_bias_once_into_buffers_or_not():
    """The decode loop's projection equals the head's own call (bias included once), written
    into reused buffers or not."""
    from msd.generation.sampler import DecodeBuffers, project

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300)
    h = torch.randn(5, 16)
    want = head(h).detach()
    buffers = DecodeBuffers(5, head, logits=True, weights=False)
    with torch.no_grad():
        torch.testing.assert_close(project(h, head), want)
        torch.testing.assert_close(project(h, head, buffers), want)
        assert project(h, head, buffers).data_ptr() == buffers.z_BV.data_ptr()
        torch.testing.assert_close(project(h[:3], head, buffers), want[:3])  # other row count
