"""Process settings the jobs (train, generate, evaluate) make before their CPU work.

Called by the jobs, never at import: they change the whole process, as a job owns its process.
A notebook that calls a job gets them too; ``IMGAUG_GEN_MALLOC=default`` leaves the C allocator
as it was.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
#: Blocks up to this size come from the heap and are reused; glibc's largest allowed value on 64 bits.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of a heap is handed back to the kernel only beyond this.
TRIM_THRESHOLD = 128 << 20
_done = False
_flush_denormal = False  # set by prepare_process: each new thread sets it again (prepare_thread)


def prepare_process() -> None:
    """Flush denormal floats to zero, and let glibc's malloc keep the blocks torch frees for reuse."""
    import torch

    # Weights drifting towards zero produce denormal floats, which slow CPU steps late in training
    # (benchmarks/README.md); flushing them changes nothing visible.
    global _flush_denormal
    _flush_denormal = torch.set_flush_denormal(True)
    keep_freed_memory()


def prepare_thread() -> None:
    """The float mode :func:`prepare_process` set, on a thread it did not run on (the flush-to-zero flag
    is each CPU thread's own: a thread rendering batches must compute the bits the main thread does)."""
    if _flush_denormal:
        import torch

        torch.set_flush_denormal(True)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds so tensors freed in a loop are reused, not unmapped.

    torch's CPU allocator is plain ``malloc``/``free``. A forward at batch 64 allocates and frees
    activations of a few MiB; glibc serves those with ``mmap`` and returns them to the kernel on
    ``free``, so every batch faults its memory in again, page by page (measured: benchmarks/README.md,
    bench_generate). This is what jemalloc or tcmalloc (PyTorch's CPU tuning guide's advice) do by
    default; ``mallopt`` gets it without a preloaded library. Returns whether it changed anything:
    not on other C libraries, under a preloaded allocator, when the user set glibc's malloc
    variables themselves, or with ``IMGAUG_GEN_MALLOC=default``.
    """
    global _done
    if _done:
        return False
    env = os.environ
    user_set = (
        env.get("IMGAUG_GEN_MALLOC", "").lower() == "default"
        or "malloc" in env.get("GLIBC_TUNABLES", "")
        or "alloc" in env.get("LD_PRELOAD", "")
        or any(k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    )
    if user_set or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their malloc has other knobs
        return False
    # The mmap threshold first: setting either one turns off glibc's dynamic threshold, and a trim
    # threshold alone would send every block over 128 KiB to mmap.
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _done = ok
    log.debug(
        "glibc malloc: mmap threshold %d MiB, trim threshold %d MiB (%s)",
        MMAP_THRESHOLD >> 20,
        TRIM_THRESHOLD >> 20,
        "set" if ok else "refused",
    )
    return ok


#: the variables launchers set to a process's rank (torchrun, Lightning's DDP launcher, srun, MPI)
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def is_launch_rank_zero() -> bool:
    """Whether this process is the first of its launch (every rank variable a launcher set is 0):
    only it claims a job's folder. Read from the environment, so it is known before any Trainer or
    process group exists."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True
