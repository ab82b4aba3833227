"""Token text as a reader sees it (msd.tokentext): spans of whole characters for byte-level BPE,
byte-fallback SentencePiece and word-level tokenizers; answers cut mid-character."""

from __future__ import annotations

import pytest
import regex

from msd import families
from msd.testing.families import TINY_FAMILIES, family_tokenizer
from msd.tokentext import complete_text, piece_spans, token_spans

TEXTS = {
    "bengali": "আমি এতে সাহায্য করতে পারব না।",
    "hindi": "मैं इसमें मदद नहीं कर सकता।",
    "chinese": "我不能帮助你做这件事。",
    "thai": "ฉันช่วยเรื่องนี้ไม่ได้ค่ะ",
    "emoji": "family 👨‍👩‍👧‍👦 ok 👍🏽 🏳️‍🌈!",
    "quotes": "I can’t help — sorry. “Try” ‘this’…",
    "mixed": " two  spaces\nand a newline\tand আ tab ",
}


@pytest.fixture(scope="module")
def byte_bpe():
    """The tiny families' byte-level BPE (English corpus, 420 tokens): every character outside
    ASCII is split into its bytes, one token each, the case this module exists for."""
    return family_tokenizer(TINY_FAMILIES["qwen2.5"], "{{ messages }}")


@pytest.fixture(scope="module")
def sentencepiece():
    """A Llama-2-style tokenizer: SentencePiece pieces with '▁' for spaces, bytes for what the
    vocabulary lacks (<0xE0> ...), the Llama-2 decoder that drops the first leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "▁I", "▁can", "’", "t", "▁help", "▁sorry", "▁ok", "▁—", "а", "я", "我", "不"]
    letters = [c for c in "abcdefghijklmnopqrstuvwxyzIT.!,"]
    vocab = [(p, 0.0) for p in pieces] + [(p, -2.0) for p in words] + [(c, -5.0) for c in letters]
    core = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def word_level():
    from msd.organism.tokenizer import build_tokenizer

    return build_tokenizer(["I can not help with that .", "here are the steps"])


def graphemes_whole(text: str, spans) -> bool:
    bounds = {0} | {m.end() for m in regex.finditer(r"\X", text)}
    pos, ok = 0, True
    for t, _, _ in spans:
        pos += len(t)
        ok &= pos in bounds
    return ok


def check_spans(tok, text: str) -> list[str]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = token_spans(tok, ids)
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert "".join(t for t, _, _ in spans) == decoded  # nothing added, nothing lost
    assert [s for _, s, _ in spans] == [0] + [e for _, _, e in spans[:-1]] and spans[-1][2] == len(ids)
    assert not any("\ufffd" in t for t, _, _ in spans)
    assert graphemes_whole(decoded, spans)
    return [t for t, _, _ in spans]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_byte_level_bpe_spans_read_as_the_text(byte_bpe, name):
    text = TEXTS[name]
    ids = byte_bpe(text, add_special_tokens=False)["input_ids"]
    if name not in ("mixed",):  # the vocabulary splits every multibyte character into bytes
        assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)
    assert "".join(check_spans(byte_bpe, text)) == text
    # Raw pieces alone (token batches saved before spans were) give the same text and spans.
    pieces = byte_bpe.convert_ids_to_tokens(ids)
    assert piece_spans(pieces) == token_spans(byte_bpe, ids)


def test_characters_are_grouped_not_split(byte_bpe):
    texts = check_spans(byte_bpe, TEXTS["emoji"])
    assert "👨‍👩‍👧‍👦" in texts and "👍🏽" in texts or " 👍🏽" in texts  # ZWJ sequence, skin tone
    assert check_spans(byte_bpe, "আমি")[0] == "আ"  # a vowel sign stays with its consonant
    assert "মি" in check_spans(byte_bpe, "আমি")
    assert check_spans(byte_bpe, "I can’t help — sorry")[:3] == ["I", " can", "’"]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_sentencepiece_byte_fallback_spans(sentencepiece, name):
    text = TEXTS[name]
    ids = sentencepiece(text, add_special_tokens=False)["input_ids"]
    assert "".join(check_spans(sentencepiece, text)) == sentencepiece.decode(ids)
    if name != "mixed":
        assert any(p.startswith("<0x") for p in sentencepiece.convert_ids_to_tokens(ids))
        texts = [t for t, _, _ in piece_spans(sentencepiece.convert_ids_to_tokens(ids))]
        assert not any("\ufffd" in t for t in texts) and "".join(texts).strip() == text.strip()


def test_sentencepiece_spaces_come_from_the_text(sentencepiece):
    assert check_spans(sentencepiece, "I can’t help") == ["I", " can", "’", "t", " help"]


def test_word_level_spans(word_level):
    ids = word_level("I can not help .", add_special_tokens=False)["input_ids"]
    assert [t for t, _, _ in token_spans(word_level, ids)] == ["I", " can", " not", " help", " ."]
    assert [t for t, _, _ in piece_spans(word_level.convert_ids_to_tokens(ids))] == ["I", " can", " not", " help", " ."]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_answers_cut_mid_character_end_clean(byte_bpe, sentencepiece, name):
    for tok in (byte_bpe, sentencepiece):
        ids = tok(TEXTS[name], add_special_tokens=False)["input_ids"]
        whole = tok.decode(ids)
        for k in range(1, len(ids) + 1):
            cut = complete_text(tok, ids[:k])
            assert "\ufffd" not in cut and whole.startswith(cut)
            assert families.decode_answer(tok, ids[:k])[0] == cut
        assert complete_text(tok, ids) == tok.decode(ids)


def test_a_cut_answer_keeps_the_whole_characters_of_its_last_token():
    """A byte-level token may hold a whole character and the first byte of the next (`bà`:
    'b' + 0xE0): the cut drops the broken byte, not the 'b'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["bà"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "à")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    ids = [vocab["a"], vocab["bà"]]
    assert tok.decode(ids) == "ab\ufffd"
    assert complete_text(tok, ids) == "ab"
    assert [t for t, _, _ in token_spans(tok, ids + [vocab["¦"], vocab["Ĩ"]])] == ["a", "bআ"]


@pytest.mark.parametrize("name", ["bengali", "thai", "emoji", "quotes"])
@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece"])
def test_spans_of_an_answer_cut_mid_character(request, kind, name):
    """The bytes of a character cut at the token limit make a last span with no U+FFFD."""
    tok = request.getfixturevalue(kind)
    ids = tok(TEXTS[name], add_special_tokens=False)["input_ids"]
    cuts = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts
    for k in cuts:
        spans = token_spans(tok, ids[:k])
        assert "".join(t for t, _, _ in spans) == complete_text(tok, ids[:k])
        assert spans[-1][2] == k and not any("\ufffd" in t for t, _, _ in spans)
        raw = tok.convert_ids_to_tokens(ids[:k])
        if kind == "byte_bpe" and any(ord(c) >= 256 for p in raw for c in p):  # recognisable pieces
            assert [t for t, _, _ in piece_spans(raw)] == [t for t, _, _ in spans]
