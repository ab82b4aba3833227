"""Helpers for tests and examples: tiny random-initialised Hugging Face chat models.

`make_tiny_model(folder)` saves a Llama- or Qwen2-shaped model with a word-level fast tokenizer
and a chat template, in Hugging Face format, so every code path that loads a hub model can be
exercised offline in seconds.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

SPECIALS = ["<pad>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_tokenizer(words: list[str]):
    """A word-level tokenizer over SPECIALS + `words`, with CHAT_TEMPLATE."""
    from msd.wordlevel import word_level_tokenizer

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    return word_level_tokenizer(vocab, unk="<unk>", pad="<pad>", eos="<|end|>", extra_special=SPECIALS[3:],
                                chat_template=CHAT_TEMPLATE, join_words=True)


DEFAULT_WORDS = (
    "the a to of and in is it you I can not help with that how do make build find a an for "
    "please tell me about cook bread water fire steal harm weapon sorry here are steps one two "
    "three first then done safe answer request language english same decide whether asks "
    "something harmful dangerous unethical or illegal if does politely decline give helpful "
    "write your whole reply original before decide : . , ? ! Javanese Swahili Bengali English "
    "in Request The request If Write Before be kind please"
).split()


def make_tiny_model(folder: str | Path, arch: str = "llama", hidden: int = 32, layers: int = 2,
                    heads: int = 4, seed: int = 0, extra_words: list[str] | None = None) -> Path:
    """Save a tiny random model + word-level tokenizer in HF format; returns the folder.

    Note: transformers 5 loads the tokenizer of a `qwen2` folder as Qwen2Tokenizer (byte-level),
    which does not fit a word-level vocabulary; load such folders' tokenizer with
    `PreTrainedTokenizerFast.from_pretrained` (as `bench/_common.py` does).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder = Path(folder)
    words = list(DEFAULT_WORDS) + list(extra_words or [])
    tok = make_tokenizer(words)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                  max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
