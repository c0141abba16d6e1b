"""The training loop every training stage runs, and its parts: Accelerate setup, LR schedule, EMA,
checkpoints and resume, CSV logs.

A stage describes its training as a `Job` (model, data, losses, validation, what to save at the
end); `fit` runs it. Nothing here knows about a particular model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, Sampler

from shapeflow import config, registry
from shapeflow import manifest as mf
from shapeflow.tracking import Tracker, run_name

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer.json"  # written last into a checkpoint: its presence marks it complete
CURVES = ("loss.csv", "val.csv")  # written beside the checkpoints, copied to the plots folder at the end
LoopParams = config.TrainVAEParams | config.TrainDiTParams  # a training stage's params section
# Its settings that change what the loop logs or checks, not the weights: a checkpoint resumes across them.
LOOP_SETTINGS = ("log_every", "checkpoint_every", "keep_checkpoints", "val_every", "accelerate_config")


def pick_precision(requested: str) -> str:
    """'auto' -> bf16 on a CUDA device that supports it, else full precision."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(precision: str, grad_accum: int, seed: int) -> Accelerator:
    """One process per device as `accelerate launch` / torchrun started it; CPU (gloo) without CUDA.
    Every random generator is seeded with `seed`."""
    accelerator = Accelerator(
        mixed_precision=pick_precision(precision),
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
    set_seed(seed)
    return accelerator


def cpu_threads(local_processes: int) -> int:
    """Threads per training process on the CPU: the cores this process may use, shared among the
    processes of this machine. `accelerate launch` sets OMP_NUM_THREADS=1 unless its config says
    use_cpu, which would leave all but one core idle in the one-process default."""
    if os.environ.get("SHAPEFLOW_THREADS"):  # an explicit budget, e.g. when test processes share the cores
        return max(1, int(os.environ["SHAPEFLOW_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_processes))


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def ema_decay(decay: float, updates: int) -> float:
    """The decay of an EMA update that follows `updates` earlier ones: min(decay, (1 + n) / (10 + n)),
    the warm-up of timm's and diffusers' EMA. Without it the average of a short run would still hold
    the early weights with weight decay^steps; with it the average follows the model at first and
    the decay reaches its cap after about 10 / (1 - decay) updates."""
    return min(decay, (1 + updates) / (10 + updates))


def ema(model: torch.nn.Module, decay: float, device: torch.device | str | None = None) -> AveragedModel:
    """An exponential moving average of `model`'s parameters: a copy of the model (on `device`) in
    `.module`. `update_parameters(model)` after each optimizer step: the first copies the model, the
    next ones move the average by 1 - ema_decay(decay, updates so far). Its state (weights and count)
    is a state_dict, so `accelerator.register_for_checkpointing` saves and restores it."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        weight = 1.0 - ema_decay(decay, int(updates))
        for avg, value in zip(averaged, current, strict=True):
            avg.lerp_(value, weight)

    return AveragedModel(model, device, multi_avg_fn=update)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


class Checkpoints:
    """`save_state` checkpoints under `root/step_<n>/`, the newest `keep` kept.

    A checkpoint is written to a temporary folder and renamed when complete, with `trainer.json`
    (step, MLflow run id, ...) written last, so a kill at any moment leaves either the previous
    complete checkpoint or the new one, never a half-written one that a rerun would load.
    """

    PATTERN = re.compile(r"^step_(\d+)$")

    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[Checkpoint]:
        found = []
        for path in self.root.glob("step_*") if self.root.is_dir() else []:
            match = self.PATTERN.match(path.name)
            state_file = path / TRAINER_STATE
            if match and state_file.is_file():
                found.append(Checkpoint(path, int(match.group(1)), json.loads(state_file.read_text())))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, accelerator: Accelerator, step: int, state: Mapping[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every rank: each writes its own RNG state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **state}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old.path, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def fingerprint(p: LoopParams, not_in: tuple[str, ...], **parts: Any) -> str:
    """What a checkpoint must match to be resumed, hashed: the params section but for the settings
    that change what is logged, checked or scored, not the weights (the loop's own, LOOP_SETTINGS,
    and the stage's, `not_in`), and `parts`: the resolved model config (a preset's fields can change
    between versions), the seed, the data, the world size, ..."""
    section = {k: v for k, v in dataclasses.asdict(p).items() if k not in LOOP_SETTINGS + not_in}
    blob = json.dumps({"params": section, **parts}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted to load."""


# What accelerate's RNG-state file holds besides tensors and plain data: numpy arrays (numpy's own
# random state). Reconstructing an array or a dtype runs no code of the file's choosing.
SAFE_CHECKPOINT_GLOBALS = (
    np.ndarray((0,)).__reduce__()[0],  # numpy's array reconstructor, wherever this numpy keeps it
    np.ndarray,
    np.dtype,
    *(type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)),
)


def check_checkpoint_files(folder: Path) -> None:
    """Refuse a checkpoint folder whose pickled files hold more than tensors and plain data.

    accelerate's `load_state` unpickles the optimizer, the LR schedule and the EMA (and the RNG
    states) with `weights_only=False`, so a planted checkpoint folder would run its own code. Each of
    those files is first read with torch's restricted unpickler, which builds only tensors, plain
    containers and SAFE_CHECKPOINT_GLOBALS; what passes it holds nothing that runs on loading."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in (".pkl", ".bin", ".pt", ".pth"):
            continue
        try:
            with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: holds more than tensors and plain data ({first}); a checkpoint like this could "
                f"run code when loaded, so training does not resume from it. Remove {folder} to start over."
            ) from exc


def resume(accelerator: Accelerator, ckpts: Checkpoints, fingerprint: str, total_steps: int) -> tuple[int, str | None]:
    """(step, MLflow run id) to go on from: the newest complete checkpoint made with this
    fingerprint, loaded into the accelerator's objects; (0, None) when there is none. Checkpoints
    made with another fingerprint (other params, data or world size) are removed, with a warning."""
    latest = ckpts.latest()
    if latest is not None and latest.state.get("fingerprint") != fingerprint:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            log.warning("checkpoints in %s were made with other params or data: starting over", ckpts.root)
            ckpts.clear()
        accelerator.wait_for_everyone()
        return 0, None
    if latest is None:
        return 0, None
    check_checkpoint_files(latest.path)
    accelerator.load_state(str(latest.path))
    if accelerator.is_main_process:
        log.info("resuming from step %d of %d (%s)", latest.step, total_steps, latest.path)
    return latest.step, latest.state.get("mlflow_run_id")


def require_batches(loader, objects: int, batch_size: int, world: int, stage: str) -> None:
    """Raise a ParamsError naming the cause when the prepared loader gives a process no batch at all
    (too few objects for batch_size x processes), instead of failing later on an empty epoch."""
    if len(loader) == 0:
        raise config.ParamsError(
            f"{stage}: {objects} training object(s) give none of the {world} processes a batch of {batch_size}; "
            f"lower {stage}.batch_size or the number of processes, or train on more objects"
        )


def category_weights(categories: Sequence[str]) -> list[float]:
    """Per-item sampling weights that give every category the same share of the draws: 1 / the
    number of items of the item's category, so each category's weights sum to 1."""
    counts = Counter(categories)
    return [1.0 / counts[c] for c in categories]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit seed for one epoch's draw: a function of (seed, epoch) only, distinct across both."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")


class WeightedEpochSampler(Sampler[int]):
    """An epoch of len(weights) indices drawn with replacement, index i with probability
    weights[i] / sum(weights). The draw is a function of (seed, epoch): every process draws the same
    sequence, from which Accelerate's BatchSamplerShard hands each process its own batches, and a
    resumed run draws the epoch it stopped in again. `set_epoch` picks the epoch; the prepared
    loader's `set_epoch` reaches it (DataLoaderShard.set_epoch looks for the sampler of its batch
    sampler, and of the batch sampler that one wraps)."""

    def __init__(self, weights: Sequence[float], seed: int):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.ndim != 1 or not len(self.weights) or (self.weights < 0).any() or not self.weights.sum() > 0:
            raise ValueError("sampling weights must be a non-empty list of non-negative numbers, not all 0")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


def data_loader(
    dataset: Dataset, batch_size: int, weights: Sequence[float] | None, seed: int, workers: int = 0
) -> DataLoader:
    """The training DataLoader, before `accelerator.prepare`. Without weights, a shuffle of every item
    per epoch (prepare swaps its RandomSampler for Accelerate's SeedableRandomSampler, seeded by
    make_accelerator's data_seed); with weights, a WeightedEpochSampler seeded by `seed`. A last
    incomplete batch is dropped unless it is the only one."""
    if weights is not None and len(weights) != len(dataset):
        raise ValueError(f"{len(weights)} sampling weights for {len(dataset)} items")
    order = {"shuffle": True} if weights is None else {"sampler": WeightedEpochSampler(weights, seed)}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=len(dataset) >= batch_size,
        num_workers=workers,
        # Workers are started for each epoch, so they get the dataset with that epoch set.
        persistent_workers=False,
        # Its own generator: starting an iterator (as a resumed run does mid-epoch) must not draw
        # from the global random state, which the model's noise comes from.
        generator=torch.Generator().manual_seed(seed),
        **order,
    )


def epoch_batches(accelerator: Accelerator, loader, step: int, grad_accum: int):
    """The loader's batches for the epoch that optimizer step `step` falls in, past the ones a
    resumed run has already seen, with the sampler's epoch set so every rank shuffles alike."""
    micro = step * grad_accum
    epoch = micro // len(loader)
    loader.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):  # Accelerate passes the epoch on only where the sampler has none
        loader.dataset.set_epoch(epoch)
    return accelerator.skip_first_batches(loader, micro % len(loader)) if micro % len(loader) else loader


def rank_checksums(accelerator: Accelerator, model: torch.nn.Module) -> list[str]:
    """A sha256 of every rank's weights, gathered to all ranks; raises when they differ (DDP fell out of sync)."""
    state = accelerator.unwrap_model(model).state_dict()
    blob = b"".join(t.detach().float().cpu().numpy().tobytes() for t in state.values())
    digest = torch.tensor(list(hashlib.sha256(blob).digest()), dtype=torch.uint8, device=accelerator.device)
    gathered = accelerator.gather(digest[None]).cpu().numpy()  # (world, 32)
    checksums = [bytes(row).hex()[:16] for row in gathered]
    if len(set(checksums)) != 1:
        raise RuntimeError(f"the ranks' weights differ after training (checksums {checksums}): DDP fell out of sync")
    return checksums


def fmt_cell(value: Any) -> Any:
    """A CSV cell: floats with 6 significant digits, anything else as it is."""
    return f"{value:.6g}" if isinstance(value, float) else value


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

    def append(self, row: Mapping[str, Any]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.columns).writerow({k: fmt_cell(row[k]) for k in self.columns})


# -- the loop ---------------------------------------------------------------------------------------


class Outputs(Protocol):
    """Where `fit` writes: checkpoints, with loss.csv and val.csv beside them, while it trains; at
    the end the metrics JSON, the curves in `plots`, and `out` (the stage's saved model) to MLflow."""

    @property
    def out(self) -> Path: ...
    @property
    def checkpoints(self) -> Path: ...
    @property
    def metrics(self) -> Path: ...
    @property
    def plots(self) -> Path: ...


def add_output_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """A training stage's command options for its `Outputs` besides `out`: --checkpoints, --metrics
    and --plots, by default checkpoints/<stage>, reports/<stage>/metrics.json and reports/<stage>."""
    reports = Path("reports") / stage
    add = parser.add_argument
    add(
        "--checkpoints", type=Path, default=Path("checkpoints") / stage, help="checkpoint folder (default: %(default)s)"
    )
    add("--metrics", type=Path, default=reports / "metrics.json", help="final metrics JSON (default: %(default)s)")
    add("--plots", type=Path, default=reports, help="folder for loss.csv and val.csv (default: %(default)s)")


@dataclass(frozen=True)
class Validation:
    """A stage's validation: on rank 0 (the others wait), every `val_every` steps and after the last.
    With no `scores` (nothing to validate on) val.csv is still written, with its header only, so the
    stage's plots output exists."""

    # (model, after the last step?) -> scores; None when there is nothing to validate on
    scores: Callable[[torch.nn.Module, bool], dict[str, float]] | None
    columns: tuple[str, ...]  # the scores' names, val.csv's columns after 'step'
    prefix: str = ""  # a score's name in MLflow and the metrics JSON is prefix + its column


@dataclass(frozen=True)
class Job:
    """What a stage trains and how; `fit` does the rest."""

    stage: str  # names the MLflow experiment (shapeflow-<stage>), the run and the errors
    describe: str  # what is trained on what, for the opening log line: 'tiny VAE on 40 objects'
    model: torch.nn.Module
    dataset: Dataset  # shuffled into batches of batch_size per process (or drawn by `weights`)
    training_losses: Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]  # (model, batch) -> terms
    terms: tuple[str, ...]  # the terms averaged into loss.csv and MLflow; "loss" is minimised
    fingerprint: str  # what a checkpoint must match to be resumed
    tags: Mapping[str, str]  # MLflow tags
    params: Mapping[str, Any]  # MLflow params besides the seed and the stage's params section
    info: Mapping[str, Any]  # metrics JSON entries after steps and world_size
    # After training, on rank 0: (model, step, MLflow run id) -> metrics to add. Writes the stage's outputs.
    save: Callable[[torch.nn.Module, int, str | None], Mapping[str, Any]]
    validation: Validation
    ema: AveragedModel | None = None  # updated after every optimizer step and checkpointed
    per_sample: Mapping[str, int] = field(default_factory=dict)  # more throughput columns: name -> units per sample
    loader_workers: int = 0  # DataLoader worker processes per training process
    # Each dataset item's category. With the stage's `balance: category` every epoch draws len(dataset)
    # items with replacement, each category equally often (category_weights, WeightedEpochSampler);
    # otherwise an epoch is a shuffle of every item.
    categories: Sequence[str] = ()
    # On rank 0 after save: (MLflow run id, the final metrics) -> log and register the saved model
    # (shapeflow.registry); None logs the output folder as plain artifacts.
    register: Callable[[str, Mapping[str, Any]], None] | None = None
    samples: Path | None = None  # the sample-stage output trained on: logged as the run's dataset input


def _logged_or_warned(what: str, log_it: Callable[[], None]) -> None:
    """MLflow logging that must not cost a finished training its outputs (they are on disk already):
    a failure is logged as an error, not raised."""
    try:
        log_it()
    except Exception as exc:  # noqa: BLE001 - a tracking server that refuses, a registry it lacks
        log.error("MLflow: logging %s failed: %s: %s", what, type(exc).__name__, exc)


def fit(accelerator: Accelerator, p: LoopParams, seed: int, paths: Outputs, job: Job) -> dict[str, Any]:
    """Train `job.model` for p.steps optimizer steps: AdamW with warm-up and cosine decay, gradient
    accumulation and clipping, going on from the newest checkpoint made with `job.fingerprint`.
    Logs every `log_every` steps, validates every `val_every`, checkpoints every `checkpoint_every`;
    at the end saves (`job.save`), writes the metrics JSON and the curves, and ends the MLflow run
    (one per training, written by rank 0, resumed with the checkpoint). -> the metrics (every rank)."""
    # A second training into the same checkpoints would resume from this one's and interleave with it.
    guard = mf.writing_lock(paths.checkpoints) if accelerator.is_main_process else contextlib.nullcontext()
    with guard:
        return _fit(accelerator, p, seed, paths, job)


def _fit(accelerator: Accelerator, p: LoopParams, seed: int, paths: Outputs, job: Job) -> dict[str, Any]:
    optimizer = torch.optim.AdamW(job.model.parameters(), lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(p.warmup_steps, p.steps, p.min_lr_ratio))
    weights = category_weights(job.categories) if p.balance == "category" else None
    loader = data_loader(job.dataset, p.batch_size, weights, seed, job.loader_workers)
    model, optimizer, loader = accelerator.prepare(job.model, optimizer, loader)
    require_batches(loader, len(job.dataset), p.batch_size, accelerator.num_processes, job.stage)
    for state in (scheduler, job.ema):
        if state is not None:
            accelerator.register_for_checkpointing(state)
    ckpts = Checkpoints(paths.checkpoints, p.keep_checkpoints)
    step, run_id = resume(accelerator, ckpts, job.fingerprint, p.steps)

    tracker = Tracker(accelerator.is_main_process)
    world = accelerator.num_processes
    facts = {"world_size": str(world), "precision": accelerator.mixed_precision, "device": accelerator.device.type}
    params = {"seed": seed, job.stage: dataclasses.asdict(p), **job.params}
    run_id = tracker.start(f"shapeflow-{job.stage}", run_name(job.stage), run_id, {**job.tags, **facts}, params)
    if run_id is not None and job.samples is not None and step == 0:
        _logged_or_warned("the dataset input", lambda: registry.log_dataset(run_id, job.samples))
    progress = _Progress(accelerator, tracker, job, p, step, paths.checkpoints)
    grad_norm = torch.zeros(())
    with tracker.ends_on_error():
        while step < p.steps:
            for batch in epoch_batches(accelerator, loader, step, p.grad_accum):
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        losses = job.training_losses(model, batch)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                progress.add(losses)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                if job.ema is not None:
                    job.ema.update_parameters(accelerator.unwrap_model(model))
                step += 1
                if step % p.log_every == 0 or step == p.steps:
                    progress.log_losses(step, scheduler.get_last_lr()[0], float(grad_norm))
                if job.validation.scores and ((p.val_every and step % p.val_every == 0) or step == p.steps):
                    progress.validate(accelerator.unwrap_model(model), step)
                if step % p.checkpoint_every == 0 and step < p.steps:
                    ckpts.save(accelerator, step, {"fingerprint": job.fingerprint, "mlflow_run_id": run_id})
                    progress.restart_clock()
                if step >= p.steps:
                    break

    checksums = rank_checksums(accelerator, model)
    metrics = {"steps": step, "world_size": world, **job.info, "rank_checksums": checksums, **progress.last_val}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics |= job.save(accelerator.unwrap_model(model), step, run_id)
        _write_reports(metrics, paths)
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
        if job.register is not None and run_id is not None:
            _logged_or_warned("the model", lambda: job.register(run_id, metrics))
        else:
            tracker.log_artifacts(paths.out, "model")
        tracker.end("FINISHED")
        ckpts.clear()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


class _Progress:
    """What `fit` reports as it goes. The loss terms, averaged over the micro-batches of every rank
    since the last report, with the LR, gradient norm and throughput: a row of loss.csv, MLflow
    metrics and a log line. Each validation: a row of val.csv, MLflow metrics and a log line. Rank 0
    writes the CSVs, beside the checkpoints, so that they resume with them."""

    def __init__(self, accelerator: Accelerator, tracker: Tracker, job: Job, p: LoopParams, step: int, folder: Path):
        self.accelerator, self.tracker, self.job, self.p = accelerator, tracker, job, p
        self.sums = torch.zeros(len(job.terms), device=accelerator.device)
        self.micro_batches = 0
        self.restart_clock()
        self.last_val: dict[str, float] = {}
        self.loss_log = self.val_log = None
        if accelerator.is_main_process:
            columns = ("step", *job.terms, "lr", "grad_norm", "samples_per_s", *job.per_sample)
            self.loss_log = CsvLog(folder / CURVES[0], columns, step)
            self.val_log = CsvLog(folder / CURVES[1], ("step", *job.validation.columns), step)
            balanced = f", {len(set(job.categories))} categories balanced" if p.balance == "category" else ""
            log.info(
                "training %s%s (%.2fM parameters), %d process(es), %s (%d threads), precision %s, steps %d",
                job.describe,
                balanced,
                sum(t.numel() for t in job.model.parameters()) / 1e6,
                accelerator.num_processes,
                accelerator.device,
                torch.get_num_threads(),
                accelerator.mixed_precision,
                p.steps,
            )

    def restart_clock(self) -> None:
        """Throughput counts from now: after a report, a validation or a checkpoint."""
        self.tic = time.perf_counter()

    def add(self, losses: Mapping[str, torch.Tensor]) -> None:
        self.sums += torch.stack([losses[t].detach().float() for t in self.job.terms])
        self.micro_batches += 1

    def log_losses(self, step: int, lr: float, grad_norm: float) -> None:
        p = self.p
        means = (self.accelerator.reduce(self.sums, "mean") / self.micro_batches).tolist()
        samples = p.batch_size * self.accelerator.num_processes * self.micro_batches
        samples_per_s = samples / (time.perf_counter() - self.tic)
        row = {"step": step, **dict(zip(self.job.terms, means, strict=True)), "lr": lr, "grad_norm": grad_norm}
        row |= {"samples_per_s": samples_per_s, **{k: n * samples_per_s for k, n in self.job.per_sample.items()}}
        if self.loss_log is not None:
            self.loss_log.append(row)
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
            terms = " ".join(f"{t} {row[t]:.4g}" for t in self.job.terms)
            log.info("step %d/%d %s lr %.2e %.1f samples/s", step, p.steps, terms, lr, samples_per_s)
        self.sums.zero_()
        self.micro_batches = 0
        self.restart_clock()

    def validate(self, model: torch.nn.Module, step: int) -> None:
        validation = self.job.validation
        self.accelerator.wait_for_everyone()
        if self.val_log is not None:
            scores = validation.scores(model, step == self.p.steps)
            self.last_val = {f"{validation.prefix}{k}": v for k, v in scores.items()}
            self.val_log.append({"step": step, **scores})
            self.tracker.log_metrics(self.last_val, step)
            log.info("step %d val: %s", step, " ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        self.accelerator.wait_for_everyone()
        self.restart_clock()


def _write_reports(metrics: Mapping[str, Any], paths: Outputs) -> None:
    """The final metrics JSON (DVC metrics), and the CSV curves kept beside the checkpoints copied to
    the plots folder (DVC plots); each written atomically."""
    mf.atomic_write_text(paths.metrics, json.dumps(dict(metrics), indent=2) + "\n")
    paths.plots.mkdir(parents=True, exist_ok=True)
    for name in CURVES:
        src = paths.checkpoints / name
        if src.is_file():
            mf.atomic_write_text(paths.plots / name, src.read_text())
