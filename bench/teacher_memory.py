"""Memory saved by the shared teacher (LoRA: the student with its adapter disabled) against a
separate frozen teacher copy, on the benchmark model.

    python bench/teacher_memory.py

Each variant runs in its own process: load the model, add LoRA, build the teacher (shared, or a
deep copy of the base model as a separate-teacher trainer would hold), then one MSD loss step
(teacher scoring, student scoring, backward) on a fixed batch. Prints parameter bytes (distinct
storages) and the peak RSS of each process, and the saving.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import LORA, SMALL, machine_line, make_bench_model, peak_rss_mib, rss_mib  # noqa: E402


def storage_bytes(*modules) -> int:
    """Bytes of the distinct parameter storages of the modules (a shared tensor counts once)."""
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def worker(variant: str, model_dir: str, batch: int, new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from msd.config import LoraConfig, LossConfig, ModelConfig, chunk_size_for
    from msd.losses import LossSpec
    from msd.models import Teacher, apply_lora, load_model_and_tokenizer
    from msd.scoring import msd_batch_loss

    base_rss = rss_mib()
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=model_dir))
    model = apply_lora(model, LoraConfig(**LORA))
    if variant == "shared":
        teacher = Teacher.for_model(model)
        teacher_modules = ()
    else:  # what a separate-teacher trainer holds: a second, frozen copy of the base model
        frozen, _ = load_model_and_tokenizer(ModelConfig(name_or_path=model_dir))
        frozen.requires_grad_(False)
        teacher = Teacher(model, frozen)
        teacher_modules = (frozen,)
    params = storage_bytes(model, *teacher_modules)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (24,), generator=g).tolist() for _ in range(batch)]
    t_prompts = [torch.randint(10, 1000, (96,), generator=g).tolist() for _ in range(batch)]
    responses = [torch.randint(10, 1000, (new_tokens,), generator=g).tolist() for _ in range(batch)]
    model.train()
    loss_cfg = LossConfig()
    out = msd_batch_loss(model, teacher, prompts, t_prompts, responses, tok.pad_token_id,
                         LossSpec.of(loss_cfg), chunk_size_for(loss_cfg, "cpu"))
    out.loss.backward()
    return {"variant": variant, "param_bytes": params, "peak_rss_mib": peak_rss_mib(),
            "base_rss_mib": base_rss}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/msd_bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--worker", choices=["shared", "copy"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    model_dir = str(make_bench_model(Path(a.workdir) / "model_small", **SMALL))
    if a.worker:
        print(json.dumps(worker(a.worker, model_dir, a.batch, a.new_tokens)))
        return 0
    recs = {}
    for variant in ("shared", "copy"):
        cmd = [sys.executable, __file__, "--worker", variant, "--workdir", a.workdir,
               "--batch", str(a.batch), "--new-tokens", str(a.new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        recs[variant] = json.loads(out.strip().splitlines()[-1])
    print(machine_line())
    print("| teacher | parameter bytes (MiB) | peak RSS MiB | peak - import baseline MiB |")
    print("|---|---|---|---|")
    for v, r in recs.items():
        label = "shared (adapter disabled)" if v == "shared" else "separate frozen copy"
        print(f"| {label} | {r['param_bytes'] / 2**20:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] - r['base_rss_mib']:.0f} |")
    saved = (recs["copy"]["param_bytes"] - recs["shared"]["param_bytes"]) / 2**20
    rss_saved = recs["copy"]["peak_rss_mib"] - recs["shared"]["peak_rss_mib"]
    print(f"saved: {saved:.1f} MiB of parameters, {rss_saved:.0f} MiB of peak RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
