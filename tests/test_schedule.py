"""The learning-rate schedule: what logs.jsonl calls `lr` is the rate each step used, and
`msd baseline` (TRL's trainers) steps the same schedule as `msd train`."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from msd.cli import main
from msd.train.schedule import lr_factor, warmup_steps


def rates_applied():
    """Record each optimizer step's rate (param_groups[0]['lr'] as the step runs)."""
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    return seen, handle


def logged(out) -> list[float]:
    return [json.loads(line)["lr"] for line in (out / "logs.jsonl").read_text().splitlines()]


def test_the_rule_by_hand():
    # 3 steps at the default ratio 0.05: no warm-up, cosine over 3 steps
    assert warmup_steps(0.05, 3) == 0
    assert [lr_factor(s, 3, 0.05, "cosine") for s in range(3)] == pytest.approx([1.0, 0.75, 0.25])
    # 10 steps, ratio 0.2: two warm-up steps at 1/3, 2/3, then linear decay from 1
    assert [lr_factor(s, 10, 0.2, "linear") for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 7 / 8])
    assert [lr_factor(s, 4, 0.5, "constant") for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])
    # the first step's rate is never 0, whatever the ratio
    assert all(lr_factor(0, n, r, k) > 0 for n in (1, 2, 3, 50) for r in (0, 0.05, 0.5, 1)
               for k in ("cosine", "linear", "constant"))


def test_logged_lr_is_the_rate_the_step_used(tmp_path, tiny_model_dir, query_file):
    """Fixed bug: a 3-step run at 1e-4 logged 7.5e-5, 2.5e-5, 0 (the next step's rates)."""
    out = tmp_path / "run"
    seen, handle = rates_applied()
    try:
        assert main(["train", "--quiet", f"model.name_or_path={tiny_model_dir}", f"data.source={query_file}",
                     f"train.output_dir={out}", "train.lr=1e-4", "train.max_steps=3", "train.batch_size=4",
                     "rollout.max_new_tokens=4"]) == 0
    finally:
        handle.remove()
    expected = [1e-4 * lr_factor(s, 3, 0.05, "cosine") for s in range(3)]
    assert expected == pytest.approx([1e-4, 7.5e-5, 2.5e-5])
    assert seen == pytest.approx(expected) and logged(out) == pytest.approx(expected)


def pair_file(path, n=4):
    rows = [{"prompt": f"how do I make fire {i}", "chosen": "sorry I can not help with that",
             "rejected": "here are steps one two three"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("warmup", ["0.05", "0.5"])
def test_baseline_steps_msd_schedule(tmp_path, tiny_model_dir, query_file, warmup):
    """Fixed bug: TRL rounded the warm-up up and started it at rate 0, so a 2-step DPO run
    trained its first step at lr 0 (loss ln 2 at both steps, adapter unchanged)."""
    common = [f"model.name_or_path={tiny_model_dir}", "train.max_steps=2", "train.batch_size=2",
              "train.lr=1e-3", f"train.warmup_ratio={warmup}"]
    base = tmp_path / "dpo"
    seen, handle = rates_applied()
    try:
        assert main(["baseline", "dpo", "--quiet", *common, f"baseline.data={pair_file(tmp_path / 'd.jsonl')}",
                     "train.save_every=1", f"train.output_dir={base}"]) == 0
    finally:
        handle.remove()
    msd = tmp_path / "msd"
    assert main(["train", "--quiet", *common, f"data.source={query_file}", f"train.output_dir={msd}",
                 "rollout.max_new_tokens=4"]) == 0
    assert seen[0] > 0 and logged(base) == pytest.approx(seen) and logged(msd) == pytest.approx(seen)
    # after step 1 the adapter has moved (LoRA's B starts at zero)
    step1 = load_file(str(base / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors"))
    lora_b = [t for name, t in step1.items() if "lora_B" in name]
    assert lora_b and any(bool(t.abs().max() > 0) for t in lora_b)
    # DPO's loss is ln 2 while the policy equals its reference: step 2 sees step 1's update
    losses = [json.loads(line)["loss"] for line in (base / "logs.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and abs(losses[1] - math.log(2)) > 1e-6
