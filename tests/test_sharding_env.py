"""How msd recognises a sharded launch, and what it refuses (no processes started)."""

import pytest

from msd.errors import MsdError
from msd.train import dist_checkpoint, sharding


def test_fsdp_request_comes_from_the_launch_environment(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not sharding.fsdp_requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding.fsdp_requested()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to shard
    assert not sharding.fsdp_requested()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(MsdError, match="fsdp_version: 2"):
        sharding.fsdp_requested()


def test_accelerate_does_not_see_the_fsdp_request(monkeypatch):
    import os

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with sharding.accelerate_fsdp_hidden():
        assert "ACCELERATE_USE_FSDP" not in os.environ
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"


def test_one_process_agrees_with_itself():
    assert sharding.all_agree(True) and not sharding.all_agree(False)
    assert sharding.broadcast_object([1]) == [1] and sharding.gather_objects(3) == [3]


def test_checkpoint_of_another_engine_is_refused(tmp_path):
    (tmp_path / "state.json").write_text('{"step": 2, "engine": "fsdp2"}')

    class Run:
        engine = "plain"
        accelerator = None

    with pytest.raises(MsdError, match="fsdp2 run, this is a plain run"):
        dist_checkpoint.load_checkpoint(Run(), tmp_path)


def test_fp16_is_refused_under_fsdp():
    import torch

    with pytest.raises(MsdError, match="use bf16"):
        sharding.shard(torch.nn.Linear(2, 2), torch.device("cpu"), "fp16")
