"""Greedy decode step against the memory-bandwidth floor, at batch 1 and 8.

On a CPU a decode step reads every weight once (and the KV cache) to make one token per row,
so its time cannot fall below (bytes read per step) / (read bandwidth). This script measures
the read bandwidth (the best of several sums over a tensor far larger than the caches, at the
same thread count as the decoding), then the seconds per greedy decode step of

- msd: `msd.generation.generate` (temperature 0, the `auto` backend: msd's decode loop on CPU,
  with the output head read as its bfloat16 copy where the CPU has AVX512-BF16 or AMX), and
- plain `model.generate(do_sample=False)`,

each as (time for N new tokens - time for 1 new token) / (steps - 1), so prefill and set-up
cancel; the fastest of --reps alternating runs. Times are taken twice: wall seconds, and the
process's CPU seconds (with one thread, the time it ran on a core: on a machine shared with
other jobs the wall time includes waiting for one, the CPU time does not; it still includes
the slowdown of sharing caches and memory bandwidth, so both are upper bounds). Floors: float32 weights; the weights msd reads (head in bfloat16 where it uses that);
both plus the KV cache read at the mean context length. The last lines are
`decode_vs_floor_b<B>_<msd|generate>=<seconds per step / floor>`, CPU seconds with one thread
(wall seconds otherwise).

    python bench/decode_floor.py --model smollm2               # batch 1 and 8, 1 thread
    python bench/decode_floor.py --model smollm2 --threads 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from _common import bench_tokenizer, machine_line, real_queries, resolve_model  # noqa: E402


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `clocks()` returned t."""
    return time.perf_counter() - t[0], time.process_time() - t[1]


def read_bandwidth(n_bytes: int, reps: int) -> tuple[float, float]:
    """Bytes per second read by `x.sum()` over an n_bytes float32 tensor, best of reps, by the
    wall clock and by the CPU clock."""
    x = torch.ones(n_bytes // 4)
    x.sum()  # fault the pages in
    wall, cpu = float("inf"), float("inf")
    for _ in range(reps):
        t = clocks()
        x.sum()
        w, c = since(t)
        wall, cpu = min(wall, w), min(cpu, c)
    return x.numel() * 4 / wall, x.numel() * 4 / cpu


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all distinct parameters, bytes of the output head's weight)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    head = model.get_output_embeddings().weight
    return total, head.numel() * head.element_size()


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V per token per row, over all layers (float32 cache)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4


def timed_msd(model, tok, prompts, new_tokens: int) -> tuple[tuple[float, float], int]:
    from msd.generation import generate

    t = clocks()
    out = generate(model, tok, prompts, max_new_tokens=new_tokens, temperature=0.0, batch_size=len(prompts))
    return since(t), max(len(r[0]) for r in out)


@torch.no_grad()
def timed_plain(model, tok, prompts, new_tokens: int) -> tuple[tuple[float, float], int]:
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
    t = clocks()
    # min_new_tokens: every row decodes all N steps (msd's loop also steps until all rows end)
    gen = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return since(t), gen.shape[1] - enc["input_ids"].shape[1]


def per_step(fn, model, tok, prompts, new_tokens: int) -> tuple[float, float, int]:
    """(wall, CPU seconds per decode step, steps) of one run: N tokens minus 1 token, over steps - 1."""
    (w1, c1), _ = fn(model, tok, prompts, 1)
    (wn, cn), steps = fn(model, tok, prompts, new_tokens)
    return (wn - w1) / max(steps - 1, 1), (cn - c1) / max(steps - 1, 1), steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="any model msd accepts (default smollm2)")
    ap.add_argument("--workdir", default="/tmp/msd_bench")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the bandwidth probe's tensor")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line(), flush=True)
    folder, real = resolve_model(a.model, a.workdir)
    from transformers import AutoModelForCausalLM

    from msd.generation.bf16head import usable as bf16_usable
    from msd.prompts import PromptBuilder

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = bench_tokenizer(folder, real)
    builder = PromptBuilder(tok)
    total, head = weight_bytes(model)
    bf16 = bf16_usable(model.get_output_embeddings())
    msd_reads = total - head // 2 if bf16 else total
    kv_tok = kv_bytes_per_token(model)
    one_thread = torch.get_num_threads() == 1  # CPU seconds then measure time on the core
    bw = read_bandwidth(a.bandwidth_mib << 20, 5)
    print(f"model {folder if real else 'synthetic benchmark model'}: {total / 1e6:.1f} MB of float32 weights "
          f"(head {head / 1e6:.1f} MB); msd's bfloat16 head {'used' if bf16 else 'not used (no native bfloat16)'}; "
          f"read bandwidth {bw[0] / 1e9:.2f} GB/s wall, {bw[1] / 1e9:.2f} GB/s CPU clock ({a.bandwidth_mib} MiB "
          f"sum, best of 5, {torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for batch in [int(b) for b in a.batches.split(",")]:
        rows = real_queries(batch)
        prompts = [builder.student(r["en"]) for r in rows]
        best = {"msd": [float("inf"), float("inf"), 0], "generate": [float("inf"), float("inf"), 0]}
        for rep in range(a.reps):  # alternate; the order flips each repetition
            for name in (("msd", "generate") if rep % 2 == 0 else ("generate", "msd")):
                wall, cpu, steps = per_step(timed_msd if name == "msd" else timed_plain, model, tok, prompts,
                                            a.new_tokens)
                b = best[name]
                b[0], b[1], b[2] = min(b[0], wall), min(b[1], cpu), max(b[2], steps)
        ctx = sum(len(p) for p in prompts) / batch + a.new_tokens / 2  # mean context while decoding
        kv = kv_tok * batch * ctx
        now = read_bandwidth(a.bandwidth_mib << 20, 5)
        bw = (max(bw[0], now[0]), max(bw[1], now[1]))  # the best seen: what the machine can do
        for name, (wall, cpu, steps) in best.items():
            reads = msd_reads if name == "msd" else total
            floor_w, floor_c = reads / bw[0], reads / bw[1]
            ratio = cpu / floor_c if one_thread else wall / floor_w
            results.append((batch, name, ratio))
            print(f"batch {batch} {name:8s}: {wall * 1e3:7.1f} ms/step wall, {cpu * 1e3:7.1f} ms CPU, {steps} steps; "
                  f"floor {floor_w * 1e3:6.1f} ms wall / {floor_c * 1e3:6.1f} ms CPU ({reads / 1e6:.0f} MB of weights; "
                  f"+{kv / 1e6:.1f} MB of KV cache: {(reads + kv) / bw[1] * 1e3:.1f} ms CPU); ratio "
                  f"{wall / floor_w:.2f} wall, {cpu / floor_c:.2f} CPU ({cpu / ((reads + kv) / bw[1]):.2f} with KV)",
                  flush=True)
    print(f"read bandwidth for the floors: {bw[0] / 1e9:.2f} GB/s wall, {bw[1] / 1e9:.2f} GB/s CPU clock; "
          f"load average at the end {os.getloadavg()[0]:.1f} (times are upper bounds on a shared machine)")
    for batch, name, ratio in results:
        print(f"decode_vs_floor_b{batch}_{name}={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
