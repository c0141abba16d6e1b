"""`shapeflow evaluate-recon`: the VAE's reconstruction figures on any folder of meshes.

A small pipeline of its own: the meshes go through the fetch (local source), watertight and sample
stages into a work folder, then each is scored as the evaluate stage scores a reconstruction. It
composes the stages' `run` functions, so it lives outside stages/ (no stage imports another) and no
stage imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from shapeflow import config
from shapeflow import manifest as mf
from shapeflow.dataset import list_objects
from shapeflow.models import families
from shapeflow.models.families import load_vae
from shapeflow.models.grid_vae import GridVAEConfig
from shapeflow.stages import fetch, sample, watertight
from shapeflow.stages.evaluate import mean_decode_seconds, recon_object, recon_summary, reference_paths


def evaluate_recon(params: config.Params, mesh_dir: Path, vae_dir: Path, work: Path) -> dict[str, Any]:
    """Every mesh file under `mesh_dir` through fetch (local source), watertight and sample into
    `work` (resumable: a rerun redoes only what changed), then the VAE's reconstruction metrics per
    mesh and their mean. Each record's `source` is the file's path under `mesh_dir`; meshes that
    failed on the way are listed with the stage and the reason, a file that repeats another's bytes
    is scored once."""
    if not mesh_dir.is_dir():
        raise NotADirectoryError(f"{mesh_dir}: not a folder of meshes")
    local = config.replace(params.fetch.local, path=str(mesh_dir.resolve()), extra_paths=())
    fetch_params = dataclasses.replace(params.fetch, source="local", extra_sources=(), local=local)
    params = dataclasses.replace(params, fetch=fetch_params)
    vae_config = families.load_config(vae_dir)
    if isinstance(vae_config, GridVAEConfig):  # the sample stage then writes the grids it reads
        grid = dataclasses.replace(params.sample.grid, resolution=vae_config.resolution)
        grid = dataclasses.replace(grid, sparse_resolution=max(grid.sparse_resolution, 2 * grid.resolution))
        params = dataclasses.replace(
            params,
            sample=dataclasses.replace(params.sample, grid=grid),
            train_vae=dataclasses.replace(params.train_vae, family="grid"),
        )
    fetch.run(params, work / "raw")
    watertight.run(params, work / "raw", work / "watertight")
    sample.run(params, work / "watertight", work / "samples")

    source = {}
    failed = []
    prefix = f"local:{mesh_dir.resolve().name}/"  # fetch's source of a file: local:<folder name>/<path>
    for stage in ("raw", "watertight", "samples"):
        for row in mf.read_manifest(work / stage / mf.MANIFEST, required=("key", "status")):
            if row["status"] in (mf.DUPLICATE, mf.SKIPPED):
                continue
            source.setdefault(row["key"], row.get("source", row["key"]).removeprefix(prefix))
            if row["status"] != mf.OK and all(f["key"] != row["key"] for f in failed):
                failed.append(
                    {
                        "key": row["key"],
                        "source": source[row["key"]],
                        "status": mf.FAILED,
                        "reason": f"{stage}: {row.get('reason', '')}",
                    }
                )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(vae_dir, device)
    ref_paths = reference_paths(work / "watertight")
    p = params.evaluate
    records = []
    for i, obj in enumerate(list_objects(work / "samples")):
        record, _, _ = recon_object(vae, obj, ref_paths.get(obj.key), p, params.train_vae.data, params.seed + i, device)
        records.append({"source": source.get(obj.key, obj.key)} | record)
    summary, _ = recon_summary(records + failed)
    report = {
        "mesh_dir": str(mesh_dir),
        "vae": str(vae_dir),
        "resolution": p.resolution,
        "mean": summary,
        # Wall seconds a mesh (encode, decode, marching cubes) on this machine: not a property of the model.
        "decode_s": mean_decode_seconds(records),
        "objects": records + failed,
    }
    mf.atomic_write_text(work / "report.json", json.dumps(mf.finite_or_none(report), indent=2) + "\n")
    return report


def format_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A plain-text table of per-object reconstruction figures and their mean."""
    header = f"{'mesh':<32} {'CD':>8} {'F@0.01':>7} {'F@0.02':>7} {'NC':>6} {'IoU':>6} {'IoU near':>8}"
    lines = [header, "-" * len(header)]

    def fmt(r: dict[str, Any]) -> str:
        cells = [r.get(k, float("nan")) for k in ("cd", "f@0.01", "f@0.02", "nc", "iou_volume", "iou_near")]
        return " ".join(f"{v:>{w}.{d}f}" for v, w, d in zip(cells, (8, 7, 7, 6, 6, 8), (4, 3, 3, 3, 3, 3), strict=True))

    for r in records:
        name = str(r.get("source", r["key"]))[-32:]
        lines.append(f"{name:<32} {fmt(r)}" if r["status"] == mf.OK else f"{name:<32} failed: {r['reason']}")
    lines.append("-" * len(header))
    lines.append(f"{'mean of ' + str(summary['objects']) + ' meshes':<32} {fmt(summary)}")
    return "\n".join(lines)


def add_parser(commands: argparse._SubParsersAction) -> None:
    r = commands.add_parser(
        "evaluate-recon", help="run a folder of meshes through watertight and sample and score the VAE on them"
    )
    r.add_argument("mesh_dir", type=Path, help="folder of obj/ply/stl/off/glb/gltf files")
    r.add_argument("--vae", type=Path, default=Path("models/vae"), help="train_vae output (default: %(default)s)")
    r.add_argument(
        "--work",
        type=Path,
        help="folder for the intermediate stages and report.json (default: cache/evaluate-recon/<folder name>)",
    )
    r.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    work = args.work or Path("cache/evaluate-recon") / args.mesh_dir.resolve().name
    report = evaluate_recon(params, args.mesh_dir, args.vae, work)
    print(format_table(report["objects"], report["mean"]))
    print(f"report: {work / 'report.json'}")
    return 0 if report["mean"]["objects"] else 1
