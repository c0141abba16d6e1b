"""The grid family's fine stage on the near-surface cells: what it costs, three ways, side by side.

The cells are those the sample stage writes (sparse_index at sparse_resolution, a grid-family
sample output's npz files), so the counts are those of real shapes. Per shape and method: the
seconds of a forward pass, and of a forward and backward pass, over every cell (medians of
--repeats); a method that fails says why in place of its time.

- gather: what the grid VAE does (shapeflow.models.grid_vae): each cell's centre reads the coarse
  feature grid by trilinear interpolation, with Fourier features of the centre, through the fine
  stage's MLP (2 hidden layers of --width);
- torch_subm: one submanifold 3x3x3 convolution (--channels in and out) over the active cells in
  plain torch: a neighbour table from a dense index volume, a gather of 27 neighbours, one einsum;
- spconv: the same convolution with spconv 2's SubMConv3d (its CPU build on a CPU), when installed.
  Measured here (spconv 2.3.8, torch 2.13 CPU): its backward pass asks torch for the current CUDA
  stream and fails on a CPU-only torch, so it cannot train on a CPU.

Only torch and numpy are needed, so it runs in an environment that has spconv without shapeflow:

    python bench/bench_sparse.py --samples data/samples --json OUT.json

Prints JSON and a table; writes bench/results/sparse.json unless --json says where.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from _table import print_table

METHODS = ("gather", "torch_subm", "spconv")
OFFSETS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)  # (27, 3)


def load_cells(samples: Path, n: int) -> list[tuple[str, np.ndarray, int, np.ndarray]]:
    """(name, sparse_index (K, 3), sparse_resolution, grid_sdf) of the first n objects that have grids."""
    out = []
    for path in sorted((samples / "objects").glob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            if "sparse_index" not in npz.files:
                continue
            out.append((path.stem[:12], npz["sparse_index"].astype(np.int64), int(npz["sparse_resolution"]),
                        npz["grid_sdf"].astype(np.float32)))  # fmt: skip
        if len(out) == n:
            break
    if not out:
        raise SystemExit(f"{samples}: no npz with grids (run the sample stage with train_vae.family: grid)")
    return out


def timed(step, repeats: int, backward: bool) -> float | str:
    """Median seconds of step(backward), or the error it raised."""
    try:
        step(backward)  # warm-up
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            step(backward)
            times.append(time.perf_counter() - tic)
    except Exception as exc:  # noqa: BLE001 - the bench reports a method that fails and goes on
        return f"{type(exc).__name__}: {str(exc)[:80]}"
    return statistics.median(times)


def finish(out, backward: bool) -> None:
    if backward:
        out.sum().backward()


def gather_step(torch, index, resolution, grid, channels: int, width: int):
    import torch.nn.functional as F

    coarse = grid.shape[0]
    features = torch.randn(1, channels, coarse, coarse, coarse, requires_grad=True)
    centres = torch.from_numpy(-1.0 + (index + 0.5) * (2.0 / resolution)).float()
    freqs = np.pi * 2.0 ** torch.arange(6, dtype=torch.float32)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(channels + 39, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
        torch.nn.Linear(width, 1),
    )  # fmt: skip

    def step(backward: bool):
        with torch.set_grad_enabled(backward):
            where = centres.flip(-1)[None, :, None, None]
            feats = F.grid_sample(features, where, mode="bilinear", align_corners=False)[0, :, :, 0, 0].T
            angles = (centres[:, :, None] * freqs).flatten(1)
            finish(mlp(torch.cat([feats, centres, angles.sin(), angles.cos()], dim=-1)), backward)

    return step


def neighbour_table(torch, index: np.ndarray, resolution: int):
    """(K, 27) row of each active cell's 27 neighbours among the active cells; K (a zero row) if not active."""
    volume = np.full((resolution,) * 3, len(index), dtype=np.int64)
    volume[tuple(index.T)] = np.arange(len(index))
    near = index[:, None] + OFFSETS[None]
    inside = np.all((near >= 0) & (near < resolution), axis=-1)
    table = np.where(inside, volume[tuple(np.clip(near, 0, resolution - 1).transpose(2, 0, 1))], len(index))
    return torch.from_numpy(table)


def torch_subm_step(torch, index, resolution, channels: int):
    table = neighbour_table(torch, index, resolution)
    features = torch.randn(len(index), channels, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(27, channels, channels) / np.sqrt(27 * channels))

    def step(backward: bool):
        with torch.set_grad_enabled(backward):
            padded = torch.cat([features, features.new_zeros(1, channels)])
            finish(torch.einsum("nkc,kcd->nd", padded[table], weight), backward)

    return step, table


def spconv_step(torch, index, resolution, channels: int):
    import spconv.pytorch as spconv

    coords = torch.from_numpy(np.concatenate([np.zeros((len(index), 1)), index], axis=1).astype(np.int32))
    features = torch.randn(len(index), channels, requires_grad=True)
    conv = spconv.SubMConv3d(channels, channels, 3, bias=False, indice_key="subm")

    def step(backward: bool):
        with torch.set_grad_enabled(backward):
            x = spconv.SparseConvTensor(features, coords, [resolution] * 3, batch_size=1)
            finish(conv(x).features, backward)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, required=True, help="a grid-family sample-stage output")
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--channels", type=int, default=32, help="feature channels (gather) and conv channels")
    parser.add_argument("--width", type=int, default=64, help="the gather method's MLP width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "sparse.json")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    has_spconv = importlib.util.find_spec("spconv") is not None
    rows = []
    for name, index, resolution, grid in load_cells(args.samples, args.objects):
        row = {"shape": name, "cells": len(index), "resolution": resolution}
        steps = {"gather": gather_step(torch, index, resolution, grid, args.channels, args.width)}
        steps["torch_subm"], table = torch_subm_step(torch, index, resolution, args.channels)
        if has_spconv:
            steps["spconv"] = spconv_step(torch, index, resolution, args.channels)
        row["mean_active_neighbours"] = float((table < len(index)).sum(1).float().mean())
        for method in METHODS:
            for kind, backward in (("forward", False), ("train", True)):
                step = steps.get(method)
                row[f"{method}_{kind}_s"] = timed(step, args.repeats, backward) if step else None
        rows.append(row)
    report = {
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "spconv": __import__("spconv").__version__ if has_spconv else None,
        "channels": args.channels,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    def cell(value) -> str:
        if value is None:
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else "fails"

    headers = ["shape", "cells"] + [f"{m} {k} s" for m in METHODS for k in ("fwd", "fwd+bwd")]
    print_table(
        headers,
        [
            [r["shape"], r["cells"]] + [cell(r[f"{m}_{k}_s"]) for m in METHODS for k in ("forward", "train")]
            for r in rows
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
