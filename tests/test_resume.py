"""Crash and resume: a run killed with SIGKILL and resumed ends with the same weights as an
uninterrupted run; off-policy teacher samples are reused, not regenerated; checkpoints are pruned
and half-written ones ignored.

The killed runs are real `msd train` processes; the reference and resumed runs call
`msd.cli.main` in-process (same code path, no second interpreter start-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_queries
from msd.train import checkpoint
from msd.cli import main

STEPS = 4


def train_args(model_dir, queries, out, mode, **extra) -> list[str]:
    opts = {"model.name_or_path": model_dir, "data.source": queries, "train.output_dir": out,
            "train.mode": mode, "train.batch_size": 4, "train.max_steps": STEPS,
            "train.save_every": 2, "train.lr": 1e-3, "train.seed": 3,
            "data.heldout_fraction": 0, "rollout.max_new_tokens": 8, "rollout.batch_size": 8}
    opts.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["train", "--quiet", *(f"{k}={v}" for k, v in opts.items())]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=tol, rtol=0), name
    # The comparison means something only if training moved the adapter.
    assert any(float(t.abs().max()) > 1e-3 for n, t in a.items() if "lora_B" in n)


class KilledRun:
    """`msd train` started as a process and SIGKILLed as soon as checkpoint `after` exists.

    A watcher thread does the killing, so the test can train its reference run meanwhile.
    """

    def __init__(self, args: list[str], run: Path, after: str = "step_2"):
        self.args, self.run, self.error = args, run, None
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "msd.cli", *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.marker = run / "checkpoints" / after / "state.json"
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 300
        while not self.marker.exists():
            if self.proc.poll() is not None:
                self.error = f"msd train exited early ({self.proc.returncode})"
                break
            if time.monotonic() > deadline:
                self.error = "no checkpoint appeared in time"
                break
            time.sleep(0.02)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self) -> int:
        """Wait for the kill; returns the step of the latest checkpoint left behind."""
        self.thread.join()
        stderr = self.proc.stderr.read().decode(errors="replace")
        self.proc.stderr.close()
        assert self.error is None, f"{self.error}: {stderr[-2000:]}"
        assert self.proc.returncode == -signal.SIGKILL
        assert not (self.run / "final").exists(), "the run finished before it was killed"
        step = checkpoint.list_checkpoints(self.run)[-1][0]
        assert 2 <= step < STEPS
        return step


# The killed processes run with one thread too, so both sides compute bit for bit alike.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    return write_queries(tmp_path_factory.mktemp("data") / "q.jsonl", n=12)


@pytest.fixture(scope="module")
def killed(tiny_model_dir, queries, tmp_path_factory):
    """Both runs to be killed start at once and train while the references run in-process."""
    runs = {}
    for mode in ("on_policy", "off_policy"):
        run = tmp_path_factory.mktemp(f"killed_{mode}") / "run"
        runs[mode] = KilledRun(train_args(tiny_model_dir, queries, run, mode), run)
    yield runs
    for k in runs.values():
        k.proc.kill()


@pytest.fixture(scope="module")
def on_policy_reference(killed, tiny_model_dir, queries, tmp_path_factory):
    """An uninterrupted on-policy run that saves every step and keeps 2 checkpoints."""
    run = tmp_path_factory.mktemp("ref_on") / "run"
    args = train_args(tiny_model_dir, queries, run, "on_policy", train__save_every=1,
                      train__keep_checkpoints=2)
    assert main([*args, "--no-resume"]) == 0
    return run


@pytest.fixture(scope="module")
def off_policy_reference(killed, tiny_model_dir, queries, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref_off") / "run"
    assert main(train_args(tiny_model_dir, queries, run, "off_policy")) == 0
    return run


def test_keep_checkpoints_prunes_old_ones(on_policy_reference):
    names = sorted(p.name for p in (on_policy_reference / "checkpoints").iterdir())
    assert names == [f"step_{STEPS - 1}", f"step_{STEPS}"]


def test_on_policy_sigkill_then_auto_resume_matches_uninterrupted(on_policy_reference, killed,
                                                                 capsys):
    run, args = killed["on_policy"].run, killed["on_policy"].args
    last = killed["on_policy"].wait()
    # A save interrupted mid-write leaves a hidden temp folder: never resumed from, cleaned up.
    half = run / "checkpoints" / f".step_{STEPS - 1}.crash"
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoint.latest_checkpoint(run).name == f"step_{last}"

    capsys.readouterr()
    assert main(args) == 0  # no --resume: resumes automatically
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints' / f'step_{last}'} (step {last} of {STEPS})" in out
    assert not half.exists()
    assert_same_weights(final_weights(run), final_weights(on_policy_reference))


def test_off_policy_sigkill_then_resume_reuses_teacher_cache(off_policy_reference, killed,
                                                             monkeypatch, capsys):
    ref = off_policy_reference
    run, args = killed["off_policy"].run, killed["off_policy"].args
    killed["off_policy"].wait()
    (cache,) = (run / "offpolicy_cache").glob("teacher_samples.*.jsonl")
    before = (cache.read_bytes(), cache.stat().st_mtime_ns)
    assert cache.read_bytes() == next((ref / "offpolicy_cache").glob("*.jsonl")).read_bytes()

    def no_sampling(*a, **k):
        raise AssertionError("the frozen teacher sampled again on resume")

    monkeypatch.setattr("msd.train.responses.generate", no_sampling)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (cache.read_bytes(), cache.stat().st_mtime_ns) == before
    assert_same_weights(final_weights(run), final_weights(ref))


def test_resume_of_a_finished_run_changes_nothing(on_policy_reference, tiny_model_dir, queries):
    before = final_weights(on_policy_reference)
    args = train_args(tiny_model_dir, queries, on_policy_reference, "on_policy",
                      train__save_every=1, train__keep_checkpoints=2)
    assert main([*args, "--resume"]) == 0
    assert_same_weights(final_weights(on_policy_reference), before, tol=0.0)


def test_checkpoint_holds_everything_needed(on_policy_reference):
    ckpt = checkpoint.latest_checkpoint(on_policy_reference)
    assert {p.name for p in ckpt.iterdir()} == {
        "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == STEPS and state["micro_batches_done"] == STEPS
    assert len(state["config_fingerprint"]) == 16
    assert not list((on_policy_reference / "checkpoints").glob(".*"))


def test_interrupted_teacher_sampling_resumes_with_the_same_samples(
        off_policy_reference, tiny_model_dir, queries, tmp_path):
    """A kill while the teacher samples are being cached keeps the finished lines; the rest is
    sampled on the next start exactly as an uninterrupted run would have sampled it."""
    (ref_cache,) = (off_policy_reference / "offpolicy_cache").glob("*.jsonl")
    lines = ref_cache.read_text().splitlines(keepends=True)
    run = tmp_path / "run"
    cache = run / "offpolicy_cache" / ref_cache.name
    cache.parent.mkdir(parents=True)
    cache.write_text("".join(lines[:5]) + lines[5][:20])  # 5 whole lines and a torn one
    with pytest.warns(UserWarning, match="partly written last line"):
        assert main(train_args(tiny_model_dir, queries, run, "off_policy")) == 0
    got = {r["key"]: r["samples"] for r in map(json.loads, cache.read_text().splitlines())}
    want = {r["key"]: r["samples"] for r in map(json.loads, lines)}
    assert got == want
    assert_same_weights(final_weights(run), final_weights(off_policy_reference))


def test_resuming_keeps_the_runs_fused_optimizer(tmp_path):
    """A checkpoint written by an unfused AdamW (as before fused became the default) resumes
    into the run's fused one: the file's `fused` flag does not overwrite the run's choice, and
    the moments are restored."""
    from msd.train import checkpoint

    model = torch.nn.Linear(4, 3)
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    old.step()
    sched = torch.optim.lr_scheduler.LambdaLR(old, lambda s: 1.0)
    path = checkpoint.save_checkpoint(tmp_path, 1, model, old, sched, {})
    new = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    checkpoint.load_checkpoint(path, model, new, torch.optim.lr_scheduler.LambdaLR(new, lambda s: 1.0))
    assert new.param_groups[0]["fused"] is True
    torch.testing.assert_close(new.state[model.weight]["exp_avg"], old.state[model.weight]["exp_avg"])
