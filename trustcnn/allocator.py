"""The process's CPU memory allocator: keep freed blocks for reuse instead of handing them back.

glibc's ``malloc`` serves each block above a threshold (128 KiB, raised by itself up to 32 MiB) with a
fresh ``mmap`` and gives it back to the kernel on ``free``. A CNN step allocates and frees activations of
tens to hundreds of MiB, so every step page-faults and zero-fills its whole working set again. On the
2-core VM of ``benchmarks/RESULTS.md`` that made a MobileNetV2 forward (batch 32, 224 px) 3.2x slower:
1.53 s against 0.47 s with the setting below (``benchmarks/allocator.py``).

``cpu_allocator=reuse`` (default) tells glibc never to ``mmap`` a block (``M_MMAP_MAX=0``) and never to trim
the heap (``M_TRIM_THRESHOLD=-1``): freed memory stays in the process and the next step reuses it. The
process's resident memory then stays at its peak rather than falling between steps (the peak itself does
not change). ``system`` leaves the allocator as it is. On other platforms or C libraries (macOS, musl, an
``LD_PRELOAD``-ed jemalloc/tcmalloc, which do this themselves) the setting does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

CPU_ALLOCATOR_MODES = ("reuse", "system")

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: str | None = None


def check_mode(mode: object) -> str:
    """``cpu_allocator`` validated: ``reuse`` or ``system``."""
    if mode in CPU_ALLOCATOR_MODES:
        return str(mode)
    raise ValueError(f"cpu_allocator={mode!r} is not a mode; use cpu_allocator=reuse (keep freed memory for the "
                     "next step; faster on CPU) or cpu_allocator=system (the C library's default).")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the libraries this process already linked: the C library in use
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def use_cpu_allocator(mode: str) -> bool:
    """Applies ``mode`` to this process (and the processes it forks later, e.g. data workers).

    Returns whether the allocator's settings were changed. ``reuse`` is one-way for the process's life:
    glibc's default (and its self-raised threshold) cannot be restored exactly, so a later ``system`` in
    the same process (another job of an in-process sweep) keeps it and says so.
    """
    global _applied
    mode = check_mode(mode)
    if mode == "system":
        if _applied == "reuse":
            log.info("cpu_allocator=system: this process already keeps freed memory (set by an earlier run in it)")
        return False
    if _applied == "reuse":
        return False
    libc = _glibc()
    if libc is None:
        log.debug("cpu_allocator=reuse: not glibc malloc here; left as it is")
        return False
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        log.warning("cpu_allocator=reuse: glibc refused mallopt; the allocator is left as it is")
        return False
    _applied = "reuse"
    log.info("cpu_allocator=reuse: glibc keeps freed memory for the next step (resident memory stays at its peak; "
             "cpu_allocator=system for glibc's default)")
    return True


def release_free_memory() -> bool:
    """Hands the heap's free memory back to the kernel now (glibc ``malloc_trim(0)``); ``False`` elsewhere.

    For measurements: under ``reuse`` the resident memory stays at its peak, so a block's own peak shows
    as a rise of the resident memory only after the free memory kept from earlier blocks is released.
    """
    libc = _glibc()
    return bool(libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0))
