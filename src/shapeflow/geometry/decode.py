"""From a learned signed-distance field to a mesh (how close it is to a reference: shapeflow.metrics).

One helper for every stage that decodes: validation in train_vae, evaluate, sample export. The field
is any callable mapping query points (Q, 3) in normalised space to signed distances (Q,), negative
inside.

Decoding is hierarchical. The field is evaluated on a coarse grid (32^3 for the usual sizes), then
the resolution doubles level by level up to the one asked for; at each level only the cells that
the surface may cross are split and their new corners evaluated, and everywhere else the fine grid
takes the coarse values by trilinear interpolation, whose sign is all marching cubes needs away from
the surface. The number of field queries grows about as R^2 instead of R^3.

A cell is split when its corners change sign, or when a corner has |f| under the margin, `slope`
times half the cell's diagonal, and the balls about its corners, of radius |f| / L, do not cover the
cell. L is the larger of `slope` and the steepest change per unit length along the edges of the cell
and of the 26 around it: where a learned field is steeper than `slope`, the balls shrink. The cover
is tested on COVER_PARTS^3 sub-cells, each of which has to lie whole in one ball, and only from the
COVER_MIN_LEVEL level on: in a cell twice as wide, the default VAE's table has a bubble one 128^3
grid point across, where the field reads -0.003 within 0.7 cell of a corner reading +0.084, that the
corners' balls cover; below that level the margin alone decides. At the last level only the signs
at its grid points matter, so there a cell is not split outright: its new grid points outside every
ball are evaluated first (`_probe_cells`), and the cell is split only if one of them has a sign its
corners do not; every other point lies in a ball, so has that ball's centre's sign. A point next to
a corner nearly on the surface is probed too, when that corner's ball reaches less than
NEAREST_REACH of the way to it: there the learned field can fold back within half a cell. On the
default VAE's lamp an edge from -0.0187 to -0.0014 reads +0.0014 at its middle, a slope 2.4 times
the one its neighbourhood's edges show, and the far corner's ball held that point.

The guarantee: if the field changes by at most `slope` per unit length, a point p of the surface in
a cell has a corner within half a diagonal, so under the margin, and |f(c)| <= slope * |p - c| at
every corner c, so p lies in no ball, its sub-cell is not covered and the cell is split. So every
cell that holds surface is split at every level but the last, its children's corners are the
field's own values, and everywhere else the sign is right. At the last level a grid point whose sign
differs from its cell's corners lies in no ball either, so it is probed and the cell split: every
cell of the finest grid whose corners change sign lies in a split cell. The grid's signs are the
dense grid's, the values at the corners of the cells the surface crosses are the field's own, and
the mesh is the dense grid's. A true signed distance has slope 1, the default.

A learned field only approximates a distance: on the Quaternius VAE its slope along grid edges near
the surface is about 0.2-0.5 at the median, 1.6-2.5 at the 99th percentile and up to 9 near thin
parts, so the margin alone is no proof for it. After each level's queries the decoder therefore
follows the surface (`follow`): where a face between a split cell and one that is not has grid
values of both signs, the surface leaves the split cells there, and the cell beyond is split too,
repeatedly, from the cells just split. The cells a piece of surface crosses are joined through
faces whose corners change sign, so once one of them is split the whole piece is found, whatever
the slope; what the margin has to catch is only a piece none of whose cells shows up at the
coarser levels (a thin part far from the rest).
`dilate` (off by default) also splits the neighbours of every crossed cell, the rule before `follow`.
The margin has to stay under the truncation the VAE learns (0.1 by default: far from the surface a
learned field reads about +-0.1), so the coarsest level has at least `MIN_BASE` cells along an axis.

Marching cubes runs only on the blocks whose values change sign (shapeflow.geometry.marching, shared
with the watertight stage).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

from shapeflow.geometry.marching import MC_BLOCK, crosses, march_blocks, weld

FieldFn = Callable[[torch.Tensor], torch.Tensor]

BOUND = 1.0  # the grid covers [-BOUND, BOUND]^3
MIN_BASE = 32  # the coarsest level: its margin (0.054 at slope 1) under the learned truncation
SLOPE = 1.0  # assumed bound on the field's change per unit length (see the module docstring)
# Queries per field call. On a CPU the local decoder's per-(query, neighbour) tensors should stay in
# cache: 2,048 queries ran 2.8x faster than 65,536 on one core. A GPU wants the largest batch that
# fits: a quarter of its free memory at QUERY_BYTES a query (the local decoder's default preset holds
# about 8 tensors of 8 neighbours x 128 channels per query in float32), within the GPU bounds.
CPU_CHUNK = 2048
GPU_CHUNK_BOUNDS = (1 << 14, 1 << 19)
QUERY_BYTES = 8 * 8 * 128 * 4
_CORNERS = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]
COVER_PARTS = 4  # sub-cells a side in the test that balls about a cell's corners cover it
# The cover test starts at this level (cells 2/128 wide): a wider cell can hide a bubble of a learned
# field that its corners' values give no sign of (module docstring).
COVER_MIN_LEVEL = 128


def default_chunk(device: torch.device | str) -> int:
    """Queries per field call on `device` (see CPU_CHUNK and GPU_CHUNK_BOUNDS)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    low, high = GPU_CHUNK_BOUNDS
    fits = free // 4 // QUERY_BYTES
    return int(min(high, max(low, 1 << max(int(fits).bit_length() - 1, 0))))


def grid_coordinates(resolution: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (resolution + 1) grid positions per axis over [-BOUND, BOUND]."""
    return torch.linspace(-BOUND, BOUND, resolution + 1, device=device)


@torch.no_grad()
def evaluate_points(field: FieldFn, points: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """field over `points` (Q, 3) in chunks of `chunk` queries (default: by device), as float32 (Q,)."""
    chunk = chunk or default_chunk(points.device)
    return torch.cat([field(part).float() for part in points.split(chunk)]) if len(points) else points.new_zeros(0)


def base_resolution(resolution: int) -> int:
    """The coarsest level for `resolution`: halved while it stays a whole number >= MIN_BASE."""
    base = resolution
    while base % 2 == 0 and base // 2 >= MIN_BASE:
        base //= 2
    return base


@torch.no_grad()
def decode_grid(
    field: FieldFn,
    resolution: int,
    chunk: int | None = None,
    device: torch.device | str = "cpu",
    base: int | None = None,
    slope: float = SLOPE,
    dilate: bool = False,
    follow: bool = True,
    cover: bool = True,
) -> np.ndarray:
    """Signed distances at the (resolution + 1)^3 grid points, float32 numpy array: exact where the
    surface may be, interpolated from a coarser level elsewhere.

    `base` is the coarsest level, evaluated densely (default: `base_resolution`); resolution must be
    base times a power of two. base == resolution is the dense grid, resolution // 2 a single
    refinement. `slope`, `dilate`, `follow` and `cover`: the splitting rule (module docstring)."""
    base = base or base_resolution(resolution)
    levels = resolution // base
    if base < 1 or resolution % base or levels & (levels - 1):
        raise ValueError(f"decode: resolution {resolution} is not base {base} times a power of two")
    chunk = chunk or default_chunk(device)
    axis = grid_coordinates(base, device)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    values = evaluate_points(field, points, chunk).reshape((base + 1,) * 3)
    exact = torch.ones_like(values, dtype=torch.bool)  # which grid points hold the field's own value
    res = base
    while res < resolution:
        # Cells of this level the surface may cross: a sign change or a corner within the margin.
        lo, hi = _cell_range(values)
        margin = slope * 0.5 * (2 * BOUND / res) * 3**0.5
        crossed = (lo < 0) & (hi > 0)
        split = (lo < margin) & (hi > -margin)  # a corner within the margin, or a sign change
        del lo, hi
        # Of the cells with a corner under the margin, those the balls about their corners cover
        # hold no surface.
        near = (split & ~crossed).nonzero() if cover and res >= COVER_MIN_LEVEL else None
        probe = None
        if near is not None and len(near):
            width = 2 * BOUND / res
            local = _steepness(values)[near[:, 0], near[:, 1], near[:, 2]] / width
            corners = torch.stack([values[near[:, 0] + i, near[:, 1] + j, near[:, 2] + k] for i, j, k in _CORNERS], 1)
            radii = corners.abs() / local.clamp(min=slope)[:, None]  # (K, 8)
            if res * 2 == resolution:
                # The last level: only the signs at its grid points count, so these cells are split
                # only if one of their new points outside the balls turns out to have the other sign.
                split[near[:, 0], near[:, 1], near[:, 2]] = False
                probe = (near, _uncovered_points(radii, width))
            else:
                near = near[_covered(radii, width)]
                split[near[:, 0], near[:, 1], near[:, 2]] = False
        del near
        if dilate:
            crossed = F.max_pool3d(crossed[None, None].float(), 3, 1, 1)[0, 0] > 0
        split |= crossed
        del crossed
        res *= 2
        values = F.interpolate(values[None, None], size=(res + 1,) * 3, mode="trilinear", align_corners=True)[0, 0]
        coarse_exact, exact = exact, torch.zeros((res + 1,) * 3, dtype=torch.bool, device=values.device)
        exact[::2, ::2, ::2] = coarse_exact
        del coarse_exact
        if probe is not None:
            _probe_cells(field, values, exact, split, *probe, res, chunk)
            del probe
        if not split.any():
            continue
        # Every corner of the new cells inside a split cell that does not hold an exact value yet.
        cells = split.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        mask = torch.zeros((res + 1,) * 3, dtype=torch.bool, device=values.device)
        for i, j, k in _CORNERS:
            mask[i : res + i, j : res + j, k : res + k] |= cells
        del cells
        idx = (mask & ~exact).nonzero()  # (P, 3)
        del mask
        _evaluate_at(field, values, exact, idx, res, chunk)
        del idx
        if follow:
            _follow_surface(field, values, exact, split, res, chunk)
        del split
    return values.cpu().numpy()


def _cover_distances(parts: int) -> torch.Tensor:
    """(parts^3, 8): the farthest distance, in cell widths, from each corner of a cell to each of the
    parts^3 sub-cells it is cut into."""
    span = torch.arange(parts, dtype=torch.float64) / parts
    low = torch.cartesian_prod(span, span, span)[:, None]  # (parts^3, 1, 3)
    corners = torch.tensor(_CORNERS, dtype=torch.float64)
    far = torch.maximum((low - corners).abs(), (low + 1 / parts - corners).abs())
    return far.square().sum(-1).sqrt().float()


_COVER = _cover_distances(COVER_PARTS)


def _cell_range(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least and the greatest of the 8 corner values of each cell of the grid `values`
    (R + 1)^3: two (R, R, R) tensors."""
    r = values.shape[0] - 1
    views = [values[i : r + i, j : r + j, k : r + k] for i, j, k in _CORNERS]
    lo, hi = torch.minimum(views[0], views[1]), torch.maximum(views[0], views[1])
    for view in views[2:]:
        torch.minimum(lo, view, out=lo)
        torch.maximum(hi, view, out=hi)
    return lo, hi


def _steepness(values: torch.Tensor) -> torch.Tensor:
    """Per cell of the grid `values` (R + 1)^3: the largest change of value along an edge of the cell
    or of the 26 around it, (R, R, R). Element-wise maxima of shifted views (max_pool3d took 6x as
    long on a CPU)."""
    r = values.shape[0] - 1
    cells = None
    for axis in range(3):
        change = (values.narrow(axis, 1, r) - values.narrow(axis, 0, r)).abs()
        for other in (a for a in range(3) if a != axis):  # the cell's 4 edges along this axis
            change = torch.maximum(change.narrow(other, 0, r), change.narrow(other, 1, r))
        cells = change if cells is None else torch.maximum(cells, change)
    for axis in range(3):  # and the 26 cells around
        near = cells.clone()
        inner = near.narrow(axis, 1, r - 1)
        torch.maximum(inner, cells.narrow(axis, 0, r - 1), out=inner)
        inner = near.narrow(axis, 0, r - 1)
        torch.maximum(inner, cells.narrow(axis, 1, r - 1), out=inner)
        cells = near
    return cells


def _covered(radii: torch.Tensor, width: float) -> torch.Tensor:
    """Whether the balls of radii (K, 8) about a cell's corners (in _CORNERS order) cover the cell,
    for K cells of `width`: each sub-cell (COVER_PARTS a side) has to lie whole in one of them.
    In parts of 2^16 cells, so the (cells, sub-cells, corners) comparison stays small."""
    reach = _COVER.to(radii.device) * width
    return torch.cat([(part[:, None, :] > reach).any(2).all(1) for part in radii.split(1 << 16)])


_SPAN = torch.stack(torch.meshgrid(*[torch.arange(3)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
_MIDDLE = _SPAN[(_SPAN == 1).any(1)]  # (19, 3): a coarse cell's fine grid points that are not its corners
# (19, 8): the distance, in coarse cell widths, from each of them to each corner
_MIDDLE_REACH = (_MIDDLE[:, None, :] / 2 - torch.tensor(_CORNERS)).square().sum(-1).sqrt().float()
_NEAREST = _MIDDLE_REACH < _MIDDLE_REACH.amin(1, keepdim=True) + 1e-6  # (19, 8): each point's nearest corners
# A point is also probed when the ball of one of its nearest corners reaches less than this share of
# the way to it (module docstring).
NEAREST_REACH = 0.25


def _uncovered_points(radii: torch.Tensor, width: float) -> torch.Tensor:
    """(K, 19) bool: which of the _MIDDLE points of K cells of `width` to probe: those in none of the
    balls of radii (K, 8) about the cells' corners, and those next to a corner nearly on the
    surface (its ball reaches less than NEAREST_REACH of the way to them)."""
    reach = _MIDDLE_REACH.to(radii.device) * width
    nearest = _NEAREST.to(radii.device)
    parts = []
    for part in radii.split(1 << 16):
        inside = part[:, None, :] > reach  # (k, 19, 8)
        short = (part[:, None, :] <= NEAREST_REACH * reach) & nearest
        parts.append(~inside.any(2) | short.any(2))
    return torch.cat(parts)


def _probe_cells(
    field: FieldFn,
    values: torch.Tensor,
    exact: torch.Tensor,
    split: torch.Tensor,
    cells: torch.Tensor,
    uncovered: torch.Tensor,
    res: int,
    chunk: int,
) -> None:
    """Evaluate the uncovered points (K, 19) of coarse cells (K, 3) of level res / 2, and mark as
    split (in `split`) the cells where a point found this way has a sign their corners do not have.

    Every other point of such a cell lies in a ball whose centre has its sign, so when no probed
    point changes sign, no cell of the res-level grid inside changes sign either."""
    points = 2 * cells[:, None, :] + _MIDDLE.to(cells.device)  # (K, 19, 3)
    size = res + 1
    flat = torch.unique(((points[..., 0] * size + points[..., 1]) * size + points[..., 2])[uncovered])
    flat = flat[~exact.view(-1)[flat]]
    _evaluate_at(
        field, values, exact, torch.stack([flat // (size * size), flat // size % size, flat % size], dim=1), res, chunk
    )
    every = 2 * cells[:, None, :] + _SPAN.to(cells.device)  # (K, 27, 3): corners and new points
    seen = values[every[..., 0], every[..., 1], every[..., 2]]
    changed = cells[(seen > 0).any(1) & (seen < 0).any(1)]
    split[changed[:, 0], changed[:, 1], changed[:, 2]] = True


_STEPS = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])  # face neighbours


def _face_points(step: torch.Tensor) -> torch.Tensor:
    """The 3 x 3 grid points (9, 3) of a coarse cell's face towards `step`, from the cell's first fine
    point: on the step's side along its axis, spanning the other two axes."""
    axis = int(step.abs().argmax())
    others = [a for a in range(3) if a != axis]
    span = torch.arange(3)
    grid_a, grid_b = torch.meshgrid(span, span, indexing="ij")
    face = torch.zeros(9, 3, dtype=torch.long)
    face[:, others[0]], face[:, others[1]] = grid_a.reshape(-1), grid_b.reshape(-1)
    face[:, axis] = 2 if step[axis] > 0 else 0
    return face


_FACES = torch.stack([_face_points(step) for step in _STEPS])  # (6, 9, 3)


def _evaluate_at(
    field: FieldFn, values: torch.Tensor, exact: torch.Tensor, idx: torch.Tensor, res: int, chunk: int
) -> None:
    """The field at grid points idx (P, 3) of the res-level grid, written into values and marked exact.
    The points go in Z order, so each chunk of queries holds points close together (the local
    decoder then compares each with fewer tokens)."""
    idx = idx[_z_order(idx).argsort()]
    values[idx[:, 0], idx[:, 1], idx[:, 2]] = evaluate_points(field, grid_coordinates(res, values.device)[idx], chunk)
    exact[idx[:, 0], idx[:, 1], idx[:, 2]] = True


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """The low 21 bits of v (int64) moved to every third bit (bit b to bit 3b)."""
    v = v & 0x1FFFFF
    v = (v | (v << 32)) & 0x1F00000000FFFF
    v = (v | (v << 16)) & 0x1F0000FF0000FF
    v = (v | (v << 8)) & 0x100F00F00F00F00F
    v = (v | (v << 4)) & 0x10C30C30C30C30C3
    return (v | (v << 2)) & 0x1249249249249249


def _z_order(idx: torch.Tensor) -> torch.Tensor:
    """Morton codes of grid indices (P, 3): sorted by them, points along the order stay close in
    space."""
    return (_spread_bits(idx[:, 0]) << 2) | (_spread_bits(idx[:, 1]) << 1) | _spread_bits(idx[:, 2])


def _unique_rows(cells: torch.Tensor, size: int) -> torch.Tensor:
    """The distinct rows of cells (K, 3) with entries in [0, size), in C order: a 1-D unique of their
    flat indices (torch.unique(dim=0) took 25x as long on 10^6 rows)."""
    flat = torch.unique(cells[:, 0] * (size * size) + cells[:, 1] * size + cells[:, 2])
    return torch.stack([flat // (size * size), flat // size % size, flat % size], dim=1)


def _split_cells(
    field: FieldFn, values: torch.Tensor, exact: torch.Tensor, cells: torch.Tensor, res: int, chunk: int
) -> None:
    """Evaluate the 27 grid points of the res-level grid in each coarse cell (K, 3) of level res / 2
    that do not hold an exact value yet, and mark them exact (sparse: for the few cells following
    the surface adds; decode_grid splits a level's cells with dense masks)."""
    if not len(cells):
        return
    span = torch.arange(3, device=cells.device)
    offsets = torch.stack(torch.meshgrid(span, span, span, indexing="ij"), dim=-1).reshape(-1, 3)  # (27, 3)
    size = res + 1
    # One flat index per point, each point once (neighbouring cells share their faces). Element-wise:
    # CUDA has no integer matrix product.
    points = 2 * cells[:, None, :] + offsets  # (K, 27, 3)
    flat = ((points[..., 0] * size + points[..., 1]) * size + points[..., 2]).reshape(-1)
    flat = torch.unique(flat)
    flat = flat[~exact.view(-1)[flat]]
    _evaluate_at(
        field, values, exact, torch.stack([flat // (size * size), flat // size % size, flat % size], dim=1), res, chunk
    )


def _follow_surface(
    field: FieldFn, values: torch.Tensor, exact: torch.Tensor, split: torch.Tensor, res: int, chunk: int
) -> None:
    """Split more coarse cells (`split`, level res / 2, updated in place) until the surface seen on
    the res-level grid no longer leaves them.

    All grid points of a split cell are exact, so a face between a split cell and one that is not
    holds 3 x 3 exact values; if they include both signs, a cell of the dense grid the surface crosses
    lies on the other side, and that cell is split too; repeated from the cells just split. The cells
    a piece of surface crosses are joined through faces whose corners change sign, so once one of them
    is inside a split cell the whole piece is."""
    coarse = res // 2
    steps, faces = _STEPS.to(split.device), _FACES.to(split.device)
    fresh = split.nonzero()  # (K, 3): the cells whose faces are checked
    while len(fresh):
        found = []
        for step, face in zip(steps, faces, strict=True):
            near = fresh + step
            inside = ((near >= 0) & (near < coarse)).all(1)
            cells, near = fresh[inside], near[inside]
            outward = ~split[near[:, 0], near[:, 1], near[:, 2]]
            cells, near = cells[outward], near[outward]
            if not len(cells):
                continue
            points = 2 * cells[:, None, :] + face  # (P, 9, 3): the shared face's grid points
            v = values[points[..., 0], points[..., 1], points[..., 2]]
            crossed = (v > 0).any(1) & (v < 0).any(1)
            found.append(near[crossed])
        fresh = _unique_rows(torch.cat(found), coarse) if found else steps.new_zeros(0, 3)
        if len(fresh):
            split[fresh[:, 0], fresh[:, 1], fresh[:, 2]] = True
            _split_cells(field, values, exact, fresh, res, chunk)


def crossed_corners(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the grid points that are corners of a cell whose corners change sign: where
    a decoded grid must agree with the dense one for marching cubes to give the same mesh."""
    r = values.shape[0] - 1
    corners = [values[i : r + i, j : r + j, k : r + k] for i, j, k in _CORNERS]
    crossed = (np.minimum.reduce(corners) < 0) & (np.maximum.reduce(corners) > 0)
    mask = np.zeros(values.shape, dtype=bool)
    for i, j, k in _CORNERS:
        mask[i : r + i, j : r + j, k : r + k] |= crossed
    return mask


OUTSIDE_CAP = 1e-6  # the least value a boundary grid point gets: outside, by next to nothing
SLIVER_NEAR = 1e-3  # grid-index units: a vertex this close to a grid point may make a zero-area face


def grid_to_mesh(values: np.ndarray) -> trimesh.Trimesh:
    """Zero level set of a grid over [-BOUND, BOUND]^3 (negative inside), outward faces, no slivers.

    Marching cubes only on the blocks whose values change sign. Everything beyond the grid counts as
    outside: where the field is still negative on the grid's boundary (a shape that reaches the box),
    the surface is capped on the boundary instead of left open, so the mesh is closed. An empty mesh
    (no faces) when the field never changes sign.
    """
    resolution = values.shape[0] - 1
    origins, blocks = _surface_blocks(values)
    verts, faces = march_blocks(blocks, origins)
    if len(faces) == 0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
    verts, faces = weld(verts, faces, resolution)
    # Where the field is exactly zero at grid points, marching cubes leaves zero-area slivers between
    # the (welded) vertices there; they are dropped without opening holes. Three points on distinct
    # edges of a cube, none at a corner, are never in a line, so only faces with a vertex at (or
    # within SLIVER_NEAR of) a grid point are checked.
    at_point = (np.abs(verts - np.round(verts)) < SLIVER_NEAR).all(1)
    verts = verts * (2 * BOUND / resolution) - BOUND
    faces = faces[:, ::-1]  # PyMCubes orients faces towards the negative side; ours is inside
    suspect = np.flatnonzero(at_point[faces].any(1))
    if len(suspect):
        flat = ~trimesh.triangles.nondegenerate(verts[faces[suspect]], height=None)
        faces = np.delete(faces, suspect[flat], axis=0)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    mesh.remove_unreferenced_vertices()
    return mesh


def _surface_blocks(values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(origins (n, 3), value blocks, each (B+1, B+1, B+1) float64) of the MC_BLOCK blocks the
    surface may cross, with the grid's boundary raised to OUTSIDE_CAP in the blocks' copies.

    The blocks' ranges are reduced over a strided view of the grid, which is left as it is and
    never copied whole (on a fresh VM a 513^3 copy took 3 s, most of it the first touch of new
    memory). A block on the boundary is taken when it has a value <= 0 anywhere: capping can only
    add values above 0. The grid is padded (edge values repeated) to whole blocks when its
    resolution is not a multiple of MC_BLOCK."""
    resolution = values.shape[0] - 1
    n = -(-resolution // MC_BLOCK)
    pad = n * MC_BLOCK - resolution
    grid = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if pad:
        grid = F.pad(grid[None, None], (0, pad) * 3, mode="replicate")[0, 0]
    kernel = MC_BLOCK + 1
    windows = grid.unfold(0, kernel, MC_BLOCK).unfold(1, kernel, MC_BLOCK).unfold(2, kernel, MC_BLOCK)
    lo, hi = windows.amin((3, 4, 5)), windows.amax((3, 4, 5))
    edge = torch.ones(n, n, n, dtype=torch.bool)
    edge[1:-1, 1:-1, 1:-1] = False
    origins = (crosses(lo, hi) | (edge & (lo <= 0))).nonzero().numpy() * MC_BLOCK
    grid = grid.numpy()
    blocks = []
    for origin in origins:
        i, j, k = origin
        block = grid[i : i + kernel, j : j + kernel, k : k + kernel].astype(np.float64)
        for axis, start in enumerate(origin):
            sides = [0] if start == 0 else []
            sides += range(max(resolution - start, 0), kernel)  # the far boundary and the padding
            if sides:
                index = [slice(None)] * 3
                index[axis] = sides
                block[tuple(index)] = np.maximum(block[tuple(index)], OUTSIDE_CAP)
        blocks.append(block)
    return origins, blocks


def decode_mesh(
    field: FieldFn, resolution: int, chunk: int | None = None, device: torch.device | str = "cpu"
) -> trimesh.Trimesh:
    return grid_to_mesh(decode_grid(field, resolution, chunk, device))
