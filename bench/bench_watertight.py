"""Watertight remeshing on CPU: the narrow-band method against the dense baseline, side by side.

Dense baseline = unsigned distance at all R^3 grid points with pysdf (a fast CPU distance library;
not exact, which only flatters the baseline), shell, flood fill with scipy's labelling over the
whole grid, marching cubes over the whole grid; the same clean-up afterwards.

Each (method, mesh, resolution) runs in a fresh process, so its peak resident memory is its own; the
time is that of the remeshing call alone, after one warm-up call on a small mesh in that process
(loading numba's compiled kernels from its cache) and one touch of 24 R^3 bytes of memory (both
methods alike), as a worker of the stage that has processed objects before would see it.

    python bench/bench_watertight.py                  # built-in subset + open/flat cases + ../shared/meshes
    python bench/bench_watertight.py --quick          # a short run

Prints a table and JSON, and writes bench/results/watertight.json.

The open and flat cases (`_open_cases`): a box without its lid and a sphere without a cap (holes far
wider than the band; their volume is compared with the solid's), a sphere with 30 faces missing
(narrow holes), and a flat sheet, a flat disk and a wavy single-sided sheet (slabs). Each row says
which rule decided the inside (`rule`) and how long the winding-number queries took (`wn_seconds`,
part of `seconds`). `--winding-queries` also times libigl's fast winding number against the exact
one (`igl.winding_number`, a sum over every triangle) on the same query points.

Quality is the Chamfer distance between the input surface and the output surface. A closed input
made of overlapping closed parts (chair legs poking into the seat) has faces inside other parts,
which are no part of the solid's boundary and so not of the output either: for closed inputs the
distance is also measured against the visible input surface alone (`cd_visible`), the sample points
outside every other part, found with the generalised winding number (see `_outside`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from _memory import peak_memory_mb, reset_peak_memory

HERE = Path(__file__).resolve().parent
SHARED_MESHES = HERE.parent.parent / "shared" / "meshes"

# The visible-surface filter probes the winding number of the whole input a step off each sample
# point along its face's outward normal, not at the point itself: sample points are float32, so
# they lie ~1e-8 off their triangle, which then subtends almost a full hemisphere. On curved parts
# a point on the visible surface reads 0 or 1 (not 0.5) by that rounding and one inside another
# part 1 or 2, so no threshold at the point separates them (measured: 21 % of the vase's and 14 %
# of fandisk's points read >= 1.0). One step outwards, a visible point is outside the solid (~0)
# and a hidden one is inside at least the part around it (>= ~1); 0.5 is the midpoint. This also
# settles coplanar faces of two parts: flush on the outside (0 outwards: kept) or face to face
# (inside the other part outwards: dropped). The step is far above float32 rounding at unit scale
# and far below any part's thickness and the grid's cell (2/R); points within it of another part
# (where a leg meets the seat) are a share of the order of the step over the part size.
VISIBLE_STEP = 1e-5
VISIBLE_WINDING = 0.5
# Top-up sampling for the filter draws at most this many times the points wanted (kept shares
# down to 1/4; the built-in shapes keep 87-100 %).
MAX_OVERSAMPLE = 4.0
# Row fields of the visible-surface figures (None where the input is not closed).
VISIBLE_KEYS = ("cd_visible", "cd_floor_visible", "visible_share")


def _inputs(per_category: int, shared: bool) -> list[tuple[str, str, bytes | str]]:
    """(name, kind, source) for every benchmark mesh: built-in objects as PLY bytes, shared as paths."""
    from shapeflow.data.builtin import export_bytes, generate_builtin

    items: list[tuple[str, str, bytes | str]] = []
    for obj in generate_builtin(per_category=per_category, defect_share=0.5, seed=123):
        items.append((obj.name, "builtin", export_bytes(obj.mesh)))
    if shared and SHARED_MESHES.is_dir():
        for path in sorted(SHARED_MESHES.iterdir()):
            if path.suffix in (".obj", ".ply"):
                items.append((path.name, "shared", str(path)))
    return items


def _open_cases() -> list[tuple[str, str, bytes | str]]:
    """(name, "open", PLY bytes) of the open and flat cases of the module docstring."""
    import trimesh

    from shapeflow.data.builtin import export_bytes

    box = trimesh.creation.box(extents=(1.0, 0.8, 0.6))
    sphere = trimesh.creation.icosphere(subdivisions=4)
    rng = np.random.default_rng(3)
    holes = np.isin(np.arange(len(sphere.faces)), rng.choice(len(sphere.faces), 30, replace=False))
    n = 24
    u, v = (a.ravel() for a in np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij"))
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    grid = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    angle = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    disk_v = np.concatenate([[[0.0, 0.0, 0.0]], np.stack([np.cos(angle), np.sin(angle), 0 * angle], 1)])
    disk_f = np.stack([np.zeros(64, int), 1 + np.arange(64), 1 + (np.arange(64) + 1) % 64], axis=1)
    meshes = {
        "box_without_lid": (box.vertices, box.faces[box.triangles_center[:, 2] < 0.29]),
        "sphere_without_cap": (sphere.vertices, sphere.faces[sphere.triangles_center[:, 2] < 0.7]),
        "sphere_30_holes": (sphere.vertices, sphere.faces[~holes]),
        "flat_sheet": (np.stack([u, v, 0.3 * u], 1), grid),
        "flat_disk": (disk_v, disk_f),
        "wavy_sheet": (np.stack([u, v, 0.2 * np.sin(3 * u)], 1), grid),
    }
    return [(name, "open", export_bytes(trimesh.Trimesh(*mesh, process=False))) for name, mesh in meshes.items()]


# Volume of the solid each holed case was cut from, relative to the box the mesh is normalised into.
SOLID_VOLUME = {
    "box_without_lid": 1.0 * 0.8 * 0.6 * (1.9 / 1.0) ** 3,
    "sphere_without_cap": None,  # the icosphere's, normalised as the holed one is: `_solid_volume`
}


def _load(source: bytes | str):
    import tempfile

    from shapeflow.geometry.mesh import load_clean, normalise

    if isinstance(source, bytes):
        with tempfile.NamedTemporaryFile(suffix=".ply") as fh:
            fh.write(source)
            fh.flush()
            mesh = load_clean(fh.name)
    else:
        mesh = load_clean(source)
    return normalise(mesh)[0]


def _measure(method: str, source: bytes | str, resolution: int, quality_points: int) -> dict:
    """Runs in a fresh process: one remesh, its time and peak memory, and its quality."""
    import trimesh

    from shapeflow.geometry.sampling import sample_surface
    from shapeflow.geometry.watertight import dense_baseline, watertight
    from shapeflow.metrics import chamfer_distance

    mesh = _load(source)
    # A stage worker has processed objects before: its memory is already backed by the machine.
    # Touch as much as a dense R^3 grid of float32 coordinates once, for both methods alike; on
    # this VM the first touch of fresh memory is otherwise several times slower than later ones.
    np.ones(3 * resolution**3, np.float64).sum()
    reset_peak_memory()
    warm = trimesh.creation.icosphere(subdivisions=2)
    rule = wn_seconds = None
    if method == "narrow_band":
        from shapeflow.geometry import watertight as module

        watertight(warm.vertices * 0.9, warm.faces, resolution=32, backend="cpu")
        wn_time = [0.0]
        exact_number = module.winding_number

        def timed_number(*args):
            t0 = time.perf_counter()
            try:
                return exact_number(*args)
            finally:
                wn_time[0] += time.perf_counter() - t0

        module.winding_number = timed_number
        start = time.perf_counter()
        result = watertight(mesh.vertices, mesh.faces, resolution=resolution, backend="cpu")
        seconds = time.perf_counter() - start
        module.winding_number = exact_number
        verts, faces = result.vertices, result.faces
        rule, wn_seconds = result.inside_rule, wn_time[0]
        # Closed inputs keep their surface exactly; so do the parts the winding number decided.
        closed_input = rule == "closed"
        fallback = result.sign_fallback
    else:
        import pysdf

        start = time.perf_counter()
        sdf = pysdf.SDF(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
        udf = lambda p: np.abs(sdf(p.astype(np.float32)))  # noqa: E731
        verts, faces = dense_baseline(mesh.vertices, mesh.faces, resolution, udf)
        seconds = time.perf_counter() - start
        closed_input = fallback = None
    peak_mb = peak_memory_mb()
    out = trimesh.Trimesh(verts, faces)  # processed on load, as a user loads it
    rng = np.random.default_rng(0)
    cd = {}
    for n in (10_000, quality_points):
        a = sample_surface(mesh, n, rng)
        b, _ = sample_surface(out, n, rng)
        cd[n] = chamfer_distance(a[0], b)
    # The floor of the sampled Chamfer distance itself: two independent samplings of the input.
    floor_a, floor_b = sample_surface(mesh, quality_points, rng), sample_surface(mesh, quality_points, rng)
    floor = chamfer_distance(floor_a[0], floor_b[0])
    # After all draws above, so `cd` and `cd_floor` stay those of the runs without it.
    visible = _visible_quality(mesh, a, b, floor_a, floor_b, rng) if closed_input else dict.fromkeys(VISIBLE_KEYS)
    return {
        "seconds": seconds,
        "wn_seconds": wn_seconds,
        "rule": rule,
        "volume": float(out.volume),
        "peak_mb": peak_mb,
        "watertight": bool(out.is_watertight),
        "cd_10k": cd[10_000],
        "cd": cd[quality_points],
        "cd_floor": floor,
        **visible,
        "closed_input": closed_input,
        "sign_fallback": fallback,
        "faces_out": len(out.faces),
    }


def _visible_quality(mesh, a: tuple, b: np.ndarray, floor_a: tuple, floor_b: tuple, rng: np.random.Generator) -> dict:
    """Chamfer distance of the output sample `b` to the visible part of the input, and its floor.

    `a`, `floor_a` and `floor_b` are (points, normals) samples of the input surface: each is
    filtered to its visible points and topped up to its former size (`_visible_sample`).
    """
    from shapeflow.metrics import chamfer_distance

    a_visible, share = _visible_sample(mesh, *a, rng)
    floor = chamfer_distance(_visible_sample(mesh, *floor_a, rng)[0], _visible_sample(mesh, *floor_b, rng)[0])
    return {"cd_visible": chamfer_distance(a_visible, b), "cd_floor_visible": floor, "visible_share": share}


def _visible_sample(
    mesh, points: np.ndarray, normals: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """The visible points of a uniform surface sample, topped up to its size; and the kept share.

    Dropping hidden points leaves fewer than wanted, and a sparser sample reads a higher Chamfer
    distance (its floor grows as the points thin out), so the visible side would look worse than
    it is. A second uniform draw of the missing count over the kept share (10 % spare, at most
    MAX_OVERSAMPLE times the size in all) is filtered alike; the visible points of both draws are
    uniform on the visible surface, and the first `len(points)` of them are kept.
    """
    from shapeflow.geometry.sampling import sample_surface

    n = len(points)
    kept = points[_outside(mesh, points, normals)]
    share = len(kept) / n
    missing = n - len(kept)
    if missing > 0 and share > 0.0:
        extra = min(int(np.ceil(1.1 * missing / share)), int((MAX_OVERSAMPLE - 1.0) * n))
        more, more_normals = sample_surface(mesh, extra, rng)
        kept = np.concatenate([kept, more[_outside(mesh, more, more_normals)]])[:n]
    return kept, share


def _outside(mesh, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(N,) bool: the surface points on the boundary of the solid a closed mesh encloses.

    Generalised winding number of the whole mesh (all parts) a step VISIBLE_STEP outwards along each
    point's face normal, below VISIBLE_WINDING (see there). The normals are flipped if the mesh is
    oriented inwards (negative volume), so "outwards" is outwards either way.
    """
    import igl

    outward = 1.0 if mesh.volume >= 0.0 else -1.0
    probes = points.astype(np.float64) + (outward * VISIBLE_STEP) * normals.astype(np.float64)  # (N, 3)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    return igl.fast_winding_number(vertices, faces, probes) < VISIBLE_WINDING


def winding_query_times(n_queries: int = 20_000) -> list[dict]:
    """libigl's fast winding number against the exact sum over triangles, on the same points."""
    import igl

    rows = []
    for name, _, source in _open_cases()[:2] + [i for i in _inputs(0, True) if i[1] == "shared"][:2]:
        mesh = _load(source)
        vertices, faces = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
        points = np.random.default_rng(0).uniform(-1, 1, (n_queries, 3))
        t0 = time.perf_counter()
        fast = igl.fast_winding_number(vertices, faces, points)
        t1 = time.perf_counter()
        exact = igl.winding_number(vertices, faces, points)
        t2 = time.perf_counter()
        rows.append(
            {
                "mesh": name,
                "faces": len(faces),
                "queries": n_queries,
                "fast_us_per_query": 1e6 * (t1 - t0) / n_queries,
                "exact_us_per_query": 1e6 * (t2 - t1) / n_queries,
                "ratio": (t2 - t1) / (t1 - t0),
                "max_abs_difference": float(np.abs(fast - exact).max()),
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _run_isolated(method, source, resolution, quality_points) -> dict:
    ctx = get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
        return pool.submit(_measure, method, source, resolution, quality_points).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--per-category", type=int, default=1, help="built-in objects per category")
    parser.add_argument("--no-shared", action="store_true", help="skip ../shared/meshes")
    parser.add_argument("--no-baseline-above", type=int, default=512, help="skip the dense baseline above this R")
    parser.add_argument(
        "--baseline-only-for",
        nargs="*",
        metavar="MESH",
        help="run the dense baseline on these meshes only (it takes minutes each at R = 512)",
    )
    parser.add_argument("--quality-points", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="R = 128 and 256, few meshes, 200K quality points")
    parser.add_argument("--no-open", action="store_true", help="skip the open and flat cases")
    parser.add_argument("--winding-queries", action="store_true", help="time fast against exact winding numbers")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "watertight.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.resolutions, args.quality_points = [128, 256], 200_000
    items = _inputs(args.per_category, not args.no_shared)
    if args.quick:
        items = items[:4] + [i for i in items if i[1] == "shared"][:2]
    if not args.no_open:
        items += _open_cases()
    rows = []
    for resolution in args.resolutions:
        for name, kind, source in items:
            row = {"mesh": name, "kind": kind, "resolution": resolution}
            ours = _run_isolated("narrow_band", source, resolution, args.quality_points)
            row.update({f"nb_{k}": v for k, v in ours.items()})
            wanted = args.baseline_only_for is None or name in args.baseline_only_for
            if resolution <= args.no_baseline_above and wanted:
                dense = _run_isolated("dense_baseline", source, resolution, args.quality_points)
                row.update({f"dense_{k}": v for k, v in dense.items()})
                row["speedup"] = dense["seconds"] / ours["seconds"]
            rows.append(row)
            print(_row_line(row), file=sys.stderr, flush=True)
    summary = _summarise(rows, args.resolutions)
    report = {
        "machine": {"cpus": os.cpu_count()},
        "quality_points": args.quality_points,
        "summary": summary,
        "rows": rows,
    }
    if args.winding_queries:
        report["winding_queries"] = winding_query_times()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    print(_table(summary))
    return 0


def _row_line(row: dict) -> str:
    dense = f" dense {row['dense_seconds']:.2f}s x{row['speedup']:.1f}" if "speedup" in row else ""
    visible = ""
    if row["nb_cd_visible"] is not None:
        visible = (
            f" visible {row['nb_cd_visible']:.4f} "
            f"(floor {row['nb_cd_floor_visible']:.4f}, {row['nb_visible_share']:.0%})"
        )
    return (
        f"R={row['resolution']} {row['mesh'][:24]:24s} ours {row['nb_seconds']:.2f}s {row['nb_peak_mb']:.0f}MB "
        f"cd {row['nb_cd']:.4f} (floor {row['nb_cd_floor']:.4f}){visible} wt={row['nb_watertight']} "
        f"{row['nb_rule']} wn {row['nb_wn_seconds']:.2f}s vol {row['nb_volume']:.3f}{dense}"
    )


def _summarise(rows: list[dict], resolutions: list[int]) -> dict:
    summary = {}
    for r in resolutions:
        sel = [row for row in rows if row["resolution"] == r]
        eps = 2.0 / r
        closed = [row for row in sel if row["nb_closed_input"]]
        shell = [row for row in sel if row["nb_rule"] == "shell"]
        winding = [row for row in sel if "winding" in row["nb_rule"] and "shell" not in row["nb_rule"]]
        open_ = [row for row in sel if not row["nb_closed_input"]]
        entry = {
            "meshes": len(sel),
            "median_seconds": statistics.median(row["nb_seconds"] for row in sel),
            "max_seconds": max(row["nb_seconds"] for row in sel),
            "max_peak_mb": max(row["nb_peak_mb"] for row in sel),
            "watertight_share": sum(row["nb_watertight"] for row in sel) / len(sel),
            "closed_inputs": len(closed),
            "sign_fallbacks": sum(bool(row["nb_sign_fallback"]) for row in sel),
            "closed_max_cd": max((row["nb_cd"] for row in closed), default=None),
            "closed_max_cd_visible": max((row["nb_cd_visible"] for row in closed), default=None),
            "closed_max_cd_floor_visible": max((row["nb_cd_floor_visible"] for row in closed), default=None),
            "closed_cd_bound": 1.0 / r,
            "open_inputs": len(open_),
            "open_max_cd": max((row["nb_cd"] for row in open_), default=None),
            "open_cd_bound": eps + 2.0 / r,
            # Inputs only the winding number sorted out: excess over the floor, against 1/R.
            "winding_inputs": len(winding),
            "winding_max_cd_excess": max((row["nb_cd"] - row["nb_cd_floor"] for row in winding), default=None),
            "shell_inputs": len(shell),
            "shell_max_cd_excess": max((row["nb_cd"] - row["nb_cd_floor"] for row in shell), default=None),
            "shell_cd_excess_bound": 4.0 / r,
            "median_wn_seconds": statistics.median(row["nb_wn_seconds"] for row in sel),
            "volume_share_capped": {
                row["mesh"]: row["nb_volume"] / _solid_volume(row["mesh"]) for row in sel if row["mesh"] in SOLID_VOLUME
            },
            "median_cd_10k": statistics.median(row["nb_cd_10k"] for row in sel),
        }
        with_base = [row for row in sel if "speedup" in row]
        if with_base:
            entry.update(
                dense_median_seconds=statistics.median(row["dense_seconds"] for row in with_base),
                speedup_median=statistics.median(row["speedup"] for row in with_base),
                speedup_of_medians=statistics.median(row["dense_seconds"] for row in with_base)
                / statistics.median(row["nb_seconds"] for row in with_base),
                dense_median_cd_10k=statistics.median(row["dense_cd_10k"] for row in with_base),
                dense_max_peak_mb=max(row["dense_peak_mb"] for row in with_base),
                dense_watertight_share=sum(row["dense_watertight"] for row in with_base) / len(with_base),
            )
        summary[str(r)] = entry
    return summary


def _solid_volume(name: str) -> float:
    if SOLID_VOLUME[name] is not None:
        return SOLID_VOLUME[name]
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=4)
    return float(sphere.volume * (1.9 / np.ptp(sphere.vertices[:, 2])) ** 3)


def _table(summary: dict) -> str:
    head = (
        "| R | meshes | median s (ours) | median s (dense) | speedup (median) | peak MB (ours) | watertight | "
        "max CD closed (bound) | max CD closed, visible surface | max CD open (bound) | "
        "winding: max CD - floor (1/R) | shells: max CD - floor (4/R) | median s in w |"
    )
    lines = [head, "|" + "---|" * 13]
    for r, e in summary.items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(
            f"| {r} | {e['meshes']} | {e['median_seconds']:.2f} | {e.get('dense_median_seconds', float('nan')):.2f} | "
            f"{e.get('speedup_median', float('nan')):.1f}x | {e['max_peak_mb']:.0f} | {e['watertight_share']:.0%} | "
            f"{fmt(e['closed_max_cd'])} ({e['closed_cd_bound']:.4f}) | {fmt(e['closed_max_cd_visible'])} | "
            f"{fmt(e['open_max_cd'])} ({e['open_cd_bound']:.4f}) | "
            f"{fmt(e['winding_max_cd_excess'])} ({1.0 / int(r):.4f}) | "
            f"{fmt(e['shell_max_cd_excess'])} ({e['shell_cd_excess_bound']:.4f}) | {e['median_wn_seconds']:.2f} |"
        )
    capped = {name: share for e in summary.values() for name, share in e["volume_share_capped"].items()}
    lines.append("")
    lines.append("capped volume / solid volume: " + ", ".join(f"{k} {v:.1%}" for k, v in capped.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
