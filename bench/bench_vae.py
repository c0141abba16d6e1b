"""VecSet VAE training throughput: forward + backward + AdamW step, per preset, on this machine.

For each preset (tiny, local, base) a batch of random shapes of the train_vae default sizes (2,048 surface
points with normals, 2,560 supervision queries) goes through the same loss and optimizer step the
stage uses. Reported: samples/s, query points/s, peak memory of the process (CPU: VmHWM, each preset
in a fresh process so the peaks do not mix; GPU: torch.cuda.max_memory_allocated), and on a GPU the
tokens/s and the share of the GPU's bf16 peak (MFU) from the model FLOPs counted by
torch.utils.flop_counter.

    python bench/bench_vae.py                       # tiny, local and base, on CUDA when there is one
    python bench/bench_vae.py --presets tiny --steps 20

Prints JSON and a table; writes bench/results/vae.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
from pathlib import Path

from _training import time_steps


def measure(preset: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    """Runs in a fresh process: time `steps` training steps after `warmup` ones."""
    import torch
    from shapeflow.config import VAELossParams
    from shapeflow.models.vae import VecSetVAE, field_loss, vae_config

    torch.manual_seed(0)
    config = vae_config(preset)
    model = VecSetVAE(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_params = VAELossParams()
    n_points, n_queries = 2048, 2560
    normals = torch.nn.functional.normalize(torch.randn(batch, n_points, 3, device=device), dim=-1)
    points = 0.5 * normals
    queries = torch.rand(batch, n_queries, 3, device=device) * 2 - 1
    sdf = queries.norm(dim=-1) - 0.5
    dtype = torch.bfloat16 if device == "cuda" else None

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            pred, posterior = model(points, normals, queries)
            loss = field_loss(pred, sdf, loss_params.kind, loss_params.truncation).mean() + 1e-4 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_steps(step, steps, warmup, device)
    seconds = timing["step_s"]
    return {
        "preset": preset,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "samples_per_s": batch / seconds,
        "query_points_per_s": batch * n_queries / seconds,
        "tokens_per_s": batch * config.num_latents / seconds,
        **timing,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "local", "base"])
    parser.add_argument("--batch", type=int, nargs="+", help="batch per preset (default: tiny and local 8, base 2 on CPU, 32 on GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vae.json"))
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = {"tiny": 8, "local": 8, "base": 2 if device == "cpu" else 32}
    batches = args.batch or [defaults.get(p, 2) for p in args.presets]
    rows = []
    for preset, batch in zip(args.presets, batches):
        with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            rows.append(pool.submit(measure, preset, batch, args.steps, args.warmup, device).result())
    report = {"machine": {"cpus": os.cpu_count(), "device": device}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    print("| preset | device | params (M) | batch | samples/s | query points/s | tokens/s | peak MB | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "–"
        print(
            f"| {r['preset']} | {r['device']} | {r['parameters_m']:.1f} | {r['batch']} | {r['samples_per_s']:.2f} | "
            f"{r['query_points_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_memory_mb']:.0f} | {mfu} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
