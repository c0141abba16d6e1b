"""Watertight remeshing on CPU: the narrow-band method against the dense seed method, side by side.

Dense seed method = unsigned distance at all R^3 grid points with pysdf (the fastest CPU distance
library we found; not exact, which only flatters the baseline), shell, flood fill with scipy's
labelling over the whole grid, marching cubes over the whole grid; the same clean-up afterwards.

Each (method, mesh, resolution) runs in a fresh process, so its peak resident memory is its own; the
time is that of the remeshing call alone, after one warm-up call on a small mesh in that process
(loading numba's compiled kernels from its cache) and one touch of 24 R^3 bytes of memory (both
methods alike), as a worker of the stage that has processed objects before would see it.

    python bench/bench_watertight.py                  # built-in subset + ../shared/meshes, R = 256, 512
    python bench/bench_watertight.py --quick          # a short run

Prints a table and JSON, and writes bench/results/watertight.json.
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

HERE = Path(__file__).resolve().parent
SHARED_MESHES = HERE.parent.parent / "shared" / "meshes"


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

    from shapeflow.geometry.watertight import seed_method, watertight
    from shapeflow.geometry.sampling import sample_surface
    from shapeflow.metrics import chamfer_distance

    mesh = _load(source)
    # A stage worker has processed objects before: its memory is already backed by the machine.
    # Touch as much as a dense R^3 grid of float32 coordinates once, for both methods alike; on
    # this VM the first touch of fresh memory is otherwise several times slower than later ones.
    np.ones(3 * resolution**3, np.float64).sum()
    _reset_peak_memory()
    warm = trimesh.creation.icosphere(subdivisions=2)
    if method == "narrow_band":
        watertight(warm.vertices * 0.9, warm.faces, resolution=32, backend="cpu")
        start = time.perf_counter()
        result = watertight(mesh.vertices, mesh.faces, resolution=resolution, backend="cpu")
        seconds = time.perf_counter() - start
        verts, faces = result.vertices, result.faces
        # Closed inputs keep their surface; one whose sign check failed got the seed's shell.
        closed_input = result.open_parts == 0 and not result.sign_fallback
        fallback = result.sign_fallback
    else:
        import pysdf

        start = time.perf_counter()
        sdf = pysdf.SDF(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
        verts, faces = seed_method(mesh.vertices, mesh.faces, resolution, lambda p: np.abs(sdf(p.astype(np.float32))))
        seconds = time.perf_counter() - start
        closed_input = fallback = None
    peak_mb = _peak_memory_mb()
    out = trimesh.Trimesh(verts, faces)  # processed on load, as a user loads it
    rng = np.random.default_rng(0)
    cd = {}
    for n in (10_000, quality_points):
        a, _ = sample_surface(mesh, n, rng)
        b, _ = sample_surface(out, n, rng)
        cd[n] = chamfer_distance(a, b)
    # The floor of the sampled Chamfer distance itself: two independent samplings of the input.
    floor = chamfer_distance(sample_surface(mesh, quality_points, rng)[0], sample_surface(mesh, quality_points, rng)[0])
    return {
        "seconds": seconds,
        "peak_mb": peak_mb,
        "watertight": bool(out.is_watertight),
        "cd_10k": cd[10_000],
        "cd": cd[quality_points],
        "cd_floor": floor,
        "closed_input": closed_input,
        "sign_fallback": fallback,
        "faces_out": len(out.faces),
    }


def _reset_peak_memory() -> None:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_memory_mb() -> float:
    """Peak resident memory of this process since the last reset, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmHWM not found in /proc/self/status")


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
    parser.add_argument("--baseline-only-for", nargs="*", metavar="MESH",
                        help="run the dense baseline on these meshes only (it takes minutes each at R = 512)")
    parser.add_argument("--quality-points", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="R = 128 and 256, few meshes, 200K quality points")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "watertight.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.resolutions, args.quality_points = [128, 256], 200_000
    items = _inputs(args.per_category, not args.no_shared)
    if args.quick:
        items = items[:4] + [i for i in items if i[1] == "shared"][:2]
    rows = []
    for resolution in args.resolutions:
        for name, kind, source in items:
            row = {"mesh": name, "kind": kind, "resolution": resolution}
            ours = _run_isolated("narrow_band", source, resolution, args.quality_points)
            row.update({f"nb_{k}": v for k, v in ours.items()})
            wanted = args.baseline_only_for is None or name in args.baseline_only_for
            if resolution <= args.no_baseline_above and wanted:
                dense = _run_isolated("dense_seed", source, resolution, args.quality_points)
                row.update({f"dense_{k}": v for k, v in dense.items()})
                row["speedup"] = dense["seconds"] / ours["seconds"]
            rows.append(row)
            print(_row_line(row), file=sys.stderr, flush=True)
    summary = _summarise(rows, args.resolutions)
    report = {"machine": {"cpus": os.cpu_count()}, "quality_points": args.quality_points, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    print(_table(summary))
    return 0


def _row_line(row: dict) -> str:
    dense = f" dense {row['dense_seconds']:.2f}s x{row['speedup']:.1f}" if "speedup" in row else ""
    return (
        f"R={row['resolution']} {row['mesh'][:24]:24s} ours {row['nb_seconds']:.2f}s {row['nb_peak_mb']:.0f}MB "
        f"cd {row['nb_cd']:.4f} (floor {row['nb_cd_floor']:.4f}) wt={row['nb_watertight']}{dense}"
    )


def _summarise(rows: list[dict], resolutions: list[int]) -> dict:
    summary = {}
    for r in resolutions:
        sel = [row for row in rows if row["resolution"] == r]
        eps = 2.0 / r
        closed = [row for row in sel if row["nb_closed_input"]]
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
            "closed_cd_bound": 1.0 / r,
            "open_inputs": len(open_),
            "open_max_cd": max((row["nb_cd"] for row in open_), default=None),
            "open_cd_bound": eps + 2.0 / r,
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


def _table(summary: dict) -> str:
    head = "| R | meshes | median s (ours) | median s (dense) | speedup (median) | peak MB (ours) | watertight | max CD closed (bound) | max CD open (bound) |"
    lines = [head, "|" + "---|" * 9]
    for r, e in summary.items():
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(
            f"| {r} | {e['meshes']} | {e['median_seconds']:.2f} | {e.get('dense_median_seconds', float('nan')):.2f} | "
            f"{e.get('speedup_median', float('nan')):.1f}x | {e['max_peak_mb']:.0f} | {e['watertight_share']:.0%} | "
            f"{fmt(e['closed_max_cd'])} ({e['closed_cd_bound']:.4f}) | {fmt(e['open_max_cd'])} ({e['open_cd_bound']:.4f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
