"""Exact distances from query points to a triangle mesh, signed negative inside.

Two back-ends behind one function:

- CPU (libigl): the distance is the exact point-triangle distance from an AABB tree. The sign is
  the generalised winding number (libigl's fast Barnes-Hut evaluation, exact near the surface)
  thresholded at 1/2, except for points the nearest face alone proves inside (see
  `behind_nearest_face`), which spares the winding number about half the points near the surface.
  The winding number is right where a closed mesh overlaps itself (built-in shapes are unions of
  overlapping closed parts) and beside zero-area triangles, where a pseudo-normal sign is not.
- CUDA (cubvh): a GPU BVH, float32. The sign comes from ray stabbing: a point is inside when rays
  in every one of cubvh's directions hit the surface. That agrees with the winding number
  everywhere except inside a void the surface encloses completely (a hollow ball's cavity), which
  stabbing calls inside and the winding number outside. Chosen automatically when torch sees a GPU
  and cubvh is installed (`pip install shapeflow[cuda]`).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import igl
import numpy as np

Backend = Literal["auto", "cpu", "cuda"]

# cubvh's sign mode: 'raystab' stabs rays in a fixed set of directions, robust to self-crossings;
# its other mode ('watertight') trusts the face normals at the closest point, like a pseudo-normal.
CUBVH_SIGN_MODE = "raystab"
# cubvh refuses meshes this small; they go to the CPU, where they cost nothing anyway.
CUBVH_MIN_FACES = 9
# Points per GPU batch: bounds the GPU memory of one call (about 100 bytes a point).
CUDA_BATCH = 1 << 22
# Winding number above which a point is inside (1 inside, 0 outside for a closed surface).
INSIDE_WINDING = 0.5
# A closest point counts as inside its face when all three barycentric weights exceed this; on an
# edge or a corner the face normal does not decide the side.
INTERIOR_MARGIN = 1e-6
# A face is too flat for barycentric weights when sin^2 of its angle at corner 0 is below this.
FLAT_FACE = 1e-12


def signed_distance(
    vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, backend: Backend = "auto"
) -> np.ndarray:
    """Signed distance from each point to the mesh: negative inside, positive outside. (N,) float64.

    The mesh must be closed for the sign to mean anything; the magnitude is exact either way.
    """
    V, F, P = _check_inputs(vertices, faces, points)
    if len(P) == 0:
        return np.zeros(0)
    if _use_cuda(backend, len(F)):
        return _cuda_distance(V, F, P, signed=True)
    return _cpu_signed_distance(V, F, P)


def unsigned_distance(
    vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, backend: Backend = "auto"
) -> np.ndarray:
    """Exact distance from each point to the nearest triangle. (N,) float64."""
    V, F, P = _check_inputs(vertices, faces, points)
    if len(P) == 0:
        return np.zeros(0)
    if _use_cuda(backend, len(F)):
        return _cuda_distance(V, F, P, signed=False)
    sq_dist, _, _ = igl.point_mesh_squared_distance(P, V, F)
    return np.sqrt(sq_dist)


@functools.cache
def cuda_available() -> bool:
    """True when torch sees a CUDA device and cubvh is installed."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("cubvh") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _use_cuda(backend: Backend, n_faces: int) -> bool:
    if backend == "cpu":
        return False
    if backend == "cuda":
        if not cuda_available():
            raise RuntimeError("backend 'cuda' needs torch with a visible GPU and cubvh (pip install shapeflow[cuda])")
        if n_faces < CUBVH_MIN_FACES:
            raise ValueError(f"backend 'cuda': cubvh needs at least {CUBVH_MIN_FACES} faces, got {n_faces}")
        return True
    if backend != "auto":
        raise ValueError(f"backend: one of 'auto', 'cpu', 'cuda', got {backend!r}")
    return n_faces >= CUBVH_MIN_FACES and cuda_available()


def _check_inputs(vertices, faces, points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous float64/int64 copies that libigl accepts, with shape errors that say which array."""
    V = np.ascontiguousarray(vertices, dtype=np.float64)
    F = np.ascontiguousarray(faces, dtype=np.int64)
    P = np.ascontiguousarray(points, dtype=np.float64)
    if V.ndim != 2 or V.shape[1] != 3 or len(V) == 0:
        raise ValueError(f"vertices: a non-empty (V, 3) array is required, got shape {V.shape}")
    if F.ndim != 2 or F.shape[1] != 3 or len(F) == 0:
        raise ValueError(f"faces: a non-empty (F, 3) array is required, got shape {F.shape}")
    if F.min() < 0 or F.max() >= len(V):
        raise ValueError(f"faces: indices must lie in [0, {len(V)}), got [{F.min()}, {F.max()}]")
    if P.ndim != 2 or P.shape[1] != 3:
        raise ValueError(f"points: an (N, 3) array is required, got shape {P.shape}")
    if not np.isfinite(V).all():
        raise ValueError("vertices: NaN or infinite coordinates")
    if not np.isfinite(P).all():
        raise ValueError("points: NaN or infinite coordinates")
    return V, F, P


def _cpu_signed_distance(V: np.ndarray, F: np.ndarray, P: np.ndarray) -> np.ndarray:
    sq_dist, face, closest = igl.point_mesh_squared_distance(P, V, F)  # (N,), (N,), (N, 3); exact
    inside = behind_nearest_face(V, F, P, face, closest)  # (N,) certainly inside where True
    rest = np.flatnonzero(~inside)
    if len(rest):
        inside[rest] = igl.fast_winding_number(V, F, P[rest]) > INSIDE_WINDING
    return np.where(inside, -1.0, 1.0) * np.sqrt(sq_dist)


def behind_nearest_face(
    V: np.ndarray, F: np.ndarray, P: np.ndarray, face: np.ndarray, closest: np.ndarray
) -> np.ndarray:
    """(N,) True where a point is certainly inside: its closest surface point lies strictly inside
    one face, and the point is behind that face.

    Why this is safe: nothing of the surface lies between a point and its closest point, so the
    point has the winding number found just behind the face there, which is one more than just in
    front of it, so at least 1 (unless some part of the mesh is inside out). It is not safe the
    other way round: in front of a face can still be inside another part that overlaps this one,
    so those points, and those whose closest point is on an edge or a corner, are left to the
    winding number. On a remeshed CAD part this decides 49 % of the near-surface points (all of
    those inside) and 12 % of the uniform ones, never against the winding number.
    """
    corners = V[F[face]]  # (N, 3, 3)
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]  # (N, 3) each
    w = closest - corners[:, 0]
    d11, d12, d22 = _rowdot(e1, e1), _rowdot(e1, e2), _rowdot(e2, e2)
    w1, w2 = _rowdot(w, e1), _rowdot(w, e2)
    det = d11 * d22 - d12 * d12  # (N,) zero for a face without area
    ok = det > FLAT_FACE * d11 * d22
    det = np.where(ok, det, 1.0)
    u = (d22 * w1 - d12 * w2) / det  # barycentric weights of corners 1 and 2
    v = (d11 * w2 - d12 * w1) / det
    interior = ok & (u > INTERIOR_MARGIN) & (v > INTERIOR_MARGIN) & (1.0 - u - v > INTERIOR_MARGIN)
    return interior & (_rowdot(P - closest, np.cross(e1, e2)) < 0.0)


def _rowdot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, y)


def _cuda_distance(V: np.ndarray, F: np.ndarray, P: np.ndarray, signed: bool) -> np.ndarray:
    import cubvh
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    bvh = cubvh.cuBVH(V.astype(np.float32), F.astype(np.int32))
    out = np.empty(len(P))
    for start in range(0, len(P), CUDA_BATCH):
        batch = torch.from_numpy(P[start : start + CUDA_BATCH].astype(np.float32)).to(device)  # (B, 3)
        if signed:
            # cubvh's sign convention is ours: negative inside.
            dist, _, _ = bvh.signed_distance(batch, return_uvw=False, mode=CUBVH_SIGN_MODE)
        else:
            dist, _, _ = bvh.unsigned_distance(batch, return_uvw=False)
        out[start : start + len(batch)] = dist.double().cpu().numpy()
    return out
