"""The sample stage's output as a torch Dataset: one item per object, a random subset per visit.

Each item draws `input_points` surface points with normals for the encoder, `sharp_points` salient
points, and volume / near-surface / near-edge supervision points with their signed distances. The
draw is a function of (seed, epoch, object) alone, never of the process's global random state, so a
run resumed in the middle of an epoch draws what the uninterrupted run drew (an object drawn twice in
one epoch, as the category-balanced sampler may, gets the same points both times).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from shapeflow import manifest as mf
from shapeflow.config import ParamsError, VAEDataParams
from shapeflow.geometry import grids

log = logging.getLogger(__name__)
SUPERVISION = ("vol", "near", "sharp_near")  # npz prefixes: <kind>_points, <kind>_sdf
ENCODER_ARRAYS = ("surface_points", "surface_normals", "sharp_points", "sharp_normals")
GRID_ARRAYS = ("grid_sdf", "sparse_index", "sparse_sdf", "sparse_resolution")  # the grid family's


@dataclass(frozen=True)
class SampleObject:
    key: str
    path: Path
    category: str
    split: str


def list_objects(root: str | Path, split: str | None = None) -> list[SampleObject]:
    """The objects of a sample-stage output whose status is ok, optionally of one split, by key."""
    root = Path(root)
    rows = mf.read_manifest(root / mf.MANIFEST, required=("key", "path", "status", "split"))
    objects = [
        SampleObject(row["key"], root / row["path"], row.get("category", ""), row["split"])
        for row in rows
        if row["status"] == mf.OK and (split is None or row["split"] == split)
    ]
    return sorted(objects, key=lambda o: o.key)


def shell_ratios(meshes: str | Path) -> dict[str, float]:
    """shell_ratio by key from a watertight-stage output's manifest: the objects with status ok and a value."""
    rows = mf.read_manifest(Path(meshes) / mf.MANIFEST, required=("key", "status", "shell_ratio"))
    return {r["key"]: float(r["shell_ratio"]) for r in rows if r["status"] == mf.OK and r["shell_ratio"]}


def drop_thin_shells(
    objects: list[SampleObject], meshes: str | Path | None, min_ratio: float
) -> tuple[list[SampleObject], list[SampleObject]]:
    """(kept, left out): the objects whose watertight output has a shell_ratio below `min_ratio`
    (thin double-walled shells: about 1) are left out, as the log says. The ratios come from the
    watertight-stage manifest in `meshes`; an object it gives none for is kept, with a warning.
    min_ratio 0 keeps every object and reads nothing."""
    if min_ratio <= 0:
        return objects, []
    if meshes is None:
        raise ParamsError(
            f"train_vae.data.min_shell_ratio: {min_ratio} needs the watertight stage's manifest (--meshes)"
        )
    ratios = shell_ratios(meshes)
    unknown = [o for o in objects if o.key not in ratios]
    if unknown:
        log.warning(
            "%d of %d objects have no shell_ratio in %s: kept", len(unknown), len(objects), Path(meshes) / mf.MANIFEST
        )
    thin = [ratios.get(o.key, np.inf) < min_ratio for o in objects]
    kept = [o for o, t in zip(objects, thin, strict=True) if not t]
    left_out = [o for o, t in zip(objects, thin, strict=True) if t]
    log.info(
        "left out %d of %d objects whose watertight shell_ratio is below %g (thin shells)",
        len(left_out),
        len(objects),
        min_ratio,
    )
    return kept, left_out


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _subset(n_available: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n indices into n_available items: without replacement when there are enough."""
    if n <= n_available:
        return torch.randperm(n_available, generator=generator)[:n]
    return torch.randint(n_available, (n,), generator=generator)


class ShapeSamples(Dataset):
    """family: what the encoder reads, "vecset" (surface points) or "grid" (the truncated SDF grid, with
    the near-surface cells as more supervision); see `draw`."""

    def __init__(self, objects: list[SampleObject], counts: VAEDataParams, seed: int = 0, family: str = "vecset"):
        if not objects:
            raise ValueError("no objects to train on (is the split empty, or did every object fail upstream?)")
        self.objects = objects
        self.counts = counts
        self.seed = seed
        self.family = family
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next draws belong to (the training loop sets it at every epoch's start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        obj = self.objects[index]
        arrays = load_arrays(obj.path)
        if self.family == "grid" and GRID_ARRAYS[0] not in arrays:
            raise ValueError(
                f"{obj.path}: no grid arrays; the grid family needs the sample stage run with train_vae.family: grid"
            )
        if self.family == "grid" and not len(arrays["sparse_index"]):
            raise ValueError(f"{obj.path}: no near-surface cells (an empty surface?)")
        return draw(arrays, self.counts, generator, self.family) | {"index": torch.tensor(index)}


def draw(
    arrays: dict[str, np.ndarray], counts: VAEDataParams, generator: torch.Generator | None, family: str = "vecset"
) -> dict[str, torch.Tensor]:
    """One random training view of an object's arrays: the encoder view and the supervision.

    vecset: points, normals, sharp_points, sharp_normals; grid: grid (1, R, R, R) and `near_points`
    of its near-surface cells (cell_points, cell_sdf). Both: <kind>_points and <kind>_sdf for the
    kinds in SUPERVISION."""
    t = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    out = _grid_view(t, counts, generator) if family == "grid" else _encoder_view(t, counts, generator)
    wanted = {"vol": counts.volume_points, "near": counts.near_points, "sharp_near": counts.sharp_near_points}
    for kind in SUPERVISION:
        src = kind if len(t[f"{kind}_points"]) else "near"
        pick = _subset(len(t[f"{src}_points"]), wanted[kind], generator)
        out[f"{kind}_points"] = t[f"{src}_points"][pick].float()
        out[f"{kind}_sdf"] = t[f"{src}_sdf"][pick].float()
    return out


def _encoder_view(
    t: dict[str, torch.Tensor], counts: VAEDataParams, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """Surface points with normals and salient points with normals, as the encoder reads them."""
    pick = _subset(len(t["surface_points"]), counts.input_points, generator)
    out = {"points": t["surface_points"][pick].float(), "normals": t["surface_normals"][pick].float()}
    # Objects sampled with sharp: 0 fall back to surface points, so every batch has the same keys.
    sharp_src = "sharp" if len(t["sharp_points"]) else "surface"
    pick = _subset(len(t[f"{sharp_src}_points"]), counts.sharp_points, generator)
    out["sharp_points"] = t[f"{sharp_src}_points"][pick].float()
    out["sharp_normals"] = t[f"{sharp_src}_normals"][pick].float()
    return out


def _grid_view(
    t: dict[str, torch.Tensor], counts: VAEDataParams, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """The grid the encoder reads, and a random subset of the near-surface cells with their distances."""
    index, sdf = t["sparse_index"], t["sparse_sdf"]
    pick = _subset(len(index), counts.near_points, generator)
    return {
        "grid": t["grid_sdf"].float()[None],
        "cell_points": torch.from_numpy(grids.cell_centres(int(t["sparse_resolution"]), index[pick].long().numpy())),
        "cell_sdf": sdf[pick].float(),
    }


def encoder_inputs(arrays: dict[str, np.ndarray], counts: VAEDataParams, seed: int) -> dict[str, torch.Tensor]:
    """A fixed (seeded) encoder view of one object, batched (1, ...): for validation and encoding."""
    t = {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in ENCODER_ARRAYS}
    view = _encoder_view(t, counts, torch.Generator().manual_seed(seed))
    return {name: tensor[None] for name, tensor in view.items()}
