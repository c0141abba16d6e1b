"""Salient-edge sampling: the vectorised sampler against a per-edge Python loop.

The baseline is the loop of the reference write-up (Dora's salient-edge sampling, with trimesh in
place of Blender): walk the pairs of adjacent faces in Python, compute each dihedral angle with
numpy, collect the sharp edges in a list, place points along each sharp edge with np.linspace in
proportion to its length, then thin the pool with farthest point sampling. Both run on the same
meshes in one process, each on a fresh copy of the mesh (trimesh caches its adjacency), so neither
inherits the other's work.

"Same distribution" is checked three ways: both select the same set of sharp edges, both build
candidate pools of the same size lying on the same edges (Chamfer distance between the pools), and
the Chamfer distance between the two final point sets is at the level of two runs of the same
method with different seeds.

    python bench/bench_salient.py            # all meshes, best of 3 timings
    python bench/bench_salient.py --quick    # a few meshes, one timing each

The meshes: trimesh primitives, the built-in procedural shapes, /work/shared/meshes/*.obj when that
folder exists, and fandisk remeshed by the watertight stage (marching cubes at R = 256, or 128 with
--quick), the size of mesh the sample stage reads in practice.

Prints JSON and a table; writes bench/results/salient.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from shapeflow.config import SampleParams
from shapeflow.data.builtin import CATEGORIES, make_shape
from shapeflow.geometry.mesh import clean_mesh, load_clean, normalise
from shapeflow.geometry.sampling import (
    SHARP_OVERSAMPLE,
    edge_candidates,
    farthest_points,
    sample_sharp,
    sample_surface,
    sharp_edge_table,
)
from shapeflow.geometry.watertight import watertight

# trimesh gives a face without area a zero normal; a unit normal is longer than this.
MIN_NORMAL_LENGTH = 0.5
SHARED_MESHES = Path(__file__).resolve().parents[2] / "shared" / "meshes"  # ../shared/meshes beside the checkout
RESULTS = Path(__file__).resolve().parent / "results" / "salient.json"
REQUIRED_SPEEDUP = 50.0
VECTOR_REPEAT_FACTOR = 10


# -------------------------------------------------------------------------------------- baseline


def reference_sharp_edges(mesh: trimesh.Trimesh, angle_deg: float) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Sharp edges, one adjacent face pair at a time: [((v0, v1), edge normal), ...]."""
    threshold = math.radians(angle_deg)
    face_normals = mesh.face_normals
    found: list[tuple[tuple[int, int], np.ndarray]] = []
    seen: set[tuple[int, int]] = set()
    for (f0, f1), (a, b) in zip(mesh.face_adjacency.tolist(), mesh.face_adjacency_edges.tolist(), strict=True):
        n0, n1 = face_normals[f0], face_normals[f1]
        if np.linalg.norm(n0) <= MIN_NORMAL_LENGTH or np.linalg.norm(n1) <= MIN_NORMAL_LENGTH:
            continue
        angle = np.arccos(np.clip(np.dot(n0, n1), -1.0, 1.0))
        edge = (min(a, b), max(a, b))
        if angle > threshold and edge not in seen:
            seen.add(edge)
            normal = n0 + n1
            length = np.linalg.norm(normal)
            found.append((edge, normal / length if length > 1e-12 else n0))
    return found


def reference_candidates(mesh: trimesh.Trimesh, sharp: list, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Edge end points, then np.linspace points along each sharp edge by its length."""
    vertices = mesh.vertices
    end_normals: dict[int, np.ndarray] = {}
    for (a, b), normal in sharp:
        for v in (a, b):
            end_normals[v] = end_normals.get(v, np.zeros(3)) + normal
    points, normals = [], []
    for v in sorted(end_normals):
        length = np.linalg.norm(end_normals[v])
        points.append(vertices[v])
        normals.append(end_normals[v] / length if length > 1e-12 else end_normals[v])
    lengths = [np.linalg.norm(vertices[b] - vertices[a]) for (a, b), _ in sharp]
    spacing = sum(lengths) / budget
    for ((a, b), normal), length in zip(sharp, lengths, strict=True):
        k = int(np.floor(length / spacing))
        if k:
            points.extend(np.linspace(vertices[a], vertices[b], k + 2)[1:-1])
            normals.extend([normal] * k)
    return np.array(points).reshape(-1, 3), np.array(normals).reshape(-1, 3)


def reference_sample_sharp(mesh: trimesh.Trimesh, n: int, angle_deg: float, rng: np.random.Generator):
    """The loop version of `sample_sharp`: same outputs, one edge at a time."""
    sharp = reference_sharp_edges(mesh, angle_deg)
    if not sharp:
        points, normals = sample_surface(mesh, n, rng)
        return points, normals, np.zeros(n, bool), 0, np.zeros((0, 3))
    candidates, normals = reference_candidates(mesh, sharp, SHARP_OVERSAMPLE * n)
    keep = farthest_points(candidates, n, rng)
    return candidates[keep], normals[keep], np.ones(n, bool), len(sharp), candidates


# ---------------------------------------------------------------------------------------- meshes


def primitives() -> Iterator[tuple[str, trimesh.Trimesh]]:
    yield "box (subdivided x3)", trimesh.creation.box(extents=(1.6, 1.0, 0.6)).subdivide().subdivide().subdivide()
    yield "cylinder 128", trimesh.creation.cylinder(radius=0.5, height=1.5, sections=128)
    yield "icosphere 4", trimesh.creation.icosphere(subdivisions=4)


def builtin_shapes(count: int) -> Iterator[tuple[str, trimesh.Trimesh]]:
    for category in CATEGORIES[:count]:
        yield f"builtin {category}", clean_mesh(make_shape(category, np.random.default_rng(0)))


def shared_meshes(names: list[str] | None) -> Iterator[tuple[str, trimesh.Trimesh]]:
    if not SHARED_MESHES.is_dir():
        return
    for path in sorted(SHARED_MESHES.glob("*.obj")):
        if names is None or path.stem in names:
            yield path.name, load_clean(path)


def remeshed(source: Iterator[tuple[str, trimesh.Trimesh]], resolution: int) -> Iterator[tuple[str, trimesh.Trimesh]]:
    """Meshes through the watertight stage's remesher: what the sample stage really reads."""
    for name, mesh in source:
        mesh, _, _ = normalise(mesh)
        result = watertight(mesh.vertices, mesh.faces, resolution=resolution)
        yield f"{name} R{resolution}", trimesh.Trimesh(result.vertices, result.faces, process=False)


STAGE_INPUT = " R"  # names of remeshed meshes carry their resolution


def meshes(quick: bool) -> Iterator[tuple[str, trimesh.Trimesh]]:
    yield from primitives()
    yield from builtin_shapes(2 if quick else 8)
    yield from shared_meshes(["fandisk", "cow"] if quick else None)
    resolution = 128 if quick else 256
    yield from remeshed(builtin_shapes(2 if quick else 8), resolution)
    yield from remeshed(shared_meshes(["fandisk"] if quick else ["fandisk", "cow", "spot"]), resolution)


# --------------------------------------------------------------------------------------- measure


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean nearest-neighbour distance (Euclidean), as in docs/conventions.md."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return 0.5 * float(cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def fresh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy without trimesh's cached adjacency, normals or angles."""
    return trimesh.Trimesh(mesh.vertices.copy(), mesh.faces.copy(), process=False)


def measure(name: str, mesh: trimesh.Trimesh, n: int, angle: float, repeats: int) -> dict:
    """Timings (best of `repeats`; the vectorised side, a few ms, gets 10x as many tries, since
    on a busy machine one unlucky try costs it proportionally more) and the distribution checks."""
    mesh, _, _ = normalise(mesh)
    fast = VECTOR_REPEAT_FACTOR * repeats
    t_vec, vec = best_time(lambda: sample_sharp(fresh(mesh), n, angle, np.random.default_rng(0)), fast)
    t_ref, ref = best_time(lambda: reference_sample_sharp(fresh(mesh), n, angle, np.random.default_rng(0)), repeats)
    # The part each method does differently: finding the edges and placing the candidates.
    t_vec_edges, _ = best_time(lambda: _vector_candidates(fresh(mesh), n, angle), fast)
    t_ref_edges, _ = best_time(lambda: _loop_candidates(fresh(mesh), n, angle), repeats)
    row = {
        "mesh": name,
        "faces": len(mesh.faces),
        "edge_pairs": len(mesh.face_adjacency),
        "sharp_edges": int(vec[3]),
        "sharp_edges_reference": int(ref[3]),
        "vectorised_s": t_vec,
        "reference_s": t_ref,
        "speedup": t_ref / t_vec,
        "vectorised_edges_s": t_vec_edges,
        "reference_edges_s": t_ref_edges,
        "speedup_edges": t_ref_edges / t_vec_edges,
    }
    row.update(_same_distribution(mesh, n, angle, vec, ref))
    return row


def _vector_candidates(mesh: trimesh.Trimesh, n: int, angle: float):
    edges, normals = sharp_edge_table(mesh, angle)
    return edge_candidates(mesh.vertices, edges, normals, SHARP_OVERSAMPLE * n) if len(edges) else None


def _loop_candidates(mesh: trimesh.Trimesh, n: int, angle: float):
    sharp = reference_sharp_edges(mesh, angle)
    return reference_candidates(mesh, sharp, SHARP_OVERSAMPLE * n) if sharp else None


def _same_distribution(mesh: trimesh.Trimesh, n: int, angle: float, vec, ref) -> dict:
    edges_vec = {tuple(e) for e in sharp_edge_table(mesh, angle)[0].tolist()}
    edges_ref = {e for e, _ in reference_sharp_edges(mesh, angle)}
    out = {"same_edges": edges_vec == edges_ref, "edges_only_in_one": len(edges_vec ^ edges_ref)}
    if not edges_vec:
        return out
    edges, normals = sharp_edge_table(mesh, angle)
    pool_vec, _ = edge_candidates(mesh.vertices, edges, normals, SHARP_OVERSAMPLE * n)
    pool_ref = ref[4]
    vec_b = sample_sharp(mesh, n, angle, np.random.default_rng(1))
    ref_b = reference_sample_sharp(mesh, n, angle, np.random.default_rng(1))
    out.update(
        pool_sizes=[len(pool_vec), len(pool_ref)],
        chamfer_pools=chamfer(pool_vec, pool_ref),
        # Vectorised and loop with different seeds, against each method's own seed-to-seed spread.
        chamfer_vec_ref=chamfer(vec[0], ref_b[0]),
        chamfer_vec_vec=chamfer(vec[0], vec_b[0]),
        chamfer_ref_ref=chamfer(ref[0], ref_b[0]),
        chamfer_same_seed=chamfer(vec[0], ref[0]),
    )
    spread = max(out["chamfer_vec_vec"], out["chamfer_ref_ref"])
    out["same_distribution"] = bool(out["same_edges"] and out["chamfer_vec_ref"] <= 1.5 * spread + 1e-9)
    return out


# ------------------------------------------------------------------------------------------ main


def table(rows: list[dict]) -> str:
    head = (
        f"{'mesh':<20}{'faces':>7}{'sharp':>6} | {'edges: vec ms':>13}{'loop ms':>9}{'x':>6} | "
        f"{'total: vec ms':>13}{'loop ms':>9}{'x':>6} | same edges  CD vec/ref  CD vec/vec"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        cd = f"{r.get('chamfer_vec_ref', float('nan')):10.2e}  {r.get('chamfer_vec_vec', float('nan')):10.2e}"
        lines.append(
            f"{r['mesh'][:19]:<20}{r['faces']:>7}{r['sharp_edges']:>6} | {1e3 * r['vectorised_edges_s']:>13.2f}"
            f"{1e3 * r['reference_edges_s']:>9.1f}{r['speedup_edges']:>6.0f} | {1e3 * r['vectorised_s']:>13.2f}"
            f"{1e3 * r['reference_s']:>9.1f}{r['speedup']:>6.0f} | {str(r['same_edges']):>10}  {cd}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few meshes, one timing each")
    parser.add_argument("--repeats", type=int, help="timings per mesh, best kept (default 3; 1 with --quick)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    defaults = SampleParams()
    n, angle = defaults.sharp, defaults.sharp_angle_deg
    rows = [measure(name, mesh, n, angle, repeats) for name, mesh in meshes(args.quick)]
    with_edges = [r for r in rows if r["sharp_edges"]]
    stage_inputs = [r for r in with_edges if STAGE_INPUT in r["mesh"]]
    summary = {
        "n_points": n,
        # The meshes the sample stage actually reads: watertight-stage outputs.
        "stage_inputs": len(stage_inputs),
        "stage_inputs_min_speedup_total": min((r["speedup"] for r in stage_inputs), default=None),
        "stage_inputs_median_speedup_total": float(np.median([r["speedup"] for r in stage_inputs]))
        if stage_inputs
        else None,
        "stage_inputs_min_speedup_edges": min((r["speedup_edges"] for r in stage_inputs), default=None),
        "angle_deg": angle,
        "repeats": repeats,
        "machine": platform.processor() or platform.machine(),
        "min_speedup_total": min(r["speedup"] for r in with_edges),
        "min_speedup_edges": min(r["speedup_edges"] for r in with_edges),
        # Time for the whole set of meshes, loop over vectorised.
        "speedup_total_all": sum(r["reference_s"] for r in with_edges) / sum(r["vectorised_s"] for r in with_edges),
        "speedup_edges_all": sum(r["reference_edges_s"] for r in with_edges)
        / sum(r["vectorised_edges_s"] for r in with_edges),
        "required_speedup": REQUIRED_SPEEDUP,
        "edges_meet_required": sum(r["speedup_edges"] >= REQUIRED_SPEEDUP for r in with_edges),
        "total_meets_required": sum(r["speedup"] >= REQUIRED_SPEEDUP for r in with_edges),
        "meshes_with_edges": len(with_edges),
        "all_same_edges": all(r["same_edges"] for r in rows),
        "all_same_distribution": all(r["same_distribution"] for r in with_edges),
        "meshes": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print()
    print(table(rows))
    print(
        f"\nspeed-up, meshes with sharp edges: edge finding + placement {summary['min_speedup_edges']:.0f}x (min), "
        f"{summary['speedup_edges_all']:.0f}x (all meshes together); end to end incl. the shared FPS call "
        f"{summary['min_speedup_total']:.0f}x (min), {summary['speedup_total_all']:.0f}x (together); "
        f"required {REQUIRED_SPEEDUP:.0f}x: met by edge finding on {summary['edges_meet_required']} and end to end "
        f"on {summary['total_meets_required']} of {summary['meshes_with_edges']} meshes"
    )
    if stage_inputs:
        print(
            f"watertight-stage outputs (what the sample stage reads), {len(stage_inputs)} meshes: end to end "
            f"{summary['stage_inputs_min_speedup_total']:.0f}x (min), "
            f"{summary['stage_inputs_median_speedup_total']:.0f}x (median)"
        )
    print(
        f"same sharp edges on every mesh: {summary['all_same_edges']}; "
        f"same distribution (Chamfer) on every mesh: {summary['all_same_distribution']}"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
