"""Evaluation metric wall times on this machine: the per-shape metrics and the generation metrics.

Per-shape metrics at each size N (default 10,000 and 100,000 points a side): chamfer_distance,
fscore (τ = 0.01) and normal_consistency between N points on a sphere of radius 0.5 and N on a
perturbed sphere (radius 0.5·(1 + 0.1·sin 3θ·cos 2φ), with its normals), and volume_iou of the two
shapes' signed distances at N uniform points in [-1, 1]³ (the sphere's exact, the perturbed sphere's
radial approximation). Generation metrics: generation_metrics (MMD, COV, 1-NNA under the Chamfer
distance) on 32 generated against 32 reference clouds of 2,048 points, random ellipsoids from one
distribution. Each figure is the median over the repeats; KD-tree builds are inside the timings.
cKDTree queries use every core for the per-shape metrics and one per query for the pairwise ones, so
set the thread count with taskset rather than OMP_NUM_THREADS.

    python bench/bench_metrics.py                   # 10K and 100K points, 3 repeats
    python bench/bench_metrics.py --sizes 10000 --repeats 5

Prints JSON and a table; writes bench/results/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _table import print_table

from shapeflow.metrics import chamfer_distance, fscore, generation_metrics, normal_consistency, volume_iou


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(median wall time of `repeats` calls of fn, what the last call returned)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def perturbed_radius(directions: np.ndarray) -> np.ndarray:
    """Radius of the perturbed sphere along unit directions: 0.5·(1 + 0.1·sin 3θ·cos 2φ)."""
    theta = np.arccos(np.clip(directions[:, 2], -1.0, 1.0))
    phi = np.arctan2(directions[:, 1], directions[:, 0])
    return 0.5 * (1.0 + 0.1 * np.sin(3 * theta) * np.cos(2 * phi))


def sphere_pair(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n points with normals on the sphere and on the perturbed sphere; both fields at n uniform points."""
    sphere_dirs, bumpy_dirs = unit_vectors(rng, n), unit_vectors(rng, n)
    bumpy = bumpy_dirs * perturbed_radius(bumpy_dirs)[:, None]
    # Normal of the perturbed surface from finite differences of its radial parametrisation.
    eps = 1e-4
    tangent_u = np.cross(bumpy_dirs, np.where(np.abs(bumpy_dirs[:, 2:]) < 0.9, [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]))
    tangent_u /= np.linalg.norm(tangent_u, axis=1, keepdims=True)
    tangent_v = np.cross(bumpy_dirs, tangent_u)

    def surface(offset: np.ndarray) -> np.ndarray:
        d = bumpy_dirs + offset
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return d * perturbed_radius(d)[:, None]

    bumpy_normals = np.cross(surface(eps * tangent_u) - bumpy, surface(eps * tangent_v) - bumpy)
    queries = rng.uniform(-1, 1, size=(n, 3))
    radius = np.linalg.norm(queries, axis=1)
    query_dirs = queries / np.maximum(radius, 1e-12)[:, None]
    return {
        "sphere": 0.5 * sphere_dirs,
        "sphere_normals": sphere_dirs,
        "bumpy": bumpy,
        "bumpy_normals": bumpy_normals,
        "sphere_sdf": radius - 0.5,
        "bumpy_sdf": radius - perturbed_radius(query_dirs),
    }


def shape_metric_calls(s: dict[str, np.ndarray]) -> dict[str, Callable[[], float]]:
    """The per-shape metrics between the sphere and the perturbed sphere of sphere_pair, as calls."""
    return {
        "chamfer_distance": lambda: chamfer_distance(s["sphere"], s["bumpy"]),
        "fscore@0.01": lambda: fscore(s["bumpy"], s["sphere"], 0.01),
        "normal_consistency": lambda: normal_consistency(
            s["sphere"], s["sphere_normals"], s["bumpy"], s["bumpy_normals"]
        ),
        "volume_iou": lambda: volume_iou(s["bumpy_sdf"], s["sphere_sdf"]),
    }


def metric_timings(sizes: list[int], repeats: int, clouds: int = 32, cloud_points: int = 2048) -> list[dict]:
    """One row per (metric, size): {metric, points, clouds, repeats, median_s, value}, the last row
    generation_metrics on `clouds` against `clouds` clouds of `cloud_points` points."""
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        for name, fn in shape_metric_calls(sphere_pair(rng, n)).items():
            seconds, value = timed(fn, repeats)
            rows.append(
                {
                    "metric": name,
                    "points": n,
                    "clouds": "1 vs 1",
                    "repeats": repeats,
                    "median_s": seconds,
                    "value": value,
                }
            )
    gen, ref = (
        [unit_vectors(rng, cloud_points) * rng.uniform(0.3, 0.9, size=3) for _ in range(clouds)] for _ in range(2)
    )
    seconds, value = timed(lambda: generation_metrics(gen, ref), repeats)
    rows.append(
        {
            "metric": "generation_metrics",
            "points": cloud_points,
            "clouds": f"{clouds} vs {clouds}",
            "repeats": repeats,
            "median_s": seconds,
            "value": value,
        }
    )
    return rows


def print_metric_table(rows: list[dict]) -> None:
    print("| metric | points | clouds | median (s) | value |")
    print("|---|---|---|---|---|")
    for r in rows:
        value = r["value"]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.4f}"
        print(f"| {r['metric']} | {r['points']:,} | {r['clouds']} | {r['median_s']:.3f} | {shown} |")


def stage_timing(params_file: Path, vae: Path, dit: Path, samples: Path, meshes: Path) -> dict:
    """The evaluate stage as dvc.yaml runs it (params from `params_file`) into a scratch folder: its
    wall time, split into reconstruction and generation, and the figures it produced."""
    import tempfile

    from shapeflow import config
    from shapeflow.stages import evaluate

    params = config.load_params(params_file)
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(scratch) / 'mlflow.db'}")
        start = time.perf_counter()
        metrics = evaluate.run(params, evaluate.Paths(vae, dit, samples, meshes, Path(scratch) / "eval"))
        total = time.perf_counter() - start
        phases = json.loads((Path(scratch) / "eval" / evaluate.RUN_FILE).read_text())["timings"]
    return {
        "split": params.evaluate.split,
        "resolution": params.evaluate.resolution,
        "total_s": total,
        **phases,
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000], help="points a side for the per-shape metrics"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/metrics.json"))
    parser.add_argument("--stage", action="store_true", help="also time the whole evaluate stage on the paths below")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--vae", type=Path, default=Path("models/vae"))
    parser.add_argument("--dit", type=Path, default=Path("models/dit"))
    parser.add_argument("--samples", type=Path, default=Path("data/samples"))
    parser.add_argument("--meshes", type=Path, default=Path("data/watertight"))
    args = parser.parse_args(argv)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {
        "machine": {"cpus": os.cpu_count(), "threads": threads},
        "metrics": metric_timings(args.sizes, args.repeats),
    }
    if args.stage:
        report["stage"] = stage_timing(args.params, args.vae, args.dit, args.samples, args.meshes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    print_metric_table(report["metrics"])
    if args.stage:
        st = report["stage"]
        print()
        row = [
            f"{st['resolution']}³",
            st["recon_objects"],
            f"{st['recon_s']:.0f}",
            st.get("samples", 0),
            f"{st.get('generation_s', 0.0):.0f}",
            f"{st['total_s']:.0f}",
        ]
        print_table(
            [f"evaluate on the {st['split']} split", "objects", "recon (s)", "samples", "generation (s)", "total (s)"],
            [row],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
