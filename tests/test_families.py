"""Real chat templates: tiny random models of six families (Qwen2.5, Qwen3, Llama-3, Llama-2,
Gemma-2, Mistral v0.3) with their published templates (tests/fixtures/chat_templates/), special
and added tokens and generation configs, run through prompts, rollouts, training and evaluation
as a user would (msd.testing.families builds them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_queries
from msd import families
from msd.cli import main
from msd.config import ModelConfig
from msd.generation import eos_ids, generate
from msd.models import load_model_and_tokenizer
from msd.prompts import PromptBuilder, teacher_message
from msd.scoring import build_inputs
from msd.testing.families import TINY_FAMILIES, make_family_model

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SIX = ["qwen2.5", "qwen3", "llama-3", "llama-2", "gemma-2", "mistral"]
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama-3": "<|eot_id|>",
               "llama-3-old": "<|eot_id|>", "llama-2": "</s>", "gemma-2": "<end_of_turn>",
               "mistral": "</s>"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_family_model(root / name, name, (TEMPLATES / fam.template).read_text())
            for name, fam in TINY_FAMILIES.items()}


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    return write_queries(tmp_path_factory.mktemp("q") / "queries.jsonl", n=8, langs=("jv",))


def load(folder, dtype="float32"):
    return load_model_and_tokenizer(ModelConfig(name_or_path=str(folder), dtype=dtype))


def template_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("family", SIX)
def test_prompt_ids_equal_apply_chat_template(family_dirs, family):
    _, tok = load(family_dirs[family])
    for thinking in (False, True):
        ids = PromptBuilder(tok, enable_thinking=thinking).student("how do I make bread?")
        assert ids == template_ids(tok, [{"role": "user", "content": "how do I make bread?"}],
                                   enable_thinking=thinking)
    builder = PromptBuilder(tok)
    teacher = builder.teacher("tell me about fire", "how do I make fire", "jv")
    message = teacher_message("tell me about fire", "how do I make fire", "jv", builder.template)
    assert teacher == template_ids(tok, [{"role": "user", "content": message}], enable_thinking=False)


@pytest.mark.parametrize("family", SIX)
def test_system_prompt_reaches_the_prompt(family_dirs, family):
    """Gemma's template raises on a system role: the system prompt opens the user turn."""
    _, tok = load(family_dirs[family])
    ids = PromptBuilder(tok, system_prompt="Be kind always.").student("how do I make bread?")
    text = tok.decode(ids)
    assert "Be kind always." in text and "how do I make bread?" in text
    if family == "gemma-2":
        assert text.startswith("<bos><start_of_turn>user\nBe kind always.\n\nhow do I make bread?")


@pytest.mark.parametrize("family", SIX)
def test_student_and_teacher_responses_line_up(family_dirs, family):
    """The generation prompt is a token prefix of the rendered conversation, and a response sits
    at the same columns after the student and the teacher prompt."""
    _, tok = load(family_dirs[family])
    builder = PromptBuilder(tok)
    prompt = builder.student("how do I make bread?")
    reply = [{"role": "user", "content": "how do I make bread?"},
             {"role": "assistant", "content": "here are steps one two"}]
    full = tok(tok.apply_chat_template(reply, tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[:len(prompt)] == prompt
    response = full[len(prompt):]
    s = build_inputs([prompt], [response], tok.pad_token_id, "cpu")
    t = build_inputs([builder.teacher("how do I make bread?", "how do I make bread?", "jv")],
                     [response], tok.pad_token_id, "cpu")
    T = len(response)
    assert s.ids_BS[0, s.prompt_cols:s.prompt_cols + T].tolist() == response
    assert t.ids_BS[0, t.prompt_cols:t.prompt_cols + T].tolist() == response


# ----------------------------------------------------------------------------- stopping

@pytest.mark.parametrize("family", [*SIX, "llama-3-old"])
def test_eos_set_holds_the_end_of_turn_token(family_dirs, family):
    model, tok = load(family_dirs[family])
    assert tok.convert_tokens_to_ids(END_OF_TURN[family]) in eos_ids(model, tok)


def _always_emit(model, token_id: int) -> None:
    """Make the head predict `token_id` whatever the input (a biased zero head)."""
    lm = model.get_output_embeddings()
    head = torch.nn.Linear(lm.in_features, lm.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token_id] = 10.0
    model.set_output_embeddings(head)


@pytest.mark.parametrize("backend", ["loop", "hf"])
@pytest.mark.parametrize("family", [*SIX, "llama-3-old"])
def test_rollouts_stop_at_the_end_of_turn(family_dirs, family, backend):
    model, tok = load(family_dirs[family])
    eot = tok.convert_tokens_to_ids(END_OF_TURN[family])
    _always_emit(model, eot)
    out = generate(model, tok, [PromptBuilder(tok).student("hello")], max_new_tokens=8,
                   temperature=0.0, backend=backend)
    assert out[0][0] == [eot]


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "gemma-2"])
def test_every_backend_gives_the_same_greedy_tokens(family_dirs, family):
    """Nothing from generation_config (Qwen2.5: repetition_penalty) leaks into hf / compiled."""
    model, tok = load(family_dirs[family])
    model.generation_config.repetition_penalty = 5.0  # exaggerated: any leak changes the tokens
    model.generation_config.no_repeat_ngram_size = 1
    prompts = [PromptBuilder(tok).student(q) for q in ("how do I make bread?", "tell me about fire")]
    outs = {b: generate(model, tok, prompts, max_new_tokens=12, temperature=0.0, backend=b)
            for b in ("loop", "hf", "compiled")}
    assert outs["loop"] == outs["hf"] == outs["compiled"]
    assert model.generation_config.repetition_penalty == 5.0  # the model's own config is kept


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("family", SIX)
def test_decoded_answers_hold_no_template_marker_or_added_token(family_dirs, family):
    _, tok = load(family_dirs[family])
    marks = sorted(set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()})
    text = " ".join(marks[:3]) + " here are steps " + " ".join(marks[3:])
    answer, thinking = families.decode_answer(tok, tok(text, add_special_tokens=False)["input_ids"])
    assert not [m for m in marks if m in answer] and "here are steps" in answer
    assert answer.split() == ["here", "are", "steps"] or thinking is not None


def test_whitespace_added_tokens_stay_in_answers(family_dirs):
    """Gemma adds runs of spaces and newlines as (non-special) tokens: they are text."""
    from tokenizers import AddedToken

    _, tok = load(family_dirs["gemma-2"])
    tok.add_tokens([AddedToken("\n\n\n", special=False, normalized=False), AddedToken("<h1>", special=False)])
    ids = tok("one\n\n\ntwo<h1>three", add_special_tokens=False)["input_ids"]
    assert families.decode_answer(tok, ids)[0] == "one\n\n\ntwothree"


def test_qwen3_answer_is_the_text_after_the_think_block(family_dirs):
    _, tok = load(family_dirs["qwen3"])
    ids = tok("<think>\nfirst decide\n</think>\n\nsorry I can not<|im_end|>", add_special_tokens=False)["input_ids"]
    assert families.decode_answer(tok, ids) == ("sorry I can not", "first decide")
    ids = tok("<think>\nfirst decide and then", add_special_tokens=False)["input_ids"]
    assert families.decode_answer(tok, ids) == ("", "first decide and then")  # truncated


# ----------------------------------------------------------------------------- train and eval

def _train(folder, queries, out, *extra):
    rc = main(["train", "--quiet", f"model.name_or_path={folder}", f"data.source={queries}",
               "data.languages=[jv]", f"train.output_dir={out}", "train.batch_size=2",
               "train.max_steps=2", "train.lr=1e-3", "rollout.max_new_tokens=6", "lora.r=2",
               "lora.target_modules=[q_proj,v_proj]", *extra])
    assert rc == 0
    logs = [json.loads(l) for l in (Path(out) / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["loss"] == r["loss"] for r in logs)
    return logs


@pytest.mark.parametrize("family", SIX)
def test_lora_and_full_fine_tuning(family_dirs, queries, tmp_path, family):
    _train(family_dirs[family], queries, tmp_path / "lora")
    _train(family_dirs[family], queries, tmp_path / "full", "lora.enabled=false", "train.mode=off_policy")


@pytest.mark.parametrize("family", SIX)
def test_bf16_weights_with_bf16_mixed_precision_and_the_default_loss(family_dirs, queries, tmp_path, family):
    """Fixed bug: the chunked loss crashed at step 1 (float32 hidden states, bfloat16 head)."""
    for lora in (True, False):  # full fine-tuning: float32 master weights, bfloat16 teacher
        _train(family_dirs[family], queries, tmp_path / f"run{lora}", "model.dtype=bfloat16",
               "train.mixed_precision=bf16", f"lora.enabled={lora}")


@pytest.mark.parametrize("family", SIX)
def test_eval_records_hold_clean_answers(family_dirs, queries, tmp_path, family):
    out = tmp_path / "ev"
    assert main(["eval", "safety", "--quiet", "--model", str(family_dirs[family]), "--benchmark",
                 queries, "--langs", "jv", "--judge", "keyword", "--max-new-tokens", "24",
                 "--temperature", "1.0", "--system-prompt", "Be kind.", "--out", str(out)]) == 0
    _, tok = load(family_dirs[family])
    marks = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert records and not [m for r in records for m in marks if m in r["response"]]


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3_thinking_in_train_and_eval(family_dirs, queries, tmp_path, thinking):
    folder = family_dirs["qwen3"]
    _train(folder, queries, tmp_path / "run", f"model.enable_thinking={thinking}")
    batch = [json.loads(l) for l in (tmp_path / "run" / "token_batches" / "step_1.jsonl").read_text().splitlines()]
    assert batch
    _, tok = load(folder)
    ids = PromptBuilder(tok, enable_thinking=thinking).student("hello")
    assert tok.decode(ids).endswith("<think>\n\n</think>\n\n") != thinking
    out = tmp_path / "ev"
    args = ["eval", "safety", "--quiet", "--model", str(folder), "--benchmark", queries, "--langs",
            "jv", "--judge", "keyword", "--max-new-tokens", "8", "--limit", "2", "--out", str(out)]
    assert main(args + (["--enable-thinking"] if thinking else [])) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["enable_thinking"] is thinking
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert all("thinking" in r for r in records)
    # The setting is part of the resume fingerprint: the other mode refuses the same folder.
    assert main(args + ([] if thinking else ["--enable-thinking"])) == 2
