"""Process-level runtime settings of training: malloc tuning, accelerate's state, AdamW state allocated up front.

`tune_malloc`: PyTorch's CPU allocator is the C library's malloc. glibc serves large blocks (above a threshold
that starts at 128 KiB) with fresh mmap()s and gives freed memory at the top of its heap back to the OS, so much
of a training step's activations and gradients (MBs each) is new memory whose pages fault in and get zeroed by
the kernel on first touch. Raising the mmap threshold to its maximum (32 MiB on 64-bit) and switching trimming
off keeps freed blocks in the process for the next step instead. Trimming matters with batches of varying
length: after a short step glibc would give back the memory a long step needs again. Peak RSS is not raised (the
same blocks are reused). Blocks above 32 MiB (the loss chunk's logits, the embedding's gradient) stay mmaps:
serving them from the heap too raised peak RSS through fragmentation. `release_memory` hands the free heap back
when training ends. Other C libraries: nothing is changed. Measured: docs/benchmarks.md, "CPU kernels and
memory" (`benchmarks/cpu_kernels.py`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
NO_TRIM = -1  # M_TRIM_THRESHOLD -1: never trim (mallopt(3))


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Keep freed memory for reuse (glibc on Linux); True when the settings were applied."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NO_TRIM))


def release_memory() -> bool:
    """Give the heap's free memory back to the OS (glibc malloc_trim); True when something was released."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(libc.malloc_trim(0))


def init_adamw_state(optimizer) -> None:
    """Allocate AdamW's moments now (zeros, step 0), through its public state-dict format.

    torch allocates them lazily at the first `step()`, i.e. after the first step's activations were freed, so
    the moments land in the middle of the memory the activations need again (on CPU the heap then grows by GBs at
    the next large step; on CUDA the caching allocator fragments the same way). Allocated before the first
    forward, the peak is reached, and an out-of-memory error raised, at step 1. The result is the same optimizer
    as a lazily initialised one (tests/test_precision.py checks bit-equal updates).
    """
    import torch

    sd = optimizer.state_dict()
    state, idx = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
                state[idx] = {"step": torch.tensor(0.0),
                              **{m: torch.zeros_like(p, memory_format=torch.preserve_format) for m in moments}}
            idx += 1
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so a second `train()` in one process may use another precision
    (accelerate keeps the first Accelerator's otherwise). One process only: under a launcher the state is the
    launcher's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
