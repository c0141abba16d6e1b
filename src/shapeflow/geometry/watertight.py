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
  pseudo-normals) instead of growing by eps. The union of all parts is taken with min(), so
  overlapping parts merge and every part is kept.

Open parts are sorted face by face with the generalised winding number w of the open faces (Jacobson
et al. 2013), probed just off both sides of each face (`classify_open_faces`):
- a face with w ~ 0 on one side and ~ 1 on the other bounds a solid (a box missing its lid, a scan
  with gaps): the surface stays on the face, signed by its pseudo-normal after the face is turned
  to face out; near the rims, where that sign is unreliable, w decides;
- a face with the same side on both sides of it (a leaf, a sign, a cloth, a flat mesh) encloses
  nothing and keeps the baseline's eps shell: a closed slab about 2 eps thick;
- a face inside a solid on both sides is dropped.
Off the band, w of the bounding faces decides what the flood fill may enter: blocks whose corners
are all inside are never entered, and blocks where w crosses 1/2 get w on a grid of twice the step,
whose level 1/2 closes the holes (the cap across the lid of the box). w is evaluated with libigl's
fast winding number, only at those points.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import igl
import mcubes
import numba
import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from shapeflow.geometry import _narrowband as nb
from shapeflow.geometry.marching import MC_BLOCK, march_blocks, weld
from shapeflow.geometry.mesh import edge_defects, edge_keys, face_volumes, half_edges

BAND_VOXELS = 1.8  # band beyond eps, in grid steps: covers every cell a zero crossing can be in (sqrt 3)
INTERIOR = -3  # part id of an open face with a solid on both sides: no surface there
PROBE_STEPS = 0.5  # how far off a face, in grid steps, its two sides are probed for w
# Classification of an open face by c, the mean of w just off its two sides (w jumps by 1 across any
# face): about 0 for a sheet (-1/2 | +1/2), 1/2 for a solid's boundary (0 | 1), 3/2 inside (1 | 2).
SHEET_BELOW, INTERIOR_FROM = 0.25, 1.0


class WatertightError(RuntimeError):
    """The remeshed surface failed its own checks (it is never written out then)."""


@dataclass(frozen=True)
class Parts:
    """Connected parts of a mesh and which of them are closed and consistently oriented."""

    faces: np.ndarray  # (F, 3) int64, closed parts re-oriented outward
    # (F,) int32: closed part id per face; for faces of open parts nb.SHEET (-1), and after
    # `classify_open_faces` nb.BOUNDARY (-2, turned to face out) or INTERIOR (-3)
    part: np.ndarray
    n_closed: int
    n_open: int

    def count(self, kind: int) -> int:
        return int((self.part == kind).sum())


@dataclass(frozen=True)
class WatertightResult:
    vertices: np.ndarray  # (V, 3) float64, normalised space
    faces: np.ndarray  # (F, 3) int64, outward
    closed_parts: int  # input parts kept on their own surface
    open_parts: int  # input parts given the baseline's eps shell
    components: int  # connected components of the output
    sign_fallback: bool  # closed parts gave an inconsistent sign: they were treated as open parts
    inside_rule: str  # what decided the inside: "closed", "winding", "shell", joined by "+"
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


def winding_number(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Generalised winding number of the triangles `faces` at `points` (libigl's fast winding number)."""
    if len(points) == 0 or len(faces) == 0:
        return np.zeros(len(points))
    return igl.fast_winding_number(
        np.ascontiguousarray(vertices, np.float64),
        np.ascontiguousarray(faces, np.int64),
        np.ascontiguousarray(points, np.float64),
    )


@dataclass(frozen=True)
class Winding:
    """The winding number that decides inside (w > 1/2) for the bounding faces of open parts.

    Normally w of the bounding faces as `classify_open_faces` turned them (so a face the file has
    flipped does not count against its neighbours). For a surface that folds through itself, where
    one face can bound the solid on different sides along its length, |w| of the open faces as the
    file has them (`absolute`).
    """

    vertices: np.ndarray
    faces: np.ndarray
    absolute: bool = False

    def __call__(self, points: np.ndarray) -> np.ndarray:
        w = winding_number(self.vertices, self.faces, points)
        return np.abs(w) if self.absolute else w


def classify_open_faces(vertices: np.ndarray, parts: Parts, resolution: int) -> Parts:
    """Sort the open faces into sheets, boundaries of a solid (turned to face out) and interior faces.

    Each open face is probed at four points (its centroid and half-way from there to each corner),
    PROBE_STEPS grid steps off either side, with w of all open faces as the file orients them. A
    label needs three of the four probes; otherwise the face stays a sheet, the rule that never
    loses a surface.
    """
    open_ = np.flatnonzero(parts.part == nb.SHEET)
    if len(open_) == 0:
        return parts
    faces = parts.faces[open_]
    tri = vertices[faces]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal = cross / np.maximum(np.linalg.norm(cross, axis=1, keepdims=True), 1e-300)
    centre = tri.mean(axis=1)
    base = np.concatenate([centre[:, None], (centre[:, None] + tri) / 2], axis=1)  # (F, 4, 3)
    off = PROBE_STEPS * grid_step(resolution) * normal[:, None, :]
    w = winding_number(vertices, faces, np.concatenate([base + off, base - off]).reshape(-1, 3))
    w_front, w_back = w.reshape(2, len(faces), 4)
    mean = np.abs(w_front + w_back) / 2
    votes_boundary = ((mean >= SHEET_BELOW) & (mean < INTERIOR_FROM)).sum(axis=1)
    votes_interior = (mean >= INTERIOR_FROM).sum(axis=1)
    part = parts.part.copy()
    out_faces = parts.faces.copy()
    boundary = votes_boundary >= 3
    interior = ~boundary & (votes_interior >= 3)
    part[open_[boundary]] = nb.BOUNDARY
    part[open_[interior]] = INTERIOR
    # A boundary face faces out when the solid (the larger |w|) lies behind it.
    backwards = boundary & (np.abs(w_front).sum(axis=1) > np.abs(w_back).sum(axis=1))
    out_faces[open_[backwards]] = out_faces[open_[backwards]][:, ::-1]
    return replace(parts, faces=out_faces, part=part)


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
    """The union field (see `_narrowband`) on the grid, exact within r_band of the surface: (val,
    pval, touched), where pval holds the bounding faces' signed distances (a 1^3 grid when there are
    none) and is not yet in val."""
    h = grid_step(resolution)
    keep = parts.part != INTERIOR
    order = np.argsort(parts.part[keep], kind="stable")
    faces = parts.faces[keep][order]
    part = parts.part[keep][order]
    face_n, edge_n, vert_n = _pseudo_normals(vertices, faces, part)
    tris = np.ascontiguousarray(vertices[faces], dtype=np.float64)
    val = np.full((resolution,) * 3, np.inf, np.float32)
    scratch = (1, 1, 1)  # grids the kernel never reads when there is nothing of their kind
    shape = val.shape if parts.n_closed else scratch
    cur = np.empty(shape, np.float32)
    stamp = np.full(shape, -1, np.int32)
    pval = np.full(val.shape if parts.count(nb.BOUNDARY) else scratch, np.inf, np.float32)
    n_blocks = -(-resolution // nb.BLOCK)
    touched = np.zeros((n_blocks,) * 3, np.uint8)
    threads = numba.get_num_threads()
    slabs = _slabs(tris, face_n, resolution, h, r_band, 4 * threads)
    nb.band_field(tris, part, face_n, edge_n, vert_n, h, r_band, eps, slabs, val, cur, stamp, pval, touched)
    return val, pval, touched


def _rim_segments(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(S, 2, 3) edges of `faces` other than those shared by exactly two faces running opposite ways:
    rims, and edges where the faces do not form an oriented surface."""
    start, stop = half_edges(faces)
    _, edge_id, counts = np.unique(edge_keys(start, stop, len(vertices)), return_inverse=True, return_counts=True)
    forward = np.bincount(edge_id, weights=(start < stop), minlength=len(counts))
    bad_edge = ~((counts == 2) & (forward == 1))
    _, first = np.unique(edge_id, return_index=True)
    pick = first[bad_edge]
    return np.stack([vertices[start[pick]], vertices[stop[pick]]], axis=1)


def _sign_rims(winding: Winding, parts: Parts, pval: np.ndarray, resolution: int, r_band: float) -> np.ndarray:
    """Re-sign by w the points of pval whose closest surface point may be on a rim; returns the
    blocks (BLOCK^3 points each) that hold such points."""
    n_blocks = -(-resolution // nb.BLOCK)
    seg = _rim_segments(winding.vertices, parts.faces[parts.part == nb.BOUNDARY])
    if len(seg) == 0:
        return np.zeros((n_blocks,) * 3, bool)
    mask = np.zeros(pval.shape, np.uint8)
    nb.mark_rims(np.ascontiguousarray(seg), grid_step(resolution), r_band, pval, mask)
    _sign_by_winding(winding, pval, np.flatnonzero(mask))
    return _block_any(mask.astype(bool), n_blocks)


def _sign_by_winding(winding: Winding, pval: np.ndarray, idx: np.ndarray) -> None:
    """Give the points `idx` (flat indices) of pval the sign w says: negative where w > 1/2."""
    points = np.stack(np.unravel_index(idx, pval.shape), axis=1) * grid_step(pval.shape[0]) - 1.0
    inside = winding(points) > 0.5
    flat = pval.reshape(-1)
    flat[idx] = np.where(inside, -np.abs(flat[idx]), np.abs(flat[idx]))


def _block_any(mask: np.ndarray, n_blocks: int) -> np.ndarray:
    """(n_blocks,)^3: whether any point of each BLOCK^3 block of the R^3 `mask` is set."""
    pad = n_blocks * nb.BLOCK - mask.shape[0]
    padded = np.pad(mask, ((0, pad),) * 3)
    b = nb.BLOCK
    return padded.reshape(n_blocks, b, n_blocks, b, n_blocks, b).any(axis=(1, 3, 5))


def winding_off_band(
    winding: Winding,
    val: np.ndarray,
    pval: np.ndarray,
    touched: np.ndarray,
    rim_blocks: np.ndarray,
    r_band: float,
) -> np.ndarray:
    """Let w of the bounding faces decide off the band where the flood fill would otherwise leak in
    through a hole; returns block_in (untouched blocks inside a solid: never entered).

    w is taken at the corners of every block (a lattice of BLOCK steps). Untouched blocks with all
    corners inside are `block_in`; those with all outside stay as they are. A hole's cap starts at
    its rim and crosses the rest of the grid in blocks whose corners disagree, so these get w on a
    lattice of 2 steps, interpolated to their points: untouched blocks whose corners disagree, and
    touched blocks with a corner or a band point inside that lie next to a rim or hold no bounding
    face's band. Their off-band points take clip((1/2 - w) * 4 r_band, +-r_band), whose zero level
    is the cap, and the blocks become touched (nb.CAPPED). Elsewhere an off-band point of a touched block is
    left to the flood fill: it cannot get there without crossing the band or a cap. Modifies val
    and touched.
    """
    R = val.shape[0]
    n_blocks = touched.shape[0]
    h = grid_step(R)
    step = nb.BLOCK // 2  # lattice points per block edge on the 2-step lattice
    size = max(-(-(R - 1) // 2), step * n_blocks) + 1
    lattice = np.full((size,) * 3, np.nan)

    def fill(index: tuple) -> None:  # index: arrays of 2-step lattice coordinates
        need = np.zeros(lattice.shape, bool)
        need[index] = True
        need &= np.isnan(lattice)
        todo = np.argwhere(need)
        lattice[tuple(todo.T)] = winding(todo * (2 * h) - 1.0)

    corner = np.arange(n_blocks + 1) * step
    fill(np.ix_(corner, corner, corner))
    inside = lattice[np.ix_(corner, corner, corner)] > 0.5
    n_in = sum(
        inside[di : di + n_blocks, dj : dj + n_blocks, dk : dk + n_blocks].astype(np.int8)
        for di, dj, dk in itertools.product((0, 1), repeat=3)
    )
    is_touched = touched.astype(bool)
    block_in = ~is_touched & (n_in == 8)
    has_pval = pval.shape == val.shape
    negative = _block_any(pval < 0, n_blocks) if has_pval else np.zeros_like(is_touched)
    bounded = _block_any(np.isfinite(pval), n_blocks) if has_pval else np.zeros_like(is_touched)
    near_rim = ndimage.binary_dilation(rim_blocks, np.ones((3, 3, 3), bool))
    mixed = (n_in > 0) & (n_in < 8)
    refine = np.argwhere(
        (~is_touched & mixed) | (is_touched & (mixed | negative | (n_in == 8)) & (near_rim | ~bounded))
    )
    if len(refine):
        offsets = np.stack(np.meshgrid(*[np.arange(step + 1)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
        index = (refine[:, None, :] * step + offsets[None]).reshape(-1, 3)
        fill(tuple(index.T))
        coarse = lattice[tuple(index.T)].reshape(len(refine), step + 1, step + 1, step + 1)
        fine = _upsample2(coarse)[:, : nb.BLOCK, : nb.BLOCK, : nb.BLOCK]  # (n, BLOCK, BLOCK, BLOCK)
        cap = np.clip((0.5 - fine) * 4.0 * r_band, -r_band, r_band).astype(np.float32)
        b = nb.BLOCK
        for (bi, bj, bk), values in zip(refine, cap, strict=True):
            view = val[bi * b : (bi + 1) * b, bj * b : (bj + 1) * b, bk * b : (bk + 1) * b]
            np.copyto(view, values[: view.shape[0], : view.shape[1], : view.shape[2]], where=~np.isfinite(view))
        touched[tuple(refine.T)] = nb.CAPPED
    return block_in.astype(np.uint8)


def _upsample2(coarse: np.ndarray) -> np.ndarray:
    """(n, m, m, m) values on a lattice of 2 steps -> (n, 2m-1, 2m-1, 2m-1) by linear interpolation."""
    out = coarse
    for axis in (1, 2, 3):
        m = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = 2 * m - 1
        up = np.empty(shape)
        even = [slice(None)] * 4
        odd = [slice(None)] * 4
        even[axis] = slice(0, None, 2)
        odd[axis] = slice(1, None, 2)
        up[tuple(even)] = out
        up[tuple(odd)] = 0.5 * (np.take(out, range(m - 1), axis=axis) + np.take(out, range(1, m), axis=axis))
        out = up
    return out


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


def _finish(verts_idx: np.ndarray, faces: np.ndarray, resolution: int) -> tuple:
    """Grid-index vertices from marching cubes -> a checked, outward, closed mesh in [-1, 1]^3."""
    h = grid_step(resolution)
    if len(faces) == 0:
        raise WatertightError("the surface vanished: no part of the object is thicker than the grid")
    verts_idx, faces = weld(verts_idx, faces, resolution)
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
    winding: bool = True,
    backend: str = "auto",
) -> WatertightResult:
    """A closed, outward-oriented remesh of a mesh already in normalised space ([-0.95, 0.95]).

    `winding=False` gives every open face the eps shell (the rule before the winding number).
    Fallbacks, each recorded in the result: closed parts that fold through themselves (their
    pseudo-normal sign lets the flood fill in behind the surface) are redone as open parts, which
    the winding number sorts out; if the sign still fails, or nothing thicker than the grid is left
    (a closed box thinner than a grid step), every face gets the eps shell.
    """
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

    def attempt(keep_closed: bool, folded: bool):
        parts = find_parts(vertices, faces, keep_closed)
        winding_rule = None
        if winding:
            as_given = parts.faces[parts.part == nb.SHEET]
            parts = classify_open_faces(vertices, parts, resolution)
            turned = parts.faces[parts.part == nb.BOUNDARY]
            winding_rule = Winding(vertices, as_given, absolute=True) if folded else Winding(vertices, turned)
        return parts, _field_and_outside(vertices, parts, winding_rule, resolution, eps, r_band, backend)

    parts, field = attempt(keep_closed_surface, folded=False)
    fallback = False
    if (parts.n_closed or parts.count(nb.BOUNDARY)) and nb.inner_edge_exposed(*field):
        # Some surface folds through itself, so a pseudo-normal sign cannot be trusted: w decides
        # the side of every point near a bounding face.
        fallback = bool(parts.n_closed)
        parts, field = attempt(False, folded=True)
        if parts.count(nb.BOUNDARY) and nb.inner_edge_exposed(*field):
            winding = False
            parts, field = attempt(False, folded=True)
    try:
        verts, out_faces, n_comp = _surface(field, resolution, r_band)
    except WatertightError:
        if parts.n_closed == 0 and parts.count(nb.BOUNDARY) == 0:
            raise
        winding = False  # nothing thicker than the grid: a slab
        parts, field = attempt(False, folded=False)
        verts, out_faces, n_comp = _surface(field, resolution, r_band)
    return _result(verts, out_faces, parts, n_comp, backend, fallback)


def _surface(field: tuple, resolution: int, r_band: float):
    val, touched, block_out, point_out = field
    h = grid_step(resolution)
    origins = _mc_origins(touched, resolution)
    values = nb.signed_blocks(val, touched, block_out, point_out, origins, MC_BLOCK, r_band, 1e-4 * h)
    verts_idx, mc_faces = march_blocks(values, origins)
    return _finish(verts_idx, mc_faces, resolution)


def _field_and_outside(
    vertices, parts: Parts, winding: Winding | None, resolution: int, eps: float, r_band: float, backend: str
):
    """(val, touched, block_out, point_out): the union field and what the flood fill reached."""
    if backend == "cuda":
        val, pval = _dense_field_cubvh(vertices, parts, resolution, eps, r_band)
    else:
        val, pval, touched = band_field(vertices, parts, resolution, eps, r_band)
    n_blocks = -(-resolution // nb.BLOCK)
    block_in = np.zeros((n_blocks,) * 3, np.uint8)
    if winding is not None and parts.count(nb.BOUNDARY):
        rim_blocks = _sign_rims(winding, parts, pval, resolution, r_band)
        if winding.absolute or backend == "cuda":  # cubvh gives no pseudo-normal sign
            _sign_by_winding(winding, pval, np.flatnonzero(np.isfinite(pval)))
        np.minimum(val, pval, out=val)
        if backend == "cuda":
            touched = _touched_blocks(val)
        block_in = winding_off_band(winding, val, pval, touched, rim_blocks, r_band)
    elif backend == "cuda":
        touched = _touched_blocks(val)
    del pval
    block_out, point_out = nb.flood_outside(val, touched, block_in)
    return val, touched, block_out, point_out


def _result(verts, faces, parts: Parts, n_comp: int, backend: str, fallback: bool) -> WatertightResult:
    tri = verts[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    rules = [
        name
        for name, used in (
            ("closed", parts.n_closed),
            ("winding", parts.count(nb.BOUNDARY)),
            ("shell", parts.count(nb.SHEET)),
        )
        if used
    ]
    return WatertightResult(
        vertices=verts,
        faces=faces,
        closed_parts=parts.n_closed,
        open_parts=parts.n_open,
        components=n_comp,
        sign_fallback=fallback,
        inside_rule="+".join(rules),
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
    """The same union field as the CPU band, computed at every grid point on the GPU with cubvh:
    (val, pval), pval holding the bounding faces' unsigned distances (the caller signs them by w)."""
    import cubvh
    import torch

    points = torch.from_numpy(_grid_points(resolution)).float().cuda()
    field = torch.full((len(points),), float("inf"), device="cuda")
    bounding = torch.full((len(points),), float("inf"), device="cuda") if parts.count(nb.BOUNDARY) else None
    groups = [(parts.part == nb.SHEET, "sheet"), (parts.part == nb.BOUNDARY, "boundary")]
    groups += [(parts.part == p, "closed") for p in range(parts.n_closed)]
    for mask, kind in groups:
        if not mask.any():
            continue
        bvh = cubvh.cuBVH(vertices, parts.faces[mask])
        for chunk in torch.split(torch.arange(len(points), device="cuda"), 1 << 24):
            if kind == "closed":
                d, _, _ = bvh.signed_distance(points[chunk], return_uvw=False, mode="watertight")
                field[chunk] = torch.minimum(field[chunk], -d)  # cubvh counts inside as positive
            elif kind == "sheet":
                d, _, _ = bvh.unsigned_distance(points[chunk], return_uvw=False)
                field[chunk] = torch.minimum(field[chunk], d - eps)
            else:
                d, _, _ = bvh.unsigned_distance(points[chunk], return_uvw=False)
                bounding[chunk] = d
    field[field.abs() > r_band] = float("inf")
    val = field.reshape((resolution,) * 3).cpu().numpy()
    if bounding is None:
        return val, np.full((1, 1, 1), np.inf, np.float32)
    bounding[bounding > r_band] = float("inf")
    return val, bounding.reshape((resolution,) * 3).cpu().numpy()


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
