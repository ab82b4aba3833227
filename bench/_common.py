"""Shared pieces of the benchmarks: the benchmark model, its queries, and memory probes.

The benchmark model is a random-initialised Qwen2-style decoder with the real Qwen vocabulary
size (151,936), so the full-vocabulary distributions cost what they cost on a real Qwen model,
while the backbone stays small enough for a 2-core CPU. Its word-level tokenizer has one
(meaningless) word per vocabulary id, so every sampled id decodes.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

QWEN_VOCAB = 151_936
LORA = dict(r=16, alpha=32, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
# Sizes of the benchmark model (about 43M parameters, 39M of them in the tied embedding).
SMALL = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024)
# A Qwen2-1.5B-shaped config (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960).
QWEN2_1_5B = dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)


def make_bench_model(folder: str | Path, *, hidden: int, layers: int, heads: int, kv_heads: int,
                     intermediate: int, vocab: int = QWEN_VOCAB, seed: int = 0,
                     save: bool = True, dtype: str = "float32", init_device: str = "cpu"):
    """Save (or return, with save=False) a random Qwen2-style model with `vocab` ids and a tokenizer.

    dtype: the saved weights' dtype; init_device: where the random weights are drawn (a GPU
    draws 1.5B of them in a second, a CPU in a minute)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from msd.testing import DEFAULT_WORDS, SPECIALS, make_tokenizer

    folder = Path(folder)
    if save and (folder / "config.json").exists():
        return folder
    n_fill = vocab - len(SPECIALS) - len(set(DEFAULT_WORDS))
    tok = make_tokenizer(list(DEFAULT_WORDS) + [f"w{i}" for i in range(n_fill)])
    assert len(tok) == vocab, (len(tok), vocab)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if not save:
        return model, tok
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def load_bench_tokenizer(folder: str | Path):
    """The benchmark model's word-level tokenizer, loaded as itself.

    transformers 5 maps any `model_type: qwen2` folder to Qwen2Tokenizer, which rebuilds a
    byte-level BPE from the vocabulary and turns our words into unknown ids; so the benchmarks
    load the tokenizer by class and hand it to both trainers. Left padding, as msd uses."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok.padding_side = "left"
    return tok


def write_bench_queries(path: str | Path, n: int, words_per_query: int, seed: int = 0) -> Path:
    """n parallel (en, jv) queries of exactly `words_per_query` filler words each."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            en = " ".join(f"w{rng.randrange(100_000)}" for _ in range(words_per_query))
            jv = " ".join(f"w{rng.randrange(100_000)}" for _ in range(words_per_query))
            f.write(json.dumps({"id": f"q{i}", "en": en, "jv": jv}) + "\n")
    return path


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process since it started, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
