"""Seconds a reconstruction for trained VAEs of either family, on the same test objects, side by side.

For each run (a workspace that ran train_vae: its models/vae, data/samples and params.yaml), the
same test objects (the keys every run has, one per category first) are encoded and decoded with
today's decoder (shapeflow.inference.reconstruct) at each resolution, on CUDA when there is one
(--device): field queries, encode+decode
seconds, marching-cubes seconds, faces. The family table of docs/grid-family.md takes its
"decode seconds per shape at the same output resolution" from here.

    python bench/bench_family_decode.py --run vecset=WS1 --run grid=WS2 --objects 4 --resolutions 128 256

Prints JSON and a table; writes bench/results/family_decode.json unless --json says where.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _table import print_table


def parse_run(item: str) -> tuple[str, Path]:
    label, sep, folder = item.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"--run wants LABEL=WORKSPACE, got {item!r}")
    return label, Path(folder)


def common_objects(samples: list[Path], n: int) -> list[str]:
    """Up to n test-object keys present in every samples folder, one per category first."""
    from shapeflow.dataset import list_objects

    listed = [{o.key: o for o in list_objects(folder, "test")} for folder in samples]
    keys = sorted(set.intersection(*(set(found) for found in listed)))
    chosen, seen = [], set()
    for key in keys:
        category = listed[0][key].category
        if category not in seen:
            chosen.append(key)
            seen.add(category)
    chosen += [k for k in keys if k not in chosen]
    return chosen[:n]


def time_run(label: str, workspace: Path, keys: list[str], resolutions: list[int], device: str) -> list[dict]:
    import torch

    import shapeflow.inference as inference
    from shapeflow import config
    from shapeflow.dataset import list_objects, load_arrays
    from shapeflow.geometry import decode
    from shapeflow.models.families import family_of, load_vae

    params = config.load_params(workspace / "params.yaml")
    vae = load_vae(workspace / "models" / "vae", device).eval()
    objects = {o.key: o for o in list_objects(workspace / "data" / "samples", "test")}
    if device == "cuda":  # CUDA start-up and the first kernels' compilation stay out of the times
        first = load_arrays(objects[keys[0]].path)
        inference.reconstruct(vae, first, params.train_vae.data, 0, 64, torch.device(device))
    rows = []
    for key in keys:
        arrays = load_arrays(objects[key].path)
        for resolution in resolutions:
            calls = {"queries": 0, "mc_s": 0.0}
            grid_to_mesh = decode.grid_to_mesh

            def counted_mesh(field, res, chunk=None, device="cpu", calls=calls, grid_to_mesh=grid_to_mesh):
                def counted(q):
                    calls["queries"] += len(q)
                    return field(q)

                values = decode.decode_grid(counted, res, chunk, device)
                tic = time.perf_counter()
                mesh = grid_to_mesh(values)
                calls["mc_s"] = time.perf_counter() - tic
                return mesh

            inference.decode_mesh = counted_mesh
            try:
                tic = time.perf_counter()
                _, mesh = inference.reconstruct(vae, arrays, params.train_vae.data, 0, resolution, torch.device(device))
                total = time.perf_counter() - tic
            finally:
                inference.decode_mesh = decode.decode_mesh
            row = {
                "run": label,
                "device": device,
                "family": family_of(vae),
                "object": f"{objects[key].category}/{key[:8]}",
                "resolution": resolution,
                "queries": calls["queries"],
                "decode_s": total - calls["mc_s"],
                "mc_s": calls["mc_s"],
                "total_s": total,
                "faces": len(mesh.faces),
            }
            print(f"{label} {row['object']} {resolution}^3: {row['queries']:,} queries, {total:.1f} s", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, help="LABEL=WORKSPACE, repeated")
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "family_decode.json")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for label, workspace in args.run:
        for part in ("models/vae", "data/samples", "params.yaml"):
            if not (workspace / part).exists():
                parser.error(f"--run {label}: {workspace / part} does not exist (has train_vae run there?)")
    keys = common_objects([workspace / "data" / "samples" for _, workspace in args.run], args.objects)
    if not keys:
        parser.error("the runs have no test object in common")
    rows = []
    for label, workspace in args.run:
        rows += time_run(label, workspace, keys, args.resolutions, device)
    report = {"device": device, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    report |= {"objects": keys, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    table = []
    for label, _ in args.run:
        for resolution in args.resolutions:
            mine = [r for r in rows if r["run"] == label and r["resolution"] == resolution]
            table.append(
                [
                    label,
                    mine[0]["family"],
                    resolution,
                    f"{statistics.mean(r['queries'] for r in mine):,.0f}",
                    f"{statistics.mean(r['decode_s'] for r in mine):.2f}",
                    f"{statistics.mean(r['mc_s'] for r in mine):.2f}",
                    f"{statistics.mean(r['total_s'] for r in mine):.2f}",
                ]
            )
    print_table(["run", "family", "R", "queries (mean)", "encode+decode s", "marching cubes s", "total s"], table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
