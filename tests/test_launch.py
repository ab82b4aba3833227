"""A launch must be what it claims before msd writes anything (msd.train.launch): the
launcher's WORLD_SIZE / RANK / LOCAL_RANK, accelerate's view and torch.distributed's agree, and
the writer lock is taken by the process the accelerator makes the writer, whatever RANK says.
(The issue's case, `accelerate launch` with a DeepSpeed config on CPU, trains once as ZeRO-3:
tests/test_zero3.py.)"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from launches import ROOT, free_port, overrides
from msd.errors import MsdError
from msd.lock import LOCK_NAME
from msd.train import launch

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID",
               "ACCELERATE_USE_DEEPSPEED", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def no_launch(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def accelerator(n, index, local=0, kind=DistributedType.MULTI_CPU, main=None):
    return SimpleNamespace(num_processes=n, process_index=index, local_process_index=local,
                           distributed_type=kind, is_main_process=index == 0 if main is None else main)


def test_a_launcher_contradicting_itself_is_refused(no_launch):
    assert launch.claimed() == launch.Claim(1, 0, 0, False)
    no_launch.setenv("RANK", "1")  # rank 1 of a one-process launch
    with pytest.raises(MsdError, match=r"inconsistent launch: launched 1 process \(WORLD_SIZE=unset, RANK=1"):
        launch.claimed()
    no_launch.setenv("WORLD_SIZE", "2")  # two processes, but nobody to meet
    with pytest.raises(MsdError, match="no launcher set MASTER_ADDR"):
        launch.claimed()
    no_launch.setenv("MASTER_ADDR", "127.0.0.1")
    no_launch.setenv("LOCAL_RANK", "1")
    assert launch.claimed() == launch.Claim(2, 1, 1, False)
    no_launch.setenv("RANK", "2")
    with pytest.raises(MsdError, match="inconsistent launch"):
        launch.claimed()


def test_an_accelerator_that_disagrees_with_the_launcher_is_refused():
    """The issue's case: two processes launched with DeepSpeed, accelerate says 'process 0 of 1'
    in each; and a DeepSpeed launch that accelerate would run as DDP."""
    two_ds = launch.Claim(2, 1, 1, True)
    with pytest.raises(MsdError, match=r"launched 2 processes, DeepSpeed \(.*RANK=1, LOCAL_RANK=1\), "
                                       r"but accelerate reports process 0 of 1.*nothing was written"):
        launch.check(accelerator(1, 0, 0, DistributedType.DEEPSPEED), two_ds)
    with pytest.raises(MsdError, match="process 1 of 2 .*MULTI_CPU"):
        launch.check(accelerator(2, 1, 1, DistributedType.MULTI_CPU), two_ds)
    with pytest.raises(MsdError, match="local 0"):
        launch.check(accelerator(2, 1, 0, DistributedType.DEEPSPEED), two_ds)
    launch.check(accelerator(2, 1, 1, DistributedType.DEEPSPEED), two_ds)  # agrees
    launch.check(accelerator(1, 0, -1, DistributedType.NO), launch.Claim(1, 0, 0, False))


def test_the_writer_lock_follows_the_accelerator_not_rank(no_launch, tmp_path):
    no_launch.setenv("RANK", "1")  # the environment says "not the writer"; the accelerator says it is
    with launch.writer_lock(tmp_path, accelerator(1, 0)):
        fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # held: a second writer is refused
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    no_launch.setenv("RANK", "0")
    with launch.writer_lock(tmp_path / "other", accelerator(2, 1)):  # not the writer: no lock
        assert not (tmp_path / "other").exists()


def test_a_locked_folder_stops_the_writer(tmp_path):
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(MsdError, match="pid 4242"):
            with launch.writer_lock(tmp_path, accelerator(1, 0)):
                pass
    finally:
        os.close(fd)


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(launch.TIMEOUT_ENV, "7.5")
    assert launch.timeout().total_seconds() == 7.5
    monkeypatch.setenv(launch.TIMEOUT_ENV, "soon")
    with pytest.raises(MsdError, match="positive number of seconds"):
        launch.timeout()


def run_msd(env_extra: dict, model_dir, queries, out) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT / "src"), **env_extra)
    return subprocess.run([sys.executable, "-m", "msd.cli", "train", "--quiet",
                           *overrides(model_dir, queries, out, 2)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_inconsistent_launches_exit_2_before_writing(tiny_model_dir, query_file, tmp_path):
    out = tmp_path / "out"
    proc = run_msd({"RANK": "1"}, tiny_model_dir, query_file, out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "msd: error: inconsistent launch: launched 1 process (WORLD_SIZE=unset, RANK=1, LOCAL_RANK=0); "
        "nothing was written"]
    assert not out.exists()
    # a process told it is one of two, whose partner never comes: a bounded wait, then exit 2
    start = time.monotonic()
    proc = run_msd({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port()), launch.TIMEOUT_ENV: "3"},
                   tiny_model_dir, query_file, out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "launched 2 processes" in proc.stderr and "could not be joined" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 60
    assert not out.exists()


def test_deepspeed_full_finetuning_of_half_weights_needs_mixed_precision():
    """DeepSpeed keeps float32 master weights only in its bf16/fp16 mode: half-precision weights
    with mixed_precision 'no' would lose most updates, as without DeepSpeed."""
    import torch

    from msd.train.setup import master_weights

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    ds = accelerator(2, 0, kind=DistributedType.DEEPSPEED)
    with pytest.raises(MsdError, match="loses most updates"):
        master_weights(model, "no", ds)
    assert master_weights(model, "bf16", ds).weight.dtype == torch.bfloat16  # DeepSpeed's own copy


def test_a_lost_peer_is_one_line_and_other_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setenv(launch.TIMEOUT_ENV, "30")
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    with pytest.raises(MsdError, match=r"process 1 of 2 lost contact .*MSD_DIST_TIMEOUT=30 s\): "
                                       r"\[gloo.*Connection closed by peer.*rerun the same launch"):
        with launch.peer_loss_reported(accelerator(2, 1)):
            raise lost
    for acc, error in ((accelerator(2, 1), RuntimeError("size mismatch")), (accelerator(1, 0), lost)):
        with pytest.raises(RuntimeError) as caught:
            with launch.peer_loss_reported(acc):
                raise error
        assert caught.value is error  # a bug, or one process alone: not a lost peer


def test_mpi_launchers_are_read_as_accelerate_reads_them(no_launch):
    no_launch.setenv("PMI_SIZE", "2")
    no_launch.setenv("PMI_RANK", "1")
    no_launch.setenv("MPI_LOCALRANKID", "1")
    assert launch.claimed() == launch.Claim(2, 1, 1, False)
