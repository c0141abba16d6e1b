"""DiT figures on this machine: training throughput per preset, and the time to generate one shape.

Training: a batch of random latents goes through the stage's flow loss (train_dit.training_losses,
8 classes) and an AdamW step; samples/s, tokens/s, peak memory (each preset in a fresh process),
and on a GPU the share of the bf16 peak (MFU) from torch.utils.flop_counter. The latents (--latents)
are the preset's own size (`preset`), or those the `local` VAE of a family makes: `vecset` (a set
of 256 tokens of 19 channels) or `grid` (a 16^3 x 8 grid, patchified by 2: 512 tokens of 64).

Sampling (tiny only, untrained weights, so the decode cost is that of an arbitrary field): per shape,
the flow's Euler steps with classifier-free guidance, the VAE's decode to a signed-distance grid, and
marching cubes, timed apart. An untrained VAE's field crosses zero in more places than a trained
one's, so the decode and marching cubes times are an upper bound for a trained pair.

    python bench/bench_dit.py                         # tiny and base training, tiny sampling
    python bench/bench_dit.py --presets tiny --resolution 64
    python bench/bench_dit.py --presets tiny --latents vecset grid --shapes 1

Prints JSON and a table; writes bench/results/dit.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _table import print_table
from _training import in_fresh_process, print_training_table, time_training, write_report

LATENTS = {  # DiT config fields the latents fix, by --latents
    "preset": {},
    "vecset": {"latent_dim": 19, "num_tokens": 256},
    "grid": {"latent_dim": 8, "num_tokens": 16**3, "grid_side": 16},
}


def train_params(latents: str):
    """train_dit's default params with the time shift its "auto" gives these latents."""
    import dataclasses

    from shapeflow.config import TrainDiTParams
    from shapeflow.models.families import T_SHIFT

    p = TrainDiTParams()
    shift = T_SHIFT[latents.replace("preset", "vecset")]
    return dataclasses.replace(p, flow=dataclasses.replace(p.flow, t_shift=shift))


def measure_training(preset: str, latents: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    import torch

    from shapeflow.models.dit import DiT, dit_config
    from shapeflow.stages.train_dit import training_losses

    torch.manual_seed(0)
    config = dit_config(preset, {"num_classes": 8, **LATENTS[latents]})
    model = DiT(config).to(device)
    data = torch.randn(batch, config.num_tokens, config.latent_dim, device=device)
    labels = torch.randint(0, 8, (batch,), device=device)

    params = train_params(latents)

    def loss() -> torch.Tensor:
        return training_losses(model, (data, labels), params, config.null_label, None)["loss"]

    row = time_training(model, loss, batch, steps, warmup, device)
    tokens_per_s = row["samples_per_s"] * config.num_tokens
    name = preset if latents == "preset" else f"{preset} on {latents} latents"
    return {"preset": name, **row, "tokens": config.num_tokens, "tokens_per_s": tokens_per_s}


def measure_sampling(shapes: int, flow_steps: int, resolution: int, device: str) -> dict:
    import torch

    from shapeflow.geometry.decode import decode_grid, grid_to_mesh
    from shapeflow.inference import LatentStats, ShapePipeline
    from shapeflow.models.dit import DiT, dit_config
    from shapeflow.models.vae import VecSetVAE, vae_config

    torch.manual_seed(0)
    vae = VecSetVAE(vae_config("tiny")).to(device).eval()
    dim = vae.config.latent_dim
    dit = (
        DiT(dit_config("tiny", {"latent_dim": dim, "num_tokens": vae.config.num_latents, "num_classes": 8}))
        .to(device)
        .eval()
    )
    stats = LatentStats(torch.zeros(dim), torch.ones(dim))
    generator = ShapePipeline(dit, vae, stats, [f"c{i}" for i in range(8)])
    labels = torch.arange(shapes, device=device) % 8
    times = {"flow_s": 0.0, "decode_s": 0.0, "marching_cubes_s": 0.0}
    for i in range(shapes):
        tic = time.perf_counter()
        latents = generator.sample_latents(labels[i : i + 1], 1, flow_steps, 3.0, seed=i)
        times["flow_s"] += time.perf_counter() - tic
        tic = time.perf_counter()
        with torch.no_grad():
            decoded = vae.decode(latents)
            grid = decode_grid(lambda q, d=decoded: vae.query(d, q[None])[0], resolution, device=device)
        times["decode_s"] += time.perf_counter() - tic
        tic = time.perf_counter()
        grid_to_mesh(grid)
        times["marching_cubes_s"] += time.perf_counter() - tic
    per_shape = {k: v / shapes for k, v in times.items()}
    return {
        "shapes": shapes,
        "flow_steps": flow_steps,
        "guidance": 3.0,
        "resolution": resolution,
        "threads": torch.get_num_threads(),
        **per_shape,
        "total_s": sum(per_shape.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--latents", nargs="+", default=["preset"], choices=sorted(LATENTS))
    parser.add_argument(
        "--batch", type=int, nargs="+", help="batch per preset (default: tiny 32, base 4 on CPU, 64 on GPU)"
    )
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
    runs = [(p, lat, b) for lat in args.latents for p, b in zip(args.presets, batches, strict=False)]
    rows = [in_fresh_process(measure_training, p, lat, b, args.steps, args.warmup, device) for p, lat, b in runs]
    sampling = in_fresh_process(measure_sampling, args.shapes, args.flow_steps, args.resolution, device)
    write_report(
        {"machine": {"cpus": os.cpu_count(), "device": device}, "training": rows, "sampling": sampling}, args.out
    )
    print_training_table(rows, {"tokens/s": "tokens_per_s"})
    s = sampling
    print()
    row = [
        "tiny",
        f"{s['flow_steps']} (CFG)",
        f"{s['resolution']}³",
        *(f"{s[k]:.2f}" for k in ("flow_s", "decode_s", "marching_cubes_s", "total_s")),
    ]
    print_table(
        ["per shape", "flow steps", "resolution", "flow (s)", "decode (s)", "marching cubes (s)", "total (s)"], [row]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
