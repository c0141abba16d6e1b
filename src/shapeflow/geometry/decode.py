"""From a learned signed-distance field to a mesh (how close it is to a reference: shapeflow.metrics).

One helper for every stage that decodes: validation in train_vae, evaluate, sample export. The field
is any callable mapping query points (Q, 3) in normalised space to signed distances (Q,), negative
inside. Decoding is coarse to fine: the field is evaluated on a grid 2x coarser than asked, and only
the coarse cells that come near the surface are evaluated at full resolution; the rest of the fine
grid takes the coarse values, whose sign is all marching cubes needs away from the surface.
"""

from __future__ import annotations

from collections.abc import Callable

import mcubes
import numpy as np
import torch
import torch.nn.functional as F
import trimesh

FieldFn = Callable[[torch.Tensor], torch.Tensor]

BOUND = 1.0  # the grid covers [-BOUND, BOUND]^3
COARSE_FACTOR = 2  # fine cells per coarse cell along an axis
# A coarse cell is refined when its corners change sign or one of them has |sdf| below this many
# coarse-cell diagonals. It must stay well under the truncation the VAE is trained with (0.1 by
# default: far from the surface a learned field reads about +-truncation), or every cell would
# qualify; at 128^3 half a coarse diagonal is 0.027.
BAND_DIAGONALS = 0.5


def grid_coordinates(resolution: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (resolution + 1) grid positions per axis over [-BOUND, BOUND]."""
    return torch.linspace(-BOUND, BOUND, resolution + 1, device=device)


@torch.no_grad()
def evaluate_points(field: FieldFn, points: torch.Tensor, chunk: int) -> torch.Tensor:
    """field over `points` (Q, 3) in chunks of `chunk` queries, as float32 (Q,)."""
    return torch.cat([field(part).float() for part in points.split(chunk)]) if len(points) else points.new_zeros(0)


@torch.no_grad()
def decode_grid(field: FieldFn, resolution: int, chunk: int = 65536, device: torch.device | str = "cpu") -> np.ndarray:
    """Signed distances at the (resolution + 1)^3 grid points, coarse to fine. float32 numpy array."""
    if resolution % COARSE_FACTOR or resolution < 2 * COARSE_FACTOR:
        return _dense(field, resolution, chunk, device)
    coarse_res = resolution // COARSE_FACTOR
    coarse = _dense(field, coarse_res, chunk, device)  # (Rc + 1)^3
    coarse_t = torch.from_numpy(coarse).to(device)
    # Corners of each coarse cell: min |sdf| and whether the sign changes.
    corners = torch.stack(
        [
            coarse_t[i : coarse_res + i, j : coarse_res + j, k : coarse_res + k]
            for i in (0, 1)
            for j in (0, 1)
            for k in (0, 1)
        ]
    )  # (8, Rc, Rc, Rc)
    diagonal = 2 * BOUND / coarse_res * 3**0.5
    near = (corners.abs().amin(0) < BAND_DIAGONALS * diagonal) | ((corners > 0).any(0) & (corners < 0).any(0))
    fine = F.interpolate(coarse_t[None, None], size=(resolution + 1,) * 3, mode="trilinear", align_corners=True)[0, 0]
    # Every fine grid point that is a corner of a fine cell inside a refined coarse cell.
    mask = torch.zeros((resolution + 1,) * 3, dtype=torch.bool, device=device)
    cells = (
        near.repeat_interleave(COARSE_FACTOR, 0).repeat_interleave(COARSE_FACTOR, 1).repeat_interleave(COARSE_FACTOR, 2)
    )
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                mask[i : resolution + i, j : resolution + j, k : resolution + k] |= cells
    idx = mask.nonzero()  # (P, 3)
    axis = grid_coordinates(resolution, device)
    fine[mask] = evaluate_points(field, axis[idx], chunk)
    return fine.cpu().numpy()


def _dense(field: FieldFn, resolution: int, chunk: int, device: torch.device | str) -> np.ndarray:
    axis = grid_coordinates(resolution, device)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    return evaluate_points(field, points, chunk).reshape((resolution + 1,) * 3).cpu().numpy()


def grid_to_mesh(values: np.ndarray) -> trimesh.Trimesh:
    """Zero level set of a grid over [-BOUND, BOUND]^3 (negative inside), outward faces, no slivers.

    An empty mesh (no faces) when the field never changes sign.
    """
    resolution = values.shape[0] - 1
    verts, faces = mcubes.marching_cubes(np.ascontiguousarray(values, dtype=np.float64), 0.0)
    if len(faces) == 0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
    verts = verts * (2 * BOUND / resolution) - BOUND
    faces = faces[:, ::-1]  # PyMCubes orients faces towards the negative side; ours is inside
    mesh = trimesh.Trimesh(verts, faces, process=False)
    # Marching cubes puts vertices on grid corners where the field is exactly zero, several times
    # over; merged, the zero-area slivers between them collapse and are dropped without opening holes.
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces(height=None))
    mesh.remove_unreferenced_vertices()
    return mesh


def decode_mesh(
    field: FieldFn, resolution: int, chunk: int = 65536, device: torch.device | str = "cpu"
) -> trimesh.Trimesh:
    return grid_to_mesh(decode_grid(field, resolution, chunk, device))
