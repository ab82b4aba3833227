"""Sharded-training smoke check for a machine with GPUs: for each engine (msd's FSDP2,
DeepSpeed ZeRO-3 when deepspeed is installed) and each of full fine-tuning and LoRA, train a
small random Llama-shaped model a few steps uninterrupted; train it again, SIGKILL every process
after a checkpoint, resume; then compare the two `final/` folders tensor by tensor, reload them
with plain transformers / PEFT and generate a few tokens. Prints one line per case and exits 1 if
any failed. Without GPUs it runs the FSDP2 cases on 2 CPU processes (a test of the script).

    python bench/gpu_scale_check.py [--gpus N] [--engines fsdp2,zero3] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from msd.testing.processes import descendants, free_port  # noqa: E402


def launch(config: str, nproc: int, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", config,
           "--num_processes", str(nproc), "--main_process_port", str(free_port()),
           "-m", "msd.cli", "train", "--quiet", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def run(config, nproc, args, out: Path, kill_after: str | None = None) -> float:
    t0 = time.time()
    proc = launch(config, nproc, args, out.with_suffix(".log"))
    if kill_after:
        marker = out / "checkpoints" / kill_after / "state.json"
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.01)
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        if (out / "final").exists():
            raise RuntimeError("the run finished before it was killed; raise --steps")
        return time.time() - t0
    if proc.wait() != 0:
        raise RuntimeError(f"launch failed, see {out.with_suffix('.log')}")
    return time.time() - t0


def final_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def reload_and_generate(folder: Path, base: Path, lora: bool) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base if lora else folder)
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    ids = torch.tensor([[5, 6, 7, 8]])
    return model.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[1]


def case(engine: str, lora: bool, a: argparse.Namespace, work: Path, model: Path, queries: str) -> str:
    gpu = torch.cuda.is_available()
    config = str(ROOT / "configs/accelerate" / ({"fsdp2": "fsdp.yaml" if gpu else "fsdp_cpu.yaml",
                                                   "zero3": "zero3.yaml"}[engine]))
    name = f"{engine}-{'lora' if lora else 'full'}"
    args = [f"model.name_or_path={model}", f"data.source={queries}", "data.heldout_fraction=0",
            f"lora.enabled={str(lora).lower()}", f"train.max_steps={a.steps}", "train.save_every=1",
            f"train.keep_checkpoints={a.steps}", "train.batch_size=2", "train.lr=1e-3",
            "rollout.max_new_tokens=16", "rollout.temperature=0",
            f"train.mixed_precision={'bf16' if gpu else 'no'}"]
    ref, res = work / f"{name}-ref", work / f"{name}-resumed"
    t_ref = run(config, a.gpus, [*args, f"train.output_dir={ref}"], ref)
    run(config, a.gpus, [*args, f"train.output_dir={res}"], res, kill_after="step_2")
    t_res = run(config, a.gpus, [*args, f"train.output_dir={res}"], res)
    x, y = final_tensors(ref / "final"), final_tensors(res / "final")
    same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    diff = max((float((x[k].float() - y[k].float()).abs().max()) for k in x if k in y), default=-1)
    tokens = reload_and_generate(res / "final", model, lora)
    logs = [json.loads(line) for line in (ref / "logs.jsonl").read_text().splitlines()]
    ok = same and tokens > 4
    return (f"{'PASS' if ok else 'FAIL'} {name}: resumed == uninterrupted: {same} (max diff {diff:.2e}); "
            f"reloaded and generated {tokens} tokens; uninterrupted {t_ref:.0f} s, resumed {t_res:.0f} s; "
            f"last loss {logs[-1]['loss']:.4f}, step {logs[-1]['step_s']:.2f} s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=max(2, torch.cuda.device_count()))
    p.add_argument("--engines", default="fsdp2,zero3")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    a = p.parse_args()
    from _common import machine_line
    from msd.testing import make_tiny_model

    print(machine_line())

    work = Path(tempfile.mkdtemp(prefix="msd_scale_"))
    model = make_tiny_model(work / "model", hidden=a.hidden, layers=4, heads=8)
    queries = work / "q.jsonl"
    with open(queries, "w") as f:
        for i in range(16):
            f.write(json.dumps({"id": f"q{i}", "en": f"how do I make bread {i}",
                                "jv": f"tell me about water jv {i}", "sw": f"tell me about fire sw {i}"}) + "\n")
    engines = [e for e in a.engines.split(",") if e]
    if "zero3" in engines:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("SKIP zero3: deepspeed is not installed (pip install deepspeed)")
            engines.remove("zero3")
    if not torch.cuda.is_available() and "zero3" in engines:
        print("SKIP zero3: needs GPUs")
        engines.remove("zero3")
    failed = 0
    for engine in engines:
        for lora in (False, True):
            try:
                line = case(engine, lora, a, work, model, str(queries))
            except Exception as e:  # one broken case must not hide the others
                line = f"FAIL {engine}-{'lora' if lora else 'full'}: {type(e).__name__}: {e}"
            failed += line.startswith("FAIL")
            print(line, flush=True)
    print(f"outputs and logs: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
