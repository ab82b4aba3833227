"""One-GPU check of the MSD step at a realistic size; see bench/gpu_check.sh (the entry point).

bfloat16, a random-initialised Qwen2-1.5B-shaped model (hidden 1536, 28 layers, 12 heads, 2 KV
heads, MLP 8960, vocabulary 151,936, tied embeddings), LoRA r 16 on all projections, batch 8,
128-token student prompts, 128 new tokens, on-policy, reverse KL, DPSW, msd's defaults
(compiled static-cache rollout with the adapter merged into a bf16 copy, shared teacher, chunked
loss). Prints per-phase times (generation, scoring = teacher + student forward + loss, backward,
optimizer), response tokens/s, peak GPU memory and an MFU estimate; then the same step with
TRL's GKDTrainer (lmbda=1, beta=1: the acceptance line's baseline) and DistillationTrainer, each
with a separate teacher, if trl (and datasets) are importable, and a line
`vs_<trainer>: speedup=<TRL s / msd s> memory_ratio=<msd peak / TRL peak>` per trainer.

Without a GPU it runs a tiny configuration on CPU so the script itself can be tested.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _common import QWEN2_1_5B, machine_line, make_bench_model, write_bench_queries  # noqa: E402
from profile_step import run_phases, setup  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
TEMPLATE_TOKENS = 3  # "<|user|> ... <|end|> <|assistant|>" around the query words


def flop_params(model) -> int:
    """Parameters that cost 2 FLOPs per token: all but the input embedding, plus the head."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = inner.get_input_embeddings().weight
    n = sum(p.numel() for p in inner.parameters() if p is not emb)
    return n + emb.numel() if inner.config.tie_word_embeddings else n


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_msd(a, model_dir: Path, qfile: Path, device: str) -> dict:
    dtype = "bfloat16" if device == "cuda" else "float32"
    state = setup(model_dir, qfile, lora=True, dtype=dtype, device=device)
    cfg, model, tok, teacher, items, opt = state
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = run_phases(*state, steps=a.steps, warmup=a.warmup, batch=a.batch, new_tokens=a.new_tokens,
                       sync=sync)
    mean = {p: sum(v) / len(v) for p, v in times.items()}
    step = sum(mean.values())
    # Model FLOPs (6N per trained token, 2N per forward token; attention and the loss's head
    # GEMMs not counted). LoRA backward: activation gradients only, ~2N per token.
    n = flop_params(model)
    s_len = len(items[0].student_ids) + a.new_tokens
    t_len = len(items[0].teacher_ids) + a.new_tokens
    flops = {"generate": 2 * n * a.batch * s_len,
             "score": 2 * n * a.batch * (s_len + t_len),
             "backward": 2 * n * a.batch * s_len, "optimizer": 0}
    peak = peak_flops()
    return {"impl": "msd", "mean": mean, "step_s": step, "tokens_per_s": a.batch * a.new_tokens / step,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "mfu": sum(flops.values()) / step / peak if peak else None,
            "phase_tflops": {p: flops[p] / mean[p] / 1e12 for p in mean if mean[p] > 0},
            "flop_params": n, "student_tokens": s_len, "teacher_tokens": t_len}


TRL_NAMES = {"trl": "TRL DistillationTrainer", "gkd": "TRL GKDTrainer (lmbda=1, beta=1)"}


def run_trl(a, model_dir: Path, worker: str = "trl") -> dict | None:
    """One TRL trainer ('trl' = DistillationTrainer, 'gkd' = GKDTrainer) in its own process,
    through bench/compare_trl.py's workers, on the same model and sizes."""
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl not importable: TRL side skipped (pip install trl datasets)")
        return None
    out = Path(a.workdir) / f"gpu_check_{worker}.json"
    cmd = [sys.executable, str(Path(__file__).with_name("compare_trl.py")), "--worker", worker, "--lora",
           "--json-out", str(out), "--workdir", a.workdir, "--model-dir", str(model_dir),
           "--batch", str(a.batch), "--prompt-words", str(a.prompt_tokens - TEMPLATE_TOKENS),
           "--new-tokens", str(a.new_tokens), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--dtype", "bfloat16" if torch.cuda.is_available() else "float32", "--threads", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{TRL_NAMES[worker]} run failed:\n" + proc.stderr[-3000:])
        return None
    rec = json.loads(out.read_text())
    step = sum(rec["step_s"]) / len(rec["step_s"])
    return {"impl": worker, "step_s": step, "tokens_per_s": a.batch * a.new_tokens / step,
            "peak_gpu_mib": rec.get("peak_gpu_mib")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/msd_gpu_check")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="student prompt length")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    ap.add_argument("--trl", default="gkd,trl",
                    help="TRL trainers to run after msd: gkd (GKDTrainer, the acceptance line), "
                         "trl (DistillationTrainer); comma list")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the script's own test: tiny model, two short steps
        a.steps, a.warmup, a.batch, a.prompt_tokens, a.new_tokens = 2, 1, 2, 12, 6
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shape = QWEN2_1_5B if device == "cuda" else TINY
    name = "model_qwen2_1.5b_bf16" if device == "cuda" else "model_tiny"
    model_dir = make_bench_model(work / name, **shape, dtype="bfloat16" if device == "cuda" else "float32",
                                 init_device=device)
    qfile = write_bench_queries(work / f"queries_{a.prompt_tokens - TEMPLATE_TOKENS}.jsonl", 64,
                                a.prompt_tokens - TEMPLATE_TOKENS)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU fallback, tiny model)"
    print(machine_line())
    print(f"gpu_check: device {gpu}; torch {torch.__version__}; batch {a.batch}, {a.prompt_tokens} "
          f"prompt + {a.new_tokens} new tokens, {a.steps} timed + {a.warmup} warm-up steps", flush=True)
    msd = run_msd(a, model_dir, qfile, device)
    print(f"msd  (flop params {msd['flop_params'] / 1e9:.2f}B; student {msd['student_tokens']}, "
          f"teacher {msd['teacher_tokens']} tokens per row)")
    for p, m in msd["mean"].items():
        tf = msd["phase_tflops"].get(p)
        print(f"  {p:10s} {m:8.3f} s  {100 * m / msd['step_s']:5.1f} %"
              + (f"  {tf:7.1f} TFLOP/s" if tf is not None and p != "optimizer" else ""))
    mfu = f"{100 * msd['mfu']:.1f} %" if msd["mfu"] is not None else "n/a (unknown GPU peak)"
    mem = f"{msd['peak_gpu_mib']:.0f} MiB" if msd["peak_gpu_mib"] is not None else "n/a"
    print(f"  step {msd['step_s']:.3f} s, {msd['tokens_per_s']:.0f} response tokens/s, "
          f"peak GPU memory {mem}, MFU {mfu}", flush=True)
    ours = {"step_s": msd["step_s"], "peak_gpu_mib": msd["peak_gpu_mib"]}
    del msd
    workers = [] if a.no_trl else [w.strip() for w in a.trl.split(",") if w.strip()]
    for worker in workers:
        if worker not in TRL_NAMES:
            raise SystemExit(f"--trl: unknown trainer {worker!r}; choices: {', '.join(TRL_NAMES)}")
        trl = run_trl(a, model_dir, worker)
        if not trl:
            continue
        mem = f"{trl['peak_gpu_mib']:.0f} MiB" if trl.get("peak_gpu_mib") else "n/a"
        dtype = "bf16" if device == "cuda" else "float32"
        print(f"{TRL_NAMES[worker]} (separate teacher, its defaults, {dtype}): step "
              f"{trl['step_s']:.3f} s, {trl['tokens_per_s']:.0f} response tokens/s, peak GPU memory {mem}")
        ratio = (f"{ours['peak_gpu_mib'] / trl['peak_gpu_mib']:.2f}"
                 if ours["peak_gpu_mib"] and trl.get("peak_gpu_mib") else "n/a")
        print(f"vs_{worker}: speedup={trl['step_s'] / ours['step_s']:.2f} memory_ratio={ratio}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
