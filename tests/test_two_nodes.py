"""Two nodes on one machine: two `accelerate launch` commands with `num_machines 2` and
machine_rank 0 and 1 over the loopback interface (one process each, DDP over gloo), as two
hosts would run them. A node killed after a checkpoint makes the other exit with one clear line
within a bounded time (no hang), and the same two launches run again resume and end with the
weights of an uninterrupted two-node run."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from launches import Launch, free_port, overrides

pytestmark = pytest.mark.slow  # three two-node launches, ~1 minute, load-dependent
STEPS = 6


def nodes(args, timeout_s: int = 30) -> list[Launch]:
    port = free_port()
    return [Launch(args, config="cpu_ddp.yaml", port=port, MSD_DIST_TIMEOUT=str(timeout_s),
                   launch_args=("--num_machines", "2", "--machine_rank", str(rank),
                                "--num_processes", "2", "--main_process_ip", "127.0.0.1"))
            for rank in (0, 1)]


def test_two_nodes_train_survive_a_lost_node_and_resume(tiny_model_dir, query_file, tmp_path):
    def args(out):
        return overrides(tiny_model_dir, query_file, out, 2, train__max_steps=STEPS,
                         train__keep_checkpoints=STEPS, lora__enabled="true")

    out = tmp_path / "run"
    head, other = nodes(args(out))
    other.kill_after(out / "checkpoints" / "step_2" / "state.json")  # node 1 goes down
    start = time.monotonic()
    status, output = head.outcome(timeout=120)
    assert status != 0 and time.monotonic() - start < 90
    assert "msd: error: process 0 of 2 lost contact with the others" in output, output[-3000:]
    assert not (out / "final").exists()

    whole = nodes(args(tmp_path / "whole"))
    resumed = nodes(args(out))
    outputs = [n.finish() for n in (*resumed, *whole)]
    assert "resuming from" in outputs[0]
    assert outputs[0].count("msd: trained") == 1 and "msd: trained" not in outputs[1]
    a = load_file(str(out / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
