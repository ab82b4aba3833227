"""The text of token ids as a reader sees it, for any tokenizer.

A byte-level BPE token (GPT-2, Llama 3, Qwen, SmolLM2) or a byte-fallback SentencePiece token
(Llama 2, Gemma) may end inside a multibyte UTF-8 character: Bengali, Hindi, Thai and Chinese
characters take 3 bytes, emoji 4, and even `’ — “ ”` take 3, often split over tokens. Such a
token's own piece (`à¦`, `<0xE0>`) is not text, and decoding it alone gives U+FFFD.

- `token_spans(tokenizer, ids)`: [(text, start, end)], each the decoded text of ids[start:end],
  the shortest runs of tokens that decode to whole characters (extended grapheme clusters:
  a base with its vowel signs, a ZWJ emoji sequence). Concatenated, the texts are exactly
  `complete_text(ids)`, which is `decode(ids)` unless the ids end inside a character: no space
  is added that the text does not have, and the bytes of a character cut at the token limit
  make a last span without their U+FFFD (possibly empty). What every token view
  shows (`msd report`'s HTML page and markdown tables); saved with each training token batch.
- `piece_spans(pieces)`: the same from saved raw pieces alone (`convert_ids_to_tokens` output,
  what token batches held before they held spans): byte-level and SentencePiece pieces are
  mapped back to bytes, WordPiece `##` pieces joined, word-level pieces joined with spaces.
- `complete_text(tokenizer, ids)`: `decode(ids)` without the replacement characters of an
  incomplete character at its end (an answer cut at the token limit mid-character).
"""

from __future__ import annotations

import re
from functools import lru_cache

REPLACEMENT = "\ufffd"
# Tokens decoded ahead of a span, so decoding that depends on what precedes (SentencePiece drops
# the first token's leading space; cleanup joins a space and punctuation) matches the whole text.
CONTEXT = 4
MAX_TAIL = 4  # tokens an incomplete character at the end can span (a UTF-8 character has 4 bytes)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def decode(tokenizer, ids) -> str:
    """All tokens, special ones included: a token view shows what the model produced."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def token_spans(tokenizer, ids) -> list[tuple[str, int, int]]:
    """(text, start, end) per run of tokens that ends on a character boundary; see the module
    docstring. Decodes a few tokens per span; where that disagrees with the whole decoded text
    (a decoder that looks further back), decodes prefixes of the whole instead."""
    ids = [int(i) for i in ids]
    n, text = _cut(tokenizer, ids)
    spans = _windowed(tokenizer, ids[:n])
    head = decode(tokenizer, ids[:n])
    if "".join(s[0] for s in spans) != head:
        spans = _by_prefix(tokenizer, ids[:n])
    if n < len(ids):  # the bytes of a character cut at the token limit, without their U+FFFD
        spans.append((text[len(head):], n, len(ids)))
    return whole_graphemes(spans)


def whole_graphemes(spans: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Spans merged so each ends where a user-perceived character does: a vowel sign, virama
    conjunct, tone mark, emoji modifier or ZWJ sequence stays with its base (a browser cannot
    shape a Bengali conjunct or a family emoji split over two coloured boxes)."""
    import regex  # a dependency of transformers; `\X` is an extended grapheme cluster

    full = "".join(t for t, _, _ in spans)
    bounds = {m.end() for m in regex.finditer(r"\X", full)}
    out, pos, cur = [], 0, None
    for text, start, end in spans:
        pos += len(text)
        cur = (cur[0] + text, cur[1], end) if cur else (text, start, end)
        if pos in bounds:
            out.append(cur)
            cur = None
    return out + ([cur] if cur else [])


def _windowed(tokenizer, ids: list[int]) -> list[tuple[str, int, int]]:
    spans, start, before = [], 0, ""
    for end in range(1, len(ids) + 1):
        text = decode(tokenizer, ids[max(0, start - CONTEXT):end])
        if end == len(ids) or (text.startswith(before) and not text.endswith(REPLACEMENT)):
            spans.append((text[len(before):] if text.startswith(before) else text, start, end))
            start = end
            before = decode(tokenizer, ids[max(0, start - CONTEXT):start])
    return spans


def _by_prefix(tokenizer, ids: list[int]) -> list[tuple[str, int, int]]:
    """Spans cut where a prefix of the ids decodes to a prefix of the whole text (O(n^2))."""
    full = decode(tokenizer, ids)
    spans, start, done = [], 0, 0
    for end in range(1, len(ids) + 1):
        text = full if end == len(ids) else decode(tokenizer, ids[:end])
        if end == len(ids) or (len(text) >= done and full.startswith(text)):
            spans.append((full[done:len(text)], start, end))
            start, done = end, len(text)
    return spans


def complete_text(tokenizer, ids) -> str:
    """`decode(ids)` less the U+FFFD an incomplete last character decodes to: the trailing ids
    whose bytes do not complete a character are dropped (the whole characters they also carry
    are kept where the decoder shows them: a byte-level BPE token may hold the end of one
    character and the start of the next; a byte-fallback decoder turns a whole run of bytes
    with a broken end into U+FFFD). Fixed bug: answers cut at the token limit mid-character
    ended in U+FFFD, which the judge and language ID then read."""
    return _cut(tokenizer, [int(i) for i in ids])[1]


def _cut(tokenizer, ids: list[int]) -> tuple[int, str]:
    """(n, text): `complete_text`'s text, and how many ids come before the incomplete tail
    (all of them when there is none); decode(ids[:n]) is a prefix of text."""
    text = decode(tokenizer, ids)
    if not text.endswith(REPLACEMENT):
        return len(ids), text
    for k in range(1, min(len(ids), MAX_TAIL) + 1):
        head = decode(tokenizer, ids[:-k])
        if not head.endswith(REPLACEMENT):
            return len(ids) - k, head + (text[len(head):].rstrip(REPLACEMENT) if text.startswith(head) else "")
    return len(ids), text


# ----------------------------------------------------------------------------- saved pieces

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def _piece_bytes(pieces: list[str]) -> list[bytes] | None:
    """Each piece's bytes, for byte-level BPE or SentencePiece pieces; None for other kinds."""
    dec = _byte_decoder()
    if all(c in dec for p in pieces for c in p) and any(ord(c) >= 256 for p in pieces for c in p):
        return [bytes(dec[c] for c in p) for p in pieces]
    if any(p.startswith("▁") or _BYTE_PIECE.match(p) for p in pieces):
        out = []
        for p in pieces:
            m = _BYTE_PIECE.match(p)
            out.append(bytes([int(m.group(1), 16)]) if m else p.replace("▁", " ").encode("utf-8"))
        return out
    return None


def piece_spans(pieces: list[str]) -> list[tuple[str, int, int]]:
    """(text, start, end) from raw token pieces alone (no tokenizer at hand). Byte-level pieces
    are recognised by the characters that stand for bytes outside printable Latin-1 (`Ġ` for a
    space, `Ċ` for a line break, `Ĳ`...), which nearly every response holds."""
    pieces = [str(p) for p in pieces]
    as_bytes = _piece_bytes(pieces)
    if as_bytes is None:  # WordPiece continuations join; word-level tokens carry no space marker
        return [(p[2:] if p.startswith("##") else p if i == 0 else " " + p, i, i + 1)
                for i, p in enumerate(pieces)]
    spans, start, buf = [], 0, b""
    for end, b in enumerate(as_bytes, start=1):
        buf += b
        text = buf.decode("utf-8", errors="replace")
        if end == len(as_bytes) or not text.endswith(REPLACEMENT):
            spans.append((text.rstrip(REPLACEMENT) if end == len(as_bytes) else text, start, end))
            start, buf = end, b""
    return whole_graphemes(spans)
