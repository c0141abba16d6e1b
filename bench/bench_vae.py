"""VAE training throughput of both families: forward + backward + AdamW step, per preset, on this machine.

For each family (vecset, grid) and preset (tiny, local, base) a batch of spheres of the train_vae
default sizes (VecSet: 2,048 surface points with normals and 512 salient points in; grid: the
sphere's truncated signed-distance grid at the preset's resolution in, and 1,024 near-surface cells;
both: 2,560 supervision queries) goes through the stage's loss (train_vae.losses / grid_losses) and
an AdamW step. Reported: samples/s, query points/s, peak memory of the
process (CPU: VmHWM, each preset in a fresh process so the peaks do not mix; GPU:
torch.cuda.max_memory_allocated), and on a GPU the tokens/s and the share of the GPU's bf16 peak
(MFU) from the model FLOPs counted by torch.utils.flop_counter.

    python bench/bench_vae.py                       # tiny, local and base, on CUDA when there is one
    python bench/bench_vae.py --families vecset grid --presets local --steps 20

Prints JSON and a table; writes bench/results/vae.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _training import in_fresh_process, print_training_table, time_training, write_report


def sphere_batch(batch: int, device: str) -> dict:
    """A train_vae batch of `batch` spheres of radius 0.5, at the default VAEDataParams counts."""
    import torch

    from shapeflow.config import VAEDataParams

    counts = VAEDataParams()

    def surface(n: int) -> tuple:
        normals = torch.nn.functional.normalize(torch.randn(batch, n, 3, device=device), dim=-1)
        return 0.5 * normals, normals

    def queries(n: int) -> tuple:
        points = torch.rand(batch, n, 3, device=device) * 2 - 1
        return points, points.norm(dim=-1) - 0.5

    out = dict(zip(("points", "normals"), surface(counts.input_points), strict=True))
    out |= dict(zip(("sharp_points", "sharp_normals"), surface(counts.sharp_points), strict=True))
    supervision = {"vol": counts.volume_points, "near": counts.near_points, "sharp_near": counts.sharp_near_points}
    for kind, n in supervision.items():
        out[f"{kind}_points"], out[f"{kind}_sdf"] = queries(n)
    return out


def sphere_grids(batch: int, resolution: int, device: str) -> dict:
    """What the grid family reads of `batch` spheres of radius 0.5: the grid and near-surface cells."""
    import torch

    from shapeflow.config import VAEDataParams

    centres = -1.0 + (torch.arange(resolution, device=device) + 0.5) * (2.0 / resolution)
    grid = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1).norm(dim=-1) - 0.5
    cells = torch.nn.functional.normalize(torch.randn(batch, VAEDataParams().near_points, 3, device=device), dim=-1)
    cells = cells * (0.5 + 0.02 * torch.randn(batch, cells.shape[1], 1, device=device))
    return {
        "grid": grid.clamp(-0.1, 0.1).expand(batch, 1, -1, -1, -1).contiguous(),
        "cell_points": cells,
        "cell_sdf": cells.norm(dim=-1) - 0.5,
    }


def measure(family: str, preset: str, batch: int, steps: int, warmup: int, device: str) -> dict:
    """Runs in a fresh process: time `steps` training steps after `warmup` ones."""
    import torch

    from shapeflow.config import VAELossParams
    from shapeflow.models import families
    from shapeflow.stages.train_vae import LOSSES

    torch.manual_seed(0)
    config = families.vae_config(family, preset)
    model = families.build_vae(config).to(device)
    data = sphere_batch(batch, device)
    if family == "grid":
        data |= sphere_grids(batch, config.resolution, device)
    kinds = ("vol", "near", "sharp_near", "cell") if family == "grid" else ("vol", "near", "sharp_near")
    queries = sum(data[f"{kind}_points"].shape[1] for kind in kinds)  # per shape
    loss = LOSSES[family]
    row = time_training(model, lambda: loss(model, data, VAELossParams())["loss"], batch, steps, warmup, device)
    per_s = batch / row["step_s"]
    return {
        "preset": f"{family} {preset}",
        **row,
        "latent": f"{config.num_latents} x {config.latent_dim}",
        "query_points_per_s": per_s * queries,
        "tokens_per_s": per_s * config.num_latents,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["vecset", "grid"], choices=["vecset", "grid"])
    parser.add_argument("--presets", nargs="+", default=["tiny", "local", "base"])
    parser.add_argument(
        "--batch", type=int, nargs="+", help="batch per preset (default: tiny and local 8, base 2 on CPU, 32 on GPU)"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vae.json"))
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = {"tiny": 8, "local": 8, "base": 2 if device == "cpu" else 32}
    batches = args.batch or [defaults.get(p, 2) for p in args.presets]
    runs = [(f, p, b) for f in args.families for p, b in zip(args.presets, batches, strict=False)]
    rows = [in_fresh_process(measure, f, p, b, args.steps, args.warmup, device) for f, p, b in runs]
    write_report({"machine": {"cpus": os.cpu_count(), "device": device}, "rows": rows}, args.out)
    print_training_table(rows, {"query points/s": "query_points_per_s", "tokens/s": "tokens_per_s"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
