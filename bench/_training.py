"""Timing training steps the same way in every model benchmark: FLOPs, seconds, peak memory, MFU;
one preset per fresh process; the summary table."""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path

from _memory import peak_memory_mb
from _table import print_table

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


def time_training(model, loss: Callable[[], object], batch: int, steps: int, warmup: int, device: str) -> dict:
    """Times training steps as the stages take them: `loss()` (under bf16 autocast on a GPU),
    backward, an AdamW step. -> {parameters_m, batch, samples_per_s, **time_steps(...)}."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if device == "cuda" else None

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_steps(step, steps, warmup, device)
    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters_m": parameters / 1e6, "batch": batch, "samples_per_s": batch / timing["step_s"], **timing}


def in_fresh_process(fn: Callable[..., dict], *args) -> dict:
    """fn(*args) in a spawned process of its own, so that peak memory figures do not mix."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def write_report(report: dict, out: Path) -> None:
    """The report as JSON in `out`, and printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def print_training_table(rows: list[dict], rates: dict[str, str]) -> None:
    """The training rows as a table; `rates`: more throughput columns, header -> row key."""
    headers = ["preset", "device", "params (M)", "batch", "samples/s", *rates, "peak MB", "MFU"]

    def cells(r: dict) -> list:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "–"
        rate_cells = [f"{r[key]:.0f}" for key in rates.values()]
        return [
            r["preset"],
            r["device"],
            f"{r['parameters_m']:.1f}",
            r["batch"],
            f"{r['samples_per_s']:.2f}",
            *rate_cells,
            f"{r['peak_memory_mb']:.0f}",
            mfu,
        ]

    print()
    print_table(headers, [cells(r) for r in rows])
