"""Tiny random models of real chat-model families, for tests: the published chat template, special
tokens, added tokens and generation settings of each family around a few-thousand-parameter
network and a small byte-level BPE tokenizer (so any text, newlines included, round-trips).

    folder = make_family_model(tmp / "qwen3", "qwen3", template_text)

The templates themselves are test fixtures (tests/fixtures/chat_templates/, with provenance); the
table below holds what each family's tokenizer and generation config publish.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
              "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
MISTRAL_TOOLS = ["[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                 "[/TOOL_RESULTS]"]


@dataclass(frozen=True)
class TinyFamily:
    """What one family's published files carry (tokens by text)."""

    arch: str  # transformers config class name
    template: str  # file name under the templates folder
    eos: str
    bos: str | None = None
    pad: str | None = None
    special: list[str] = field(default_factory=list)  # further special tokens
    added: list[str] = field(default_factory=list)  # added tokens with special=False
    gen_eos: list[str] = field(default_factory=list)  # generation_config eos_token_id
    generation: dict = field(default_factory=dict)  # other generation_config settings
    config: dict = field(default_factory=dict)  # other model config settings


TINY_FAMILIES = {
    "qwen2.5": TinyFamily(
        "Qwen2Config", "qwen2.5-7b-instruct.jinja", "<|im_end|>", pad="<|endoftext|>",
        special=["<|im_start|>"], added=QWEN_ADDED, gen_eos=["<|im_end|>", "<|endoftext|>"],
        generation=dict(repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20, do_sample=True)),
    "qwen3": TinyFamily(
        "Qwen3Config", "qwen3-8b.jinja", "<|im_end|>", pad="<|endoftext|>", special=["<|im_start|>"],
        added=["<think>", "</think>", *QWEN_ADDED], gen_eos=["<|im_end|>", "<|endoftext|>"],
        generation=dict(temperature=0.6, top_p=0.95, top_k=20, do_sample=True)),
    "llama-3": TinyFamily(
        "LlamaConfig", "llama-3-8b-instruct.jinja", "<|eot_id|>", bos="<|begin_of_text|>",
        special=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
        gen_eos=["<|end_of_text|>", "<|eot_id|>"], generation=dict(temperature=0.6, top_p=0.9, do_sample=True)),
    # Llama-3 files from before May 2024: only <|end_of_text|> is an EOS anywhere.
    "llama-3-old": TinyFamily(
        "LlamaConfig", "llama-3-8b-instruct.jinja", "<|end_of_text|>", bos="<|begin_of_text|>",
        special=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"], gen_eos=["<|end_of_text|>"]),
    "llama-2": TinyFamily("LlamaConfig", "llama-2-7b-chat-hf.jinja", "</s>", bos="<s>", special=["<unk>"],
                          gen_eos=["</s>"]),
    "gemma-2": TinyFamily(
        "Gemma2Config", "gemma-2-2b-it.jinja", "<eos>", bos="<bos>", pad="<pad>",
        special=["<start_of_turn>", "<end_of_turn>"], gen_eos=["<eos>", "<end_of_turn>"],
        config=dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, head_dim=8)),
    "mistral": TinyFamily("MistralConfig", "mistral-7b-instruct-v0.3.jinja", "</s>", bos="<s>",
                          special=["<unk>", "[INST]", "[/INST]", *MISTRAL_TOOLS], gen_eos=["</s>"]),
}

CORPUS = ("how do I make bread water fire tell me about the steps one two three sorry I can not "
          "help with that here are request in English the same decide whether asks harmful "
          "politely decline give a helpful answer write your whole reply user assistant system "
          "model Javanese Swahili jv sw en 0 1 2 3 4 5 6 7 8 9 ? . , :")


def family_tokenizer(fam: TinyFamily, template: str, vocab_size: int = 420):
    """A byte-level BPE tokenizer trained on a small corpus, with the family's tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([CORPUS] * 4, trainer)
    named = {k: v for k, v in (("bos_token", fam.bos), ("eos_token", fam.eos), ("pad_token", fam.pad)) if v}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, additional_special_tokens=fam.special, **named)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam.added])
    tok.chat_template = template
    return tok


def make_family_model(folder: str | Path, family: str, template: str, *, hidden: int = 16,
                      layers: int = 1, seed: int = 0, dtype: str = "float32") -> Path:
    """Save a tiny random model of `family` (a TINY_FAMILIES key) with `template`; returns the folder."""
    import torch
    import transformers

    fam = TINY_FAMILIES[family]
    tok = family_tokenizer(fam, template)
    config_cls = getattr(transformers, fam.arch)
    ids = tok.convert_tokens_to_ids
    cfg = config_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                     num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=512, tie_word_embeddings=False,
                     bos_token_id=ids(fam.bos) if fam.bos else None, eos_token_id=ids(fam.eos),
                     pad_token_id=ids(fam.pad) if fam.pad else None, **fam.config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = model.generation_config
    gen.eos_token_id = [ids(t) for t in fam.gen_eos] if len(fam.gen_eos) > 1 else ids(fam.gen_eos[0])
    gen.pad_token_id = cfg.pad_token_id
    for k, v in fam.generation.items():
        setattr(gen, k, v)
    model.to(getattr(torch, dtype))
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
