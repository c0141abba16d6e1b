"""Watertight remeshing: any triangle soup in, a closed, outward-oriented mesh out.

The dense baseline: unsigned distance on an R^3 grid over [-1, 1]^3, a thin shell `udf < eps`, a
flood fill from the corner to find the outside, the signed field `udf - eps` outside and negative
inside, marching cubes. Its surface sits eps outside the input everywhere.

What runs here does the same work where it matters and skips the rest:
- distances are exact, and computed only within a narrow band around the surface (CPU: numba kernels
  in `_narrowband`; CUDA: cubvh over the whole grid, when it is installed and a GPU is present);
- the flood fill moves through the empty bulk of the grid in whole blocks;
- marching cubes (PyMCubes) runs only on the blocks the surface crosses;
- parts that are already closed and consistently oriented keep their own surface (sign from their
  pseudo-normals) instead of growing by eps; open parts get the baseline's eps-offset shell. The
  union of all parts is taken with min(), so overlapping parts merge and every part is kept.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import mcubes
import numba
import numpy as np
import trimesh
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from shapeflow.geometry import _narrowband as nb
from shapeflow.geometry.mesh import edge_defects, edge_keys, face_volumes, half_edges

MC_BLOCK = 16  # marching-cubes block edge, in cells
BAND_VOXELS = 1.8  # band beyond eps, in grid steps: covers every cell a zero crossing can be in (sqrt 3)


class WatertightError(RuntimeError):
    """The remeshed surface failed its own checks (it is never written out then)."""


@dataclass(frozen=True)
class Parts:
    """Connected parts of a mesh and which of them are closed and consistently oriented."""

    faces: np.ndarray  # (F, 3) int64, closed parts re-oriented outward
    part: np.ndarray  # (F,) int32, closed part id per face, -1 for faces of open parts
    n_closed: int
    n_open: int


@dataclass(frozen=True)
class WatertightResult:
    vertices: np.ndarray  # (V, 3) float64, normalised space
    faces: np.ndarray  # (F, 3) int64, outward
    closed_parts: int  # input parts kept on their own surface
    open_parts: int  # input parts given the baseline's eps shell
    components: int  # connected components of the output
    sign_fallback: bool  # closed parts gave an inconsistent sign: the baseline's shell was used instead
    volume: float
    area: float
    backend: str


def grid_step(resolution: int) -> float:
    return 2.0 / (resolution - 1)


def _label_parts(vertices: np.ndarray, faces: np.ndarray):
    """Edge-connected parts: (part of each face, part has only paired opposite edges, part volume)."""
    n_faces = len(faces)
    start, stop = half_edges(faces)  # (3F,) each: edges ab, bc, ca per face
    keys, edge_id, counts = np.unique(edge_keys(start, stop, len(vertices)), return_inverse=True, return_counts=True)
    face_of = np.repeat(np.arange(n_faces), 3)
    # Faces and edges as one graph: parts are its connected components.
    graph = coo_matrix((np.ones(len(face_of)), (face_of, n_faces + edge_id)), shape=(n_faces + len(keys),) * 2)
    _, labels = connected_components(graph, directed=False)
    _, part_of_face = np.unique(labels[:n_faces], return_inverse=True)
    n_parts = part_of_face.max() + 1
    forward = np.bincount(edge_id, weights=(start < stop), minlength=len(keys))
    good_edge = (counts == 2) & (forward == 1)
    closed = np.ones(n_parts, bool)
    closed[part_of_face[face_of[~good_edge[edge_id]]]] = False
    volume = np.bincount(part_of_face, weights=face_volumes(vertices[faces]), minlength=n_parts)
    return part_of_face, closed, volume


def find_parts(vertices: np.ndarray, faces: np.ndarray, keep_closed: bool = True) -> Parts:
    """Split faces into edge-connected parts; a part is closed when every edge has exactly two faces
    with opposite directions and it encloses a volume. Closed parts turned inside out are flipped."""
    part_of_face, closed, volume = _label_parts(vertices, faces)
    extent = np.ptp(vertices, axis=0).max()
    open_part = ~closed | (np.abs(volume) <= 1e-9 * extent**3)
    if not keep_closed:
        open_part[:] = True
    faces = faces.copy()
    flip = (~open_part & (volume < 0))[part_of_face]
    faces[flip] = faces[flip][:, ::-1]
    closed_ids = np.cumsum(~open_part) - 1
    part = np.where(open_part[part_of_face], -1, closed_ids[part_of_face]).astype(np.int32)
    return Parts(faces=faces, part=part, n_closed=int((~open_part).sum()), n_open=int(open_part.sum()))


def _pseudo_normals(vertices: np.ndarray, faces: np.ndarray, part: np.ndarray):
    """Face, edge and angle-weighted vertex pseudo-normals per face corner, each part on its own."""
    tri = vertices[faces]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    face_n = cross / np.maximum(np.linalg.norm(cross, axis=1, keepdims=True), 1e-300)
    # Vertices shared by two parts get one normal per part: key each corner by (part, vertex).
    corner_key = (part.astype(np.int64)[:, None] + 1) * (len(vertices) + 1) + faces  # (F, 3)
    _, corner_id = np.unique(corner_key, return_inverse=True)
    corner_id = corner_id.reshape(faces.shape)
    angles = np.empty(faces.shape)
    for c in range(3):
        u = tri[:, (c + 1) % 3] - tri[:, c]
        w = tri[:, (c + 2) % 3] - tri[:, c]
        cos = np.einsum("ij,ij->i", u, w) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(w, axis=1), 1e-300)
        angles[:, c] = np.arccos(np.clip(cos, -1.0, 1.0))
    vert_sum = np.zeros((corner_id.max() + 1, 3))
    np.add.at(vert_sum, corner_id.ravel(), (angles[:, :, None] * face_n[:, None, :]).reshape(-1, 3))
    vert_n = vert_sum[corner_id]  # (F, 3, 3)
    n = len(vertices)
    edge_key = (np.repeat(part.astype(np.int64), 3) + 1) * n * n + edge_keys(*half_edges(faces), n)  # (part, edge)
    _, edge_id = np.unique(edge_key, return_inverse=True)
    edge_sum = np.zeros((edge_id.max() + 1, 3))
    np.add.at(edge_sum, edge_id, np.repeat(face_n, 3, axis=0))
    edge_n = edge_sum[edge_id].reshape(-1, 3, 3)
    return face_n, edge_n, vert_n


def _slabs(tris: np.ndarray, face_n: np.ndarray, resolution: int, h: float, r_band: float, n: int) -> np.ndarray:
    """x-slab bounds that give threads about equal work.

    A face's work is about the band points near it (its area over the dominant-axis cosine, times the
    band thickness), spread evenly over the x-columns it spans.
    """
    area = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    cos = np.abs(face_n).max(axis=1)
    work = (area / h**2 + 1.0) * (2 * r_band / h) / np.maximum(cos, 0.5) + 8.0
    x0 = np.clip(np.floor((tris[:, :, 0].min(axis=1) - r_band + 1.0) / h).astype(np.int64), 0, resolution - 1)
    x1 = np.clip(np.floor((tris[:, :, 0].max(axis=1) + r_band + 1.0) / h).astype(np.int64) + 1, 1, resolution)
    per_col = work / (x1 - x0)
    density = np.zeros(resolution + 1)
    np.add.at(density, x0, per_col)
    np.add.at(density, x1, -per_col)
    cum = np.cumsum(np.cumsum(density)[:resolution])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n) + 1
    inner = np.unique(np.clip(cuts, 1, resolution - 1))
    return np.concatenate([[0], inner, [resolution]]).astype(np.int64)


def band_field(vertices: np.ndarray, parts: Parts, resolution: int, eps: float, r_band: float):
    """The union field (see `_narrowband`) on the grid, exact within r_band of the surface."""
    h = grid_step(resolution)
    order = np.argsort(parts.part, kind="stable")
    faces = parts.faces[order]
    part = parts.part[order]
    face_n, edge_n, vert_n = _pseudo_normals(vertices, faces, part)
    tris = np.ascontiguousarray(vertices[faces], dtype=np.float64)
    val = np.full((resolution,) * 3, np.inf, np.float32)
    if parts.n_closed:
        cur = np.empty_like(val)
        stamp = np.full(val.shape, -1, np.int32)
    else:  # open parts only: the per-part scratch grids are never read
        cur = np.empty((1, 1, 1), np.float32)
        stamp = np.full((1, 1, 1), -1, np.int32)
    n_blocks = -(-resolution // nb.BLOCK)
    touched = np.zeros((n_blocks,) * 3, np.uint8)
    threads = numba.get_num_threads()
    slabs = _slabs(tris, face_n, resolution, h, r_band, 4 * threads)
    nb.band_field(tris, part, face_n, edge_n, vert_n, h, r_band, eps, slabs, val, cur, stamp, touched)
    return val, touched


def _mc_origins(touched: np.ndarray, resolution: int) -> np.ndarray:
    """Origins of the marching-cubes blocks whose corners include a point of a touched block."""
    tb = np.argwhere(touched)  # (T, 3)
    ratio = MC_BLOCK // nb.BLOCK
    # A block's first layer of points is also the last corner layer of the block before it, along
    # any of the axes where it starts a marching-cubes block: every combination of those steps back.
    first = (tb % ratio) == 0  # (T, 3)
    cand = [tb // ratio - np.array(step) * first for step in itertools.product((0, 1), repeat=3)]
    blocks = np.unique(np.concatenate(cand), axis=0)
    blocks = blocks[(blocks >= 0).all(axis=1)]
    origins = blocks * MC_BLOCK
    return origins[(origins < resolution - 1).all(axis=1)]


def _march_blocks(values: np.ndarray, origins: np.ndarray):
    """PyMCubes on each block with a sign change; vertices in grid-index units."""
    lo = values.reshape(len(values), -1).min(axis=1)
    hi = values.reshape(len(values), -1).max(axis=1)
    verts, faces = [], []
    for b in np.flatnonzero((lo < 0) & (hi > 0)):
        v, f = mcubes.marching_cubes(values[b], 0.0)
        if len(f) == 0:
            continue
        verts.append(v + origins[b])
        faces.append(f.astype(np.int64))
    return trimesh.util.append_faces(verts, faces)


def _weld(verts: np.ndarray, faces: np.ndarray, resolution: int):
    """Merge the vertex copies that neighbouring blocks both computed, drop collapsed faces.

    Every marching-cubes vertex lies on a grid edge, so (edge's lower corner, axis) is an exact key.
    """
    corner = np.floor(verts).astype(np.int64)  # (V, 3)
    frac = verts - corner
    axis = np.argmax(frac, axis=1)
    key = ((corner[:, 0] * resolution + corner[:, 1]) * resolution + corner[:, 2]) * 3 + axis
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return verts[first], faces


def _finish(verts_idx: np.ndarray, faces: np.ndarray, resolution: int) -> tuple:
    """Grid-index vertices from marching cubes -> a checked, outward, closed mesh in [-1, 1]^3."""
    h = grid_step(resolution)
    if len(faces) == 0:
        raise WatertightError("the surface vanished: no part of the object is thicker than the grid")
    verts_idx, faces = _weld(verts_idx, faces, resolution)
    faces = np.ascontiguousarray(faces[:, ::-1])  # PyMCubes orients triangles inward for a field negative inside
    verts = verts_idx * h - 1.0
    n = len(verts)
    graph = coo_matrix((np.ones(2 * len(faces)), (faces[:, [0, 1]].ravel(), faces[:, [1, 2]].ravel())), shape=(n, n))
    n_comp, comp = connected_components(graph, directed=False)
    volume = np.bincount(comp[faces[:, 0]], weights=face_volumes(verts[faces]), minlength=n_comp)
    # Marching cubes leaves a few stray fragments around isolated grid points that barely dip below
    # zero: drop every part smaller than one grid cell; no real part is that small at this resolution.
    keep = volume > h**3
    if not keep.all():
        faces = faces[keep[comp[faces[:, 0]]]]
        used, faces = np.unique(faces, return_inverse=True)
        verts, faces = verts[used], faces.reshape(-1, 3)
    if len(faces) == 0:
        raise WatertightError("only fragments smaller than one grid cell were left")
    if any(edge_defects(faces, len(verts)).values()):
        raise WatertightError("the remeshed surface is not closed (an edge without exactly one opposite twin)")
    return verts, faces, int(keep.sum())


def cubvh_available() -> bool:
    if importlib.util.find_spec("cubvh") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pick_backend(backend: str = "auto") -> str:
    if backend == "auto":
        return "cuda" if cubvh_available() else "cpu"
    if backend == "cuda" and not cubvh_available():
        raise WatertightError("backend 'cuda' asked for, but cubvh or a CUDA device is not available")
    return backend


def watertight(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int = 256,
    eps_voxels: float = 1.0,
    keep_closed_surface: bool = True,
    backend: str = "auto",
) -> WatertightResult:
    """A closed, outward-oriented remesh of a mesh already in normalised space ([-0.95, 0.95])."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        raise WatertightError("the mesh has no faces")
    if np.abs(vertices).max() > 1.0:
        raise WatertightError("vertices outside [-1, 1]^3: normalise the mesh first")
    h = grid_step(resolution)
    eps = eps_voxels * 2.0 / resolution
    r_band = eps + BAND_VOXELS * h
    backend = pick_backend(backend)
    parts = find_parts(vertices, faces, keep_closed_surface)
    val, touched, block_out, point_out = _field_and_outside(vertices, parts, resolution, eps, r_band, backend)
    fallback = bool(parts.n_closed) and nb.inner_edge_exposed(val, touched, block_out, point_out)
    if fallback:
        # A closed part folds through itself somewhere, so its pseudo-normal sign cannot be trusted:
        # give the whole object the baseline's eps shell, which needs no sign.
        parts = find_parts(vertices, faces, keep_closed=False)
        val, touched, block_out, point_out = _field_and_outside(vertices, parts, resolution, eps, r_band, backend)
    origins = _mc_origins(touched, resolution)
    values = nb.signed_blocks(val, touched, block_out, point_out, origins, MC_BLOCK, r_band, 1e-4 * h)
    del val, point_out
    verts_idx, mc_faces = _march_blocks(values, origins)
    verts, out_faces, n_comp = _finish(verts_idx, mc_faces, resolution)
    return _result(verts, out_faces, parts, n_comp, backend, fallback)


def _field_and_outside(vertices, parts: Parts, resolution: int, eps: float, r_band: float, backend: str):
    if backend == "cuda":
        val = _dense_field_cubvh(vertices, parts, resolution, eps, r_band)
        touched = _touched_blocks(val)
    else:
        val, touched = band_field(vertices, parts, resolution, eps, r_band)
    block_out, point_out = nb.flood_outside(val, touched)
    return val, touched, block_out, point_out


def _result(verts, faces, parts: Parts, n_comp: int, backend: str, fallback: bool) -> WatertightResult:
    tri = verts[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return WatertightResult(
        vertices=verts,
        faces=faces,
        closed_parts=parts.n_closed,
        open_parts=parts.n_open,
        components=n_comp,
        sign_fallback=fallback,
        volume=float(face_volumes(tri).sum()),
        area=float(0.5 * np.linalg.norm(cross, axis=1).sum()),
        backend=backend,
    )


def _touched_blocks(val: np.ndarray) -> np.ndarray:
    R = val.shape[0]
    n_blocks = -(-R // nb.BLOCK)
    pad = n_blocks * nb.BLOCK - R
    finite = np.pad(np.isfinite(val), ((0, pad),) * 3)
    return (
        finite.reshape(n_blocks, nb.BLOCK, n_blocks, nb.BLOCK, n_blocks, nb.BLOCK).any(axis=(1, 3, 5)).astype(np.uint8)
    )


def _grid_points(resolution: int) -> np.ndarray:
    x = np.linspace(-1.0, 1.0, resolution)
    return np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1).reshape(-1, 3)


def _dense_field_cubvh(vertices: np.ndarray, parts: Parts, resolution: int, eps: float, r_band: float):
    """The same union field as the CPU band, computed at every grid point on the GPU with cubvh."""
    import cubvh
    import torch

    points = torch.from_numpy(_grid_points(resolution)).float().cuda()
    field = torch.full((len(points),), float("inf"), device="cuda")
    groups = [(parts.part == -1, False)] + [(parts.part == p, True) for p in range(parts.n_closed)]
    for mask, closed in groups:
        if not mask.any():
            continue
        bvh = cubvh.cuBVH(vertices, parts.faces[mask])
        for chunk in torch.split(torch.arange(len(points), device="cuda"), 1 << 24):
            if closed:
                d, _, _ = bvh.signed_distance(points[chunk], return_uvw=False, mode="watertight")
                d = -d  # cubvh counts inside as positive
            else:
                d, _, _ = bvh.unsigned_distance(points[chunk], return_uvw=False)
                d = d - eps
            field[chunk] = torch.minimum(field[chunk], d)
    field[field.abs() > r_band] = float("inf")
    return field.reshape((resolution,) * 3).cpu().numpy()


def dense_baseline(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int,
    udf: Callable[[np.ndarray], np.ndarray],
    eps_voxels: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The dense baseline (module docstring): udf at all R^3 points with `udf`, shell, flood fill with
    scipy's labelling over the whole grid, marching cubes over the whole grid."""
    eps = eps_voxels * 2.0 / resolution
    h = grid_step(resolution)
    d = udf(_grid_points(resolution)).reshape((resolution,) * 3).astype(np.float32)
    labels, _ = ndimage.label(d >= eps)
    outside = labels == labels[0, 0, 0]
    del labels
    sdf = np.where(outside, d - eps, -np.abs(d - eps)).astype(np.float32)
    sdf[np.abs(sdf) < 1e-4 * h] = 1e-4 * h
    for face in (np.s_[0], np.s_[-1]):  # never inside on the grid's outer faces, as in signed_blocks
        for axis_view in (sdf[face], sdf[:, face], sdf[:, :, face]):
            np.maximum(axis_view, 1e-4 * h, out=axis_view)
    verts_idx, mc_faces = mcubes.marching_cubes(sdf, 0.0)
    verts, out_faces, _ = _finish(verts_idx, mc_faces.astype(np.int64), resolution)
    return verts, out_faces
