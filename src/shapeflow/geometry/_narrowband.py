"""Compiled kernels of the narrow-band watertight method (numba).

Grid convention: R points per axis, point (i, j, k) sits at (-1 + i*h, -1 + j*h, -1 + k*h) with
h = 2 / (R - 1). The field `val` holds, for every grid point within `r_band` of the input surface,

    min( min over closed parts c of  signed distance to c  (pseudo-normal sign, negative inside),
         udf to the sheet faces - eps )

and +inf elsewhere. Sheet faces alone give the dense baseline's field (its zero level is the
eps-offset surface); closed, consistently oriented parts keep their own surface. Faces of open parts
that bound a solid (the winding-number rule in `watertight.py`, part id -2) go to a second grid
`pval`: their signed distance with the pseudo-normal sign, which the caller corrects near their
rims before taking the union. Blocks of BLOCK^3
grid points that hold no finite value ("untouched") are the bulk of the grid and are handled as
whole blocks by the flood fill.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

BLOCK = 8  # flood-fill block edge, in grid points
SHEET, BOUNDARY = -1, -2  # part ids of open faces: eps shell, or a solid's boundary (winding number)
TOUCHED, CAPPED = 1, 2  # `touched` values: a face's band reaches the block; w gave its off-band points values
# The six face neighbours of a grid point or block: +x, -x, +y, -y, +z, -z.
_NEIGHBOURS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.int64)

# Closest-feature regions of a point-triangle query (Ericson, Real-Time Collision Detection 5.1.5).
_FACE, _VA, _VB, _VC, _EAB, _EBC, _ECA = 0, 1, 2, 3, 4, 5, 6


@njit(cache=True, inline="always")
def _closest_on_triangle(px, py, pz, t):
    """Closest point on triangle t (3, 3) to p, and which feature (face, vertex, edge) it lies on."""
    ax, ay, az = t[0, 0], t[0, 1], t[0, 2]
    bx, by, bz = t[1, 0], t[1, 1], t[1, 2]
    cx, cy, cz = t[2, 0], t[2, 1], t[2, 2]
    abx, aby, abz = bx - ax, by - ay, bz - az
    acx, acy, acz = cx - ax, cy - ay, cz - az
    apx, apy, apz = px - ax, py - ay, pz - az
    d1 = abx * apx + aby * apy + abz * apz
    d2 = acx * apx + acy * apy + acz * apz
    if d1 <= 0.0 and d2 <= 0.0:
        return ax, ay, az, _VA
    bpx, bpy, bpz = px - bx, py - by, pz - bz
    d3 = abx * bpx + aby * bpy + abz * bpz
    d4 = acx * bpx + acy * bpy + acz * bpz
    if d3 >= 0.0 and d4 <= d3:
        return bx, by, bz, _VB
    vc = d1 * d4 - d3 * d2
    if vc <= 0.0 and d1 >= 0.0 and d3 <= 0.0:
        v = d1 / (d1 - d3)
        return ax + v * abx, ay + v * aby, az + v * abz, _EAB
    cpx, cpy, cpz = px - cx, py - cy, pz - cz
    d5 = abx * cpx + aby * cpy + abz * cpz
    d6 = acx * cpx + acy * cpy + acz * cpz
    if d6 >= 0.0 and d5 <= d6:
        return cx, cy, cz, _VC
    vb = d5 * d2 - d1 * d6
    if vb <= 0.0 and d2 >= 0.0 and d6 <= 0.0:
        w = d2 / (d2 - d6)
        return ax + w * acx, ay + w * acy, az + w * acz, _ECA
    va = d3 * d6 - d5 * d4
    if va <= 0.0 and (d4 - d3) >= 0.0 and (d5 - d6) >= 0.0:
        w = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        return bx + w * (cx - bx), by + w * (cy - by), bz + w * (cz - bz), _EBC
    denom = 1.0 / (va + vb + vc)
    v = vb * denom
    w = vc * denom
    return ax + abx * v + acx * w, ay + aby * v + acy * w, az + abz * v + acz * w, _FACE


@njit(cache=True, inline="always")
def _pseudo_normal(f, region, face_n, edge_n, vert_n):
    """Angle-weighted pseudo-normal of the closest feature: its sign test is exact on closed meshes."""
    if region == _FACE:
        return face_n[f]
    if region == _VA:
        return vert_n[f, 0]
    if region == _VB:
        return vert_n[f, 1]
    if region == _VC:
        return vert_n[f, 2]
    if region == _EAB:
        return edge_n[f, 0]
    if region == _EBC:
        return edge_n[f, 1]
    return edge_n[f, 2]


@njit(cache=True)
def _face_into_slab(f, tris, part, face_n, edge_n, vert_n, h, r_band, eps, i0, i1, val, cur, stamp, pval, touched):
    """Write face f's distances into the grid points of x-slab [i0, i1) within r_band of it."""
    R = val.shape[0]
    t = tris[f]
    lo = np.empty(3, np.int64)
    hi = np.empty(3, np.int64)
    for ax in range(3):
        mn = min(t[0, ax], t[1, ax], t[2, ax]) - r_band
        mx = max(t[0, ax], t[1, ax], t[2, ax]) + r_band
        lo[ax] = max(0, int(math.ceil((mn + 1.0) / h)))
        hi[ax] = min(R - 1, int(math.floor((mx + 1.0) / h)))
    lo[0] = max(lo[0], i0)
    hi[0] = min(hi[0], i1 - 1)
    if lo[0] > hi[0] or lo[1] > hi[1] or lo[2] > hi[2]:
        return
    n = face_n[f]
    # March along the axis the face is most perpendicular to, only over the points within r_band of
    # its plane: the work is proportional to the face's area, not to its bounding box.
    a = 0
    if abs(n[1]) > abs(n[a]):
        a = 1
    if abs(n[2]) > abs(n[a]):
        a = 2
    b = (a + 1) % 3
    c = (a + 2) % 3
    na = n[a]
    half = r_band / abs(na)
    idx = np.empty(3, np.int64)
    p = np.empty(3)
    pid = part[f]
    for ib in range(lo[b], hi[b] + 1):
        xb = -1.0 + ib * h
        for ic in range(lo[c], hi[c] + 1):
            xc = -1.0 + ic * h
            pa = t[0, a] - (n[b] * (xb - t[0, b]) + n[c] * (xc - t[0, c])) / na
            ja = max(lo[a], int(math.ceil((pa - half + 1.0) / h)))
            jz = min(hi[a], int(math.floor((pa + half + 1.0) / h)))
            for ia in range(ja, jz + 1):
                idx[a] = ia
                idx[b] = ib
                idx[c] = ic
                p[0] = -1.0 + idx[0] * h
                p[1] = -1.0 + idx[1] * h
                p[2] = -1.0 + idx[2] * h
                qx, qy, qz, region = _closest_on_triangle(p[0], p[1], p[2], t)
                dx = p[0] - qx
                dy = p[1] - qy
                dz = p[2] - qz
                d = math.sqrt(dx * dx + dy * dy + dz * dz)
                if d > r_band:
                    continue
                i, j, k = idx[0], idx[1], idx[2]
                touched[i // BLOCK, j // BLOCK, k // BLOCK] = 1
                if pid == SHEET:  # the baseline's eps-offset field
                    v = d - eps
                    if v < val[i, j, k]:
                        val[i, j, k] = v
                    continue
                pn = _pseudo_normal(f, region, face_n, edge_n, vert_n)
                sd = d if dx * pn[0] + dy * pn[1] + dz * pn[2] >= 0.0 else -d
                if pid == BOUNDARY:
                    if d < abs(pval[i, j, k]):
                        pval[i, j, k] = sd
                    continue
                if stamp[i, j, k] != pid:
                    # Faces come sorted by part: the previous part is finished at this point.
                    if stamp[i, j, k] >= 0 and cur[i, j, k] < val[i, j, k]:
                        val[i, j, k] = cur[i, j, k]
                    stamp[i, j, k] = pid
                    cur[i, j, k] = sd
                elif abs(sd) < abs(cur[i, j, k]):
                    cur[i, j, k] = sd


@njit(parallel=True, cache=True)
def band_field(tris, part, face_n, edge_n, vert_n, h, r_band, eps, slabs, val, cur, stamp, pval, touched):
    """Fill `val` (and `pval`) within r_band of the surface. Slabs of x split the grid between threads,
    so no two threads write the same point; faces must be sorted by part, the negative ids first."""
    n_slabs = slabs.shape[0] - 1
    for s in prange(n_slabs):
        i0 = slabs[s]
        i1 = slabs[s + 1]
        for f in range(tris.shape[0]):
            _face_into_slab(
                f, tris, part, face_n, edge_n, vert_n, h, r_band, eps, i0, i1, val, cur, stamp, pval, touched
            )
    # Fold the last closed part seen at each point into the union: only touched blocks hold any.
    if stamp.shape[0] == val.shape[0]:
        R = val.shape[0]
        nbk = touched.shape[0]
        for bi in prange(nbk):
            for bj in range(nbk):
                for bk in range(nbk):
                    if touched[bi, bj, bk] == 0:
                        continue
                    for i in range(bi * BLOCK, min((bi + 1) * BLOCK, R)):
                        for j in range(bj * BLOCK, min((bj + 1) * BLOCK, R)):
                            for k in range(bk * BLOCK, min((bk + 1) * BLOCK, R)):
                                if stamp[i, j, k] >= 0 and cur[i, j, k] < val[i, j, k]:
                                    val[i, j, k] = cur[i, j, k]


@njit(cache=True)
def flood_outside(val, touched, block_in):
    """Grid points reachable from the corner through points with val > 0 (6-connected).

    Untouched blocks marked in `block_in` (inside a solid by the winding number) are never entered.
    Returns (block_out, point_out): an untouched block is outside as a whole when block_out is 1; a
    point of a touched block is outside when point_out is 1. Only the points of touched blocks are
    visited one by one, so the cost follows the band, not the grid.
    """
    R = val.shape[0]
    nb = touched.shape[0]
    block_out = np.zeros(touched.shape, np.uint8)
    point_out = np.zeros(val.shape, np.uint8)
    bq = np.empty((nb * nb * nb, 3), np.int64)
    bq_n = 0
    pq = np.empty((1024, 3), np.int64)
    pq_n = 0
    if touched[0, 0, 0] == 0:
        if block_in[0, 0, 0] == 0:
            block_out[0, 0, 0] = 1
            bq_n = _put(bq, bq_n, 0, 0, 0)
    elif val[0, 0, 0] > 0:
        point_out[0, 0, 0] = 1
        pq_n = _put(pq, pq_n, 0, 0, 0)
    while bq_n > 0 or pq_n > 0:
        while bq_n > 0:
            bq_n -= 1
            bi, bj, bk = bq[bq_n, 0], bq[bq_n, 1], bq[bq_n, 2]
            for s in range(6):
                ni, nj, nk = bi + _NEIGHBOURS[s, 0], bj + _NEIGHBOURS[s, 1], bk + _NEIGHBOURS[s, 2]
                if not _on_grid(ni, nj, nk, nb):
                    continue
                if touched[ni, nj, nk] == 0:
                    if block_out[ni, nj, nk] == 0 and block_in[ni, nj, nk] == 0:
                        block_out[ni, nj, nk] = 1
                        bq_n = _put(bq, bq_n, ni, nj, nk)
                    continue
                # Enter the touched neighbour through the face it shares with this block.
                r0 = np.array([ni * BLOCK, nj * BLOCK, nk * BLOCK])
                r1 = np.minimum(r0 + BLOCK, R)
                ax = 0 if _NEIGHBOURS[s, 0] != 0 else (1 if _NEIGHBOURS[s, 1] != 0 else 2)
                face = r0[ax] if _NEIGHBOURS[s, ax] > 0 else r1[ax] - 1
                r0[ax] = face
                r1[ax] = face + 1
                for i in range(r0[0], r1[0]):
                    for j in range(r0[1], r1[1]):
                        for k in range(r0[2], r1[2]):
                            if point_out[i, j, k] == 0 and val[i, j, k] > 0:
                                point_out[i, j, k] = 1
                                if pq_n == pq.shape[0]:
                                    pq = _grow(pq)
                                pq_n = _put(pq, pq_n, i, j, k)
        while pq_n > 0:
            pq_n -= 1
            i, j, k = pq[pq_n, 0], pq[pq_n, 1], pq[pq_n, 2]
            for s in range(6):
                ni, nj, nk = i + _NEIGHBOURS[s, 0], j + _NEIGHBOURS[s, 1], k + _NEIGHBOURS[s, 2]
                if not _on_grid(ni, nj, nk, R):
                    continue
                bi, bj, bk = ni // BLOCK, nj // BLOCK, nk // BLOCK
                if touched[bi, bj, bk] == 0:
                    if block_out[bi, bj, bk] == 0 and block_in[bi, bj, bk] == 0:
                        block_out[bi, bj, bk] = 1
                        bq_n = _put(bq, bq_n, bi, bj, bk)
                elif point_out[ni, nj, nk] == 0 and val[ni, nj, nk] > 0:
                    point_out[ni, nj, nk] = 1
                    if pq_n == pq.shape[0]:
                        pq = _grow(pq)
                    pq_n = _put(pq, pq_n, ni, nj, nk)
            if bq_n > 0:
                break  # drain whole blocks first: they open up the most space per step
    return block_out, point_out


@njit(cache=True, inline="always")
def _on_grid(i, j, k, n):
    # Lower bounds first: the order the compiled branches run fastest in.
    return i >= 0 and j >= 0 and k >= 0 and i < n and j < n and k < n


@njit(cache=True, inline="always")
def _put(q, n, i, j, k):
    """Put (i, j, k) on top of the stack `q` of `n` entries (it has room); returns n + 1."""
    q[n, 0] = i
    q[n, 1] = j
    q[n, 2] = k
    return n + 1


@njit(cache=True)
def _grow(q):
    bigger = np.empty((q.shape[0] * 2, 3), np.int64)
    bigger[: q.shape[0]] = q
    return bigger


@njit(parallel=True, cache=True)
def signed_blocks(val, touched, block_out, point_out, origins, size, r_band, nudge):
    """The signed field on (size+1)^3 corner blocks starting at `origins` (n, 3), for marching cubes.

    Points not reachable from outside are inside: a positive value there (a pocket enclosed by the
    surface) is negated, as the baseline's flood fill does. Points off the band get +-r_band. Values
    within `nudge` of zero are pushed to +nudge so that no vertex lands exactly on a grid point, which
    is what makes marching cubes emit zero-area triangles. Points on the grid's outer faces are never
    inside, so the surface is closed even where the shell would cross the grid's edge.
    """
    R = val.shape[0]
    n = origins.shape[0]
    out = np.empty((n, size + 1, size + 1, size + 1), np.float32)
    for b in prange(n):
        for di in range(size + 1):
            i = min(origins[b, 0] + di, R - 1)
            for dj in range(size + 1):
                j = min(origins[b, 1] + dj, R - 1)
                for dk in range(size + 1):
                    k = min(origins[b, 2] + dk, R - 1)
                    bi, bj, bk = i // BLOCK, j // BLOCK, k // BLOCK
                    if touched[bi, bj, bk] == 0:
                        outside = block_out[bi, bj, bk] == 1
                    else:
                        outside = point_out[i, j, k] == 1
                    v = val[i, j, k]
                    if not math.isfinite(v):
                        v = r_band if outside else -r_band
                    elif not outside and v > 0:
                        v = -v
                    if abs(v) < nudge:
                        v = nudge
                    if v < 0 and (i == 0 or j == 0 or k == 0 or i == R - 1 or j == R - 1 or k == R - 1):
                        v = nudge  # a shell reaching the grid's edge (eps > margin at small R) is closed there
                    out[b, di, dj, dk] = v
    return out


@njit(cache=True)
def inner_edge_exposed(val, touched, block_out, point_out):
    """True when some point inside a surface (val < 0) touches the outside off the band.

    In a consistent field a negative point's neighbours are band points or the unreached interior.
    A negative point next to an outside point that no face reached means the flood fill got in
    behind the surface: the pseudo-normal sign was wrong somewhere (a self-intersecting fold).
    Blocks whose off-band points carry a hole's cap (CAPPED) are not checked: a cap is a surface
    with no face near it.
    """
    R = val.shape[0]
    nb_ = touched.shape[0]
    for bi in range(nb_):
        for bj in range(nb_):
            for bk in range(nb_):
                if touched[bi, bj, bk] != TOUCHED:
                    continue  # untouched, or CAPPED: its negative values may be a cap's, next to the outside
                for i in range(bi * BLOCK, min((bi + 1) * BLOCK, R)):
                    for j in range(bj * BLOCK, min((bj + 1) * BLOCK, R)):
                        for k in range(bk * BLOCK, min((bk + 1) * BLOCK, R)):
                            if not val[i, j, k] < 0:
                                continue
                            for s in range(6):
                                ni, nj, nk = i + _NEIGHBOURS[s, 0], j + _NEIGHBOURS[s, 1], k + _NEIGHBOURS[s, 2]
                                if not _on_grid(ni, nj, nk, R):
                                    continue
                                if math.isfinite(val[ni, nj, nk]):
                                    continue
                                b0, b1, b2 = ni // BLOCK, nj // BLOCK, nk // BLOCK
                                if touched[b0, b1, b2] == 0:
                                    if block_out[b0, b1, b2] == 1:
                                        return True
                                elif point_out[ni, nj, nk] == 1:
                                    return True
    return False


@njit(parallel=True, cache=True)
def mark_rims(seg, h, r_band, pval, mask):
    """Set `mask` at the finite points of `pval` whose closest point on the surface may lie on one of
    the segments `seg` (S, 2, 3): there the pseudo-normal sign is not to be trusted (a rim, a
    non-manifold edge), and the caller decides the side by the winding number instead."""
    R = pval.shape[0]
    tol = 1e-4 * h
    for s in prange(seg.shape[0]):
        ax, ay, az = seg[s, 0, 0], seg[s, 0, 1], seg[s, 0, 2]
        ux, uy, uz = seg[s, 1, 0] - ax, seg[s, 1, 1] - ay, seg[s, 1, 2] - az
        uu = ux * ux + uy * uy + uz * uz
        lo = np.empty(3, np.int64)
        hi = np.empty(3, np.int64)
        for c in range(3):
            mn = min(seg[s, 0, c], seg[s, 1, c])
            mx = max(seg[s, 0, c], seg[s, 1, c])
            lo[c] = max(0, int(math.ceil((mn - r_band + 1.0) / h)))
            hi[c] = min(R - 1, int(math.floor((mx + r_band + 1.0) / h)))
        for i in range(lo[0], hi[0] + 1):
            px = -1.0 + i * h
            for j in range(lo[1], hi[1] + 1):
                py = -1.0 + j * h
                for k in range(lo[2], hi[2] + 1):
                    v = pval[i, j, k]
                    if not math.isfinite(v):
                        continue
                    pz = -1.0 + k * h
                    t = ((px - ax) * ux + (py - ay) * uy + (pz - az) * uz) / uu if uu > 0.0 else 0.0
                    t = min(1.0, max(0.0, t))
                    dx = px - (ax + t * ux)
                    dy = py - (ay + t * uy)
                    dz = pz - (az + t * uz)
                    if math.sqrt(dx * dx + dy * dy + dz * dz) <= abs(v) + tol:
                        mask[i, j, k] = 1
