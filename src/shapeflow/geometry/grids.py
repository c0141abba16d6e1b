"""What the grid family of latents reads: a truncated signed distance on a coarse grid of cells and,
one or more levels finer, the cells near the surface with their signed distances.

Both live on cell centres of a grid over [-BOUND, BOUND]^3: cell i of a grid of R cells per axis has
its centre at -BOUND + (i + 1/2) * 2 BOUND / R (`cell_centres`). The signed distance is negative inside.

Computed coarse to fine with an exact distance query (`sdf_fn`, e.g. geometry.sdf.signed_distance) on
a few points only. A true signed distance changes by at most the distance between two points, and a
child cell's centre lies d = sqrt(3) h / 4 from its parent's (h: the parent's cell size), so where a
parent's value v has |v| - d >= t the child's value clipped to +-t is sign(v) * t without a query
(the child keeps sign(v) (|v| - d) as a bound for the next level). Only the children of the other
parents are queried; the results equal the dense grid's queried and clipped everywhere, at about
R^2 queries instead of R^3.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BOUND = 1.0
BASE = 16  # the coarsest level, queried densely
SdfFn = Callable[[np.ndarray], np.ndarray]  # points (Q, 3) float32 -> signed distances (Q,)


def cell_centres(resolution: int, index: np.ndarray | None = None) -> np.ndarray:
    """Centres of a grid's cells (index (K, 3), default every cell in C order) as float32 (K, 3)."""
    if index is None:
        index = np.indices((resolution,) * 3).reshape(3, -1).T
    return (-BOUND + (index + 0.5) * (2.0 * BOUND / resolution)).astype(np.float32)


def _child_offsets() -> np.ndarray:
    return np.indices((2, 2, 2)).reshape(3, -1).T  # (8, 3)


def _refine(
    sdf_fn: SdfFn, index: np.ndarray, values: np.ndarray, resolution: int, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the cells `index` (K, 3) of a grid of `resolution` to their 8 children each at 2 *
    resolution. `values` (K,) are signed distances or, where not queried, bounds: the right sign and
    a magnitude at most the true one. A child is queried when its parent's magnitude, less the
    distance between their centres, is under `threshold`; the others get the bound that leaves
    (at least `threshold`). -> child index (8K, 3), child values (8K,), which were queried (8K,)."""
    child_index = (2 * index[:, None] + _child_offsets()[None]).reshape(-1, 3)
    reach = np.sqrt(3.0) * (2.0 * BOUND / resolution) / 4.0
    parent = np.repeat(values, 8)
    bound = np.abs(parent) - reach
    query = bound < threshold
    child = np.where(parent < 0, -bound, bound).astype(np.float32)
    if query.any():
        child[query] = sdf_fn(cell_centres(2 * resolution, child_index[query]))
    return child_index, child, query


def truncated_grid(sdf_fn: SdfFn, resolution: int, truncation: float) -> np.ndarray:
    """The signed distance at the centres of a resolution^3 grid's cells, clipped to +-truncation:
    float32 (R, R, R). resolution: BASE times a power of two (or at most BASE: then dense)."""
    base = min(resolution, BASE)
    if resolution % base or (resolution // base) & (resolution // base - 1):
        raise ValueError(f"grid resolution {resolution}: must be {BASE} times a power of two")
    index = np.indices((base,) * 3).reshape(3, -1).T
    values = sdf_fn(cell_centres(base)).astype(np.float32)
    r = base
    while r < resolution:
        index, values, _ = _refine(sdf_fn, index, values, r, truncation)
        r *= 2
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    grid[tuple(index.T)] = np.clip(values, -truncation, truncation)
    return grid


def surface_cells(sdf_fn: SdfFn, grid: np.ndarray, fine_resolution: int, band: float) -> tuple[np.ndarray, np.ndarray]:
    """The cells of the grid at `fine_resolution` (the coarse grid's times a power of two) whose
    centre is within `band` of the surface: their index (K, 3) in C order and signed distances (K,).
    `grid` is `truncated_grid`'s (its clipped values are bounds, which is all the refinement needs)."""
    r = grid.shape[0]
    if fine_resolution <= r or fine_resolution % r or (fine_resolution // r) & (fine_resolution // r - 1):
        raise ValueError(f"sparse resolution {fine_resolution}: must be the grid's {r} times a power of two")

    def descendants_reach(level: int) -> float:
        """How far the centre of a cell at `level` is from its descendants' at fine_resolution."""
        return np.sqrt(3.0) * (BOUND / level) * (1.0 - level / fine_resolution)

    index = np.argwhere(np.abs(grid) - descendants_reach(r) < band)
    values = grid[tuple(index.T)]
    while r < fine_resolution:
        index, values, queried = _refine(sdf_fn, index, values, r, band + descendants_reach(2 * r))
        r *= 2
        # A cell stays when it or one of its descendants may lie within the band; unqueried cells cannot.
        keep = queried & (np.abs(values) - descendants_reach(r) < band)
        index, values = index[keep], values[keep]
    order = np.lexsort(index.T[::-1])
    return index[order], values[order]
