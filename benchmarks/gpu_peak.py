"""The bf16 matmul peak of this GPU, measured (the MFU benchmarks report against it, not a datasheet)."""

from __future__ import annotations

import time

import torch


def measured_bf16_peak_tflops(sizes: tuple[int, ...] = (8192, 16384)) -> float:
    """The best TFLOP/s of a large square bf16 matmul over ``sizes`` (warmed up, then timed)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        repeats = max(3, int(2e13 / (2 * n**3)))
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
        del a, b
    torch.cuda.empty_cache()
    return best
