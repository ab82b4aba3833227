"""The machine a run starts on: whether its CPU computes in bfloat16 natively, how many threads
torch uses, and the line `msd train`, `msd eval` and `msd baseline` print first.

    machine.start("train", {"model.dtype": "auto (float32)"}, threads=cfg.train.threads,
                  threads_key="train.threads", bf16=machine.bf16_asked(cfg), strict=args.strict)

bfloat16: a CPU without bfloat16 instructions (x86 without AVX512-BF16 and AMX) runs bfloat16
through oneDNN's emulation; on an AVX2-only CPU a training step took 8-10x as long as in
float32. Asking for it there gives one warning line naming the float32 setting to use, or, with
`--strict`, an error.

Threads: torch's intra-op threads, from the first of: the run's setting (`train.threads`,
`--threads`), MSD_THREADS, OMP_NUM_THREADS (yours or the launcher's), else the cores this
process may run on (its affinity mask, `os.sched_getaffinity`: taskset, a container's cpuset)
divided by the processes of the run on this machine (LOCAL_WORLD_SIZE or the MPI launchers'
names, as accelerate reads them). OpenMP threads wait for each other at every operation, so
threads beyond the free cores slow a run down (on a shared 2-core machine an eval ran at 4.5
tokens/s with 2 threads and 14-37 with 1).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass

from msd.errors import MsdError

# --strict, worded once for every command that trains or evaluates (train, baseline, eval).
STRICT_HELP = ("refuse (exit 2) what this machine would run emulated, several times slower: bfloat16 "
               "on a CPU without bfloat16 instructions (default: a warning)")

# Environment variables naming the processes of a launch, in the order accelerate reads them.
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions. x86: AVX512-BF16 or AMX (oneDNN emulates
    bfloat16 on plain AVX-512 and AVX2, without the gain); elsewhere whatever oneDNN reports."""
    import torch

    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_type() -> str:
    """Where a run computes: 'cuda' when a GPU is visible (and accelerate is not told --cpu)."""
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def resolve_device(name: str, key: str = "--device") -> str:
    """A device setting -> the device a single-process run loads its model on: 'auto' =
    `device_type()`; 'cpu'; 'cuda' or 'cuda:N' when that GPU is visible (else one line)."""
    import re

    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return device_type()
    if name == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise MsdError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N", key)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= count:
        seen = f"{count} GPU{'s' if count != 1 else ''} visible" if count else "no GPU is visible here"
        raise MsdError(f"device {name!r} is not available ({seen}); use auto or cpu", key)
    return name


def _env_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def cores() -> int:
    """CPU cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity mask (macOS, Windows)
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run on this machine (1 without a launcher)."""
    return max(1, _env_int(LOCAL_SIZE_VARS, 1))


def local_main() -> bool:
    """Whether this is the first process of the run on this machine (the one that prints)."""
    return _env_int(LOCAL_RANK_VARS, 0) == 0


@dataclass(frozen=True)
class Threads:
    n: int
    why: str  # where the count came from: the setting's name, an environment variable, or cores / processes


def choose_threads(setting: int = 0, key: str = "threads") -> Threads:
    """Torch's thread count for this process (see the module docstring); `setting` 0 = auto."""
    if setting and setting > 0:
        return Threads(setting, key)
    for var in ("MSD_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()  # OpenMP allows a nested list: "4,2"
        if value.isdigit() and int(value) > 0:
            return Threads(int(value), var)
    n_cores, procs = cores(), local_processes()
    return Threads(max(1, n_cores // procs), f"{n_cores} cores / {procs} process{'es' if procs > 1 else ''}")


def bf16_asked(cfg) -> dict[str, str]:
    """The settings of a training config (msd.config.Config) that ask for bfloat16, each with
    the float32 setting to use instead."""
    asked = {}
    if cfg.model.dtype == "bfloat16":
        asked["model.dtype=bfloat16"] = "model.dtype=float32"
    if cfg.train.mixed_precision == "bf16":
        asked["train.mixed_precision=bf16"] = "train.mixed_precision=no"
    return asked


def check_bf16(asked: dict[str, str], strict: bool = False, device: str | None = None) -> None:
    """One warning line when `asked` (setting -> float32 alternative) is non-empty, the run
    computes on CPU (`device`, default `device_type()`) and the CPU has no bfloat16
    instructions; with `strict`, a one-line MsdError instead."""
    if not asked or (device or device_type()) != "cpu" or native_bf16():
        return
    text = (f"{', '.join(asked)}: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so torch "
            f"emulates bfloat16, several times slower than float32; use {' and '.join(asked.values())}")
    if strict:
        raise MsdError(f"{text} (--strict refuses emulated bfloat16)")
    if local_main():
        print(f"msd: warning: {text}", file=sys.stderr, flush=True)


def start(command: str, settings: dict[str, object], *, threads: int = 0, threads_key: str = "threads",
          bf16: dict[str, str] | None = None, strict: bool = False, device: str | None = None) -> Threads:
    """What every run does first: the bfloat16 check (`check_bf16`), torch's threads
    (`choose_threads`), and one line with the device (default `device_type()`), processes,
    threads and `settings`."""
    import torch

    device = device or device_type()
    check_bf16(bf16 or {}, strict, device)
    chosen = choose_threads(threads, threads_key)
    torch.set_num_threads(chosen.n)
    if local_main():
        if device == "cpu":
            device += f" (bfloat16 {'native' if native_bf16() else 'emulated'})"
        procs = _env_int(WORLD_SIZE_VARS, 1)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"msd {command}: {device}, {procs} process{'es' if procs > 1 else ''}, "
              f"{chosen.n} thread{'s' if chosen.n > 1 else ''} ({chosen.why}{busy_hint(chosen, threads_key)}); "
              f"{shown}", flush=True)
    return chosen


def busy_hint(chosen: Threads, key: str) -> str:
    """A note when the machine is already busy: other processes hold the cores the threads would
    use, and each OpenMP thread waits for the slowest (on a 2-core machine at load 10, an eval of
    SmolLM2-135M ran at 2 tokens/s with 2 threads and 40 with 1). The count itself stays as
    chosen: a thread count that follows the load would change results from run to run."""
    if chosen.n < 2 or chosen.why == key:
        return ""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows)
        return ""
    machine_cores = os.cpu_count() or 1
    if load < machine_cores:
        return ""
    setting = f"{key} 1" if key.startswith("--") else f"{key}=1"
    return f"; the machine is busy, load {load:.1f} on {machine_cores} cores: {setting} may run faster"
