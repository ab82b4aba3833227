"""Sharded training (msd's FSDP2 over gloo, 2 CPU processes): it trains, each process holds only
its shard, checkpoints resume exactly after a SIGKILL, and `final/` is a full Hugging Face model
(or PEFT adapter) equal to what one process trains with twice the batch.

Launched as users launch it: `accelerate launch --config_file configs/accelerate/fsdp_cpu.yaml`
and `torchrun` with ACCELERATE_USE_FSDP=true FSDP_VERSION=2. The one-process references run
in-process meanwhile (the machine has two cores). Greedy rollouts (on-policy) or one teacher
cache (off-policy) make the responses independent of the process split, so only float rounding
separates two from one process (tolerances as in tests/test_multiprocess.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msd.config import load_config
from msd.train import checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
pytestmark = pytest.mark.slow  # ~2-4 minutes in all (six two-process launches), load-dependent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(model_dir, queries, out, batch, **extra) -> list[str]:
    opts = {"model.name_or_path": model_dir, "data.source": queries, "train.output_dir": out,
            "train.batch_size": batch, "train.max_steps": STEPS, "train.lr": 1e-2,
            "train.save_every": 1, "train.schedule": "constant", "train.warmup_ratio": 0,
            "rollout.max_new_tokens": 5, "rollout.temperature": 0, "loss.chunk_size": 0,
            "data.heldout_fraction": 0}
    opts.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in opts.items()]


class Launch:
    """`msd train` on two processes, in its own process group (killed as a whole)."""

    def __init__(self, args: list[str], launcher: str = "accelerate"):
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT / "src"))
        port = str(_free_port())
        if launcher == "accelerate":
            cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   str(ROOT / "configs/accelerate/fsdp_cpu.yaml"), "--main_process_port", port]
        else:  # torchrun: the FSDP request is the environment accelerate would set
            env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", port]
        self.proc = subprocess.Popen([*cmd, "-m", "msd.cli", "train", "--quiet", *args], env=env,
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

    def finish(self) -> str:
        out, _ = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, out[-4000:]
        return out

    def kill_after(self, marker: Path) -> None:
        """SIGKILL every process of the launch (the workers too: torchrun starts each in its own
        session) as soon as `marker` exists, as a node failure would."""
        deadline = time.monotonic() + 240
        while not marker.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = self.proc.communicate()
        assert marker.exists(), out[-4000:]


def descendants(pid: int) -> list[int]:
    """The processes started (transitively) by `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def shares(output: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"holds (\d+) of (\d+) parameter elements", output)]


def assert_close(a: dict, b: dict, moved_from: dict | None = None) -> None:
    assert a.keys() == b.keys() and a
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    # AdamW moves each weight by up to lr = 1e-2 per step; rounding noise in differently padded
    # batches moves a few by ~1e-5; a sharding or averaging error moves most by ~1e-2.
    assert diffs.max() < 1e-4, diffs.max()
    assert diffs.median() < 1e-6
    if moved_from is not None:  # the comparison means something only if training moved them
        moved = torch.cat([(a[k].float() - moved_from[k].float()).abs().flatten() for k in a])
        assert moved.median() > 1e-3


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    from conftest import write_queries

    return write_queries(tmp_path_factory.mktemp("data") / "q.jsonl", n=8)


@pytest.fixture(scope="module")
def full_ft(peaky_model_dir, queries, tmp_path_factory, one_thread):
    """Full fine-tuning, on-policy: two processes (FSDP2, batch 2 each), uninterrupted, and one
    process with batch 4."""
    root = tmp_path_factory.mktemp("full")
    two = Launch(overrides(peaky_model_dir, queries, root / "two", 2, lora__enabled="false"))
    train(load_config(None, overrides(peaky_model_dir, queries, root / "one", 4,
                                      lora__enabled="false")), progress=False)
    return root, two.finish()


def test_fsdp_full_finetuning_shards_and_matches_one_process(full_ft, peaky_model_dir):
    from transformers import AutoModelForCausalLM

    root, output = full_ft
    (l0, n0), (l1, n1) = shares(output)
    assert n0 == n1 and l0 + l1 == n0 and abs(l0 - l1) < 0.1 * n0  # each holds about half
    ckpt = root / "two" / "checkpoints" / f"step_{STEPS}"
    assert {p.name for p in ckpt.iterdir()} == {"dcp", "scheduler.pt", "rng_0.pt", "rng_1.pt",
                                                "state.json"}
    assert json.loads((ckpt / "state.json").read_text())["engine"] == "fsdp2"
    # final/ is a full model that plain transformers loads, equal to the one-process training
    two = AutoModelForCausalLM.from_pretrained(root / "two" / "final").state_dict()
    one = AutoModelForCausalLM.from_pretrained(root / "one" / "final").state_dict()
    init = AutoModelForCausalLM.from_pretrained(peaky_model_dir).state_dict()
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in init.items()}
    assert_close(two, one, moved_from=init)
    logs = [json.loads(line) for line in (root / "two" / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))


def test_fsdp_full_finetuning_killed_and_resumed_equals_uninterrupted(full_ft, peaky_model_dir,
                                                                      queries, tmp_path):
    root, _ = full_ft
    out = tmp_path / "run"
    args = overrides(peaky_model_dir, queries, out, 2, lora__enabled="false",
                     train__keep_checkpoints=STEPS)  # the marker stays until the kill
    Launch(args).kill_after(out / "checkpoints" / "step_2" / "state.json")
    assert not (out / "final").exists(), "the run finished before it was killed"
    assert checkpoint.list_checkpoints(out)[-1][0] < STEPS
    Launch(args).finish()
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(root / "two" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp_lora_off_policy_torchrun_killed_resumed_matches_one_process(peaky_model_dir, queries,
                                                                          tmp_path, one_thread):
    """LoRA, off-policy with sampled (temperature 1) teacher responses, launched by torchrun:
    both processes share the teacher sampling, and the cache equals a one-process run's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = dict(lora__enabled="true", train__mode="off_policy", rollout__temperature=1.0,
                 rollout__batch_size=3)
    out = tmp_path / "two"
    args = overrides(peaky_model_dir, queries, out, 2, train__keep_checkpoints=STEPS, **extra)
    Launch(args, "torchrun").kill_after(out / "checkpoints" / "step_2" / "state.json")
    assert not (out / "final").exists(), "the run finished before it was killed"
    rerun = Launch(args, "torchrun")
    train(load_config(None, overrides(peaky_model_dir, queries, tmp_path / "one", 4, **extra)),
          progress=False)
    output = rerun.finish()
    assert "resuming from" in output
    (l0, n0), (l1, _) = shares(output)
    assert abs(l0 - l1) < 0.1 * n0

    def cache(run):
        [path] = (run / "offpolicy_cache").glob("teacher_samples.*.jsonl")
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(recs) == len({r["key"] for r in recs})  # each item sampled once
        return {r["key"]: r["samples"] for r in recs}

    assert cache(out) == cache(tmp_path / "one")
    a = load_file(str(out / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    assert_close(a, b)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)
    # plain PEFT loads it, with the trained values
    base = AutoModelForCausalLM.from_pretrained(peaky_model_dir)
    peft = PeftModel.from_pretrained(base, out / "final")
    loaded = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert len(loaded) == len(a)
    for name, t in a.items():
        key = next(n for n in loaded if n.startswith(name.rsplit(".weight", 1)[0]))
        assert torch.equal(loaded[key].detach(), t)


def test_fsdp_pieces_under_torchrun(tiny_model_dir):
    """tests/fsdp_probe.py on two processes: half of each weight per process, a process-0
    adapter everywhere, rollouts from gathered weights on the normal backend (no collective calls
    while decoding) equal to the unsharded model's, the layer-by-layer fallback, the agreed
    finite flag and the global gradient norm."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(ROOT / "tests" / "fsdp_probe.py"),
                           str(tiny_model_dir)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "probe ok 0" in proc.stdout and "probe ok 1" in proc.stdout
