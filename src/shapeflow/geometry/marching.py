"""Marching cubes on the blocks of a grid that the surface crosses, and the weld that joins them.

Shared by the watertight stage and the decoder. Both keep values on a regular grid whose surface
touches a small share of it; PyMCubes runs on each (B + 1)^3 block whose values change sign, and the
vertex copies that neighbouring blocks both computed are merged afterwards.
"""

from __future__ import annotations

import mcubes
import numpy as np
import trimesh

MC_BLOCK = 16  # marching-cubes block edge, in cells


def crosses(lo, hi):
    """Whether marching cubes finds surface where the values range from lo to hi (arrays or tensors)."""
    return (lo <= 0) & (hi > 0)


def march_blocks(values, origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyMCubes on each block (B+1, B+1, B+1) of `values` (an array or a list) that the surface
    crosses; vertices in grid-index units (the block's origin added), faces as PyMCubes orients them
    (towards the negative side).

    PyMCubes puts a value of exactly 0 on the negative side, so a block holds surface when it has a
    value <= 0 and one > 0 (`crosses`)."""
    verts, faces = [], []
    for b, block in enumerate(values):
        if not crosses(block.min(), block.max()):
            continue
        v, f = mcubes.marching_cubes(block, 0.0)
        if len(f) == 0:
            continue
        verts.append(v + origins[b])
        faces.append(f.astype(np.int64))
    if not faces:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    return trimesh.util.append_faces(verts, faces)


def weld(verts: np.ndarray, faces: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the vertex copies that neighbouring blocks both computed, drop collapsed faces.

    Every marching-cubes vertex lies on a grid edge, so (edge's lower corner, axis) is an exact key;
    a vertex on a grid point (the field exactly zero there) has the same key from every edge.
    `resolution` bounds the grid-point index along an axis.
    """
    corner = np.floor(verts).astype(np.int64)  # (V, 3)
    frac = verts - corner
    axis = np.argmax(frac, axis=1)
    stride = resolution + 1
    key = ((corner[:, 0] * stride + corner[:, 1]) * stride + corner[:, 2]) * 3 + axis
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return verts[first], faces
