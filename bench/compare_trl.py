"""One MSD-sized on-policy distillation step, msd against TRL, on the same model and batch.

    python bench/compare_trl.py                     # LoRA pair + full fine-tuning pair (~7 min)
    python bench/compare_trl.py --gkd               # also TRL's GKDTrainer (~9 min in all)
    python bench/compare_trl.py --pairs lora --reps 3 --threads 2
    python bench/compare_trl.py --model smollm2     # a real model (any --model msd accepts)

Both sides: the same random-initialised Qwen2-style model (about 43M parameters, real Qwen
vocabulary of 151,936 ids, tied embeddings, float32), the same batch of queries, prompt length,
response length (`max_new_tokens`; a random model practically never samples EOS, so every
response is full length), on-policy sampling at temperature 1, reverse KL, the same LoRA config
(r 16, alpha 32, all attention and MLP projections) or full fine-tuning, AdamW at the same
learning rate. With `--model NAME` both sides take that model (resolved as msd resolves
`--model`: `smollm2`, a folder, a GGUF file) with its own tokenizer and chat template, and the
queries are PolyRefuse's benign prompts (Spanish for the student, English for msd's teacher);
a real model stops at its end of turn, so responses may be shorter than `--new-tokens`.

- msd: `msd.train.train` with its defaults (teacher = the adapter-disabled student, chunked
  loss, rollout with LoRA merged into the weights, DPSW weights).
- TRL: `trl.DistillationTrainer` (TRL >= 1.x; on-policy, beta=1 = reverse KL) with a separate
  teacher of the same config, otherwise its defaults (gradient checkpointing on, chunked
  divergence). Chosen over `trl.experimental.gkd.GKDTrainer` (lmbda=1, beta=1): TRL marks that
  configuration as fully covered by DistillationTrainer, which is its maintained trainer and
  the faster and lighter of the two. Not the same loss: MSD adds DPSW weights and its teacher
  reads a longer prompt (query + English query + instruction), so msd does more work per step.
  Precision is float32 for both (TRL's bf16 default is switched off, as msd runs float32 on CPU).
  msd runs without gradient checkpointing (its default) for both figures.

Each run is a fresh process (`--worker`); runs alternate msd / TRL and their order flips every
repetition. Per run: `--warmup` steps are dropped, then `--steps` optimizer steps are timed, in
wall seconds and in process CPU seconds (one thread per process by default: on a shared machine
CPU seconds show how much of the wall time was waiting for a core).
Memory is the process's peak RSS (ru_maxrss, whole run), and the same minus the RSS after the
imports (what the model, optimizer and step allocate). TRL runs at its best for each figure:
without gradient checkpointing for the speed figure (faster), with it for the memory figure
(leaner), so each TRL configuration runs twice. The last two lines:

    full: speedup=<TRL s/step / msd s/step> memory_ratio=<msd peak / TRL peak>   (full fine-tuning)
    speedup=<TRL s/step / msd s/step> memory_ratio=<msd peak / TRL peak>         (LoRA)

memory_ratio uses the peak RSS above the import baseline (the libraries' own pages are not the
trainer's memory and TRL imports more of them); the absolute ratio is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import (LORA, bench_tokenizer, machine_line, peak_rss_mib, resolve_model, rss_mib,  # noqa: E402
                     write_bench_queries)


# ----------------------------------------------------------------------------- workers

CPU_TIMES: list[float] = []  # process CPU seconds per timed step, filled by the worker


class _StepTimer:
    """A transformers TrainerCallback (built lazily) timing each optimizer step, wall and CPU."""

    def __new__(cls, times: list[float], sync=lambda: None):
        from transformers import TrainerCallback

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                sync()
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                sync()
                times.append(time.perf_counter() - self.t0)
                CPU_TIMES.append(time.process_time() - self.c0)

        return StepTimer()

def _worker_msd(a, model_dir: Path, qfile: Path, out_dir: Path) -> list[float]:
    from msd.config import Config
    from msd.models import load_model
    from msd.train import train

    cfg = Config()
    cfg.model.name_or_path = str(model_dir)
    cfg.data.source = str(qfile)
    cfg.data.heldout_fraction = 0.0
    cfg.lora.enabled = a.lora
    for k, v in LORA.items():
        setattr(cfg.lora, k, v)
    cfg.rollout.max_new_tokens = a.new_tokens
    cfg.rollout.batch_size = a.batch
    cfg.train.batch_size = a.batch
    cfg.train.max_steps = a.warmup + a.steps
    cfg.train.lr = 1e-5
    cfg.train.warmup_ratio = 0.0
    cfg.train.output_dir = str(out_dir)
    model = load_model(cfg.model)
    # CPU seconds per step: from its micro-batch to its statistics (after the optimizer step).
    import msd.train.logs as mt_logs
    import msd.train.loop as mt

    starts, cpu = [], []
    micro_batch, accumulate_stats = mt.micro_batch, mt_logs.accumulate_stats

    def timed_micro_batch(*args, **kw):
        starts.append(time.process_time())
        return micro_batch(*args, **kw)

    def timed_stats(*args, **kw):
        cpu.append(time.process_time() - starts[-1])
        return accumulate_stats(*args, **kw)

    mt.micro_batch, mt_logs.accumulate_stats = timed_micro_batch, timed_stats
    result = train(cfg, model=model, tokenizer=bench_tokenizer(model_dir, a.model is not None), progress=False,
                   resume=False)
    CPU_TIMES[:] = cpu[a.warmup:]
    return [h["step_s"] for h in result.history[a.warmup:]]


def _student_text(row: dict) -> str:
    """The student's query of a benchmark row: its one non-English text."""
    return next(v for k, v in row.items() if k not in ("id", "en"))


def _queries_file(a) -> Path:
    return Path(a.workdir) / (f"queries_real_{a.model.replace('/', '_')}.jsonl" if a.model
                              else f"queries_{a.prompt_words}.jsonl")


def _worker_trl(a, model_dir: Path, qfile: Path, out_dir: Path) -> list[float]:
    """TRL's DistillationTrainer, on-policy, beta=1 (reverse KL), temperature 1, a separate
    teacher; otherwise its defaults (gradient checkpointing on, chunked divergence)."""
    from trl import DistillationConfig, DistillationTrainer

    rows = [json.loads(line) for line in qfile.read_text().splitlines()]
    data = [{"prompt": [{"role": "user", "content": _student_text(r)}]} for r in rows]
    return _run_trl(a, model_dir, out_dir, DistillationTrainer, DistillationConfig, data,
                    max_completion_length=a.new_tokens, top_p=1.0, top_k=0,
                    gradient_checkpointing=not a.no_gc)


def _worker_gkd(a, model_dir: Path, qfile: Path, out_dir: Path) -> list[float]:
    """TRL's experimental GKDTrainer at lmbda=1 (always on-policy), beta=1 (reverse KL),
    temperature 1, with a separate teacher; otherwise its defaults (full logits, gradient
    checkpointing on, which also turns the KV cache off during its generation). bf16 on a GPU
    when --dtype bfloat16, as for DistillationTrainer."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [json.loads(line) for line in qfile.read_text().splitlines()]
    data = [{"messages": [{"role": "user", "content": _student_text(r)}, {"role": "assistant", "content": "w1"}]}
            for r in rows]
    return _run_trl(a, model_dir, out_dir, GKDTrainer, GKDConfig, data, lmbda=1.0,
                    max_new_tokens=a.new_tokens, gradient_checkpointing=not a.no_gc)


def _run_trl(a, model_dir: Path, out_dir: Path, trainer_cls, config_cls, rows: list[dict], **config_kw):
    """Train a TRL distillation trainer (reverse KL: beta=1, temperature 1) with a separate
    teacher of the same config on `rows`; the timed steps' wall seconds."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, a.dtype)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    on_gpu = torch.cuda.is_available()
    args = config_cls(
        output_dir=str(out_dir), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps, learning_rate=1e-5, lr_scheduler_type="constant",
        temperature=1.0, beta=1.0, bf16=dtype == torch.bfloat16 and on_gpu, use_cpu=not on_gpu,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        **config_kw)
    peft_cfg = None
    if a.lora:
        peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                              target_modules=LORA["target_modules"], task_type="CAUSAL_LM", bias="none")
    times: list[float] = []
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=bench_tokenizer(model_dir, a.model is not None), peft_config=peft_cfg,
                          callbacks=[_StepTimer(times, sync)])
    trainer.train()
    CPU_TIMES[:] = CPU_TIMES[a.warmup:]
    return times[a.warmup:]


def worker(a) -> int:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    model_dir = Path(a.model_dir) if a.model_dir else resolve_model(a.model, work)[0]
    qfile = _queries_file(a)
    out_dir = work / f"run_{a.worker}_{'lora' if a.lora else 'full'}_{os.getpid()}"
    # Import everything the run needs before the baseline is taken.
    if a.worker == "msd":
        import msd.train  # noqa: F401
        import peft  # noqa: F401
        run = _worker_msd
    elif a.worker in ("gkd", "gkd_nogc"):
        import peft  # noqa: F401
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
        run = _worker_gkd
    else:
        import peft  # noqa: F401
        import trl  # noqa: F401
        from trl import DistillationTrainer  # noqa: F401
        run = _worker_trl
    a.no_gc = a.worker.endswith("_nogc")
    base = rss_mib()
    times = run(a, model_dir, qfile, out_dir)
    peak = peak_rss_mib()
    rec = {"impl": a.worker, "lora": a.lora, "step_s": times, "cpu_s": CPU_TIMES, "peak_rss_mib": peak,
           "base_rss_mib": base, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        rec["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(a.json_out).write_text(json.dumps(rec))
    return 0


# ----------------------------------------------------------------------------- driver

def run_one(a, impl: str, lora: bool, rep: int) -> dict:
    out = Path(a.workdir) / f"result_{impl}_{'lora' if lora else 'full'}_{rep}.json"
    cmd = [sys.executable, __file__, "--worker", impl, "--json-out", str(out),
           "--workdir", a.workdir, "--batch", str(a.batch), "--prompt-words", str(a.prompt_words),
           "--new-tokens", str(a.new_tokens), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(a.threads)] + (["--lora"] if lora else []) + (["--model", a.model] if a.model else [])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{impl} ({'lora' if lora else 'full'}) failed with code {proc.returncode}")
    rec = json.loads(out.read_text())
    rec["wall_s"] = time.time() - t0
    print(f"  rep {rep} {impl:4s} {'lora' if lora else 'full'}: "
          f"{statistics.mean(rec['step_s']):6.2f} s/step ({statistics.mean(rec['cpu_s']):6.2f} CPU s)  "
          f"peak {rec['peak_rss_mib']:6.0f} MiB "
          f"(+{rec['peak_rss_mib'] - rec['base_rss_mib']:.0f})  [{rec['wall_s']:.0f} s]", flush=True)
    return rec


LABELS = {"msd": "msd", "trl": "TRL DistillationTrainer, gradient checkpointing (memory figure)",
          "trl_nogc": "TRL DistillationTrainer, no gradient checkpointing (speed figure)",
          "gkd": "TRL GKDTrainer (experimental), gradient checkpointing (memory figure)",
          "gkd_nogc": "TRL GKDTrainer (experimental), no gradient checkpointing (speed figure)"}


def summarise(recs: list[dict], lora: bool, impls) -> dict:
    out = {}
    for impl in impls:
        rs = [r for r in recs if r["impl"] == impl and r["lora"] == lora]
        steps = [s for r in rs for s in r["step_s"]]
        out[impl] = {"s_per_step": statistics.median(steps), "n": len(steps),
                     "cpu_per_step": statistics.median([c for r in rs for c in r["cpu_s"]]),
                     "peak": max(r["peak_rss_mib"] for r in rs),
                     "train_mem": max(r["peak_rss_mib"] - r["base_rss_mib"] for r in rs)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/msd_bench")
    ap.add_argument("--pairs", default="lora,full", help="comma list of lora, full")
    ap.add_argument("--reps", type=int, default=3, help="processes per implementation and pair")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per process")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per process")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=16, help="words per query (one token each)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (0 = torch default); see docs/PERFORMANCE.md")
    ap.add_argument("--gkd", action="store_true",
                    help="also run TRL's experimental GKDTrainer (lmbda=1, beta=1) as a third column")
    ap.add_argument("--worker", choices=list(LABELS), help=argparse.SUPPRESS)
    ap.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="any model msd accepts (e.g. smollm2); default: the synthetic benchmark model")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # a synthetic model's folder (bench/gpu_check.py)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, real = resolve_model(a.model, work)
    write_bench_queries(_queries_file(a), 256, a.prompt_words, real=real)
    import trl

    print(machine_line())
    print(f"compare_trl: model {model_dir if real else 'synthetic benchmark model'}, batch {a.batch}, "
          f"{'PolyRefuse benign' if real else f'{a.prompt_words}-word'} queries, {a.new_tokens} new tokens, "
          f"{a.steps} timed + {a.warmup} warm-up steps x {a.reps} processes, threads {a.threads}, "
          f"trl {trl.__version__}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    pairs = [p.strip() for p in a.pairs.split(",") if p.strip()]
    # Each peer at its best for the figure measured: speed without gradient checkpointing,
    # memory with it.
    impls = ("msd", "trl_nogc", "trl") + (("gkd_nogc", "gkd") if a.gkd else ())
    recs = []
    for rep in range(a.reps):
        for pair in pairs:
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                recs.append(run_one(a, impl, pair == "lora", rep))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"\n| pair | trainer | s/step (median of {a.steps * a.reps}) | CPU s/step | peak RSS MiB | "
          "peak - import baseline MiB |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for pair in pairs:
        s = summary[pair] = summarise(recs, pair == "lora", impls)
        for impl in impls:
            print(f"| {pair} | {LABELS[impl]} | {s[impl]['s_per_step']:.2f} | {s[impl]['cpu_per_step']:.2f} | "
                  f"{s[impl]['peak']:.0f} | {s[impl]['train_mem']:.0f} |")
    for pair in pairs:
        s = summary[pair]
        for peer in ("trl", "gkd") if a.gkd else ("trl",):
            fast, lean = s[f"{peer}_nogc"], s[peer]
            print(f"{pair} vs {LABELS[peer].split(',')[0]}: speedup {fast['s_per_step'] / s['msd']['s_per_step']:.2f}x "
                  f"against its fastest (no gradient checkpointing; CPU time "
                  f"{fast['cpu_per_step'] / s['msd']['cpu_per_step']:.2f}x); memory above imports "
                  f"{s['msd']['train_mem'] / lean['train_mem']:.2f} of its leanest (gradient checkpointing), "
                  f"absolute peak RSS {s['msd']['peak'] / lean['peak']:.2f}")
    # The last line is the LoRA pair; the line before it, full fine-tuning.
    for pair in [p for p in pairs if p != "lora"] + (["lora"] if "lora" in pairs else []):
        s = summary[pair]
        line = (f"speedup={s['trl_nogc']['s_per_step'] / s['msd']['s_per_step']:.2f} "
                f"memory_ratio={s['msd']['train_mem'] / s['trl']['train_mem']:.2f}")
        print(line if pair == "lora" else f"{pair}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
