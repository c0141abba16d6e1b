"""train_dit stage: a DiT with rectified flow on the trained VAE's latent token sets.

Started by `accelerate launch` (dvc.yaml) like train_vae, with the same training features: DDP over
an accelerate config, bf16 on GPU, gradient accumulation, AdamW with warm-up and cosine decay,
checkpoints and resume after a kill, one MLflow run written by rank 0.

1. Every train and val object is encoded once with the VAE (posterior mean of a seeded encoder view)
   into a cache file keyed by the hashes of the VAE weights, the sample manifest and the encoder
   view settings: nothing is re-encoded while none of those changed.
2. Latents are normalised per channel with the train split's mean and std (kept in generator.json).
3. The DiT learns the flow's velocity (shapeflow.flow), class-conditional on the manifest's category
   with label dropout for classifier-free guidance, or unconditional.
4. OUT gets raw/ and ema/ (weights + config) and generator.json; --metrics the final figures, among
   them the share of final samples that decode to a watertight mesh and the share nearest (Chamfer)
   to val shapes of the category asked for; --plots loss.csv and val.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from scipy.spatial import cKDTree
from torch.utils.data import TensorDataset

from shapeflow import config, flow, registry, tracking, training
from shapeflow import manifest as mf
from shapeflow.dataset import SampleObject, drop_thin_shells, list_objects, load_arrays
from shapeflow.geometry.mesh import is_watertight_shape
from shapeflow.geometry.sampling import sample_surface
from shapeflow.inference import EMA_DIR, GENERATOR_FILE, RAW_DIR, LatentStats, ShapePipeline
from shapeflow.models import families
from shapeflow.models.dit import DiT, DiTConfig, dit_config, save_pretrained
from shapeflow.models.families import AnyVAE, encoder_inputs, load_vae

log = logging.getLogger("shapeflow.train_dit")

STAGE = "train_dit"
VAL_COLUMNS = ("val_loss", "val_loss_ema")  # val.csv's after 'step', and their names in the metrics
VAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)  # the val flow loss is the mean over these times
SCORE_POINTS = 2048  # points a side for the category check (PointFlow's cloud size)
ENCODE_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Paths:
    vae: Path
    samples: Path
    out: Path
    checkpoints: Path
    metrics: Path
    plots: Path
    cache: Path  # latent cache folder
    meshes: Path | None = None  # watertight-stage output: shell_ratio for train_vae.data.min_shell_ratio


@dataclasses.dataclass
class Latents:
    """Encoded objects of one split: latents (N, M, D) in the VAE's units, and the objects."""

    latents: torch.Tensor
    objects: list[SampleObject]

    @property
    def categories(self) -> list[str]:
        return [o.category for o in self.objects]


@dataclasses.dataclass
class TrainingData:
    """What the DiT learns from: the encoded splits, the train split's latent statistics, the classes."""

    key: str  # the latent cache key (see cache_key)
    train: Latents
    val: Latents
    stats: LatentStats
    classes: list[str]  # [] when unconditional
    left_out: list[str] = dataclasses.field(default_factory=list)  # keys of the thin shells left out of train

    def normalised(self, split: Latents) -> tuple[torch.Tensor, torch.Tensor]:
        """A split's latents normalised with the train statistics (N, M, D), and its labels (N,): the
        index of the category among the classes, else the null label len(classes)."""
        labels = [self.classes.index(c) if c in self.classes else len(self.classes) for c in split.categories]
        return self.stats.normalise(split.latents), torch.tensor(labels, dtype=torch.long)


# -- encoding -----------------------------------------------------------------------------------------


def cache_key(vae_dir: Path, samples: Path, data: config.VAEDataParams, seed: int) -> str:
    """What the cached latents depend on: the VAE's weights and config, the samples, the encoder view."""
    blob = json.dumps(
        {
            "vae_weights": mf.file_sha256(vae_dir / "model.safetensors"),
            "vae_config": mf.file_sha256(vae_dir / "config.json"),
            "samples": mf.file_sha256(samples / mf.MANIFEST),
            "input_points": data.input_points,
            "sharp_points": data.sharp_points,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def encode_objects(
    vae: AnyVAE, objects: list[SampleObject], data: config.VAEDataParams, seed: int, device
) -> torch.Tensor:
    """Posterior-mean latents (N, M, D) of each object's seeded encoder view (points or grid)."""
    out = [torch.zeros(0, vae.config.num_latents, vae.config.latent_dim)]
    for start in range(0, len(objects), ENCODE_BATCH):
        views = [encoder_inputs(vae, load_arrays(o.path), data, seed) for o in objects[start : start + ENCODE_BATCH]]
        batch = {k: torch.cat([v[k] for v in views]).to(device) for k in views[0]}
        out.append(vae.encode(**batch).mode().float().cpu())
    return torch.cat(out)


def cached_latents(
    paths: Paths,
    split_objects: dict[str, list[SampleObject]],
    data: config.VAEDataParams,
    seed: int,
    key: str,
    accelerator: Accelerator,
) -> dict[str, Latents]:
    """Latents per split, from the cache file of `key` (see cache_key), else encoded (rank 0) and cached."""
    file = paths.cache / f"latents-{key}.npz"
    if accelerator.is_main_process and not file.is_file():
        vae = load_vae(paths.vae, accelerator.device)
        tic = time.perf_counter()
        arrays: dict[str, np.ndarray] = {}
        for split, objects in split_objects.items():
            arrays[f"{split}_latents"] = encode_objects(vae, objects, data, seed, accelerator.device).numpy()
            arrays[f"{split}_keys"] = np.array([o.key for o in objects])
        paths.cache.mkdir(parents=True, exist_ok=True)
        with mf.atomic_path(file) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        log.info(
            "encoded %d objects in %.1f s -> %s", sum(map(len, split_objects.values())), time.perf_counter() - tic, file
        )
    elif accelerator.is_main_process:
        log.info("latents from the cache %s (VAE, samples and encoder view unchanged)", file)
    accelerator.wait_for_everyone()
    out = {}
    with np.load(file, allow_pickle=False) as npz:
        for split, objects in split_objects.items():
            # The cache key covers the manifest; this guards the split logic.
            if list(npz[f"{split}_keys"]) != [o.key for o in objects]:
                raise RuntimeError(f"{file}: cached {split} objects differ from the manifest's; delete it to re-encode")
            out[split] = Latents(torch.from_numpy(npz[f"{split}_latents"]), objects)
    return out


def training_data(params: config.Params, paths: Paths, accelerator: Accelerator) -> TrainingData:
    """The train and val splits' latents (encoded, or from the cache), their statistics, the classes.
    The train split leaves out the thin shells train_vae leaves out (train_vae.data.min_shell_ratio)."""
    objects = {"train": list_objects(paths.samples, "train"), "val": list_objects(paths.samples, "val")}
    if not objects["train"]:
        raise mf.ManifestError(f"{paths.samples / mf.MANIFEST}: no objects with status ok in the train split")
    if not objects["val"] and accelerator.is_main_process:
        log.warning("no objects in the val split of %s: no val flow loss, no category check", paths.samples)
    min_ratio = params.train_vae.data.min_shell_ratio
    kept, thin = drop_thin_shells(objects["train"], paths.meshes, min_ratio)
    if not kept:
        raise config.ParamsError(
            f"train_vae.data.min_shell_ratio: all {len(thin)} train objects are thin shells below {min_ratio}; lower it"
        )
    key = cache_key(paths.vae, paths.samples, params.train_vae.data, params.seed)
    # The cache holds every object of the splits, so one encoding serves any min_shell_ratio.
    latents = cached_latents(paths, objects, params.train_vae.data, params.seed, key, accelerator)
    train = latents["train"]
    left_out = {o.key for o in thin}
    if left_out:
        rows = [i for i, o in enumerate(train.objects) if o.key not in left_out]
        train = Latents(train.latents[rows], [train.objects[i] for i in rows])
    classes = sorted(set(train.categories)) if params.train_dit.conditional else []
    if params.train_dit.conditional and len(classes) < 2:
        log.warning("train split has %d categorie(s): conditioning on it is of little use", len(classes))
    return TrainingData(key, train, latents["val"], LatentStats.of(train.latents), classes, sorted(left_out))


# -- training ---------------------------------------------------------------------------------------


def model_config(
    p: config.TrainDiTParams, latent_dim: int, num_tokens: int, num_classes: int, grid_side: int = 0
) -> DiTConfig:
    """The DiT of the preset, its token layout taken from the VAE: latent_dim and num_tokens, and
    grid_side for grid latents (patchified; train_dit.model.patch_size sets the patch)."""
    fixed = {"latent_dim": latent_dim, "num_tokens": num_tokens, "num_classes": num_classes, "grid_side": grid_side}
    clash = sorted(set(fixed) & set(p.model))
    if clash:
        raise config.ParamsError(f"train_dit.model: {clash} follow from the VAE and the data and cannot be set")
    try:
        return dit_config(p.preset, {**p.model, **fixed})
    except (ValueError, TypeError) as exc:
        raise config.ParamsError(f"train_dit.preset/model: {exc}") from exc


NOT_IN_FINGERPRINT = ("final_samples", "generate")  # besides training.LOOP_SETTINGS


def channel_weights(p: config.TrainDiTParams, latent_dim: int, anchored: bool) -> torch.Tensor | None:
    """Flow-loss weights per latent channel: `anchor_weight` on an anchored VAE's xyz (its first three
    channels), 1 elsewhere; None when all would be 1."""
    if not anchored or p.anchor_weight == 1.0:
        return None
    weights = torch.ones(latent_dim)
    weights[:3] = p.anchor_weight
    return weights


def training_losses(
    model, batch: list[torch.Tensor], p: config.TrainDiTParams, null_label: int | None, weights: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The flow-matching loss of a batch (z, y) with fresh times, noise and label dropout (global
    torch RNG); the labels y are not used when null_label is None (an unconditional DiT)."""
    z, y = batch
    t = flow.sample_t(z.shape[0], p.flow.t_mean, p.flow.t_std, p.flow.t_shift, device=z.device)
    noise = torch.randn_like(z)
    extra_args = None if null_label is None else {"y": flow.drop_labels(y, p.cond_dropout, null_label)}
    return {"loss": flow.loss(model, z, noise, t, weights, extra_args).mean()}


@torch.no_grad()
def val_loss(model: DiT, z: torch.Tensor, y: torch.Tensor | None, seed: int, batch: int = 64) -> float:
    """Flow loss on the val latents at fixed times and fixed noise: comparable across steps and runs."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for t_value in VAL_TIMES:
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        for start in range(0, len(z), batch):
            part = slice(start, start + batch)
            t = torch.full((len(z[part]),), t_value, device=z.device)
            extra_args = None if y is None else {"y": y[part]}
            per = flow.loss(model, z[part], noise[part], t, extra_args=extra_args)
            total, count = total + float(per.sum()), count + len(per)
    model.train()
    return total / max(1, count)


def score_samples(pipeline: ShapePipeline, val: Latents, p: config.TrainDiTParams, seed: int) -> dict[str, Any]:
    """Generate final_samples shapes (the classes in turn) and score them.

    watertight_share: share that decode to a non-empty watertight mesh. category_match: of the
    conditional samples with a surface, the share whose nearest val shape (Chamfer on 2,048-point
    clouds) is of the category asked for.
    """
    g = p.generate
    results = pipeline.generate(p.final_samples, None, g.steps, g.guidance, seed, g.resolution)
    tight = [is_watertight_shape(mesh) for _, mesh in results]
    summary: dict[str, Any] = {
        "samples": len(results),
        "watertight_share": float(np.mean(tight)) if tight else float("nan"),
    }
    if not pipeline.classes or not val.objects:
        return summary
    rng = np.random.default_rng(seed)
    refs = []
    for obj in val.objects:
        pts = load_arrays(obj.path)["surface_points"]
        refs.append(pts[rng.choice(len(pts), SCORE_POINTS, replace=len(pts) < SCORE_POINTS)])
    trees = [cKDTree(r) for r in refs]
    matches = []
    for category, mesh in results:
        if len(mesh.faces) == 0:
            continue
        pts = sample_surface(mesh, SCORE_POINTS, rng)[0]
        tree = cKDTree(pts)
        cds = [0.5 * (t.query(pts)[0].mean() + tree.query(r)[0].mean()) for t, r in zip(trees, refs, strict=True)]
        matches.append(val.categories[int(np.argmin(cds))] == category)
    summary["category_match"] = float(np.mean(matches)) if matches else 0.0
    return summary


def run(params: config.Params, paths: Paths) -> dict[str, Any]:
    """Encode, train, score, save; returns the final metrics (on every rank)."""
    p = params.train_dit
    accelerator = training.make_accelerator(p.precision, p.grad_accum, params.seed)
    data = training_data(params, paths, accelerator)
    _, num_tokens, latent_dim = data.train.latents.shape
    vae_info = json.loads((paths.vae / "config.json").read_text())
    vae_cfg = families.config_from(vae_info)
    grid_side = families.token_grid(vae_cfg)
    p = dataclasses.replace(p, flow=dataclasses.replace(p.flow, t_shift=families.flow_shift(p.flow.t_shift, vae_cfg)))
    cfg = model_config(p, latent_dim, num_tokens, len(data.classes), grid_side)
    model = DiT(cfg)
    ema = training.ema(model, p.ema_decay, accelerator.device) if p.ema_decay else None
    z_train, y_train = data.normalised(data.train)
    z_val, y_val = (t.to(accelerator.device) for t in data.normalised(data.val))
    y_val = y_val if data.classes else None

    def scores(model: DiT, last: bool) -> dict[str, float]:
        raw = val_loss(model, z_val, y_val, params.seed)
        return {
            "val_loss": raw,
            "val_loss_ema": raw if ema is None else val_loss(ema.module, z_val, y_val, params.seed),
        }

    def save(model: DiT, step: int, run_id: str | None) -> dict[str, Any]:
        meta = {"steps": step, "seed": params.seed, "preset": p.preset}
        save_pretrained(model, paths.out / RAW_DIR, meta)
        if ema is not None:
            model = ema.module
            save_pretrained(model, paths.out / EMA_DIR, meta | {"ema_decay": p.ema_decay})
        info = {
            "classes": data.classes,
            "latent_stats": data.stats.to_dict(),
            "t_shift": p.flow.t_shift,
            "latent_cache_key": data.key,
            "vae": str(paths.vae),
            "mlflow_run_id": run_id,
        }
        mf.atomic_write_text(paths.out / GENERATOR_FILE, json.dumps(info, indent=2) + "\n")
        return final_scores(model, paths.vae, data, p, params.seed) if p.final_samples else {}

    anchored = bool(vae_info["config"].get("anchored"))
    null_label = cfg.null_label if data.classes else None
    parts = {"model": cfg.to_dict(), "seed": params.seed, "latents": data.key, "world": accelerator.num_processes}
    parts["left_out"] = data.left_out  # the latents cover every train object: which of them are trained on
    conditioning = f"{len(data.classes)} classes" if data.classes else "unconditional"
    job = training.Job(
        stage=STAGE,
        describe=f"{p.preset} DiT on {len(z_train)} latent sets ({num_tokens} x {latent_dim}), {conditioning}",
        model=model,
        dataset=TensorDataset(z_train, y_train),
        training_losses=functools.partial(
            training_losses, p=p, null_label=null_label, weights=channel_weights(p, latent_dim, anchored)
        ),
        terms=("loss",),
        fingerprint=training.fingerprint(p, NOT_IN_FINGERPRINT, **parts),
        tags=tracking.provenance_tags(STAGE, data=paths.samples, vae=paths.vae)
        | {
            "data_manifest_sha256": mf.file_sha256(paths.samples / mf.MANIFEST),
            "latent_cache_key": data.key,
            "vae_family": families.family_of(vae_cfg),
        },
        params={
            "model_config": cfg.to_dict(),
            "classes": data.classes,
            "train_objects": len(z_train),
            "train_vae.data.min_shell_ratio": params.train_vae.data.min_shell_ratio,
            "thin_shells_left_out": len(data.left_out),
            "val_objects": len(z_val),
            "vae_steps": vae_info.get("meta", {}).get("steps"),
        },
        info={"train_objects": len(z_train), "thin_shells_left_out": len(data.left_out), "classes": data.classes},
        save=save,
        validation=training.Validation(scores if len(z_val) else None, VAL_COLUMNS),
        ema=ema,
        categories=data.train.categories,
        register=lambda run_id, metrics: registry.register(
            run_id,
            registry.DIT_MODEL,
            {"dit": paths.out, "vae": paths.vae},
            registry.dit_signature(p.generate.steps, p.generate.guidance, p.generate.resolution),
            f"{p.preset} DiT ({conditioning}) with its VAE: (category, seed) rows in, GLB meshes out",
            {k: v for k, v in metrics.items() if k.startswith(("val_", "gen_")) and isinstance(v, float)},
        ),
        samples=paths.samples,
    )
    return training.fit(accelerator, p, params.seed, paths, job)


def final_scores(dit: DiT, vae: Path, data: TrainingData, p: config.TrainDiTParams, seed: int) -> dict[str, Any]:
    """The final samples' scores (score_samples) and the seconds a sample took, as gen_<name>."""
    tic = time.perf_counter()
    vae_model = load_vae(vae, next(dit.parameters()).device)
    pipeline = ShapePipeline(dit.eval(), vae_model, data.stats, data.classes, p.flow.t_shift)
    scores = score_samples(pipeline, data.val, p, seed)
    scores["seconds_per_sample"] = (time.perf_counter() - tic) / p.final_samples
    log.info("final samples: %s", scores)
    return {f"gen_{k}": v for k, v in scores.items()}


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train-dit", help="train the DiT on the VAE's latents (run it with accelerate launch)")
    p.add_argument("vae", type=Path, help="train_vae output folder (model.safetensors + config.json)")
    p.add_argument("samples", type=Path, help="sample-stage output folder (manifest.csv + objects/)")
    p.add_argument("out", type=Path, help="output folder: raw/, ema/, generator.json")
    training.add_output_arguments(p, STAGE)
    p.add_argument(
        "--cache", type=Path, default=Path("cache/latents"), help="latent cache folder (default: %(default)s)"
    )
    p.add_argument(
        "--meshes",
        type=Path,
        help="watertight-stage output: its manifest's shell_ratio is what train_vae.data.min_shell_ratio compares",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    paths = Paths(args.vae, args.samples, args.out, args.checkpoints, args.metrics, args.plots, args.cache, args.meshes)
    metrics = run(params, paths)
    extra = "".join(f", {k} {metrics[k]:.3f}" for k in ("gen_watertight_share", "gen_category_match") if k in metrics)
    print(f"train_dit: {metrics['steps']} steps, val flow loss {metrics.get('val_loss_ema', float('nan')):.4f}{extra}")
    return 0
