"""watertight stage: every mesh of a folder -> a closed mesh in normalised space.

`shapeflow watertight SRC DST [--resolution R]` works on a fetch output (its manifest.csv) or on any
folder of mesh files. DST gets `objects/<key>.ply`, `records/<key>.json` and `manifest.csv` with the
transform that undoes the normalisation: original = normalised * scale + offset.
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any

import trimesh

from shapeflow import config, runner
from shapeflow import manifest as mf
from shapeflow.geometry.mesh import load_clean, normalise
from shapeflow.geometry.watertight import watertight

log = logging.getLogger(__name__)

# Part of every record's params hash: bump it when a change of the method changes its outputs, so a
# rerun redoes the objects instead of keeping those made before (2: the winding-number rule).
METHOD_VERSION = 2

COLUMNS = (
    *mf.OBJECT_COLUMNS,
    "scale",
    "offset_x",
    "offset_y",
    "offset_z",
    "resolution",
    "backend",
    "closed_parts",
    "open_parts",
    "sign_fallback",
    "inside_rule",
    "thin",
    "components",
    "n_vertices",
    "n_faces",
    "shell_ratio",
    "params_hash",
)


def process_object(task: runner.Task, out_dir: Path, params: config.WatertightParams) -> dict[str, Any]:
    """One object: load, clean, normalise, remesh, write `objects/<key>.ply`."""
    mesh, scale, offset = normalise(load_clean(task.src))
    result = watertight(
        mesh.vertices,
        mesh.faces,
        resolution=params.resolution,
        eps_voxels=params.eps_voxels,
        keep_closed_surface=params.keep_closed_surface,
        winding=params.winding,
        backend=params.backend,
    )
    rel = f"{mf.OBJECTS}/{task.key}.ply"
    with mf.atomic_path(out_dir / rel) as tmp:
        trimesh.Trimesh(result.vertices, result.faces, process=False).export(tmp, file_type="ply")
    eps = params.eps_voxels * 2.0 / params.resolution
    return {
        "path": rel,
        "scale": float(scale),
        "offset_x": float(offset[0]),
        "offset_y": float(offset[1]),
        "offset_z": float(offset[2]),
        "resolution": params.resolution,
        "backend": result.backend,
        "closed_parts": result.closed_parts,
        "open_parts": result.open_parts,
        "components": result.components,
        "sign_fallback": result.sign_fallback,
        "inside_rule": result.inside_rule,
        # Nothing decided an inside but the eps shell: a sheet, a flat mesh, a closed slab about 2 eps thick.
        "thin": result.inside_rule == "shell",
        "n_vertices": len(result.vertices),
        "n_faces": len(result.faces),
        # About 1 for a thin double-walled shell (a sheet's slab, or a hole the winding number did not
        # close); solid objects give much larger values.
        "shell_ratio": round(result.volume / (eps * result.area), 3),
    }


def run(
    params: config.Params,
    src: str | Path,
    dst: str | Path,
    *,
    resolution: int | None = None,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, Any]]:
    """Remesh this rank's share of the objects in `src` into `dst`; returns their records."""
    section = config.replace(params.watertight, resolution=resolution)
    return runner.run_stage(
        functools.partial(process_object, params=section),
        src,
        dst,
        f"{config.section_hash(section)}-v{METHOD_VERSION}",
        COLUMNS,
        params,
        workers=workers,
        rank=rank,
        world_size=world_size,
        desc="watertight",
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("watertight", help="remesh meshes into closed meshes in normalised space")
    p.add_argument("src", type=Path, help="a fetch output (with manifest.csv) or any folder of meshes")
    p.add_argument("dst", type=Path, help="output folder")
    p.add_argument("--resolution", type=int, help="grid points per axis (default: params watertight.resolution)")
    runner.add_worker_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    records = run(
        params,
        args.src,
        args.dst,
        resolution=args.resolution,
        workers=args.workers,
        rank=args.rank,
        world_size=args.world_size,
    )
    print(runner.summarize(records, "watertight"))
    return runner.exit_code(records)
