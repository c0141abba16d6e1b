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
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader, TensorDataset

from shapeflow import config, flow, manifest as mf, training
from shapeflow.dataset import SampleObject, encoder_inputs, list_objects, load_arrays
from shapeflow.generate import EMA_DIR, GENERATOR_FILE, RAW_DIR, Generator, LatentStats, is_watertight_shape
from shapeflow.geometry.sampling import sample_surface
from shapeflow.models.dit import DiT, DiTConfig, dit_config, save_pretrained
from shapeflow.models.vae import VecSetVAE, load_pretrained as load_vae
from shapeflow.stages.train_vae import CsvLog

log = logging.getLogger("shapeflow.train_dit")

STAGE = "train_dit"
LOSS_COLUMNS = ("step", "loss", "lr", "grad_norm", "samples_per_s")
VAL_COLUMNS = ("step", "val_loss", "val_loss_ema")
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


@dataclasses.dataclass
class Latents:
    """Encoded objects of one split: latents (N, M, D) in the VAE's units, and who they are."""

    latents: torch.Tensor
    keys: list[str]
    categories: list[str]


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
def encode_objects(vae: VecSetVAE, objects: list[SampleObject], data: config.VAEDataParams, seed: int, device) -> torch.Tensor:
    """Posterior-mean latents (N, M, D) of each object's seeded encoder view."""
    out = [torch.zeros(0, vae.config.num_latents, vae.config.latent_dim)]
    for start in range(0, len(objects), ENCODE_BATCH):
        views = [encoder_inputs(load_arrays(o.path), data, seed) for o in objects[start : start + ENCODE_BATCH]]
        batch = {k: torch.cat([v[k] for v in views]).to(device) for k in views[0]}
        out.append(vae.encode(**batch).mode().float().cpu())
    return torch.cat(out)


def cached_latents(
    paths: Paths, split_objects: dict[str, list[SampleObject]], data: config.VAEDataParams, seed: int,
    key: str, accelerator: Accelerator,
) -> dict[str, Latents]:  # fmt: skip
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
        log.info("encoded %d objects in %.1f s -> %s", sum(map(len, split_objects.values())), time.perf_counter() - tic, file)
    elif accelerator.is_main_process:
        log.info("latents from the cache %s (VAE, samples and encoder view unchanged)", file)
    accelerator.wait_for_everyone()
    out = {}
    with np.load(file, allow_pickle=False) as npz:
        for split, objects in split_objects.items():
            keys = [o.key for o in objects]
            if list(npz[f"{split}_keys"]) != keys:  # the key covers the manifest; this guards the split logic
                raise RuntimeError(f"{file}: cached {split} objects differ from the manifest's; delete the file to re-encode")
            out[split] = Latents(torch.from_numpy(npz[f"{split}_latents"]), keys, [o.category for o in objects])
    return out


# -- training ---------------------------------------------------------------------------------------


def model_config(p: config.TrainDiTParams, latent_dim: int, num_tokens: int, num_classes: int) -> DiTConfig:
    fixed = {"latent_dim": latent_dim, "num_tokens": num_tokens, "num_classes": num_classes}
    clash = sorted(set(fixed) & set(p.model))
    if clash:
        raise config.ParamsError(f"train_dit.model: {clash} follow from the VAE and the data and cannot be set")
    try:
        return dit_config(p.preset, {**p.model, **fixed})
    except (ValueError, TypeError) as exc:
        raise config.ParamsError(f"train_dit.preset/model: {exc}") from exc


NOT_IN_FINGERPRINT = ("log_every", "checkpoint_every", "keep_checkpoints", "val_every", "final_samples", "generate", "accelerate_config")


def fingerprint(params: config.Params, model: DiTConfig, latent_key: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed: the settings, the resolved model config, the latents, the world size."""
    section = {k: v for k, v in dataclasses.asdict(params.train_dit).items() if k not in NOT_IN_FINGERPRINT}
    blob = json.dumps({"train_dit": section, "model": model.to_dict(), "seed": params.seed, "latents": latent_key, "world": world_size}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def channel_weights(p: config.TrainDiTParams, latent_dim: int, anchored: bool) -> torch.Tensor | None:
    """Flow-loss weights per latent channel: `anchor_weight` on an anchored VAE's xyz (its first three
    channels), 1 elsewhere; None when all would be 1."""
    if not anchored or p.anchor_weight == 1.0:
        return None
    weights = torch.ones(latent_dim)
    weights[:3] = p.anchor_weight
    return weights


def flow_loss(
    model, z: torch.Tensor, y: torch.Tensor | None, p: config.TrainDiTParams, null_label: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The batch's flow-matching loss with fresh noise, times and label dropout (global torch RNG)."""
    t = flow.sample_t(z.shape[0], p.flow.t_mean, p.flow.t_std, p.flow.t_shift, device=z.device)
    noise = torch.randn_like(z)
    if y is None:
        return flow.loss(lambda x, s: model(x, s), z, noise, t, weights).mean()
    y = flow.drop_labels(y, p.cond_dropout, null_label)
    return flow.loss(lambda x, s, y: model(x, s, y), z, noise, t, weights, y=y).mean()


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
            kwargs = {} if y is None else {"y": y[part]}
            per = flow.loss(lambda x, s, **kw: model(x, s, kw.get("y")), z[part], noise[part], t, **kwargs)
            total, count = total + float(per.sum()), count + len(per)
    model.train()
    return total / max(1, count)


def score_samples(generator: Generator, val: Latents, val_objects: list[SampleObject], p: config.TrainDiTParams, seed: int) -> dict[str, Any]:
    """Generate final_samples shapes (the classes in turn) and score them.

    watertight_share: share that decode to a non-empty watertight mesh. category_match: of the
    conditional samples with a surface, the share whose nearest val shape (Chamfer on 2,048-point
    clouds) is of the category asked for.
    """
    g = p.generate
    results = generator.generate(p.final_samples, None, g.steps, g.guidance, seed, g.resolution)
    tight = [is_watertight_shape(mesh) for _, mesh in results]
    summary: dict[str, Any] = {"samples": len(results), "watertight_share": float(np.mean(tight)) if results else float("nan")}
    if not generator.classes or not val_objects:
        return summary
    rng = np.random.default_rng(seed)
    refs = []
    for obj in val_objects:
        pts = load_arrays(obj.path)["surface_points"]
        refs.append(pts[rng.choice(len(pts), SCORE_POINTS, replace=len(pts) < SCORE_POINTS)])
    trees = [cKDTree(r) for r in refs]
    matches = []
    for category, mesh in results:
        if len(mesh.faces) == 0:
            continue
        pts = sample_surface(mesh, SCORE_POINTS, rng)[0]
        tree = cKDTree(pts)
        cds = [0.5 * (t.query(pts)[0].mean() + tree.query(r)[0].mean()) for t, r in zip(trees, refs)]
        matches.append(val.categories[int(np.argmin(cds))] == category)
    summary["category_match"] = float(np.mean(matches)) if matches else 0.0
    return summary


def run(params: config.Params, paths: Paths) -> dict[str, Any]:
    """Encode, train, score, save; returns the final metrics (on every rank)."""
    p = params.train_dit
    accelerator = training.make_accelerator(p.precision, p.grad_accum, params.seed)
    set_seed(params.seed)
    world = accelerator.num_processes

    objects = {"train": list_objects(paths.samples, "train"), "val": list_objects(paths.samples, "val")}
    if not objects["train"]:
        raise mf.ManifestError(f"{paths.samples / mf.MANIFEST}: no objects with status ok in the train split")
    latent_key = cache_key(paths.vae, paths.samples, params.train_vae.data, params.seed)
    latents = cached_latents(paths, objects, params.train_vae.data, params.seed, latent_key, accelerator)
    train, val = latents["train"], latents["val"]
    stats = LatentStats.of(train.latents)
    classes = sorted(set(train.categories)) if p.conditional else []
    if p.conditional and len(classes) < 2:
        log.warning("train split has %d categorie(s): conditioning on it is of little use", len(classes))
    _, num_tokens, latent_dim = train.latents.shape
    cfg = model_config(p, latent_dim, num_tokens, len(classes))
    vae_info = json.loads((paths.vae / "config.json").read_text())
    weights = channel_weights(p, latent_dim, bool(vae_info["config"].get("anchored")))

    def labels_of(split: Latents) -> torch.Tensor:
        return torch.tensor([classes.index(c) if c in classes else cfg.null_label for c in split.categories])

    z_train = stats.normalise(train.latents)
    y_train = labels_of(train) if classes else torch.zeros(len(z_train), dtype=torch.long)
    dataset = TensorDataset(z_train, y_train)
    loader = DataLoader(dataset, batch_size=p.batch_size, shuffle=True, drop_last=len(dataset) >= p.batch_size)

    model = DiT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.cosine_schedule(p.warmup_steps, p.steps, p.min_lr_ratio))
    ema = training.EMA(model, p.ema_decay) if p.ema_decay else None
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    training.require_batches(loader, len(dataset), p.batch_size, accelerator.num_processes, STAGE)
    accelerator.register_for_checkpointing(scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    fp = fingerprint(params, cfg, latent_key, world)
    ckpts = training.Checkpoints(paths.checkpoints, p.keep_checkpoints)
    step, run_id = training.resume(accelerator, ckpts, fp, p.steps)

    tracker = training.Tracker(accelerator.is_main_process)
    vae_meta = vae_info.get("meta", {})
    tags = training.pipeline_tags() | {
        "stage": STAGE,
        "git_commit": training.git_commit(),
        "dvc_data_hash": training.dvc_hash(paths.samples) or "untracked",
        "dvc_vae_hash": training.dvc_hash(paths.vae) or "untracked",
        "data_manifest_sha256": mf.file_sha256(paths.samples / mf.MANIFEST),
        "latent_cache_key": latent_key,
        "world_size": str(world),
        "precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
    }
    run_id = tracker.start(
        "shapeflow-train_dit",
        training.run_name(STAGE),
        run_id,
        tags,
        {"seed": params.seed, STAGE: dataclasses.asdict(p), "model_config": cfg.to_dict(), "classes": classes,
         "train_objects": len(z_train), "val_objects": len(val.keys), "vae_steps": vae_meta.get("steps")},
    )  # fmt: skip
    null_label = cfg.null_label
    z_val = stats.normalise(val.latents).to(accelerator.device)
    y_val = labels_of(val).to(accelerator.device) if classes else None
    if accelerator.is_main_process:
        loss_log = CsvLog(paths.checkpoints / "loss.csv", LOSS_COLUMNS, step)
        val_log = CsvLog(paths.checkpoints / "val.csv", VAL_COLUMNS, step)
        log.info(
            "training %s DiT (%.2fM parameters) on %d latent sets (%d x %d), %s, %d process(es), %s, precision %s, steps %d",
            p.preset, sum(t.numel() for t in model.parameters()) / 1e6, len(z_train), num_tokens, latent_dim,
            f"{len(classes)} classes" if classes else "unconditional", world, accelerator.device,
            accelerator.mixed_precision, p.steps,
        )  # fmt: skip

    ema_model = DiT(cfg).to(accelerator.device) if ema is not None else None
    if not len(z_val) and accelerator.is_main_process:
        log.warning("no objects in the val split of %s: no val flow loss, no category check", paths.samples)

    def validate_now() -> dict[str, float]:
        raw = accelerator.unwrap_model(model)
        row = {"val_loss": val_loss(raw, z_val, y_val, params.seed)}
        if ema is not None:
            ema.copy_to(ema_model)
            row["val_loss_ema"] = val_loss(ema_model, z_val, y_val, params.seed)
        else:
            row["val_loss_ema"] = row["val_loss"]
        return row

    per_step = p.batch_size * p.grad_accum * world
    loss_sum = torch.zeros((), device=accelerator.device)
    window, grad_norm, tic = 0, torch.zeros((), device=accelerator.device), time.perf_counter()
    last_val: dict[str, float] = {}
    with tracker.ends_on_error():
        while step < p.steps:
            for z, y in training.epoch_batches(accelerator, loader, step, p.grad_accum):
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = flow_loss(model, z, y if classes else None, p, null_label, weights)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float()
                window += 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))
                step += 1
                if step % p.log_every == 0 or step == p.steps:
                    mean = float(accelerator.reduce(loss_sum, "mean")) / window
                    row = {"step": step, "loss": mean, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "samples_per_s": per_step * window / p.grad_accum / (time.perf_counter() - tic)}  # fmt: skip
                    if accelerator.is_main_process:
                        loss_log.append(row)
                        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
                        log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", step, p.steps, mean, row["lr"], row["samples_per_s"])
                    loss_sum.zero_()
                    window, tic = 0, time.perf_counter()
                if len(z_val) and ((p.val_every and step % p.val_every == 0) or step == p.steps):
                    if accelerator.is_main_process:
                        last_val = validate_now()
                        val_log.append({"step": step, **last_val})
                        tracker.log_metrics(last_val, step)
                        log.info("step %d val flow loss %.4f (EMA %.4f)", step, last_val["val_loss"], last_val["val_loss_ema"])
                    tic = time.perf_counter()
                if step % p.checkpoint_every == 0 and step < p.steps:
                    ckpts.save(accelerator, step, {"fingerprint": fp, "mlflow_run_id": run_id})
                    tic = time.perf_counter()
                if step >= p.steps:
                    break

    checksums = training.rank_checksums(accelerator, model)
    metrics: dict[str, Any] = {"steps": step, "world_size": world, "train_objects": len(z_train), "classes": classes,
                               "rank_checksums": checksums, **last_val}  # fmt: skip
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"steps": step, "seed": params.seed, "preset": p.preset}
        raw_model = accelerator.unwrap_model(model)
        save_pretrained(raw_model, paths.out / RAW_DIR, meta)
        final = raw_model
        if ema is not None:
            ema.copy_to(ema_model)
            save_pretrained(ema_model, paths.out / EMA_DIR, meta | {"ema_decay": p.ema_decay})
            final = ema_model
        info = {"classes": classes, "latent_stats": stats.to_dict(), "t_shift": p.flow.t_shift, "latent_cache_key": latent_key,
                "vae": str(paths.vae), "mlflow_run_id": run_id}  # fmt: skip
        mf.atomic_write_text(paths.out / GENERATOR_FILE, json.dumps(info, indent=2) + "\n")
        if p.final_samples:
            tic = time.perf_counter()
            generator = Generator(final.eval(), load_vae(paths.vae, accelerator.device), stats, classes, p.flow.t_shift)
            scores = score_samples(generator, val, objects["val"], p, params.seed)
            scores["seconds_per_sample"] = (time.perf_counter() - tic) / max(1, p.final_samples)
            metrics |= {f"gen_{k}": v for k, v in scores.items()}
            log.info("final samples: %s", scores)
        training.write_reports(metrics, paths.metrics, paths.plots, paths.checkpoints, ("loss.csv", "val.csv"))
        tracker.log_artifacts(paths.out, "model")
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
        tracker.end("FINISHED")
        ckpts.clear()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train-dit", help="train the DiT on the VAE's latents (run it with accelerate launch)")
    p.add_argument("vae", type=Path, help="train_vae output folder (model.safetensors + config.json)")
    p.add_argument("samples", type=Path, help="sample-stage output folder (manifest.csv + objects/)")
    p.add_argument("out", type=Path, help="output folder: raw/, ema/, generator.json")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints/train_dit"), help="checkpoint folder (default: %(default)s)")
    p.add_argument("--metrics", type=Path, default=Path("reports/train_dit/metrics.json"), help="final metrics JSON (default: %(default)s)")
    p.add_argument("--plots", type=Path, default=Path("reports/train_dit"), help="folder for loss.csv and val.csv (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path("cache/latents"), help="latent cache folder (default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    paths = Paths(args.vae, args.samples, args.out, args.checkpoints, args.metrics, args.plots, args.cache)
    metrics = run(params, paths)
    extra = "".join(f", {k} {metrics[k]:.3f}" for k in ("gen_watertight_share", "gen_category_match") if k in metrics)
    print(f"train_dit: {metrics['steps']} steps, val flow loss {metrics.get('val_loss_ema', float('nan')):.4f}{extra}")
    return 0
