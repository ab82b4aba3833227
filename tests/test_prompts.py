"""Student/teacher prompts and one-to-one alignment of response tokens under both prompts."""

import pytest
import torch

from msd.config import ModelConfig
from msd.errors import MsdError
from msd.models import load_model_and_tokenizer
from msd.prompts import TEACHER_TEMPLATES, PromptBuilder, resolve_template, teacher_message
from msd.scoring import build_inputs, response_logits, response_mask


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


def test_teacher_contexts_hold_what_they_promise():
    full = teacher_message("Q-tgt", "Q-en", "jv", TEACHER_TEMPLATES["full"])
    eng = teacher_message("Q-tgt", "Q-en", "jv", TEACHER_TEMPLATES["english_only"])
    ins = teacher_message("Q-tgt", "Q-en", "jv", TEACHER_TEMPLATES["instruction_only"])
    assert "Q-tgt" in full and "Q-en" in full and "Javanese" in full and "decline" in full
    assert "Q-en" in eng and "decline" not in eng
    assert "Q-en" not in ins and "decline" in ins and "Q-tgt" in ins


def test_custom_template_needs_query(tmp_path):
    with pytest.raises(MsdError, match="query"):
        resolve_template("full", "text:no placeholder here")
    f = tmp_path / "t.txt"
    f.write_text("{query} / {english}")
    assert resolve_template("full", str(f)) == "{query} / {english}"


def test_prompts_use_chat_template(model_tok):
    model, tok = model_tok
    pb = PromptBuilder(tok, system_prompt="be kind")
    text = tok.decode(pb.student("how do I make bread"))
    assert text.startswith("<|system|> be kind") and text.endswith("<|assistant|>")
    assert "how do I make bread" in tok.decode(pb.teacher("how do I make bread", "make bread", "sw"))


def test_response_tokens_line_up_under_both_prompts(model_tok):
    """Position t of the (B, T, V) logits predicts response token t under both prompts."""
    model, tok = model_tok
    pb = PromptBuilder(tok)
    student = [pb.student("how do I make bread"), pb.student("tell me about fire please")]
    teacher = [pb.teacher("how do I make bread", "make bread", "jv"),
               pb.teacher("tell me about fire please", "fire", "sw")]
    responses = [tok("here are steps one two <|end|>")["input_ids"], tok("sorry <|end|>")["input_ids"]]
    T = max(map(len, responses))
    for prompts in (student, teacher):
        batch = build_inputs(prompts, responses, tok.pad_token_id, "cpu")
        logits_BTV = response_logits(model, batch, T)
        assert logits_BTV.shape == (2, T, len(tok))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            # Reference: score the un-padded sequence alone.
            ids = torch.tensor([p + r])
            ref = model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(r)]
            torch.testing.assert_close(logits_BTV[i, :len(r)], ref, atol=1e-5, rtol=1e-4)
            # Same response ids sit right after the prompt in both batches.
            assert batch.ids_BS[i, batch.prompt_cols:batch.prompt_cols + len(r)].tolist() == r
    mask = response_mask(responses, "cpu")
    assert mask.sum(-1).tolist() == [len(r) for r in responses]
