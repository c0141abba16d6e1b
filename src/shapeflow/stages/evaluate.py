"""evaluate stage: the figures runs are compared by, on one split (test by default).

1. Reconstruction: every object of the split is encoded by the VAE (posterior mean of a seeded
   encoder view), decoded to a mesh, and scored against its watertight mesh: Chamfer distance,
   F-score@0.01/0.02 and normal consistency on `recon_points` surface points a side, volume IoU on the
   object's uniform supervision points and near-surface IoU on its near-surface points (both from the
   decoded field itself, not the mesh). Per object, per category, and the mean.
2. Generation: the DiT samples shapes (each category of the split in turn, as many as the split holds
   of it unless `gen_per_category` says otherwise); MMD-CD, COV-CD and 1-NNA-CD against the split's
   surfaces on `gen_points`-point clouds, per category and overall. Category match: the share of
   samples whose nearest training shape (Chamfer, a 1-nearest-neighbour classifier over the train
   split) is of the category asked for; also over the categories with at least
   `category_min_train` training objects only (`category_match_common`).
3. The noise floor of all of them: the same metrics between two independent samplings of the reference
   surfaces, the best figure a model could reach at these point counts; for category match, the same
   classifier on the split's real shapes (an object is never its own neighbour).

OUT gets metrics.json (the headline figures, DVC metrics), plots/*.csv (per object, per sample, per
category), samples/ (meshes and preview.png of the generated shapes) and recon/ (reference beside
reconstruction for the first objects). One MLflow run in `shapeflow-evaluate`, tagged with the runs
of the VAE and DiT it scored.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from shapeflow import config, tracking, training
from shapeflow import manifest as mf
from shapeflow.dataset import SampleObject, list_objects, load_arrays
from shapeflow.geometry.decode import evaluate_points
from shapeflow.geometry.mesh import is_watertight_shape, sampled_frame
from shapeflow.geometry.sampling import sample_surface
from shapeflow.inference import GENERATOR_FILE, ShapePipeline, reconstruct
from shapeflow.metrics import F_TAUS, generation_metrics, pairwise_chamfer, point_metrics, surface_metrics, volume_iou
from shapeflow.models import families
from shapeflow.models.families import AnyVAE, load_vae
from shapeflow.render import preview_grid, write_samples

log = logging.getLogger("shapeflow.evaluate")

STAGE = "evaluate"
SURFACE_KEYS = ("cd", *(f"f@{tau}" for tau in F_TAUS), "nc")
RECON_KEYS = (*SURFACE_KEYS, "iou_volume", "iou_near")
GEN_KEYS = ("mmd_cd", "cov_cd", "1nna_cd")
RECON_COLUMNS = (
    "key",
    "category",
    "status",
    "reason",
    *RECON_KEYS,
    "faces",
    "watertight",
    *(f"floor_{k}" for k in SURFACE_KEYS),
)
SAMPLE_COLUMNS = ("sample", "category", "faces", "watertight", "nearest_cd", "nearest_key", "nearest_category")
GEN_CATEGORY_COLUMNS = (
    "category",
    "samples",
    "references",
    "train_objects",
    "empty",
    *GEN_KEYS,
    "watertight_share",
    "category_match",
    *(f"floor_{k}" for k in (*GEN_KEYS, "category_match")),
)
RUN_FILE = "run.json"  # beside metrics.json: the MLflow run id and wall times


@dataclasses.dataclass(frozen=True)
class Paths:
    vae: Path
    dit: Path | None  # None: reconstruction only
    samples: Path
    meshes: Path  # watertight-stage output: the reference surfaces
    out: Path

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.out / "plots"


class Reference:
    """One object's watertight surface in the frame its samples were drawn in, sampled on demand with
    a seed (the same seed, the same points)."""

    def __init__(self, path: Path):
        self.mesh = sampled_frame(path)[0]

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return sample_surface(self.mesh, n, np.random.default_rng(seed))


def reference_paths(meshes: Path) -> dict[str, Path]:
    rows = mf.read_manifest(meshes / mf.MANIFEST, required=("key", "path", "status"))
    return {r["key"]: meshes / r["path"] for r in rows if r["status"] == mf.OK}


# -- reconstruction -----------------------------------------------------------------------------------


def recon_object(
    vae: AnyVAE,
    obj: SampleObject,
    ref_path: Path | None,
    p: config.EvaluateParams,
    data: config.VAEDataParams,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, Any], trimesh.Trimesh | None, Reference | None]:
    """(record, reconstruction, reference) of one object; the record says why when it failed."""
    record: dict[str, Any] = {"key": obj.key, "category": obj.category, "status": mf.OK, "reason": ""}
    try:
        if ref_path is None:
            raise FileNotFoundError(f"no watertight mesh with status ok for object {obj.key}")
        reference = Reference(ref_path)
        arrays = load_arrays(obj.path)
        tic = time.perf_counter()
        field, mesh = reconstruct(vae, arrays, data, seed, p.resolution, device)
        decode_s = time.perf_counter() - tic
    except (OSError, ValueError, KeyError) as exc:  # a missing or corrupt file, an object with no surface
        reason = f"{obj.path}: {type(exc).__name__}: {exc}"
        log.error("evaluate: object %s failed: %s", obj.key, reason)
        return record | {"status": mf.FAILED, "reason": reason}, None, None
    ref_points, ref_normals = reference.sample(p.recon_points, seed)
    record |= surface_metrics(mesh, ref_points, seed=seed + 1, reference_normals=ref_normals)
    for name, prefix in (("iou_volume", "vol"), ("iou_near", "near")):
        points = torch.from_numpy(np.ascontiguousarray(arrays[f"{prefix}_points"], dtype=np.float32)).to(device)
        pred = evaluate_points(field, points).cpu().numpy()
        record[name] = volume_iou(pred, arrays[f"{prefix}_sdf"])
    floor_points, floor_normals = reference.sample(p.recon_points, seed + 2)
    floor = point_metrics(floor_points, ref_points, floor_normals, ref_normals)
    record |= {f"floor_{k}": v for k, v in floor.items()}
    record |= {"faces": len(mesh.faces), "watertight": is_watertight_shape(mesh), "decode_s": decode_s}
    return record, mesh, reference


def mean_decode_seconds(records: list[dict[str, Any]]) -> float | None:
    """Mean wall seconds of a reconstruction (encode, decode, marching cubes) over the scored records."""
    decoded = [r["decode_s"] for r in records if r["status"] == mf.OK]
    return float(np.mean(decoded)) if decoded else None


def summarise(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean of each key over the records where it is finite (an empty reconstruction has no CD)."""
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def by_category(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r.get("category") or "-"].append(r)
    return dict(sorted(groups.items()))


def recon_summary(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the mean over the objects that were scored, one row per category)."""
    ok = [r for r in records if r["status"] == mf.OK]
    floor_keys = tuple(f"floor_{k}" for k in SURFACE_KEYS)
    summary: dict[str, Any] = {"objects": len(ok), "failed": len(records) - len(ok), **summarise(ok, RECON_KEYS)}
    summary["empty"] = sum(1 for r in ok if r["faces"] == 0)
    summary["watertight_share"] = float(np.mean([r["watertight"] for r in ok])) if ok else float("nan")
    summary["floor"] = {k.removeprefix("floor_"): v for k, v in summarise(ok, floor_keys).items()}
    rows = [
        {"category": category, "objects": len(group), **summarise(group, RECON_KEYS + floor_keys)}
        for category, group in by_category(ok).items()
    ]
    return summary, rows


# -- generation ----------------------------------------------------------------------------------------


def sample_plan(
    generator: ShapePipeline, objects: list[SampleObject], per_category: int
) -> list[tuple[str | None, int]]:
    """(category, how many) to generate: per category of the split the DiT knows, or all at once
    when it is unconditional."""
    if not generator.classes:
        return [(None, per_category or len(objects))]
    counts: dict[str, int] = defaultdict(int)
    for obj in objects:
        counts[obj.category] += 1
    unknown = sorted(c for c in counts if c not in generator.classes)
    if unknown:
        log.warning("evaluate: the DiT was not trained on categories %s of the split; they are not generated", unknown)
    return [(c, per_category or n) for c, n in sorted(counts.items()) if c in generator.classes]


def cloud_metrics(gen: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, float]:
    if not gen or not ref:
        return dict.fromkeys(GEN_KEYS, float("nan"))
    return generation_metrics(gen, ref)


def nearest_train(
    dist: np.ndarray, own_keys: list[str | None], train_keys: list[str], train_category: dict[str, str]
) -> list[tuple[str, str, float]]:
    """(key, category, distance) of each row's nearest training shape in `dist` (rows by columns =
    train_keys), never the row's own object (`own_keys`: the key a row was sampled from, None for a
    generated shape). Rows with no candidate get ("", "", nan)."""
    out = []
    for row, own in zip(dist, own_keys, strict=True):
        candidates = [j for j, k in enumerate(train_keys) if k != own]
        if not candidates:
            out.append(("", "", float("nan")))
            continue
        j = min(candidates, key=lambda c: row[c])
        out.append((train_keys[j], train_category[train_keys[j]], float(row[j])))
    return out


def share(flags: list[bool]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def evaluate_generation(
    generator: ShapePipeline,
    objects: list[SampleObject],
    refs: dict[str, Reference],
    train: dict[str, tuple[str, Reference]],
    p: config.EvaluateParams,
    g: config.GenerateParams,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, trimesh.Trimesh]]]:
    """(overall figures, one row per sample, one row per category, the samples). `train`: category and
    surface of each training object (key: (category, reference)), the category-match classifier."""
    scored = [o for o in objects if o.key in refs]
    ref_clouds = {o.key: refs[o.key].sample(p.gen_points, seed)[0] for o in scored}
    floor_clouds = {o.key: refs[o.key].sample(p.gen_points, seed + 1)[0] for o in scored}
    results: list[tuple[str, trimesh.Trimesh]] = []
    offset = 0
    for category, n in sample_plan(generator, scored, p.gen_per_category):
        tic = time.perf_counter()
        results += generator.generate(n, category, g.steps, g.guidance, seed + offset, p.resolution)
        offset += n
        log.info("evaluate: %d samples of %s in %.1f s", n, category or "all categories", time.perf_counter() - tic)

    rng = np.random.default_rng(seed)
    clouds = [sample_surface(mesh, p.gen_points, rng)[0] if len(mesh.faces) else None for _, mesh in results]
    keys = [o.key for o in scored]
    category_of = {o.key: o.category for o in scored}
    surfaced = [i for i, c in enumerate(clouds) if c is not None]

    # Category match: a 1-nearest-neighbour classifier over the training shapes, applied to the samples
    # and (the floor) to the split's real shapes.
    classified = bool(generator.classes and train)
    train_keys = sorted(train)
    train_category = {k: train[k][0] for k in train_keys}
    train_count: dict[str, int] = defaultdict(int)
    for category in train_category.values():
        train_count[category] += 1
    sample_nearest: dict[int, tuple[str, str, float]] = {}
    floor_nearest: dict[str, tuple[str, str, float]] = {}
    if classified:
        tic = time.perf_counter()
        train_clouds = [train[k][1].sample(p.gen_points, seed + 2)[0] for k in train_keys]
        if surfaced:
            d = pairwise_chamfer([clouds[i] for i in surfaced], train_clouds)
            sample_nearest = dict(
                zip(surfaced, nearest_train(d, [None] * len(surfaced), train_keys, train_category), strict=True)
            )
        if keys:
            d = pairwise_chamfer([floor_clouds[k] for k in keys], train_clouds)
            floor_nearest = dict(zip(keys, nearest_train(d, keys, train_keys, train_category), strict=True))
        log.info(
            "evaluate: category classifier over %d training shapes in %.1f s",
            len(train_keys),
            time.perf_counter() - tic,
        )

    sample_rows = []
    for i, (category, mesh) in enumerate(results):
        nearest_key, nearest_category, nearest_cd = sample_nearest.get(i, ("", "", float("nan")))
        sample_rows.append(
            {
                "sample": i,
                "category": category,
                "faces": len(mesh.faces),
                "watertight": is_watertight_shape(mesh),
                "nearest_cd": nearest_cd,
                "nearest_key": nearest_key,
                "nearest_category": nearest_category,
            }
        )

    def matches(idx: list[int]) -> list[bool]:
        return [sample_rows[i]["nearest_category"] == sample_rows[i]["category"] for i in idx if i in sample_nearest]

    def floor_matches(ref_keys: list[str]) -> list[bool]:
        return [floor_nearest[k][1] == category_of[k] for k in ref_keys if floor_nearest.get(k, ("",))[0]]

    def figures(gen_idx: list[int], ref_keys: list[str]) -> dict[str, Any]:
        gen = [clouds[i] for i in gen_idx if clouds[i] is not None]
        out = {"samples": len(gen_idx), "references": len(ref_keys), "empty": len(gen_idx) - len(gen)}
        out |= cloud_metrics(gen, [ref_clouds[k] for k in ref_keys])
        out["watertight_share"] = share([sample_rows[i]["watertight"] for i in gen_idx])
        floor = cloud_metrics([floor_clouds[k] for k in ref_keys], [ref_clouds[k] for k in ref_keys])
        if classified:
            out["category_match"] = share(matches(gen_idx))
            floor["category_match"] = share(floor_matches(ref_keys))
        return out | {f"floor_{k}": v for k, v in floor.items()}

    overall = figures(list(range(len(results))), keys)
    category_rows = []
    if generator.classes:
        for category in sorted({c for c, _ in results}):
            idx = [i for i, (c, _) in enumerate(results) if c == category]
            row = figures(idx, [k for k in keys if category_of[k] == category])
            category_rows.append({"category": category, "train_objects": train_count.get(category, 0), **row})
    summary: dict[str, Any] = {k: overall[k] for k in ("samples", "references", "empty", *GEN_KEYS)}
    summary["watertight_share"] = overall["watertight_share"]
    floor_keys = list(GEN_KEYS)
    if classified:
        common = {c for c, n in train_count.items() if n >= p.category_min_train}
        common_idx = [i for i, (c, _) in enumerate(results) if c in common]
        summary["category_match"] = overall["category_match"]
        summary["category_match_common"] = share(matches(common_idx))
        summary["common_categories"] = len(common)
        floor_keys.append("category_match")
        overall["floor_category_match_common"] = share(floor_matches([k for k in keys if category_of[k] in common]))
        floor_keys.append("category_match_common")
    summary["floor"] = {k: overall[f"floor_{k}"] for k in floor_keys}
    return summary, sample_rows, category_rows, results


# -- outputs -------------------------------------------------------------------------------------------


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mf.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: training.fmt_cell(v) for k, v in row.items() if k in columns})


def write_recon_preview(pairs: list[tuple[str, trimesh.Trimesh, trimesh.Trimesh]], folder: Path) -> None:
    """recon/preview.png: each reference beside its reconstruction; the reconstructions as glb."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    meshes, titles = [], []
    for name, reference, recon in pairs:
        meshes += [reference, recon]
        titles += [f"{name} reference", f"{name} reconstruction"]
        with mf.atomic_path(folder / f"{name}.glb") as tmp:
            recon.export(tmp, file_type="glb")
    with mf.atomic_path(folder / "preview.png") as tmp:
        Image.fromarray(preview_grid(meshes, titles, columns=4)).save(tmp, format="PNG")


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested figures as MLflow metric names, 'recon.floor.cd'; only finite numbers."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_metrics(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


# The figures runs are compared by, in this order: MLflow's compare view opens on the first metric
# logged, and lists them in logging order.
HEADLINE = (
    "recon.f@0.02",
    "recon.f@0.01",
    "recon.cd",
    "recon.nc",
    "recon.iou_volume",
    "generation.category_match_common",
    "generation.category_match",
    "generation.watertight_share",
    "generation.mmd_cd",
    "generation.cov_cd",
    "generation.1nna_cd",
)


COUNT_KEYS = {"objects", "failed", "empty", "samples", "references", "common_categories"}


def headline_first(flat: dict[str, float]) -> dict[str, float]:
    """`flat` with the HEADLINE figures first, then the other figures, then the counts."""
    counts = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] in COUNT_KEYS}
    head = {k: flat[k] for k in HEADLINE if k in flat}
    return head | {k: v for k, v in flat.items() if k not in head and k not in counts} | counts


def model_run_id(folder: Path, file: str) -> str:
    """The MLflow run that trained the model in `folder` (recorded by its training stage)."""
    try:
        body = json.loads((folder / file).read_text())
    except (OSError, ValueError):
        return "unknown"
    return str(body.get("meta", body).get("mlflow_run_id") or "unknown")


def load_references(
    objects: list[SampleObject], ref_paths: dict[str, Path], refs: dict[str, Reference], purpose: str
) -> None:
    """Add to `refs` the reference surface of each of `objects` it lacks; an object whose mesh cannot
    be read is left out, as the log says."""
    for obj in objects:
        if obj.key in ref_paths and obj.key not in refs:
            try:
                refs[obj.key] = Reference(ref_paths[obj.key])
            except (OSError, ValueError) as exc:
                log.error("evaluate: %s: reference mesh unusable for %s: %s", obj.key, purpose, exc)


def training_references(
    paths: Paths, refs: dict[str, Reference], ref_paths: dict[str, Path]
) -> dict[str, tuple[str, Reference]]:
    """Category and surface of every train-split object (those already in `refs` reused): the
    category-match classifier's neighbours."""
    tic = time.perf_counter()
    train = list_objects(paths.samples, "train")
    load_references(train, ref_paths, refs, "category match")
    out = {obj.key: (obj.category, refs[obj.key]) for obj in train if obj.key in refs}
    log.info("evaluate: %d training shapes loaded for category match in %.1f s", len(out), time.perf_counter() - tic)
    return out


def preview_pick(categories: list[str | None], per_category: int, unconditional: int) -> list[int]:
    """Indices of the samples drawn in the preview: the first `per_category` of each category, in
    category order, or the first `unconditional` samples when they have no category."""
    if not any(categories):
        return list(range(min(unconditional, len(categories))))
    picked: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        if len(picked[category or ""]) < per_category:
            picked[category or ""].append(i)
    return [i for category in sorted(picked) for i in picked[category]]


def category_rows_layout(picked: list[tuple[str | None, trimesh.Trimesh]], columns: int) -> list[int | None]:
    """Preview tiles with each category on a row of its own (blank tiles after a short one); samples
    without a category simply in order."""
    if not any(category for category, _ in picked):
        return list(range(len(picked)))
    layout: list[int | None] = []
    for i, (category, _) in enumerate(picked):
        if layout and i > 0 and picked[i - 1][0] != category and len(layout) % columns:
            layout += [None] * (columns - len(layout) % columns)
        layout.append(i)
    return layout


# -- the stage -----------------------------------------------------------------------------------------


def open_models(paths: Paths, device: torch.device) -> tuple[AnyVAE, ShapePipeline | None]:
    vae = load_vae(paths.vae, device)
    return vae, ShapePipeline.load(paths.dit, paths.vae, device) if paths.dit is not None else None


def run(params: config.Params, paths: Paths) -> dict[str, Any]:
    """Score the VAE (and the DiT, when given) on the split; write OUT; returns metrics.json's content."""
    p = params.evaluate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae, generator = open_models(paths, device)
    objects = list_objects(paths.samples, p.split)
    if not objects:
        raise mf.ManifestError(f"{paths.samples / mf.MANIFEST}: no objects with status ok in the {p.split!r} split")
    ref_paths = reference_paths(paths.meshes)

    tracker = tracking.Tracker(True)
    inputs = {"vae": paths.vae, "samples": paths.samples, "watertight": paths.meshes}
    if paths.dit is not None:
        inputs["dit"] = paths.dit
    tags = tracking.provenance_tags(STAGE, **inputs) | {
        "vae_run_id": model_run_id(paths.vae, "config.json"),
        "data_manifest_sha256": mf.file_sha256(paths.samples / mf.MANIFEST),
        "device": device.type,
        "vae_family": families.family_of(vae),
    }
    if paths.dit is not None:
        tags["dit_run_id"] = model_run_id(paths.dit, GENERATOR_FILE)
    # The sections that made the models go in too, so runs line up by them in MLflow's compare view.
    logged = {"seed": params.seed, STAGE: dataclasses.asdict(p), "train_vae": dataclasses.asdict(params.train_vae)}
    if paths.dit is not None:
        logged["train_dit"] = dataclasses.asdict(params.train_dit)
    tracker.start("shapeflow-evaluate", tracking.run_name(STAGE), None, tags, logged)

    with tracker.ends_on_error():
        chosen = objects[: p.recon_objects] if p.recon_objects else objects
        records, pairs, refs = [], [], {}
        tic = time.perf_counter()
        for i, obj in enumerate(chosen):
            record, mesh, reference = recon_object(
                vae, obj, ref_paths.get(obj.key), p, params.train_vae.data, params.seed + i, device
            )
            records.append(record)
            if reference is not None:
                refs[obj.key] = reference  # loaded once: generation scores against it too
                if len(pairs) < p.previews:
                    pairs.append((obj.key[:12], reference.mesh, mesh))
            if record["status"] == mf.OK:
                log.info(
                    "evaluate: %d/%d %s %s: CD %.4f F@0.02 %.3f IoU %.3f",
                    i + 1,
                    len(chosen),
                    obj.key[:12],
                    obj.category,
                    record["cd"],
                    record["f@0.02"],
                    record["iou_volume"],
                )
        recon, recon_rows = recon_summary(records)
        timings = {"recon_objects": len(records), "recon_s": time.perf_counter() - tic}
        timings["recon_decode_s"] = mean_decode_seconds(records)
        log.info("evaluate: %d reconstructions in %.1f s", len(records), timings["recon_s"])
        metrics: dict[str, Any] = {"split": p.split, "recon": recon}
        write_csv(paths.plots / "recon.csv", RECON_COLUMNS, records)
        write_csv(
            paths.plots / "recon_categories.csv",
            ("category", "objects", *RECON_KEYS, *(f"floor_{k}" for k in SURFACE_KEYS)),
            recon_rows,
        )
        write_recon_preview(pairs, paths.out / "recon")

        if generator is not None:
            load_references(objects, ref_paths, refs, "generation metrics")
            train = training_references(paths, refs, ref_paths) if generator.classes else {}
            tic = time.perf_counter()
            gen, sample_rows, gen_rows, results = evaluate_generation(
                generator, objects, refs, train, p, params.train_dit.generate, params.seed
            )
            timings |= {"samples": len(results), "generation_s": time.perf_counter() - tic}
            log.info("evaluate: %d samples generated and scored in %.1f s", len(results), timings["generation_s"])
            metrics["generation"] = gen
            write_csv(paths.plots / "generation.csv", SAMPLE_COLUMNS, sample_rows)
            write_csv(paths.plots / "generation_categories.csv", GEN_CATEGORY_COLUMNS, gen_rows)
            picked = [results[i] for i in preview_pick([c for c, _ in results], p.preview_per_category, p.previews)]
            columns = p.preview_per_category if generator.classes else 4
            write_samples(picked, paths.out / "samples", params.seed, columns, category_rows_layout(picked, columns))

        tracker.log_metrics(headline_first(flat_metrics(metrics)), 0)
        # Per-category figures as tables (the artifact view shows them; mlflow.load_table joins them
        # over runs), not as metric keys: a hundred and more of those would bury the headline.
        tracker.log_table(recon_rows, "tables/recon_categories.json")
        if generator is not None:
            tracker.log_table(gen_rows, "tables/generation_categories.json")
        for folder in ("recon", "samples", "plots"):
            if (paths.out / folder).is_dir():
                tracker.log_artifacts(paths.out / folder, folder)
        # The run id and wall times beside the outputs (not in the metrics: those are a function of
        # models, data and params).
        run_info = {"mlflow_run_id": tracker.run_id, "device": device.type, "timings": timings}
        mf.atomic_write_text(paths.out / RUN_FILE, json.dumps(run_info, indent=2) + "\n")
        mf.atomic_write_text(
            paths.metrics, json.dumps(mf.finite_or_none(metrics), indent=2) + "\n"
        )  # last: marks a complete run
    tracker.end("FINISHED")
    return metrics


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "evaluate", help="reconstruction and generation metrics on a split (evaluate section of params)"
    )
    p.add_argument("vae", type=Path, help="train_vae output (model.safetensors + config.json)")
    p.add_argument("dit", type=Path, help="train_dit output (raw/, ema/, generator.json); 'none' skips generation")
    p.add_argument("samples", type=Path, help="sample-stage output")
    p.add_argument("meshes", type=Path, help="watertight-stage output: the reference surfaces")
    p.add_argument("out", type=Path, help="output folder: metrics.json, plots/, samples/, recon/")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    dit = None if str(args.dit).lower() == "none" else args.dit
    metrics = run(params, Paths(args.vae, dit, args.samples, args.meshes, args.out))
    recon = metrics["recon"]
    line = (
        f"evaluate: {recon['objects']} reconstructions, CD {recon['cd']:.4f}, "
        f"F@0.02 {recon['f@0.02']:.3f}, IoU {recon['iou_volume']:.3f}"
    )
    if "generation" in metrics:
        gen = metrics["generation"]
        line += (
            f"; {gen['samples']} samples, MMD-CD {gen['mmd_cd']:.4f}, "
            f"COV {gen['cov_cd']:.2f}, 1-NNA {gen['1nna_cd']:.2f}"
        )
    print(line)
    return 0 if recon["objects"] else 1
