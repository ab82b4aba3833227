"""The machine a run starts on (msd.machine): bfloat16 on a CPU that would emulate it (a warning,
an error with --strict), torch's threads from the cores and processes, and the line each run
prints first. The CPU-capability probe is faked, so these pass on any CPU."""

from __future__ import annotations

import json

import pytest
import torch

from msd import machine
from msd.cli import main
from msd.errors import MsdError


@pytest.fixture
def cpu(monkeypatch):
    """A CPU run whose bfloat16 support the test sets: cpu(native=False) fakes an AVX2-only CPU."""
    monkeypatch.setattr(machine, "device_type", lambda: "cpu")

    def fake(native: bool):
        monkeypatch.setattr(machine, "native_bf16", lambda: native)

    return fake


@pytest.fixture
def threads_restored():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def auto_env(monkeypatch):
    """No thread count from the environment, one process, 8 cores in this process's mask, idle."""
    for var in ("MSD_THREADS", "OMP_NUM_THREADS", *machine.LOCAL_SIZE_VARS, *machine.LOCAL_RANK_VARS,
                *machine.WORLD_SIZE_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.0, 0.0, 0.0), raising=False)  # an idle machine
    return monkeypatch


# ----------------------------------------------------------------------------- threads

def test_threads_from_cores_and_local_processes(auto_env):
    assert machine.choose_threads() == machine.Threads(8, "8 cores / 1 process")
    auto_env.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun / accelerate launch
    assert machine.choose_threads() == machine.Threads(2, "8 cores / 4 processes")
    auto_env.delenv("LOCAL_WORLD_SIZE")
    auto_env.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "16")  # mpirun: more processes than cores
    assert machine.choose_threads().n == 1


def test_user_settings_win_over_the_cores(auto_env):
    auto_env.setenv("LOCAL_WORLD_SIZE", "2")
    auto_env.setenv("OMP_NUM_THREADS", "3")
    assert machine.choose_threads() == machine.Threads(3, "OMP_NUM_THREADS")
    auto_env.setenv("OMP_NUM_THREADS", "5,2")  # OpenMP's nested form: the outer level
    assert machine.choose_threads().n == 5
    auto_env.setenv("MSD_THREADS", "6")
    assert machine.choose_threads() == machine.Threads(6, "MSD_THREADS")
    assert machine.choose_threads(7, "train.threads") == machine.Threads(7, "train.threads")


def test_train_sets_and_prints_threads(tmp_path, tiny_model_dir, query_file, auto_env, cpu, capsys,
                                       threads_restored):
    cpu(native=True)
    argv = ["train", "--quiet", f"model.name_or_path={tiny_model_dir}", f"data.source={query_file}",
            "train.max_steps=1", "train.batch_size=4", "rollout.max_new_tokens=2"]
    assert main([*argv, f"train.output_dir={tmp_path / 'a'}", "train.threads=1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("msd train: cpu (bfloat16 native), 1 process, 1 thread (train.threads); ")
    assert "model.dtype=auto (float32), train.mixed_precision=no" in first
    assert torch.get_num_threads() == 1
    # auto: the 8 cores of the (faked) mask over 4 local processes; torch is set to match
    auto_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert main([*argv, f"train.output_dir={tmp_path / 'b'}"]) == 0
    assert "2 threads (8 cores / 4 processes)" in capsys.readouterr().out.splitlines()[0]
    assert torch.get_num_threads() == 2
    # train.threads may change on resume: it does not change what is trained
    assert main([*argv, f"train.output_dir={tmp_path / 'b'}", "train.max_steps=2", "train.threads=1"]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_a_busy_machine_is_named_in_the_line(auto_env, capsys, threads_restored):
    auto_env.setattr(machine.os, "cpu_count", lambda: 8)
    auto_env.setattr(machine.os, "getloadavg", lambda: (9.5, 9.0, 8.0), raising=False)
    machine.start("eval safety", {"--dtype": "float32"}, threads_key="--threads", device="cpu")
    line = capsys.readouterr().out
    assert line.startswith("msd eval safety: cpu (bfloat16 ") and line.count("\n") == 1
    assert ", 1 process, 8 threads (8 cores / 1 process; the machine is busy, load 9.5 on 8 cores: " \
           "--threads 1 may run faster); --dtype=float32" in line
    machine.start("train", {}, threads=2, threads_key="train.threads", device="cpu")  # the user's choice
    assert "2 threads (train.threads); " in capsys.readouterr().out
    auto_env.setattr(machine.os, "getloadavg", lambda: (3.0, 3.0, 3.0), raising=False)
    machine.start("train", {}, threads_key="train.threads", device="cpu")
    assert "8 threads (8 cores / 1 process); " in capsys.readouterr().out


# ----------------------------------------------------------------------------- bfloat16

def test_bf16_warning_names_the_float32_setting(cpu, capsys):
    cpu(native=False)
    machine.check_bf16({"model.dtype=bfloat16": "model.dtype=float32"})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("msd: warning: model.dtype=bfloat16: this CPU has no "
                                                   "bfloat16 instructions")
    assert err.rstrip().endswith("use model.dtype=float32")
    with pytest.raises(MsdError, match="use model.dtype=float32 and train.mixed_precision=no"):
        machine.check_bf16({"model.dtype=bfloat16": "model.dtype=float32",
                            "train.mixed_precision=bf16": "train.mixed_precision=no"}, strict=True)
    cpu(native=True)  # a CPU with AVX512-BF16 or AMX: nothing to say
    machine.check_bf16({"model.dtype=bfloat16": "model.dtype=float32"}, strict=True)
    machine.check_bf16({"model.dtype=bfloat16": "model.dtype=float32"}, strict=True, device="cuda")
    assert capsys.readouterr().err == ""


def test_bf16head_asks_the_same_probe(monkeypatch):
    from msd.generation import bf16head

    head = torch.nn.Linear(8, 4096, bias=False)
    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    assert not bf16head.usable(head)
    monkeypatch.setattr(machine, "native_bf16", lambda: True)
    assert bf16head.usable(head)


@pytest.mark.parametrize("setting, fix", [("model.dtype=bfloat16", "model.dtype=float32"),
                                          ("train.mixed_precision=bf16", "train.mixed_precision=no")])
def test_train_strict_refuses_emulated_bf16(tmp_path, tiny_model_dir, query_file, cpu, capsys, setting, fix,
                                            threads_restored):
    cpu(native=False)
    out = tmp_path / "run"
    argv = ["train", "--quiet", f"model.name_or_path={tiny_model_dir}", f"data.source={query_file}",
            f"train.output_dir={out}", "train.max_steps=1", "train.batch_size=4", "rollout.max_new_tokens=2",
            setting]
    assert main([*argv, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"msd: error: {setting}: this CPU has no bfloat16")
    assert f"use {fix}" in err and not out.exists()  # refused before any work
    if setting.startswith("train."):  # without --strict: a warning, and the run goes on
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert f"msd: warning: {setting}: this CPU has no bfloat16" in captured.err
        assert "msd train: cpu (bfloat16 emulated)" in captured.out
        assert [json.loads(line)["step"] for line in (out / "logs.jsonl").open()] == [1]


def test_eval_warns_or_refuses_bf16(tmp_path, tiny_model_dir, query_file, cpu, capsys, threads_restored):
    cpu(native=False)
    argv = ["eval", "safety", "--model", str(tiny_model_dir), "--benchmark", query_file, "--limit", "2",
            "--judge", "keyword", "--max-new-tokens", "2", "--dtype", "bfloat16", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msd: error: --dtype bfloat16: this CPU") and err.endswith(
        "use --dtype float32 (--strict refuses emulated bfloat16)") and "\n" not in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "msd: warning: --dtype bfloat16: this CPU" in captured.err
    first = captured.out.splitlines()[0]
    assert first.startswith("msd eval safety: cpu (bfloat16 emulated), 1 process, 1 thread (--threads); "
                            "--dtype=bfloat16")
    assert main([*argv[:-3], "--quiet", "--out", str(tmp_path / "c"), "--threads", "-1"]) == 2
    assert "msd: error: --threads: must be at least 0" in capsys.readouterr().err


def test_baseline_strict_refuses_emulated_bf16(tmp_path, tiny_model_dir, cpu, capsys):
    pytest.importorskip("trl")
    cpu(native=False)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    assert main(["baseline", "dpo", "--quiet", "--strict", f"model.name_or_path={tiny_model_dir}",
                 f"baseline.data={data}", "train.mixed_precision=bf16",
                 f"train.output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msd: error: train.mixed_precision=bf16: this CPU") and "\n" not in err


def test_demo_warns_of_emulated_bf16(tmp_path, cpu, capsys, monkeypatch):
    import msd.demo

    cpu(native=False)
    monkeypatch.setattr(msd.demo, "_run_demo", lambda *args: {"ran": True})  # the warning comes first
    assert msd.demo.run_demo(tmp_path / "demo", overrides=["model.dtype=bfloat16"]) == {"ran": True}
    err = capsys.readouterr().err
    assert err.startswith("msd: warning: model.dtype=bfloat16: this CPU has no bfloat16") and err.count("\n") == 1
    assert msd.demo.run_demo(tmp_path / "demo") == {"ran": True}
    assert capsys.readouterr().err == ""


def test_the_device_setting_names_a_visible_device_or_is_one_line(monkeypatch):
    import torch

    from msd.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert machine.resolve_device("auto") == "cuda" and machine.resolve_device("CUDA:1") == "cuda:1"
    assert machine.resolve_device("cpu") == "cpu"
    with pytest.raises(MsdError, match=r"device 'cuda:2' is not available \(2 GPUs visible\)"):
        machine.resolve_device("cuda:2")
    # auto dtype follows where the model runs: bfloat16 on the GPU, float32 on the CPU beside it
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine.resolve_device("auto") == "cpu"
    with pytest.raises(MsdError, match="no GPU is visible here"):
        machine.resolve_device("cuda")
