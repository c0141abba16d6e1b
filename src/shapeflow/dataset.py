"""The sample stage's output as a torch Dataset: one item per object, a random subset per visit.

Each item draws, with the torch generator of the calling process (seeded by training, restored on
resume), `input_points` surface points with normals for the encoder, `sharp_points` salient points,
and volume / near-surface / near-edge supervision points with their signed distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from shapeflow import manifest as mf
from shapeflow.config import VAEDataParams

SUPERVISION = ("vol", "near", "sharp_near")  # npz prefixes: <kind>_points, <kind>_sdf
ENCODER_ARRAYS = ("surface_points", "surface_normals", "sharp_points", "sharp_normals")


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


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _subset(n_available: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n indices into n_available items: without replacement when there are enough."""
    if n <= n_available:
        return torch.randperm(n_available, generator=generator)[:n]
    return torch.randint(n_available, (n,), generator=generator)


class ShapeSamples(Dataset):
    def __init__(self, objects: list[SampleObject], counts: VAEDataParams):
        if not objects:
            raise ValueError("no objects to train on (is the split empty, or did every object fail upstream?)")
        self.objects = objects
        self.counts = counts

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return draw(load_arrays(self.objects[index].path), self.counts, generator=None) | {"index": torch.tensor(index)}


def draw(
    arrays: dict[str, np.ndarray], counts: VAEDataParams, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """One random training view of an object's arrays: the encoder view and the supervision."""
    t = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    out = _encoder_view(t, counts, generator)
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


def encoder_inputs(arrays: dict[str, np.ndarray], counts: VAEDataParams, seed: int) -> dict[str, torch.Tensor]:
    """A fixed (seeded) encoder view of one object, batched (1, ...): for validation and encoding."""
    t = {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in ENCODER_ARRAYS}
    view = _encoder_view(t, counts, torch.Generator().manual_seed(seed))
    return {name: tensor[None] for name, tensor in view.items()}
