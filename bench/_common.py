"""Shared pieces of the benchmarks: the benchmark model (or a real one), its queries, the
machine's description, and memory probes.

The benchmark model is a random-initialised Qwen2-style decoder with the real Qwen vocabulary
size (151,936), so the full-vocabulary distributions cost what they cost on a real Qwen model,
while the backbone stays small enough for a 2-core CPU. Its word-level tokenizer has one
(meaningless) word per vocabulary id, so every sampled id decodes. `--model NAME` in a benchmark
takes any model msd accepts instead (`smollm2`, a folder, a GGUF file), with its own tokenizer
and real queries (PolyRefuse's benign prompts, English and Spanish).

Every benchmark prints `machine_line()` first: CPU speed claims hold for one instruction set
(the bfloat16 head of msd's CPU decoding needs AVX512-BF16 or AMX), so each figure names its CPU.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

QWEN_VOCAB = 151_936
# The instruction sets CPU figures depend on: AVX2 (float32 GEMMs), AVX-512, and native bfloat16
# (msd's bfloat16 head runs only where one of the last two is present).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
REAL_QUERY_LANG = "es"  # the student language of the real queries
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


def write_bench_queries(path: str | Path, n: int, words_per_query: int, seed: int = 0,
                        real: bool = False) -> Path:
    """n parallel (en, jv) queries of exactly `words_per_query` filler words each; real=True:
    `real_queries(n)` instead."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        if real:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in real_queries(n))
            return path
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


def cpu_description(cpuinfo: str | None = None) -> str:
    """'<CPU model name>; avx2 yes, avx512f yes, avx512_bf16 no, amx_bf16 no' from /proc/cpuinfo
    (`cpuinfo`: its text, for tests); elsewhere the platform's processor name, flags unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return f"{platform.processor() or platform.machine()}; instruction sets unknown"
    fields = {}
    for line in cpuinfo.splitlines():  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    if not flags:
        return f"{name}; instruction sets unknown"
    return f"{name}; " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)


def machine_line() -> str:
    """One line naming what the figures were measured on: CPU and instruction sets, torch's CPU
    kernel level, cores, threads, load average."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"machine: {cpu_description()}; torch {torch.__version__} "
            f"(CPU kernels {torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def resolve_model(name: str | None, workdir: str | Path) -> tuple[Path, bool]:
    """(model folder, real?): `name` resolved as msd resolves `--model` (a model source such
    as `smollm2`, a folder, a GGUF file), or the synthetic benchmark model when None."""
    if name is None:
        return make_bench_model(Path(workdir) / "model_small", **SMALL), False
    from msd.models import resolve_model_path

    return Path(resolve_model_path(name)), True


def bench_tokenizer(folder: str | Path, real: bool):
    """A real model's tokenizer as msd loads it (its chat template checked, left padding), or
    the benchmark model's word-level one."""
    if not real:
        return load_bench_tokenizer(folder)
    from msd.config import ModelConfig
    from msd.models import load_tokenizer

    return load_tokenizer(str(folder), ModelConfig(name_or_path=str(folder)))


def real_queries(n: int) -> list[dict]:
    """The first n of PolyRefuse's benign prompts: {"id", "en", REAL_QUERY_LANG} (both texts
    present), so a real model reads real text of varied length."""
    from msd.data.sets.polyrefuse import load

    rows = [t for t in load("harmless", ["en", REAL_QUERY_LANG]) if REAL_QUERY_LANG in t.texts]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} benign PolyRefuse prompts, {n} asked for")
    return [{"id": t.id, "en": t.texts["en"], REAL_QUERY_LANG: t.texts[REAL_QUERY_LANG]} for t in rows[:n]]
