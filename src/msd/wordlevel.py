"""Word-level fast tokenizers: one token per word or punctuation run, for models msd builds
itself (the model organism, the tiny models of tests and benchmarks).

The `tokenizers` Whitespace pre-tokenizer splits on `\\w+|[^\\w\\s]+`. The result is wrapped in
`PreTrainedTokenizerFast` with a chat template, so it saves with `save_pretrained` and loads
with `AutoTokenizer` like any hub tokenizer.
"""

from __future__ import annotations


def word_level_tokenizer(vocab: dict[str, int], *, unk: str, pad: str, eos: str,
                         extra_special: list[str], chat_template: str, join_words: bool = False,
                         padding_side: str | None = None):
    """A `PreTrainedTokenizerFast` over `vocab` (which holds the special tokens too).

    join_words=True decodes with spaces between words (a WordPiece decoder without
    continuation pieces); False keeps the `tokenizers` default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if join_words:
        core.decoder = decoders.WordPiece(prefix="##")
    kwargs = {"padding_side": padding_side} if padding_side else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=unk, pad_token=pad, eos_token=eos,
                                  additional_special_tokens=list(extra_special), **kwargs)
    tok.chat_template = chat_template
    return tok
