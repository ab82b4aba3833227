"""The organism's tokenizer: word-level, with role markers and a Jinja chat template.

One token per word or punctuation mark (the `tokenizers` Whitespace pre-tokenizer splits on
`\\w+|[^\\w\\s]+`), so decoding joins tokens with single spaces and gives back the world's
sentences exactly. Newlines in prompts are layout only and vanish. Wrapped in
`PreTrainedTokenizerFast` and saved with `save_pretrained`, so downstream code loads it with
`AutoTokenizer` like any hub tokenizer.
"""

from __future__ import annotations

from typing import Iterable

PAD, UNK, EOS = "<pad>", "<unk>", "<|end|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL = (PAD, UNK, EOS, *ROLES)

# Every turn is "<|role|>\n content <|end|>\n"; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _splitter():
    """chunk (no whitespace) -> its pre-tokens, memoised: the world reuses a few hundred chunks
    millions of times, and calling the pre-tokenizer per text dominated the build."""
    from tokenizers.pre_tokenizers import Whitespace

    pre = Whitespace()
    memo: dict[str, tuple[str, ...]] = {}

    def split(text: str) -> list[str]:
        out: list[str] = []
        for chunk in text.split():
            if chunk not in memo:
                memo[chunk] = tuple(w for w, _ in pre.pre_tokenize_str(chunk))
            out += memo[chunk]
        return out

    return split


def words_of(texts: Iterable[str]) -> list[str]:
    """The tokens the pre-tokenizer makes of `texts`, first-seen order, no duplicates."""
    split = _splitter()
    seen: dict[str, None] = {}
    for text in texts:
        for word in split(text):
            seen.setdefault(word, None)
    return list(seen)


def fast_encoder(tokenizer):
    """text -> ids, equal to `tokenizer(text, add_special_tokens=False)` for texts without
    special tokens (checked in the tests), about ten times faster on the organism's corpus."""
    split, vocab, unk = _splitter(), tokenizer.get_vocab(), tokenizer.unk_token_id
    return lambda text: [vocab.get(w, unk) for w in split(text)]


def build_tokenizer(texts: Iterable[str]):
    """A word-level `PreTrainedTokenizerFast` whose vocabulary is every word in `texts` (sorted)."""
    from msd.wordlevel import word_level_tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for word in sorted(words_of(texts)):
        vocab.setdefault(word, len(vocab))
    return word_level_tokenizer(vocab, unk=UNK, pad=PAD, eos=EOS, extra_special=list(ROLES),
                                chat_template=CHAT_TEMPLATE, padding_side="left")
