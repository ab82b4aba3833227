"""Memory per parameter under each engine, measured on CPU: one process, DDP, FSDP2, ZeRO-3,
for full fine-tuning and LoRA, each on 2 processes (one for "one process").

Each process builds msd's accelerator and run exactly as `msd train` does
(`msd.train.setup.make_accelerator` + `prepare`: teacher copy, sharding, optimizer), takes two
optimizer steps of a plain language-model loss (so gradients and AdamW states exist), and reports
its memory above what it held before loading the model, in bytes per parameter of the model:
the tensors it keeps (`live_tensor_bytes`), its resident memory after the steps, and the peak
resident memory (loading included). Per process, one figure per process. float32 weights, no mixed
precision. The model is a Qwen2-style decoder (hidden 512, 8 layers, 32,768-id vocabulary,
tied embedding: 48.3M parameters), big enough that the library's own memory does not blur the
figures.

    python bench/engine_memory.py            # all engines, prints one table row per run
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
ROOT = Path(__file__).resolve().parents[1]
SIZE = dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=2048, vocab=32_768)
ENGINES = {  # name -> launcher prefix (None: one plain process)
    "one process": None,
    "DDP": "cpu_ddp.yaml",
    "FSDP2": "fsdp_cpu.yaml",
    "ZeRO-3": "zero3_cpu.yaml",
}


def live_tensor_bytes() -> int:
    """Bytes of the tensor storages this process's Python objects reach (each storage once;
    FSDP2's DTensors by their local shard): what the engine keeps, without the freed memory the
    C heap holds on to, which resident memory still counts."""
    import gc

    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        t = getattr(obj, "_local_tensor", obj)
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if storage.device.type == "cpu" and storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def worker(model_dir: str, lora: bool, out_dir: str) -> None:
    import torch

    from _common import rss_mib
    from msd.config import load_config
    from msd.models import load_model
    from msd.train.setup import make_accelerator, prepare

    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"lora.enabled={str(lora).lower()}",
                             "train.batch_size=1", "train.max_steps=2", "loss.chunk_size=0"])
    acc = make_accelerator(cfg.train)
    base_mib, base_live = rss_mib(), live_tensor_bytes()
    model = load_model(cfg.model)
    # ZeRO-3 loads each process's partition only (docs/SCALING.md): count the full sizes
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    run = prepare(cfg, model, acc, 16)
    ids = torch.randint(0, SIZE["vocab"], (1, 32))
    for _ in range(2):
        loss = run.model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad()
    held = (rss_mib() - base_mib) * 2**20 / n_params
    live = (live_tensor_bytes() - base_live) / n_params
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mib) * 2**20 / n_params
    row = {"rank": acc.process_index, "params": n_params, "engine": run.engine,
           "live_B_per_param": round(live, 2), "held_B_per_param": round(held, 2), "peak_B_per_param": round(peak, 2)}
    Path(out_dir, f"mem_{acc.process_index}.json").write_text(json.dumps(row))


def launch(engine: str, model_dir: str, lora: bool) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), PYTHONWARNINGS="ignore")
    out_dir = tempfile.mkdtemp()
    script = [str(Path(__file__).resolve()), "--worker", model_dir, str(int(lora)), out_dir]
    config = ENGINES[engine]
    cmd = [sys.executable, *script] if config is None else [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
        str(ROOT / "configs/accelerate" / config), "--main_process_port", "29731", *script]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    rows = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("mem_*.json"))]
    if not rows:
        raise SystemExit(f"{engine}: no figures\n{(out.stdout + out.stderr)[-3000:]}")
    return rows


def main() -> None:
    from _common import make_bench_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_bench_model(Path(tmp) / "model", hidden=SIZE["hidden"], layers=SIZE["layers"],
                                         heads=SIZE["heads"], kv_heads=SIZE["kv_heads"],
                                         intermediate=SIZE["intermediate"], vocab=SIZE["vocab"]))
        print("| engine | tuning | processes | tensors B/param | resident B/param | peak resident B/param |")
        print("|---|---|---|---|---|---|")
        for lora in (False, True):
            for engine in ENGINES:
                rows = launch(engine, model_dir, lora)
                live = " / ".join(f"{r['live_B_per_param']:.1f}" for r in rows)
                held = " / ".join(f"{r['held_B_per_param']:.1f}" for r in rows)
                peak = " / ".join(f"{r['peak_B_per_param']:.1f}" for r in rows)
                print(f"| {engine} | {'LoRA' if lora else 'full'} | {len(rows)} | {live} | {held} | {peak} |",
                      flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3] == "1", sys.argv[4])
    else:
        main()
