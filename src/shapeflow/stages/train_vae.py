"""train_vae stage: fit the VAE of `train_vae.family` (VecSet or grid) to the sample stage's output
with Accelerate.

Started by `accelerate launch` (dvc.yaml), one process per device; runs as well as a plain
`shapeflow train-vae` (one process) or under torchrun. Writes to OUT (models/vae): model.safetensors
and config.json; to --metrics a JSON of the final figures; to --plots loss.csv and val.csv. Checkpoints
go to --checkpoints every `checkpoint_every` steps; a rerun with the same params and data resumes
from the newest complete one. One MLflow run per training, written by rank 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from shapeflow import config, registry, tracking, training
from shapeflow import manifest as mf
from shapeflow.dataset import ShapeSamples, drop_thin_shells, list_objects, load_arrays
from shapeflow.geometry.mesh import sampled_frame
from shapeflow.geometry.sampling import sample_surface
from shapeflow.inference import reconstruct
from shapeflow.metrics import METRIC_POINTS, surface_metrics
from shapeflow.models import families
from shapeflow.models.families import AnyVAE, AnyVAEConfig
from shapeflow.models.vae import field_loss

log = logging.getLogger("shapeflow.train_vae")

STAGE = "train_vae"
TERMS = {  # loss.csv's columns after 'step', by family
    "vecset": ("loss", "volume", "near", "sharp", "kl"),
    "grid": ("loss", "volume", "near", "sharp", "cells", "coarse", "kl"),
}
VAL_COLUMNS = ("cd", "f@0.01", "f@0.02", "empty")  # val.csv's after 'step'; val_<column> in the metrics


@dataclasses.dataclass(frozen=True)
class Paths:
    samples: Path
    out: Path
    checkpoints: Path
    metrics: Path
    plots: Path
    # watertight-stage output: reference surfaces for validation, shell_ratio for data.min_shell_ratio
    meshes: Path | None = None


def model_config(p: config.TrainVAEParams, grid_resolution: int | None = None) -> AnyVAEConfig:
    """The family's preset with train_vae.model's fields; a grid VAE reads grids of
    `grid_resolution` (those the sample stage wrote) unless train_vae.model sets its resolution."""
    overrides = dict(p.model)
    if p.family == "grid" and grid_resolution:
        overrides = {"resolution": grid_resolution} | overrides
    try:
        return families.vae_config(p.family, p.preset, overrides)
    except (ValueError, TypeError) as exc:
        raise config.ParamsError(f"train_vae.preset/model ({p.family} family): {exc}") from exc


NOT_IN_FINGERPRINT = ("val_objects", "val_resolution")  # besides training.LOOP_SETTINGS


def grid_side(path: Path) -> int:
    """The side of the grid the sample stage wrote into one object's npz; a ParamsError when it wrote
    none (it was run for the VecSet family)."""
    with np.load(path, allow_pickle=False) as npz:
        if families.GRID_ARRAY not in npz.files:
            raise config.ParamsError(
                f"train_vae.family: grid needs the sample stage's grids, and {path} has none: rerun the sample "
                "stage with this family (dvc repro sample)"
            )
        return int(npz[families.GRID_ARRAY].shape[0])


def fingerprint(params: config.Params, model: AnyVAEConfig, data_id: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed (training.fingerprint)."""
    parts = {"model": model.to_dict(), "seed": params.seed, "data": data_id, "world": world_size}
    return training.fingerprint(params.train_vae, NOT_IN_FINGERPRINT, **parts)


TERM_OF = {"vol": "volume", "near": "near", "sharp_near": "sharp", "cell": "cells"}  # by supervision kind


def _queries(batch: dict[str, torch.Tensor], kinds: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([batch[f"{kind}_points"] for kind in kinds], dim=1)


def _field_terms(
    pred: torch.Tensor, batch: dict[str, torch.Tensor], kinds: tuple[str, ...], p: config.VAELossParams
) -> dict[str, torch.Tensor]:
    """The field's loss at each kind of supervision point, `pred` holding them in `kinds` order; 0 for a
    kind with no points (sharp_near_points: 0)."""
    parts = pred.split([batch[f"{kind}_points"].shape[1] for kind in kinds], dim=1)
    return {
        TERM_OF[kind]: field_loss(part, batch[f"{kind}_sdf"], p.kind, p.truncation).mean()
        if part.shape[1]
        else pred.new_zeros((), dtype=torch.float32)
        for kind, part in zip(kinds, parts, strict=True)
    }


def losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], p: config.VAELossParams) -> dict[str, torch.Tensor]:
    """Every loss term of one batch of the VecSet family, and their weighted sum under 'loss'."""
    kinds = ("vol", "near", "sharp_near")
    pred, posterior = model(
        batch["points"], batch["normals"], _queries(batch, kinds), batch["sharp_points"], batch["sharp_normals"]
    )
    terms = _field_terms(pred, batch, kinds, p) | {"kl": posterior.kl().mean()}
    terms["loss"] = (
        p.volume_weight * terms["volume"]
        + p.near_weight * terms["near"]
        + p.sharp_weight * terms["sharp"]
        + p.kl_weight * terms["kl"]
    )
    return terms


def grid_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], p: config.VAELossParams
) -> dict[str, torch.Tensor]:
    """Every loss term of one batch of the grid family, and their weighted sum under 'loss': the field
    at the volume, near and near-edge points and at the near-surface cells, the coarse field against
    the input grid at every cell, the KL."""
    kinds = ("vol", "near", "sharp_near", "cell")
    pred, coarse, posterior = model(batch["grid"], _queries(batch, kinds))
    target = batch["grid"][:, 0]
    terms = _field_terms(pred, batch, kinds, p) | {
        # The input grid is truncated already; the coarse field is held to it, in its own units.
        "coarse": (coarse.float() - target).abs().mean() / target.abs().amax().clamp_min(1e-6),
        "kl": posterior.kl().mean(),
    }
    terms["loss"] = (
        p.volume_weight * terms["volume"]
        + p.near_weight * (terms["near"] + terms["cells"])
        + p.sharp_weight * terms["sharp"]
        + p.coarse_weight * terms["coarse"]
        + p.kl_weight * terms["kl"]
    )
    return terms


LOSSES = {"vecset": losses, "grid": grid_losses}


class References:
    """Reference surface points per object: METRIC_POINTS on its watertight mesh when a watertight
    output is given, else the surface points stored in its npz (fewer, so a higher sampling floor).
    Sampled once per object and kept, as float32, for the validations that follow."""

    def __init__(self, meshes: Path | None, seed: int):
        self.seed = seed
        self.paths: dict[str, Path] = {}
        self._cache: dict[str, np.ndarray] = {}
        if meshes is not None:
            rows = mf.read_manifest(meshes / mf.MANIFEST, required=("key", "path", "status"))
            self.paths = {r["key"]: meshes / r["path"] for r in rows if r["status"] == mf.OK}

    def points(self, key: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
        if key not in self.paths:
            return arrays["surface_points"]
        if key not in self._cache:
            mesh = sampled_frame(self.paths[key])[0]  # the frame the samples were drawn in
            self._cache[key] = sample_surface(mesh, METRIC_POINTS, np.random.default_rng(self.seed))[0].astype(
                np.float32
            )
        return self._cache[key]


@torch.no_grad()
def validate(
    model: AnyVAE,
    objects: list,
    references: References,
    data: config.VAEDataParams,
    resolution: int,
    seed: int,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Encode each object (posterior mean), decode to a mesh, score it against its reference surface;
    the mean scores, and how many decoded to no surface at all."""
    model.eval()
    rows = []
    for i, obj in enumerate(objects):
        arrays = load_arrays(obj.path)
        _, mesh = reconstruct(model, arrays, data, seed + i, resolution, accelerator.device, accelerator.autocast)
        rows.append({"key": obj.key, **surface_metrics(mesh, references.points(obj.key, arrays), seed=seed)})
    model.train()
    cds = [r["cd"] for r in rows if np.isfinite(r["cd"])]
    summary = {
        "cd": float(np.mean(cds)) if cds else float("nan"),
        "f@0.01": float(np.mean([r["f@0.01"] for r in rows])),
        "f@0.02": float(np.mean([r["f@0.02"] for r in rows])),
        "empty": float(len(rows) - len(cds)),
    }
    return summary


def run(params: config.Params, paths: Paths, *, val_split: str = "val") -> dict[str, Any]:
    """Train, validate, save; returns the final metrics (on every rank)."""
    p = params.train_vae
    accelerator = training.make_accelerator(p.precision, p.grad_accum, params.seed)
    train_objects = list_objects(paths.samples, "train")
    val_objects = list_objects(paths.samples, val_split)
    if not train_objects:
        raise mf.ManifestError(f"{paths.samples / mf.MANIFEST}: no objects with status ok in the train split")
    train_objects, thin = drop_thin_shells(train_objects, paths.meshes, p.data.min_shell_ratio)
    if not train_objects:
        raise config.ParamsError(
            f"train_vae.data.min_shell_ratio: all {len(thin)} train objects are thin shells below "
            f"{p.data.min_shell_ratio}; lower it"
        )
    cfg = model_config(p, grid_side(train_objects[0].path) if p.family == "grid" else None)
    if not val_objects:
        log.warning("no objects in the %r split of %s: validation is skipped", val_split, paths.samples)
    # Periodic validations score the first val_objects objects; the last one scores the whole split.
    val_during = val_objects[: p.val_objects] if p.val_objects else val_objects
    references = References(paths.meshes, params.seed)
    manifest_sha = mf.file_sha256(paths.samples / mf.MANIFEST)
    data_id = tracking.dvc_hash(paths.samples) or manifest_sha

    def scores(model: AnyVAE, last: bool) -> dict[str, float]:
        objects = val_objects if last else val_during
        return validate(model, objects, references, p.data, p.val_resolution, params.seed, accelerator)

    def save(model: AnyVAE, step: int, run_id: str | None) -> dict[str, Any]:
        meta = {"steps": step, "seed": params.seed, "family": p.family, "preset": p.preset, "mlflow_run_id": run_id}
        families.save_vae(model, paths.out, meta)
        return {}

    counts = {"train_objects": len(train_objects), "thin_shells_left_out": len(thin)}
    job = training.Job(
        stage=STAGE,
        describe=f"{p.preset} {p.family} VAE on {len(train_objects)} objects",
        model=families.build_vae(cfg),
        dataset=ShapeSamples(train_objects, p.data, seed=params.seed, family=p.family),
        training_losses=functools.partial(LOSSES[p.family], p=p.loss),
        terms=TERMS[p.family],
        fingerprint=fingerprint(params, cfg, data_id, accelerator.num_processes),
        tags=tracking.provenance_tags(STAGE, data=paths.samples)
        | {"data_manifest_sha256": manifest_sha, "vae_family": p.family},
        params={"model_config": cfg.to_dict(), **counts, "val_objects": len(val_objects)},
        info={**counts, "val_split": val_split, "val_objects": len(val_objects)},
        save=save,
        validation=training.Validation(scores if val_objects else None, VAL_COLUMNS, prefix="val_"),
        per_sample={"points_per_s": p.data.volume_points + p.data.near_points + p.data.sharp_near_points},
        loader_workers=p.data.loader_workers,
        categories=[o.category for o in train_objects],
        register=lambda run_id, metrics: registry.register(
            run_id,
            registry.VAE_MODEL,
            {"vae": paths.out},
            registry.vae_signature(cfg.num_latents, cfg.latent_dim, getattr(cfg, "resolution", 0)),
            f"{p.preset} {p.family} VAE: {registry.vae_input(getattr(cfg, 'resolution', 0))} in, "
            f"latents (B, {cfg.num_latents}, {cfg.latent_dim}) out",
            {k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, float)},
        ),
        samples=paths.samples,
    )
    return training.fit(accelerator, p, params.seed, paths, job)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train-vae", help="train the VAE (train_vae.family) on a sample-stage output (run it with accelerate launch)"
    )
    p.add_argument("samples", type=Path, help="sample-stage output folder (manifest.csv + objects/)")
    p.add_argument("out", type=Path, help="output folder for model.safetensors and config.json")
    training.add_output_arguments(p, STAGE)
    p.add_argument(
        "--meshes",
        type=Path,
        help="watertight-stage output: validation scores against these surfaces, and their manifest's "
        "shell_ratio is what train_vae.data.min_shell_ratio compares",
    )
    p.add_argument(
        "--val-split",
        default="val",
        choices=["train", "val", "test"],
        help="split scored during training (default: %(default)s)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    paths = Paths(args.samples, args.out, args.checkpoints, args.metrics, args.plots, args.meshes)
    metrics = run(params, paths, val_split=args.val_split)
    if "val_f@0.02" in metrics:
        print(
            f"train_vae: {metrics['steps']} steps, val CD {metrics['val_cd']:.4f}, F@0.02 {metrics['val_f@0.02']:.3f}"
        )
    return 0
