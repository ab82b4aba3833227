"""Where does one MSD step spend its time? Times generation, scoring (teacher + student + loss
forward), backward and the optimizer step separately, on the benchmark model.

    python bench/profile_step.py --steps 3 --batch 8 --prompt-words 16 --new-tokens 32 [--full-ft]
    python bench/profile_step.py ... --torch-profile   # also print the top operators

The phases call the functions the training loop calls (`msd.generation.generate`,
`msd.scoring.msd_batch_loss`, backward, AdamW), split at their seams, so their sum is one
training step. `bench/gpu_check.py` uses `setup` and `run_phases` on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _common import LORA, SMALL, load_bench_tokenizer, machine_line, make_bench_model, write_bench_queries  # noqa: E402

PHASES = ("generate", "score", "backward", "optimizer")


def setup(model_dir: str, qfile: str, *, lora: bool = True, chunk_size: int = -1, dtype: str = "float32",
          device: str = "cpu"):
    """(cfg, model, tokenizer, teacher, items, optimizer) as `msd.train.train` builds them."""
    from msd.config import Config
    from msd.data import load_tuples
    from msd.models import Teacher, apply_lora, load_model
    from msd.train.items import build_items

    cfg = Config()
    cfg.model.name_or_path, cfg.model.dtype = str(model_dir), dtype
    cfg.data.source = str(qfile)
    cfg.loss.chunk_size = chunk_size
    cfg.lora.enabled = lora
    for k, v in LORA.items():
        setattr(cfg.lora, k, v)
    model = load_model(cfg.model, device=device)
    tok = load_bench_tokenizer(model_dir)
    if lora:
        model = apply_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    teacher = Teacher.for_model(model)
    items = build_items(cfg, load_tuples(str(qfile), "en"), tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device in ("cpu", "cuda"))  # as msd.train.setup
    model.train()
    return cfg, model, tok, teacher, items, opt


def run_phases(cfg, model, tok, teacher, items, opt, *, steps: int, warmup: int, batch: int,
               new_tokens: int, backend: str = "auto", sync=lambda: None, profiler=None):
    """Per-phase seconds of each timed step: {phase: [s, ...]}; `warmup` steps are dropped."""
    from msd.generation import generate
    from msd.config import chunk_size_for
    from msd.losses import LossSpec
    from msd.scoring import msd_batch_loss

    times = {p: [] for p in PHASES}
    for step in range(warmup + steps):
        if profiler is not None and step == warmup + steps - 1:
            profiler.__enter__()
        part = [items[(step * batch + i) % len(items)] for i in range(batch)]
        marks = []

        def mark():
            sync()
            marks.append(time.perf_counter())

        mark()
        samples = generate(model, tok, [it.student_ids for it in part], max_new_tokens=new_tokens,
                           batch_size=batch, seed=step, backend=backend)
        responses = [s[0] or [tok.eos_token_id] for s in samples]
        mark()
        out = msd_batch_loss(model, teacher, [it.student_ids for it in part],
                             [it.teacher_ids for it in part], responses, tok.pad_token_id,
                             LossSpec.of(cfg.loss), chunk_size_for(cfg.loss, next(model.parameters()).device.type,
                                                            shared_head=teacher.frozen is None))
        mark()
        out.loss.backward()
        mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark()
        if step >= warmup:
            for p, a, b in zip(PHASES, marks, marks[1:]):
                times[p].append(b - a)
    if profiler is not None:
        profiler.__exit__(None, None, None)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/msd_bench")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--full-ft", action="store_true")
    ap.add_argument("--chunk-size", type=int, default=-1, help="loss.chunk_size (-1 = auto)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--torch-profile", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_bench_model(work / "model_small", **SMALL)
    qfile = write_bench_queries(work / f"queries_{a.prompt_words}.jsonl", 256, a.prompt_words)
    state = setup(model_dir, qfile, lora=not a.full_ft, chunk_size=a.chunk_size)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if a.torch_profile else None
    times = run_phases(*state, steps=a.steps, warmup=a.warmup, batch=a.batch, new_tokens=a.new_tokens,
                       backend=a.backend, profiler=prof)
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    mean = {p: sum(v) / len(v) for p, v in times.items()}
    total = sum(mean.values())
    print(machine_line())
    print(f"threads={torch.get_num_threads()} batch={a.batch} new_tokens={a.new_tokens} "
          f"lora={not a.full_ft} chunk={a.chunk_size}")
    for p, m in mean.items():
        print(f"  {p:10s} {m:7.3f} s  {100 * m / total:5.1f} %")
    print(f"  {'step':10s} {total:7.3f} s  ({a.batch * a.new_tokens / total:.0f} response tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
