"""Multi-process launches for the tests: `msd train` on two processes under accelerate or
torchrun, killed as a whole, and the comparisons the sharded tests share."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from msd.testing.processes import descendants, free_port  # noqa: F401 (tests import free_port from here)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6



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

    def __init__(self, args: list[str], launcher: str = "accelerate",
                 config: str = "fsdp_cpu.yaml", launch_args: tuple[str, ...] = (),
                 port: int | None = None, **env_extra: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT / "src"), **env_extra)
        port = str(port or free_port())
        if launcher == "accelerate":
            cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   str(ROOT / "configs/accelerate" / config), "--main_process_port", port,
                   *launch_args]
        else:  # torchrun: the FSDP request is the environment accelerate would set
            env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", port]
        self.proc = subprocess.Popen([*cmd, "-m", "msd.cli", "train", "--quiet", *args], env=env,
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

    def outcome(self, timeout: float) -> tuple[int, str]:
        """(exit status, output) once it ends; killed (and failed) after `timeout` seconds."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"still running after {timeout} s:\n{out[-4000:]}") from None
        return self.proc.returncode, out

    def kill(self) -> None:
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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
        self.kill()
        out, _ = self.proc.communicate()
        assert marker.exists(), out[-4000:]


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


