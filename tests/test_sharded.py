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
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from launches import ROOT, STEPS, Launch, assert_close, free_port, overrides, shares
from msd.config import load_config
from msd.train import checkpoint, train

pytestmark = pytest.mark.slow  # ~2-4 minutes in all (seven two-process launches), load-dependent


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
    both processes share the teacher sampling, the cache equals a one-process run's, and the
    resumed adapter equals an uninterrupted two-process run's bit for bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = dict(lora__enabled="true", train__mode="off_policy", rollout__temperature=1.0,
                 rollout__batch_size=3)
    out = tmp_path / "two"
    args = overrides(peaky_model_dir, queries, out, 2, train__keep_checkpoints=STEPS, **extra)
    Launch(args, "torchrun").kill_after(out / "checkpoints" / "step_2" / "state.json")
    assert not (out / "final").exists(), "the run finished before it was killed"
    rerun = Launch(args, "torchrun")
    whole = Launch(overrides(peaky_model_dir, queries, tmp_path / "whole", 2, **extra), "torchrun")
    train(load_config(None, overrides(peaky_model_dir, queries, tmp_path / "one", 4, **extra)),
          progress=False)
    output = rerun.finish()
    whole.finish()
    a = load_file(str(out / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
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
                           "--master_port", str(free_port()), str(ROOT / "tests" / "fsdp_probe.py"),
                           str(tiny_model_dir)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "probe ok 0" in proc.stdout and "probe ok 1" in proc.stdout
