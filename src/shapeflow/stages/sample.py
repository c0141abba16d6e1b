"""sample stage: every watertight mesh -> one npz of points, normals and signed distances.

`shapeflow sample SRC DST` works on a watertight-stage output (its manifest.csv) or on any folder of
closed meshes. DST gets `objects/<key>.npz` (arrays listed in `geometry.sampling.sample_object`,
plain arrays, readable with `np.load(path, allow_pickle=False)`; with train_vae.family grid also
those of `geometry.sampling.sample_grids`), `records/<key>.json` and
`manifest.csv`. Each object's random stream is seeded from (params seed, object key), so its samples
do not depend on the order, the number of workers or the sharding.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from shapeflow import config, runner
from shapeflow import manifest as mf
from shapeflow.geometry.mesh import sampled_frame
from shapeflow.geometry.sampling import sample_grids, sample_object

COLUMNS = (
    *mf.OBJECT_COLUMNS,
    "n_faces",
    "n_sharp_edges",
    "inverted",
    "scale",
    "offset_x",
    "offset_y",
    "offset_z",
    "params_hash",
)

# Bumped when the npz layout changes, so outputs written by older code are redone.
FORMAT_VERSION = 1


def object_seed(seed: int, key: str) -> int:
    """A 64-bit seed for one object: a function of (params seed, key) only."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def with_grids(params: config.Params) -> bool:
    """Whether the outputs carry the grid family's arrays: only when train_vae.family asks for them."""
    return params.train_vae.family == "grid"


def params_hash(params: config.Params) -> str:
    """What an output depends on besides its input file: the sample section (its grid part only when
    grids are written), the seed, the format."""
    blob = f"{config.section_hash(params.sample, exclude=('grid',))}:{params.seed}:{FORMAT_VERSION}"
    if with_grids(params):
        blob += f":grid:{config.section_hash(params.sample.grid)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def process_object(task: runner.Task, out_dir: Path, params: config.Params) -> dict[str, Any]:
    """One object: load, check it is closed, normalise, sample, write `objects/<key>.npz`."""
    mesh, inverted, scale, offset = sampled_frame(task.src)
    # Compose with the upstream transform, so scale and offset lead back to the source file's frame.
    up_scale = float(task.meta.get("scale", 1.0))
    up_offset = np.array([float(task.meta.get(f"offset_{a}", 0.0)) for a in "xyz"])
    scale, offset = scale * up_scale, offset * up_scale + up_offset
    arrays = sample_object(mesh, params.sample, object_seed(params.seed, task.key))
    if with_grids(params):
        arrays |= sample_grids(mesh, params.sample.grid)
    rel = f"{mf.OBJECTS}/{task.key}.npz"
    with mf.atomic_path(out_dir / rel) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return {
        "path": rel,
        "n_faces": len(mesh.faces),
        "n_sharp_edges": int(arrays["n_sharp_edges"]),
        "inverted": inverted,
        "scale": float(scale),
        "offset_x": float(offset[0]),
        "offset_y": float(offset[1]),
        "offset_z": float(offset[2]),
    }


def run(
    params: config.Params,
    src: str | Path,
    dst: str | Path,
    *,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, Any]]:
    """Sample this rank's share of the objects in `src` into `dst`; returns their records."""
    return runner.run_stage(
        functools.partial(process_object, params=params),
        src,
        dst,
        params_hash(params),
        COLUMNS,
        params,
        workers=workers,
        rank=rank,
        world_size=world_size,
        desc="sample",
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sample", help="sample surface, salient-edge and supervision points with signed distances")
    p.add_argument("src", type=Path, help="a watertight output (with manifest.csv) or any folder of closed meshes")
    p.add_argument("dst", type=Path, help="output folder")
    runner.add_worker_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    records = run(params, args.src, args.dst, workers=args.workers, rank=args.rank, world_size=args.world_size)
    print(runner.summarize(records, "sample"))
    return runner.exit_code(records)
