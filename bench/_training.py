"""Timing one training step the same way in every model benchmark: FLOPs, seconds, peak memory, MFU."""

from __future__ import annotations

import time
from collections.abc import Callable

from _memory import peak_memory_mb

# Dense bf16 peak of the GPUs this project is run on, FLOP/s (no sparsity).
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: str) -> dict:
    """Counts the FLOPs of one `step` (torch.utils.flop_counter), runs `warmup` more, then times
    `steps`: {device, threads, step_s, flops_per_step, achieved_tflops, peak_memory_mb[, mfu]}."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    row = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "step_s": seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_memory_mb(),
    }
    if device == "cuda":
        peak = next((v for k, v in BF16_PEAK.items() if k in row["device"]), None)
        row["mfu"] = flops / seconds / peak if peak else None
    return row
