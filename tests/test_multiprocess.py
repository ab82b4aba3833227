"""Two processes x batch b give the same update as one process x batch 2b (DDP over gloo, CPU).

Greedy rollouts (rollout.temperature=0) make the samples independent of the process split, so
the only differences left are float rounding: the final adapters must agree to float tolerance.
This checks `micro_batch` sharding, DDP gradient averaging, saving from rank 0 and `save_final`.
On CPU, accelerate starts several processes only with its torchrun launcher (`--multi_gpu`,
which falls back to gloo without GPUs); `--cpu --num_processes 2` starts one (see
docs/PERFORMANCE.md), which msd refuses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msd.config import load_config
from msd.errors import MsdError
from msd.testing.processes import free_port
from msd.train import train

ROOT = Path(__file__).resolve().parents[1]


def _overrides(model_dir, queries, out, batch):
    return [f"model.name_or_path={model_dir}", f"data.source={queries}", f"train.output_dir={out}",
            f"train.batch_size={batch}", "train.max_steps=2", "train.lr=1e-2", "train.save_every=1",
            "train.schedule=constant", "train.warmup_ratio=0", "rollout.max_new_tokens=5",
            "rollout.temperature=0", "loss.chunk_size=4"]


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, peaky_model_dir, query_file):
    tiny_model_dir = peaky_model_dir
    one = tmp_path / "one"
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "msd.cli", "train", "--quiet", *_overrides(tiny_model_dir, query_file, two, 2)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # The one-process reference runs here meanwhile (the machine has two cores).
    torch.set_num_threads(1)
    train(load_config(None, _overrides(tiny_model_dir, query_file, one, 4)), progress=False)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]

    a = load_file(str(one / "final" / "adapter_model.safetensors"))
    b = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    init_b = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().max() > 1e-4 for k in init_b)  # the adapter moved away from B = 0
    # AdamW moves each weight by up to lr = 1e-2 per step, nearly by sign(g); rounding noise in
    # the (padded differently) batch gradients moves a few weights by ~1e-5. Anything wrong in
    # sharding or averaging moves most of them by ~1e-2.
    diffs = torch.cat([(b[k] - a[k]).abs().flatten() for k in a])
    assert diffs.max() < 1e-4, diffs.max()
    assert diffs.median() < 1e-6

    # Rank 0 alone wrote the logs and the checkpoints; both runs saw the same data and losses.
    logs_one = [json.loads(line) for line in (one / "logs.jsonl").read_text().splitlines()]
    logs_two = [json.loads(line) for line in (two / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs_two] == [1, 2]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_1", "step_2"]
    # rank 0's logged loss is the mean over its own rows: compare the step-1 response lengths
    assert logs_two[0]["response_len"] == pytest.approx(logs_one[0]["response_len"], abs=3)


def test_accelerate_cpu_flag_single_process_is_refused(monkeypatch, tmp_path, tiny_model_dir, query_file):
    """`accelerate launch --cpu --num_processes 2` runs one process (no mpirun): say so, don't
    silently train with one process."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(None, _overrides(tiny_model_dir, query_file, tmp_path / "x", 2))
    with pytest.raises(MsdError, match="--multi_gpu"):
        train(cfg, progress=False)
