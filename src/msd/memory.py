"""Give freed CPU memory back to the operating system between the phases of a step."""

from __future__ import annotations

_MALLOC_TRIM: list = []  # [glibc's malloc_trim or None], looked up once


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim(0)`; a no-op elsewhere).

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, and
    keeps up to twice that free at the heap's top before trimming. On CPU the rollout's and the
    forward passes' freed (B, V) and activation blocks then sit, still resident, under the
    loss's peak. msd calls this between the phases of a step on CPU (before and after the
    rollout, after the teacher's forward, before the chunked loss allocates its block); on the
    benchmark model it lowered peak RSS by 50-130 MB (docs/PERFORMANCE.md).
    The call takes well under a millisecond when there is little to return.
    """
    if not _MALLOC_TRIM:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _MALLOC_TRIM.append(getattr(libc, "malloc_trim", None))
        except OSError:
            _MALLOC_TRIM.append(None)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)
