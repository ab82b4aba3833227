"""Give freed CPU memory back to the operating system, and keep the C heap from holding it.

glibc keeps freed blocks below its mmap threshold in the heap. The threshold is adaptive: each
time a block that was mmap-ed is freed, it rises to that block's size, up to 32 MB, and the heap
is then only trimmed when twice that is free at its top. On CPU the rollout's and the forward
passes' freed (B, V) and activation blocks then sit, still resident, under the next phase's
peak, and how much depends on the order of frees (run to run, the LoRA benchmark step peaked
between 342 and 406 MiB above imports).
"""

from __future__ import annotations

_LIBC: list = []  # [glibc, or None], looked up once
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 16 << 20  # blocks from this size up are mmap-ed, and unmapped when freed


def _libc():
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`; a no-op elsewhere).

    msd calls this between the phases of a step on CPU (before and after the rollout, after the
    teacher's forward, before the chunked loss allocates its block); on the benchmark model it
    lowered peak RSS by 50-130 MB (docs/PERFORMANCE.md). The call takes well under a
    millisecond when there is little to return.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def steady_heap() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (16 MB), which also stops its adaptation
    (a no-op without glibc). Blocks of 16 MB and more (the loss's workspace, the packed
    bfloat16 head) then always go back to the system when freed, and smaller ones never stack
    up under a threshold raised to 32 MB. Process-wide; msd's CPU training sets it once. On the
    LoRA benchmark step: peak 344-347 MiB in six runs instead of 342-406, same step time."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
