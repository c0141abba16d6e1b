"""Decoding a learned field to a mesh: the dense grid, the two-level decode of before and the
hierarchical decode (shapeflow.geometry.decode), side by side on the same VAE and shapes.

For each shape, resolution and method: field queries, decode and marching-cubes seconds, the
process's extra peak memory (CPU: VmHWM above the resident memory before; GPU: the peak allocated),
and against the dense grid of the same resolution: `sign_mismatch`, the grid points whose sign
differs from the dense grid's at the corners of cells the dense surface crosses, and `cd_to_dense`,
the Chamfer distance between the method's mesh and the dense mesh, beside `cd_floor`, the distance
between two independent samplings of the dense mesh. With the dense grid comes
`queries_exact_split`, the queries of a hierarchy that split exactly the cells the dense surface
crosses (the least a rule that queries split cells whole can ask for and still match the dense
grid), and `crossed_corners`, the corners of those cells (the least any decoder can ask for).
`--method-max METHOD=R` leaves a method out above R (the dense grid: `--dense-max`).

The methods:
- dense: the field at every (R + 1)^3 grid point, marching cubes over the whole grid;
- two_level: the decoder before the hierarchy, as it was (a dense grid 2x coarser, the full
  resolution in the band; 65,536 queries per call; marching cubes over the whole grid), with the
  query code of then (`per_pair_forward`: the local decoder's value map applied to every
  (query, neighbour) pair);
- previous: the first hierarchical decoder (levels from 32^3, slope 1.5 and a one-cell dilation of
  the crossed cells, no surface following or cover test), with the query code of then;
- hierarchical: the decoder of today (levels from 32^3, slope 1 with the corner-ball cover test from
  the 128^3 level on, surface following, queries in Z order and per call sized to the device, the
  local decoder's neighbour search narrowed per chunk, marching cubes on the blocks the surface
  crosses).

The VAE: a train_vae output (`--vae models/vae`) with its sample-stage objects (`--samples`,
default data/samples beside it); or, without `--vae`, a VAE of the default (local) preset trained
here for `--train-steps` steps on a few built-in shapes with thin parts (tables, chairs, lamps,
rings).

    python bench/bench_decode.py --json OUT.json
    python bench/bench_decode.py --vae models/vae --samples data/samples --objects 4 --resolutions 128 256 512

The dense grid at 512^3 is 135M queries (about an hour a shape on 2 CPU cores): it is only computed
up to `--dense-max` (default 256 on a CPU, 512 on a GPU); above it the two dense columns are empty.
With `--evaluate-objects N` (and `--vae`), N test objects also go through the evaluate stage's
per-object scoring (`recon_object`: decode, Chamfer and F-scores on 100,000 points, volume IoU)
with the decoder before the hierarchy at 128^3 and with today's at 128^3 and 256^3: seconds per
object and the mean figures, so the cost and what the coarser grid hid sit side by side.

Prints JSON and a table; writes bench/results/decode.json unless --json says where.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _memory import peak_memory_mb, reset_peak_memory, resident_memory_mb
from _table import print_table

TWO_LEVEL_CHUNK = 65536  # queries per call of the decoder before the hierarchy
FLOOR_POINTS = 100_000
BUILTIN_SHAPES = ("table", "chair", "lamp", "ring")


def per_pair_forward(self, queries, decoded):
    """LocalQueryDecoder.forward (planes) as it was before the values were pooled per head: one
    (C + heads + 1) x C product per (query, neighbour) pair, torch.gather for the neighbours. The
    same field up to rounding; the baseline for the decoders of before."""
    import torch
    import torch.nn.functional as F

    from shapeflow.models.layers import gather_points

    normed = self.norm_tok(decoded.tokens)
    tokens = self.from_token(normed)
    anchors, width = decoded.anchors, tokens.shape[-1]
    plane = self.to_plane(normed)
    items = torch.cat([tokens, F.normalize(plane[..., :3], dim=-1), plane[..., 3:]], dim=-1)
    k = min(self.k, anchors.shape[1])
    idx = torch.cdist(queries.float(), anchors.float()).topk(k, dim=-1, largest=False).indices
    flat = idx.flatten(1)
    near_anchor = gather_points(anchors, flat).unflatten(1, idx.shape[1:])
    near_token, normal, offset = gather_points(items, flat).unflatten(1, idx.shape[1:]).split([width, 3, 1], dim=-1)
    rel = queries[:, :, None] - near_anchor.to(queries.dtype)
    dist = (normal * rel).sum(-1, keepdim=True) + offset
    hidden = F.gelu(near_token + self.rel(rel) + self.from_plane(self.plane_fourier(dist)))
    value, logit, plane_logit = self.to_value_logit(hidden).split([width, self.heads, 1], dim=-1)
    weight = logit.softmax(dim=2)
    x = (weight[..., None] * value.unflatten(-1, (self.heads, -1))).sum(dim=2).flatten(-2)
    blend = (plane_logit.softmax(dim=2) * dist).sum(dim=(2, 3))
    reach = self.log_reach.exp()
    return self._field(x) + reach * torch.tanh(blend / reach)


class queries_as_before:
    """Within the block, the VAE's local query decoder runs `per_pair_forward` (if it has planes)."""

    def __init__(self, vae):
        self.decoder = getattr(vae, "query_decoder", None)  # the grid family has none
        self.active = getattr(self.decoder, "planes", False)

    def __enter__(self):
        if self.active:
            self.decoder.forward = per_pair_forward.__get__(self.decoder)
        return self

    def __exit__(self, *exc):
        if self.active:
            del self.decoder.forward


# The splitting rule of the first hierarchical decoder, and the one the two-level decoder's band used.
RULE_BEFORE = {"slope": 1.5, "dilate": True, "follow": False, "cover": False}


def full_grid_mesh(values):
    """Marching cubes over the whole grid, as grid_to_mesh did before it went block-wise."""
    import mcubes
    import numpy as np
    import trimesh

    resolution = values.shape[0] - 1
    verts, faces = mcubes.marching_cubes(np.ascontiguousarray(values, dtype=np.float64), 0.0)
    if len(faces) == 0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
    mesh = trimesh.Trimesh(verts * (2.0 / resolution) - 1.0, faces[:, ::-1], process=False)
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces(height=None))
    mesh.remove_unreferenced_vertices()
    return mesh


def builtin_objects(steps: int, device: str) -> tuple[object, list[tuple[str, dict]]]:
    """A local-preset VAE trained for `steps` on a few built-in shapes, and those shapes' arrays."""
    import numpy as np
    import torch
    import trimesh

    from shapeflow import config
    from shapeflow.data.builtin import make_shape
    from shapeflow.dataset import draw
    from shapeflow.geometry.mesh import normalise
    from shapeflow.geometry.sampling import sample_object
    from shapeflow.geometry.watertight import watertight
    from shapeflow.models.vae import VecSetVAE, vae_config
    from shapeflow.stages.train_vae import losses

    params = config.load_params(None)
    objects = []
    for i, category in enumerate(BUILTIN_SHAPES):
        mesh, _, _ = normalise(make_shape(category, np.random.default_rng(i)))
        closed = watertight(mesh.vertices, mesh.faces, resolution=256)
        arrays = sample_object(trimesh.Trimesh(closed.vertices, closed.faces, process=False), params.sample, seed=i)
        objects.append((category, arrays))
    torch.manual_seed(0)
    vae = VecSetVAE(vae_config(params.train_vae.preset, params.train_vae.model)).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    tic = time.perf_counter()
    for step in range(steps):
        views = [draw(arrays, params.train_vae.data, generator) for _, arrays in objects]
        batch = {k: torch.stack([v[k] for v in views]).to(device) for k in views[0]}
        loss = losses(vae, batch, params.train_vae.loss)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}/{steps} loss {loss.item():.5f} ({time.perf_counter() - tic:.0f} s)", flush=True)
    return vae.eval(), objects


def stage_objects(vae_dir: Path, samples: Path, n: int, keys: list[str] | None, device: str):
    from shapeflow.dataset import list_objects, load_arrays
    from shapeflow.models.families import load_vae

    vae = load_vae(vae_dir, device).eval()
    objects = list_objects(samples, "test") or list_objects(samples)
    if keys:
        objects = [o for o in objects if any(o.key.startswith(k) for k in keys)]
    # One object per category first, in key order, so the shapes differ.
    chosen, seen = [], set()
    for o in sorted(objects, key=lambda o: o.key):
        if o.category not in seen:
            chosen.append(o)
            seen.add(o.category)
    chosen += [o for o in objects if o not in chosen]
    return vae, [(f"{o.category}/{o.key[:8]}", load_arrays(o.path)) for o in chosen[:n]]


def run_method(method: str, field, resolution: int, device: str, as_before=None) -> tuple[object, object, dict]:
    import torch

    from shapeflow.geometry.decode import decode_grid, grid_to_mesh

    calls = {"queries": 0}

    def counted(q):
        calls["queries"] += len(q)
        return field(q)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_memory()
    before = resident_memory_mb()
    tic = time.perf_counter()
    if method == "dense":
        values = decode_grid(counted, resolution, device=device, base=resolution)
    elif method == "two_level":
        with as_before:
            values = decode_grid(counted, resolution, TWO_LEVEL_CHUNK, device, base=resolution // 2, **RULE_BEFORE)
    elif method == "previous":
        with as_before:
            values = decode_grid(counted, resolution, device=device, **RULE_BEFORE)
    else:
        values = decode_grid(counted, resolution, device=device)
    decode_s = time.perf_counter() - tic
    tic = time.perf_counter()
    mesh = full_grid_mesh(values) if method in ("dense", "two_level") else grid_to_mesh(values)
    mc_s = time.perf_counter() - tic
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_memory_mb() - before
    row = {
        "queries": calls["queries"],
        "decode_s": decode_s,
        "mc_s": mc_s,
        "total_s": decode_s + mc_s,
        "peak_memory_mb": memory,
        "faces": len(mesh.faces),
        "watertight": bool(mesh.is_watertight) if len(mesh.faces) else False,
    }
    return values, mesh, row


def exact_split_queries(dense_values) -> int:
    """The queries of a hierarchy (same levels as decode_grid's) that split exactly the cells holding
    a crossing of the dense surface, and no others: what a perfect splitting rule would cost, the
    lower bound for a decode that matches the dense grid."""
    import torch
    import torch.nn.functional as F

    from shapeflow.geometry.decode import _CORNERS, base_resolution

    values = torch.from_numpy(dense_values)
    resolution = values.shape[0] - 1
    corners = torch.stack([values[i : resolution + i, j : resolution + j, k : resolution + k] for i, j, k in _CORNERS])
    crossed = ((corners > 0).any(0) & (corners < 0).any(0)).float()[None, None]
    res = base_resolution(resolution)
    queries = (res + 1) ** 3
    while res < resolution:
        factor = resolution // res
        cells = F.max_pool3d(crossed, factor, factor)[0, 0] > 0
        cells = cells.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        res *= 2
        mask = torch.zeros((res + 1,) * 3, dtype=torch.bool)
        for i, j, k in _CORNERS:
            mask[i : res + i, j : res + j, k : res + k] |= cells
        mask[::2, ::2, ::2] = False
        queries += int(mask.sum())
    return queries


def compare(values, mesh, dense_values, dense_mesh, dense_points, seed: int) -> dict:
    import numpy as np
    from scipy import ndimage

    from shapeflow.geometry.decode import crossed_corners
    from shapeflow.geometry.sampling import sample_surface
    from shapeflow.metrics import chamfer_distance

    wrong = ((values < 0) != (dense_values < 0)) & crossed_corners(dense_values)
    # Where the first few are: grid index, the dense value, the decoded value.
    where = [
        [*map(int, ijk), float(dense_values[tuple(ijk)]), float(values[tuple(ijk)])] for ijk in np.argwhere(wrong)[:10]
    ]
    # The wrong points in connected groups (26-neighbours): a part the decoder skipped, or a few
    # isolated points where the field spikes between grid points.
    groups, count = ndimage.label(wrong, np.ones((3, 3, 3), bool))
    sizes = np.bincount(groups.ravel())[1:]
    row = {
        "sign_mismatch": int(wrong.sum()),
        "mismatch_groups": int(count),
        "mismatch_largest_group": int(sizes.max()) if count else 0,
        "mismatch_points": where,
    }
    if len(mesh.faces) == 0 or len(dense_mesh.faces) == 0:
        return row | {"cd_to_dense": float("nan")}
    points, _ = sample_surface(mesh, FLOOR_POINTS, np.random.default_rng(seed))
    return row | {"cd_to_dense": chamfer_distance(points, dense_points)}


METHODS = ("dense", "two_level", "previous", "hierarchical")


def bench_shape(
    name: str, vae, arrays: dict, resolutions: list[int], limits: dict[str, int], device: str, methods=METHODS
) -> list[dict]:
    import numpy as np
    import torch

    from shapeflow import config
    from shapeflow.geometry.decode import crossed_corners
    from shapeflow.geometry.sampling import sample_surface
    from shapeflow.metrics import chamfer_distance
    from shapeflow.models.families import encoder_inputs

    data = config.load_params(None).train_vae.data
    inputs = {k: v.to(device) for k, v in encoder_inputs(vae, arrays, data, 0).items()}
    with torch.no_grad():
        tokens = vae.decode(vae.encode(**inputs).mode())

    def field(q):  # as inference.reconstruct queries it
        return vae.query(tokens, q[None])[0]

    rows = []
    for resolution in resolutions:
        dense_values = dense_mesh = dense_points = None
        result = {}
        for method in methods:
            if resolution > limits.get(method, resolution):
                continue
            values, mesh, row = run_method(method, field, resolution, device, queries_as_before(vae))
            if method == "dense":
                dense_values, dense_mesh = values, mesh
                row["queries_exact_split"] = exact_split_queries(values)
                row["crossed_corners"] = int(crossed_corners(values).sum())
                if len(mesh.faces):
                    dense_points, _ = sample_surface(mesh, FLOOR_POINTS, np.random.default_rng(1))
                    again, _ = sample_surface(mesh, FLOOR_POINTS, np.random.default_rng(2))
                    row["cd_floor"] = chamfer_distance(again, dense_points)
            elif dense_values is not None:
                row |= compare(values, mesh, dense_values, dense_mesh, dense_points, seed=3)
            result[method] = row
            print(
                f"{name} {resolution}^3 {method}: {row['queries']:,} queries, {row['total_s']:.1f} s"
                + (f", sign_mismatch {row['sign_mismatch']}" if "sign_mismatch" in row else ""),
                flush=True,
            )
        rows.append({"shape": name, "resolution": resolution, **result})
    return rows


def evaluate_rows(vae_dir: Path, samples: Path, n: int, device: str) -> list[dict]:
    """The evaluate stage's per-object scoring of n test objects, two-level 128^3 against the
    hierarchical decoder at 128^3 and 256^3: mean seconds and figures per variant."""
    import contextlib
    import dataclasses
    import statistics

    import shapeflow.inference as inference
    import shapeflow.stages.evaluate as evaluate
    from shapeflow import config
    from shapeflow.dataset import list_objects
    from shapeflow.geometry.decode import decode_grid, decode_mesh, evaluate_points
    from shapeflow.models.families import load_vae

    params = config.load_params(None)
    vae = load_vae(vae_dir, device).eval()
    objects = (list_objects(samples, "test") or list_objects(samples))[:n]
    refs = evaluate.reference_paths(samples.parent / "watertight")

    def two_level_mesh(field, resolution, chunk=None, device="cpu"):
        values = decode_grid(field, resolution, TWO_LEVEL_CHUNK, device, base=resolution // 2, **RULE_BEFORE)
        return full_grid_mesh(values)

    variants = (("two_level", 128, two_level_mesh, TWO_LEVEL_CHUNK), ("hierarchical", 128, decode_mesh, None))
    variants += (("hierarchical", 256, decode_mesh, None),)
    rows = []
    for method, resolution, mesher, chunk in variants:
        inference.decode_mesh = mesher
        evaluate.evaluate_points = lambda field, points, chunk_=None, c=chunk: evaluate_points(field, points, c)
        p = dataclasses.replace(params.evaluate, resolution=resolution)
        records, seconds = [], []
        for obj in objects:
            tic = time.perf_counter()
            with queries_as_before(vae) if method == "two_level" else contextlib.nullcontext():
                record, _, _ = evaluate.recon_object(vae, obj, refs.get(obj.key), p, params.train_vae.data, 0, device)
            seconds.append(time.perf_counter() - tic)
            records.append(record)
        ok = [r for r in records if r["status"] == "ok"]
        row = {"method": method, "resolution": resolution, "objects": len(ok), "s_per_object": statistics.mean(seconds)}
        for key in ("cd", "f@0.01", "f@0.02", "nc", "iou_volume", "floor_f@0.01"):
            row[key] = statistics.mean(float(r[key]) for r in ok)
        rows.append(row)
        summary = f"{row['s_per_object']:.1f} s/object, F@0.01 {row['f@0.01']:.3f}"
        print(f"evaluate {method} {resolution}^3: {summary}", flush=True)
    inference.decode_mesh, evaluate.evaluate_points = decode_mesh, evaluate_points
    return rows


def summary_rows(rows: list[dict]) -> list[list[object]]:
    table = []
    for r in rows:
        dense, two, prev, hier = (r.get(m) for m in METHODS)

        def ratio(a, b, key):
            return f"{a[key] / b[key]:.1f}x" if a and b and b[key] else "-"

        table.append(
            [
                r["shape"],
                r["resolution"],
                f"{dense['queries']:,}" if dense else "-",
                *(f"{m['queries']:,}" if m else "-" for m in (two, prev, hier)),
                f"{dense['queries_exact_split']:,}" if dense else "-",
                f"{dense['crossed_corners']:,}" if dense else "-",
                f"{dense['total_s']:.1f}" if dense else "-",
                *(f"{m['total_s']:.1f}" if m else "-" for m in (two, prev, hier)),
                ratio(dense, hier, "queries"),
                ratio(dense, hier, "total_s"),
                f"{hier['peak_memory_mb']:.0f}" if hier else "-",
                f"{hier['sign_mismatch']} ({hier['mismatch_groups']}, {hier['mismatch_largest_group']})"
                if hier and "sign_mismatch" in hier
                else "-",
                f"{hier['cd_to_dense']:.5f}" if hier and "cd_to_dense" in hier else "-",
                f"{dense['cd_floor']:.5f}" if dense and "cd_floor" in dense else "-",
            ]
        )
    return table


def parse_limit(item: str) -> tuple[str, int]:
    method, _, resolution = item.partition("=")
    if method not in METHODS or not resolution.isdigit():
        raise SystemExit(f"--method-max: {item!r} is not METHOD=R with METHOD one of {', '.join(METHODS)}")
    return method, int(resolution)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, help="a train_vae output folder (default: train one here)")
    parser.add_argument("--samples", type=Path, help="the sample stage's output for --vae (default: data/samples)")
    parser.add_argument("--objects", type=int, default=4, help="shapes from --samples (one per category first)")
    parser.add_argument("--keys", nargs="+", help="object key prefixes to take from --samples")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all")
    parser.add_argument("--dense-max", type=int, help="largest resolution with a dense grid (CPU 256, GPU 512)")
    parser.add_argument(
        "--method-max",
        nargs="+",
        default=[],
        metavar="METHOD=R",
        help="the largest resolution a method runs at, e.g. two_level=128 (default: every one)",
    )
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the VAE trained without --vae")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: torch's)")
    parser.add_argument("--evaluate-objects", type=int, default=0, help="test objects scored as evaluate does")
    parser.add_argument("--skip-grids", action="store_true", help="only the --evaluate-objects comparison")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_max = args.dense_max or (512 if device == "cuda" else 256)
    limits = {"dense": dense_max} | dict(parse_limit(item) for item in args.method_max)
    if args.vae:
        samples = args.samples or Path("data/samples")
        vae, objects = stage_objects(args.vae, samples, args.objects, args.keys, device)
        source = f"{args.vae} on {samples}"
    else:
        vae, objects = builtin_objects(args.train_steps, device)
        source = f"local preset trained {args.train_steps} steps on built-in {', '.join(BUILTIN_SHAPES)}"
    rows = []
    for name, arrays in [] if args.skip_grids else objects:
        rows += bench_shape(name, vae, arrays, args.resolutions, limits, device, args.methods)
    evaluated = []
    if args.vae and args.evaluate_objects:
        evaluated = evaluate_rows(args.vae, args.samples or Path("data/samples"), args.evaluate_objects, device)
    report = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "vae": source,
        "dense_max": dense_max,
        "method_max": limits,
        "rows": rows,
        "evaluate": evaluated,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    headers = [
        "shape",
        "R",
        "queries dense",
        "two-level",
        "previous",
        "hier.",
        "exact-split bound",
        "crossed corners",
        "s dense",
        "two-level",
        "previous",
        "hier.",
        "queries dense/hier.",
        "time dense/hier.",
        "hier. MB",
        "sign_mismatch (groups, largest)",
        "cd_to_dense",
        "cd floor",
    ]
    if rows:
        print_table(headers, summary_rows(rows))
    if evaluated:
        keys = ["method", "resolution", "objects", "s_per_object", "cd", "f@0.01", "f@0.02", "nc", "iou_volume"]
        print_table(keys, [[f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in keys] for r in evaluated])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
