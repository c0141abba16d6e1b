"""train_vae stage: fit the VecSet VAE to the sample stage's output with Accelerate.

Started by `accelerate launch` (dvc.yaml), one process per device; runs as well as a plain
`shapeflow train-vae` (one process) or under torchrun. Writes to OUT (models/vae): model.safetensors
and config.json; to --metrics a JSON of the final figures; to --plots loss.csv and val.csv. Checkpoints
go to --checkpoints every `checkpoint_every` steps; a rerun with the same params and data resumes
from the newest complete one. One MLflow run per training, written by rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from shapeflow import config, manifest as mf, training
from shapeflow.dataset import ShapeSamples, encoder_inputs, list_objects, load_arrays
from shapeflow.geometry.decode import METRIC_POINTS, FieldFn, decode_mesh, surface_metrics
from shapeflow.geometry.sampling import sample_surface
from shapeflow.stages.sample import sampled_frame
from shapeflow.models.vae import VAEConfig, VecSetVAE, field_loss, save_pretrained, vae_config

log = logging.getLogger("shapeflow.train_vae")

STAGE = "train_vae"
LOSS_COLUMNS = ("step", "loss", "volume", "near", "sharp", "kl", "lr", "grad_norm", "samples_per_s", "points_per_s")
VAL_COLUMNS = ("step", "cd", "f@0.01", "f@0.02", "empty")
TERMS = ("loss", "volume", "near", "sharp", "kl")


@dataclasses.dataclass(frozen=True)
class Paths:
    samples: Path
    out: Path
    checkpoints: Path
    metrics: Path
    plots: Path
    meshes: Path | None = None  # watertight-stage output: reference surfaces for validation


def model_config(p: config.TrainVAEParams) -> VAEConfig:
    try:
        return vae_config(p.preset, p.model)
    except (ValueError, TypeError) as exc:
        raise config.ParamsError(f"train_vae.preset/model: {exc}") from exc


# Settings that change what is logged or checked, not the weights: a checkpoint resumes across them.
NOT_IN_FINGERPRINT = (
    "log_every", "checkpoint_every", "keep_checkpoints", "val_every", "val_objects", "val_resolution", "accelerate_config",
)  # fmt: skip


def fingerprint(params: config.Params, model: VAEConfig, data_id: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed: the training settings, the model's resolved config
    (a preset's fields can change between versions), the seed, the data, the world size."""
    section = {k: v for k, v in dataclasses.asdict(params.train_vae).items() if k not in NOT_IN_FINGERPRINT}
    blob = json.dumps(
        {"train_vae": section, "model": model.to_dict(), "seed": params.seed, "data": data_id, "world": world_size},
        sort_keys=True,
        default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], p: config.VAELossParams) -> dict[str, torch.Tensor]:
    """Every loss term of one batch, and their weighted sum under 'loss'."""
    groups = [batch["vol_points"], batch["near_points"], batch["sharp_near_points"]]
    pred, posterior = model(
        batch["points"], batch["normals"], torch.cat(groups, dim=1), batch["sharp_points"], batch["sharp_normals"]
    )
    pred_vol, pred_near, pred_sharp = pred.split([g.shape[1] for g in groups], dim=1)
    terms = {
        "volume": field_loss(pred_vol, batch["vol_sdf"], p.kind, p.truncation).mean(),
        "near": field_loss(pred_near, batch["near_sdf"], p.kind, p.truncation).mean(),
        "kl": posterior.kl().mean(),
    }
    terms["sharp"] = (
        field_loss(pred_sharp, batch["sharp_near_sdf"], p.kind, p.truncation).mean()
        if pred_sharp.shape[1]
        else pred.new_zeros((), dtype=torch.float32)
    )
    terms["loss"] = (
        p.volume_weight * terms["volume"]
        + p.near_weight * terms["near"]
        + p.sharp_weight * terms["sharp"]
        + p.kl_weight * terms["kl"]
    )
    return terms


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
            self._cache[key] = sample_surface(mesh, METRIC_POINTS, np.random.default_rng(self.seed))[0].astype(np.float32)
        return self._cache[key]


@torch.no_grad()
def reconstruct(
    model: VecSetVAE, arrays: dict[str, np.ndarray], data: config.VAEDataParams, seed: int, resolution: int,
    device: torch.device, autocast=contextlib.nullcontext,
) -> tuple[FieldFn, trimesh.Trimesh]:  # fmt: skip
    """An object's reconstruction: the posterior mean of its seeded encoder view, decoded to latent
    tokens; the field (query points (Q, 3) -> signed distances (Q,)) they define, and its mesh."""
    inputs = {k: v.to(device) for k, v in encoder_inputs(arrays, data, seed).items()}
    with autocast():
        tokens = model.decode(model.encode(**inputs).mode())

    def field(q: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model.query(tokens, q[None])[0]

    return field, decode_mesh(field, resolution, device=device)


@torch.no_grad()
def validate(
    model: VecSetVAE,
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


class CsvLog:
    """A CSV that survives resume: rows past the resumed step are dropped, new rows appended."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int):
        self.path, self.columns = path, columns
        rows = []
        if resume_step and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with mf.atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns).writerow({k: _fmt(row[k]) for k in self.columns})


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def run(params: config.Params, paths: Paths, *, val_split: str = "val") -> dict[str, Any]:
    """Train, validate, save; returns the final metrics (on every rank)."""
    p = params.train_vae
    cfg = model_config(p)
    accelerator = training.make_accelerator(p.precision, p.grad_accum, params.seed)
    set_seed(params.seed)
    world = accelerator.num_processes

    train_objects = list_objects(paths.samples, "train")
    val_objects = list_objects(paths.samples, val_split)
    if not train_objects:
        raise mf.ManifestError(f"{paths.samples / mf.MANIFEST}: no objects with status ok in the train split")
    if not val_objects:
        log.warning("no objects in the %r split of %s: validation is skipped", val_split, paths.samples)
    # Periodic validations score the first val_objects objects; the last one scores the whole split.
    val_during = val_objects[: p.val_objects] if p.val_objects else val_objects
    manifest_sha = mf.file_sha256(paths.samples / mf.MANIFEST)
    data_hash = training.dvc_hash(paths.samples)
    ckpts = training.Checkpoints(paths.checkpoints, p.keep_checkpoints)
    references = References(paths.meshes, params.seed)
    fp = fingerprint(params, cfg, data_hash or manifest_sha, world)

    dataset = ShapeSamples(train_objects, p.data)
    loader = DataLoader(
        dataset,
        batch_size=p.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= p.batch_size,
        num_workers=p.data.loader_workers,
        persistent_workers=p.data.loader_workers > 0,
    )
    model = VecSetVAE(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.cosine_schedule(p.warmup_steps, p.steps, p.min_lr_ratio))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    training.require_batches(loader, len(train_objects), p.batch_size, accelerator.num_processes, STAGE)
    accelerator.register_for_checkpointing(scheduler)

    step, run_id = training.resume(accelerator, ckpts, fp, p.steps)

    tracker = training.Tracker(accelerator.is_main_process)
    tags = training.pipeline_tags() | {
        "stage": STAGE,
        "git_commit": training.git_commit(),
        "dvc_data_hash": data_hash or "untracked",
        "data_manifest_sha256": manifest_sha,
        "world_size": str(world),
        "precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
    }
    run_id = tracker.start(
        "shapeflow-train_vae",
        training.run_name(STAGE),
        run_id,
        tags,
        {"seed": params.seed, STAGE: dataclasses.asdict(p), "model_config": cfg.to_dict(),
         "train_objects": len(train_objects), "val_objects": len(val_objects)},
    )
    if accelerator.is_main_process:
        loss_log = CsvLog(paths.checkpoints / "loss.csv", LOSS_COLUMNS, step)
        val_log = CsvLog(paths.checkpoints / "val.csv", VAL_COLUMNS, step)
        log.info(
            "training %s VAE (%.2fM parameters) on %d objects, %d process(es), %s (%d threads), precision %s, steps %d",
            p.preset, sum(t.numel() for t in model.parameters()) / 1e6, len(train_objects), world,
            accelerator.device, torch.get_num_threads(), accelerator.mixed_precision, p.steps,
        )  # fmt: skip

    per_step = p.batch_size * p.grad_accum * world
    points_per_sample = p.data.volume_points + p.data.near_points + p.data.sharp_near_points
    sums = torch.zeros(len(TERMS), device=accelerator.device)
    window, grad_norm, tic = 0, torch.zeros((), device=accelerator.device), time.perf_counter()
    val_summary: dict[str, float] = {}
    with tracker.ends_on_error():
        while step < p.steps:
            for batch in training.epoch_batches(accelerator, loader, step, p.grad_accum):
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        terms = losses(model, batch, p.loss)
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.stack([terms[t].detach().float() for t in TERMS])
                window += 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                if step % p.log_every == 0 or step == p.steps:
                    means = (accelerator.reduce(sums, "mean") / window).tolist()
                    elapsed = time.perf_counter() - tic
                    row = dict(zip(TERMS, means)) | {
                        "step": step,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "samples_per_s": per_step * window / p.grad_accum / elapsed,
                        "points_per_s": per_step * points_per_sample * window / p.grad_accum / elapsed,
                    }
                    if accelerator.is_main_process:
                        loss_log.append(row)
                        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
                        log.info("step %d/%d loss %.4f (volume %.4f near %.4f sharp %.4f kl %.3g) lr %.2e %.1f samples/s",
                                 step, p.steps, row["loss"], row["volume"], row["near"], row["sharp"], row["kl"],
                                 row["lr"], row["samples_per_s"])  # fmt: skip
                    sums.zero_()
                    window, tic = 0, time.perf_counter()
                if val_objects and ((p.val_every and step % p.val_every == 0) or step == p.steps):
                    val_summary = _validate_on_main(
                        accelerator, model, val_objects if step == p.steps else val_during, references, p, params.seed, step, tracker,
                        val_log if accelerator.is_main_process else None,
                    )  # fmt: skip
                    tic = time.perf_counter()
                if step % p.checkpoint_every == 0 and step < p.steps:
                    ckpts.save(accelerator, step, {"fingerprint": fp, "mlflow_run_id": run_id})
                    tic = time.perf_counter()
                if step >= p.steps:
                    break

    checksums = training.rank_checksums(accelerator, model)
    metrics = {"steps": step, "world_size": world, "train_objects": len(train_objects), "val_split": val_split,
               "val_objects": len(val_objects), "rank_checksums": checksums,
               **{f"val_{k}": v for k, v in val_summary.items()}}  # fmt: skip
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pretrained(accelerator.unwrap_model(model), paths.out, {"steps": step, "seed": params.seed, "preset": p.preset, "mlflow_run_id": run_id})
        training.write_reports(metrics, paths.metrics, paths.plots, paths.checkpoints, ("loss.csv", "val.csv"))
        tracker.log_artifacts(paths.out, "model")
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
        tracker.end("FINISHED")
        ckpts.clear()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _validate_on_main(accelerator, model, val_objects, references, p, seed, step, tracker, val_log) -> dict[str, float]:
    """Validation runs on rank 0 while the others wait; every rank gets the summary back."""
    summary: dict[str, float] = {}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = validate(accelerator.unwrap_model(model), val_objects, references, p.data, p.val_resolution, seed, accelerator)
        tracker.log_metrics({f"val_{k}": v for k, v in summary.items()}, step)
        val_log.append({"step": step, **summary})
        log.info("step %d val: CD %.4f F@0.01 %.3f F@0.02 %.3f (%d objects)", step, summary["cd"], summary["f@0.01"], summary["f@0.02"], len(val_objects))
    accelerator.wait_for_everyone()
    return summary


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train-vae", help="train the VecSet VAE on a sample-stage output (run it with accelerate launch)")
    p.add_argument("samples", type=Path, help="sample-stage output folder (manifest.csv + objects/)")
    p.add_argument("out", type=Path, help="output folder for model.safetensors and config.json")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints/train_vae"), help="checkpoint folder (default: %(default)s)")
    p.add_argument("--metrics", type=Path, default=Path("reports/train_vae/metrics.json"), help="final metrics JSON (default: %(default)s)")
    p.add_argument("--plots", type=Path, default=Path("reports/train_vae"), help="folder for loss.csv and val.csv (default: %(default)s)")
    p.add_argument("--meshes", type=Path, help="watertight-stage output: validation scores against these surfaces")
    p.add_argument("--val-split", default="val", choices=["train", "val", "test"], help="split scored during training (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    paths = Paths(args.samples, args.out, args.checkpoints, args.metrics, args.plots, args.meshes)
    metrics = run(params, paths, val_split=args.val_split)
    if "val_f@0.02" in metrics:
        print(f"train_vae: {metrics['steps']} steps, val CD {metrics['val_cd']:.4f}, F@0.02 {metrics['val_f@0.02']:.3f}")
    return 0
