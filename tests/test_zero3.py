"""DeepSpeed ZeRO-3 over gloo, 2 CPU processes, launched as users launch it
(`accelerate launch --config_file configs/accelerate/zero3_cpu.yaml -m msd.cli train`): each
process holds half of every parameter, checkpoints are the engine's partitioned states inside
msd's atomic folder, a run SIGKILLed after a checkpoint and rerun ends with the same weights as
an uninterrupted run, and `final/` loads in plain transformers / PEFT.

Greedy on-policy rollouts make the runs deterministic, so resumed and uninterrupted runs are
compared bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launches import Launch, overrides, shares
from msd.train import checkpoint

pytest.importorskip("deepspeed")  # in the `dev` extra (make install); a pure-Python install
pytestmark = pytest.mark.slow  # four two-process launches, ~1-2 minutes, load-dependent
STEPS = 4


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    from conftest import write_queries

    return write_queries(tmp_path_factory.mktemp("data") / "q.jsonl", n=8)


def zero3(args) -> Launch:
    return Launch(args, config="zero3_cpu.yaml")


def killed_and_resumed(model_dir, queries, out, **extra) -> str:
    """A run SIGKILLed (every process) once step 2's checkpoint exists, then rerun to the end;
    the rerun's output."""
    args = overrides(model_dir, queries, out, 2, train__max_steps=STEPS,
                     train__keep_checkpoints=STEPS, **extra)  # the marker stays until the kill
    zero3(args).kill_after(out / "checkpoints" / "step_2" / "state.json")
    assert not (out / "final").exists(), "the run finished before it was killed"
    assert checkpoint.list_checkpoints(out)[-1][0] < STEPS
    output = zero3(args).finish()
    assert "resuming from" in output
    return output


def assert_partitioned(output: str) -> None:
    """Each process holds its half of every parameter (ZeRO-3 pads partitions to equal size)."""
    assert "ZeRO-3 process 0 of 2" in output and "ZeRO-3 process 1 of 2" in output
    (l0, n0), (l1, n1) = shares(output)
    assert n0 == n1 and l0 == l1 and n0 <= l0 + l1 < n0 * 1.05, (l0, l1, n0)


def assert_engine_checkpoint(out, step: int) -> None:
    ckpt = out / "checkpoints" / f"step_{step}"
    assert {p.name for p in ckpt.iterdir()} >= {"engine", "scheduler.pt", "rng_0.pt", "rng_1.pt",
                                                "state.json"}
    states = {p.name for p in (ckpt / "engine").rglob("zero_pp_rank_*")}
    assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1)
            for kind in ("model", "optim")} <= states
    saved = json.loads((ckpt / "state.json").read_text())
    assert (saved["engine"], saved["processes"]) == ("deepspeed", 2)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zero3_full_finetuning_partitions_resumes_and_loads(peaky_model_dir, queries, tmp_path):
    from transformers import AutoModelForCausalLM

    args = overrides(peaky_model_dir, queries, tmp_path / "two", 2, train__max_steps=STEPS,
                     lora__enabled="false")
    output = zero3(args).finish()
    assert_partitioned(output)
    assert output.count("msd: trained") == 1  # one training, not one per process
    assert_engine_checkpoint(tmp_path / "two", STEPS)
    logs = [json.loads(line) for line in (tmp_path / "two" / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))

    killed_and_resumed(peaky_model_dir, queries, tmp_path / "run", lora__enabled="false")
    # final/ is a full model that plain transformers loads; resumed == uninterrupted, bit for bit
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    init = AutoModelForCausalLM.from_pretrained(peaky_model_dir).state_dict()
    assert {k: v.shape for k, v in two.items()} == {k: v.shape for k, v in init.items()}
    moved = torch.cat([(two[k] - init[k]).abs().flatten() for k in two])
    assert moved.median() > 1e-3  # training moved the weights (lr 1e-2, AdamW)
    assert_equal(load_file(str(tmp_path / "run" / "final" / "model.safetensors")),
                 load_file(str(tmp_path / "two" / "final" / "model.safetensors")))


def test_zero3_lora_off_policy_partitions_resumes_and_loads_in_peft(peaky_model_dir, queries,
                                                                   tmp_path):
    """LoRA, off-policy: both processes sample the teacher (temperature 1) from gathered weights,
    and the adapter trains on the engine's partitions."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = dict(lora__enabled="true", train__mode="off_policy", rollout__temperature=1.0,
                 rollout__batch_size=3)
    args = overrides(peaky_model_dir, queries, tmp_path / "two", 2, train__max_steps=STEPS, **extra)
    output = zero3(args).finish()
    assert_partitioned(output)
    assert_engine_checkpoint(tmp_path / "two", STEPS)
    killed_and_resumed(peaky_model_dir, queries, tmp_path / "run", **extra)
    a = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    assert_equal(a, b)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # the adapter trained
    base = AutoModelForCausalLM.from_pretrained(peaky_model_dir)
    peft = PeftModel.from_pretrained(base, tmp_path / "run" / "final")
    loaded = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert len(loaded) == len(a)
    for name, t in a.items():
        key = next(n for n in loaded if n.startswith(name.rsplit(".weight", 1)[0]))
        assert torch.equal(loaded[key].detach(), t)
