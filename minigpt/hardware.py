"""The machine a run uses: which device (``pick_device``), whether it multiplies bf16 natively
(``bf16_native``), how fast it multiplies matrices (``measure_matmul_peak``, MFU's denominator), an
allocator setting that spares a CPU training step its page faults (``keep_freed_memory``), and torch's
fused AdamW where it has one (``adamw``).

Built in: 04_pretraining
"""

from __future__ import annotations

import ctypes
import functools
import time

import torch


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware, as torch detects it at run time: a CUDA
    GPU that supports bf16, or an x86 CPU with AVX512-BF16 or AMX dot-product instructions. Elsewhere
    (other CPUs, MPS) bf16 would be emulated, slower than float32, so ``bf16="auto"`` leaves it off.

    Built in: 04_pretraining
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch's own CPU feature checks (cpuinfo), not a guess from the model name
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's allocator to keep large freed blocks for reuse instead of handing them back to the
    operating system. By default glibc serves each block above its mmap threshold (128 KiB, growing to
    at most 32 MiB) with fresh pages from the kernel and returns them on free, so a training step,
    which allocates and frees the same activation-sized buffers every step, takes a page fault on
    every page of them every step. With both thresholds raised the pages stay in the process: its
    resident memory stays at its peak instead of falling back between steps. Called once by the
    ``Trainer`` on the CPU; returns whether the allocator accepted it (False off glibc: macOS, musl).

    Built in: 04_pretraining
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2**31 - 1))


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, else Apple's MPS, else the CPU. Under a process group, CUDA means the GPU that
    :func:`minigpt.distributed.start` chose for this process."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device: use 'cpu' or 'auto'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    if name == "auto":
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def measure_matmul_peak(device: torch.device, dtype=torch.float32, n: int = 1024,
                        seconds: float = 0.5) -> float:
    """FLOP/s of square matrix products on ``device``: the denominator of MFU, measured, not quoted."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def adamw(groups: list[dict], device: torch.device, **settings) -> torch.optim.AdamW:
    """torch's AdamW over the parameter ``groups``, with its fused kernel where torch has one for them:
    plain (not sharded) floating-point tensors on a CPU or a CUDA GPU. The fused kernel updates each
    parameter in one pass (decay, both moments, the step); without it, AdamW on a CPU runs a dozen
    tensor operations per parameter from Python: about 2.7 ms a step for the 52 tensors of nanoGPT's
    4-layer CPU recipe, against 0.6 ms fused, on one core. The update is the same up to float rounding
    (tests: 30 steps agree to 1e-5). ``optimizer.defaults["fused"]`` says which it is.

    Built in: 04_pretraining
    """
    params = [p for group in groups for p in group["params"]]
    fused = device.type in ("cpu", "cuda") and all(
        type(p.data) is torch.Tensor and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=fused, **settings)
