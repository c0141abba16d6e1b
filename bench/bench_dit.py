"""DiT figures on this machine: training throughput per preset, and the time to generate one shape.

Training: a batch of random latent sets of the preset's size goes through the stage's flow loss and
an AdamW step; samples/s, tokens/s, peak memory (each preset in a fresh process), and on a GPU the
share of the bf16 peak (MFU) from torch.utils.flop_counter.

Sampling (tiny only, untrained weights, so the decode cost is that of an arbitrary field): per shape,
the flow's Euler steps with classifier-free guidance, the VAE's decode to a signed-distance grid, and
marching cubes, timed apart. An untrained VAE's field crosses zero in more places than a trained
one's, so the decode and marching cubes times are an upper bound for a trained pair.

    python bench/bench_dit.py                         # tiny and base training, tiny sampling
    python bench/bench_dit.py --presets tiny --resolution 64

Prints JSON and a table; writes bench/results/dit.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from _table import print_table
from _training import time_steps


def measure_training(preset: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    import torch
    from shapeflow import flow
    from shapeflow.models.dit import DiT, dit_config

    torch.manual_seed(0)
    config = dit_config(preset, {"num_classes": 8})
    model = DiT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randn(batch, config.num_tokens, config.latent_dim, device=device)
    labels = torch.randint(0, 8, (batch,), device=device)
    dtype = torch.bfloat16 if device == "cuda" else None

    def step() -> None:
        t = flow.sample_t(batch, device=device)
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = flow.loss(lambda x, s, y: model(x, s, y), data, torch.randn_like(data), t, y=labels).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_steps(step, steps, warmup, device)
    seconds = timing["step_s"]
    return {
        "preset": preset,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "tokens": config.num_tokens,
        "samples_per_s": batch / seconds,
        "tokens_per_s": batch * config.num_tokens / seconds,
        **timing,
    }


def measure_sampling(shapes: int, flow_steps: int, resolution: int, device: str) -> dict:
    import torch

    from shapeflow.generate import Generator, LatentStats
    from shapeflow.geometry.decode import decode_grid, grid_to_mesh
    from shapeflow.models.dit import DiT, dit_config
    from shapeflow.models.vae import VecSetVAE, vae_config

    torch.manual_seed(0)
    vae = VecSetVAE(vae_config("tiny")).to(device).eval()
    dim = vae.config.latent_dim
    dit = DiT(dit_config("tiny", {"latent_dim": dim, "num_tokens": vae.config.num_latents, "num_classes": 8})).to(device).eval()
    stats = LatentStats(torch.zeros(dim), torch.ones(dim))
    generator = Generator(dit, vae, stats, [f"c{i}" for i in range(8)])
    labels = torch.arange(shapes, device=device) % 8
    times = {"flow_s": 0.0, "decode_s": 0.0, "marching_cubes_s": 0.0}
    for i in range(shapes):
        tic = time.perf_counter()
        latents = generator.sample_latents(labels[i : i + 1], 1, flow_steps, 3.0, seed=i)
        times["flow_s"] += time.perf_counter() - tic
        tic = time.perf_counter()
        with torch.no_grad():
            decoded = vae.decode(latents)
            grid = decode_grid(lambda q: vae.query(decoded, q[None])[0], resolution, device=device)
        times["decode_s"] += time.perf_counter() - tic
        tic = time.perf_counter()
        grid_to_mesh(grid)
        times["marching_cubes_s"] += time.perf_counter() - tic
    per_shape = {k: v / shapes for k, v in times.items()}
    return {"shapes": shapes, "flow_steps": flow_steps, "guidance": 3.0, "resolution": resolution,
            "threads": torch.get_num_threads(), **per_shape, "total_s": sum(per_shape.values())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batch", type=int, nargs="+", help="batch per preset (default: tiny 32, base 4 on CPU, 64 on GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--shapes", type=int, default=3, help="shapes generated for the sampling figure")
    parser.add_argument("--flow-steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dit.json"))
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = {"tiny": 32, "base": 4 if device == "cpu" else 64}
    batches = args.batch or [defaults.get(p, 4) for p in args.presets]
    ctx = mp.get_context("spawn")
    rows = []
    for preset, batch in zip(args.presets, batches):
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            rows.append(pool.submit(measure_training, preset, batch, args.steps, args.warmup, device).result())
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        sampling = pool.submit(measure_sampling, args.shapes, args.flow_steps, args.resolution, device).result()
    report = {"machine": {"cpus": os.cpu_count(), "device": device}, "training": rows, "sampling": sampling}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    print("| preset | device | params (M) | batch | samples/s | tokens/s | peak MB | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "–"
        print(f"| {r['preset']} | {r['device']} | {r['parameters_m']:.1f} | {r['batch']} | {r['samples_per_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_memory_mb']:.0f} | {mfu} |")  # fmt: skip
    s = sampling
    print()
    row = ["tiny", f"{s['flow_steps']} (CFG)", f"{s['resolution']}³", *(f"{s[k]:.2f}" for k in ("flow_s", "decode_s", "marching_cubes_s", "total_s"))]
    print_table(["per shape", "flow steps", "resolution", "flow (s)", "decode (s)", "marching cubes (s)", "total (s)"], [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
