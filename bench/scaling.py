"""How the cost of an MSD step grows: response length, batch and vocabulary, each doubled twice.

One on-policy LoRA step as the training loop runs it (rollout, teacher + student scoring with the
chunked loss, backward, AdamW; `profile_step.run_phases`) on the benchmark backbone (hidden 256,
4 layers) around a base point, B=2 responses of T=16 tokens with a V=32,768 vocabulary; each
dimension takes 3 values (x1, x2, x4) with the others at the base. Every point runs in its own
process: step seconds (median of --steps after a warm-up) and the step's peak memory above the
set-up (resident memory sampled every 2 ms from the first step on), plus the peak of the scoring phase
alone (loss + forwards), which the chunked loss keeps at O(chunk x V) rather than O(B x T x V).
The exponent of each dimension is the least-squares slope of log(cost) on log(size).

    python bench/scaling.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BASE = {"batch": 2, "tokens": 16, "vocab": 32_768}
BACKBONE = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024)


class PeakRss:
    """Peak resident memory (MiB) of this process while the context runs, sampled in a thread."""

    def __enter__(self):
        from _common import rss_mib

        self.rss, self.peak, self.stop = rss_mib, rss_mib(), threading.Event()
        self.start = self.peak
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def one_point(a) -> dict:
    import torch

    from _common import make_bench_model, write_bench_queries
    from profile_step import run_phases, setup

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    model_dir = make_bench_model(work / f"scaling_v{a.vocab}", vocab=a.vocab, **BACKBONE)
    qfile = write_bench_queries(work / "queries_16.jsonl", 256, 16)
    state = setup(model_dir, qfile, lora=True)
    with PeakRss() as mem:  # from the set-up on: the warm-up step's first allocations count too
        times = run_phases(*state, steps=a.steps, warmup=1, batch=a.batch, new_tokens=a.tokens)
    step = [sum(parts) for parts in zip(*times.values())]
    return {"batch": a.batch, "tokens": a.tokens, "vocab": a.vocab,
            "step_s": statistics.median(step), "score_s": statistics.median(times["score"]),
            "peak_mib": round(mem.peak - mem.start, 1)}


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/msd_bench")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    for k, v in BASE.items():
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args(argv)
    if a.point:
        print(json.dumps(one_point(a)))
        return 0
    rows, fits = [], {}
    for dim in BASE:
        points = []
        for factor in (1, 2, 4):
            args = {**BASE, dim: BASE[dim] * factor}
            cmd = [sys.executable, __file__, "--point", "--workdir", a.workdir, "--steps", str(a.steps),
                   "--threads", str(a.threads)] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            points.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows += points
        xs = [p[dim] for p in points]
        fits[dim] = {k: slope(xs, [p[k] for p in points]) for k in ("step_s", "peak_mib")}
    from _common import machine_line

    print(machine_line())
    print(f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; base {BASE}; backbone {BACKBONE}")
    print("| B | T | V | step (s) | scoring (s) | step peak above set-up (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['tokens']} | {r['vocab']} | {r['step_s']:.3f} | {r['score_s']:.3f} | {r['peak_mib']:.0f} |")
    for dim, f in fits.items():
        print(f"exponent {dim}: time={f['step_s']:.2f} memory={f['peak_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
