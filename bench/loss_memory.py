"""Peak memory of the plain vs the chunked MSD loss, forward and backward.

    python bench/loss_memory.py                     # B=4, T=512, V=151,936, H=896 (Qwen2-0.5B sizes)
    python bench/loss_memory.py --chunk-size 128 --device cuda

Each variant runs in its own subprocess (this script with --variant), so one cannot inherit the
other's peak. The inputs (hidden states, both heads) are built first; the figure reported is the
peak above that baseline while the loss, its backward and the head's weight gradient run:
- CPU: peak resident set (getrusage ru_maxrss) minus the resident set after the inputs exist.
  Large tensors are mmap-backed, so they leave the resident set as soon as they are freed.
- CUDA: torch.cuda.max_memory_allocated minus memory_allocated after the inputs exist.
The last line is `peak_ratio=<plain / chunked>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from msd.chunked import chunked_msd_loss
from msd.config import LossConfig, chunk_size_for
from msd.losses import LossSpec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--chunk-size", type=int, default=-1,
                   help="tokens per chunk (default -1: msd's auto size for the device)")
    p.add_argument("--kind", default="rkl")
    p.add_argument("--weighting", default="dpsw")
    p.add_argument("--frozen-head", action="store_true", help="student head without gradient (LoRA-like)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    p.add_argument("--variant", choices=["plain", "chunked"], help="internal: run one variant and print JSON")
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_inputs(args):
    """Hidden states (B, T, H) and two bias-free heads (V, H), built in place (no spikes)."""
    g = torch.Generator(device=args.device).manual_seed(0)
    kw = dict(generator=g, device=args.device)
    student_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=args.device)
    teacher_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=args.device)
    with torch.no_grad():
        student_head.weight.normal_(0.0, 0.05, generator=g)
        teacher_head.weight.normal_(0.0, 0.02, generator=g).add_(student_head.weight)
    student_head.requires_grad_(not args.frozen_head)
    teacher_head.requires_grad_(False)
    h_s_BTH = torch.randn(args.batch, args.tokens, args.hidden, **kw).requires_grad_()
    h_t_BTH = torch.randn(args.batch, args.tokens, args.hidden, **kw).mul_(0.3).add_(h_s_BTH.detach())
    mask_BT = torch.rand(args.batch, args.tokens, **kw) < 0.9
    return student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT


def run_variant(args) -> dict:
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    inputs = make_inputs(args)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        max_before = max_rss_bytes()
    chunk_size = 0 if args.variant == "plain" else chunk_size_for(LossConfig(chunk_size=args.chunk_size),
                                                                 torch.device(args.device).type)
    start = time.perf_counter()
    student_head, teacher_head, h_s_BTH, h_t_BTH, mask_BT = inputs
    out = chunked_msd_loss(
        h_s_BTH, h_t_BTH, student_head, teacher_head, mask_BT,
        LossSpec(args.kind, args.weighting), chunk_size=chunk_size,
    )
    out.loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max_rss_bytes() - base
        # ru_maxrss only grows: a spike while building the inputs would hide the loss's peak.
        assert max_before - base < peak, "input construction peaked above the loss; cannot measure"
    return {
        "variant": args.variant,
        "chunk_size": chunk_size,
        "peak_bytes": peak,
        "seconds": time.perf_counter() - start,
        "loss": out.loss.item(),
        "grad_norm": h_s_BTH.grad.norm().item(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    from _common import machine_line

    print(machine_line())
    argv = sys.argv[1:] if argv is None else list(argv)
    rows = []
    for variant in ("plain", "chunked"):
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gib = 1024**3
    print(f"B={args.batch} T={args.tokens} V={args.vocab} H={args.hidden} device={args.device} "
          f"kind={args.kind} weighting={args.weighting} head={'frozen' if args.frozen_head else 'trained'}")
    print(f"{'variant':<8} {'chunk':>6} {'peak GiB':>9} {'seconds':>8} {'loss':>12}")
    for r in rows:
        print(f"{r['variant']:<8} {r['chunk_size']:>6} {r['peak_bytes'] / gib:>9.2f} {r['seconds']:>8.1f} {r['loss']:>12.6f}")
    print(f"peak_ratio={rows[0]['peak_bytes'] / rows[1]['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
