"""Pieces every training stage shares: Accelerate setup, LR schedule, checkpoints, MLflow, provenance.

Stages build their loop from these; nothing here knows about a particular model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRAINER_STATE = "trainer.json"  # written last into a checkpoint: its presence marks it complete


def pick_precision(requested: str) -> str:
    """'auto' -> bf16 on a CUDA device that supports it, else full precision."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(precision: str, grad_accum: int, seed: int) -> Accelerator:
    """One process per device as `accelerate launch` / torchrun started it; CPU (gloo) without CUDA."""
    accelerator = Accelerator(
        mixed_precision=pick_precision(precision),
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
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


class EMA:
    """Exponential moving average of a model's floating-point weights, kept in float32.

    `update` after each optimizer step; `copy_to` writes the averages into a model of the same
    architecture. It has `state_dict`/`load_state_dict`, so `accelerator.register_for_checkpointing`
    saves and restores it with the rest of the training state.

    The decay of update n (from 0) is min(decay, (1 + n) / (10 + n)), the warm-up of timm's and
    diffusers' EMA: without it the average of a short run still holds the initial weights with
    weight decay^steps (0.999^2000 = 0.14, zero-initialised output layers included), and the EMA
    samples are worse than the raw ones. With it the early average follows the model and the
    decay reaches its cap after about 10 / (1 - decay) updates.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        """The decay the next update applies."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        for name, value in self.shadow.items():
            state[name].copy_(value.to(state[name].dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state from another architecture: the weight names differ")
        self.decay = float(state["decay"])
        # A checkpoint from before the warm-up has no count: it resumes at the full decay.
        self.updates = int(state.get("updates", 10**9))
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}


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
    accelerator.load_state(str(latest.path))
    if accelerator.is_main_process:
        log.info("resuming from step %d of %d (%s)", latest.step, total_steps, latest.path)
    return latest.step, latest.state.get("mlflow_run_id")


def require_batches(loader, objects: int, batch_size: int, world: int, stage: str) -> None:
    """Raise a ParamsError naming the cause when the prepared loader gives a process no batch at all
    (too few objects for batch_size x processes), instead of failing later on an empty epoch."""
    if len(loader) == 0:
        from shapeflow.config import ParamsError

        raise ParamsError(
            f"{stage}: {objects} training object(s) give none of the {world} processes a batch of {batch_size}; "
            f"lower {stage}.batch_size or the number of processes, or train on more objects"
        )


def epoch_batches(accelerator: Accelerator, loader, step: int, grad_accum: int):
    """The loader's batches for the epoch that optimizer step `step` falls in, past the ones a
    resumed run has already seen, with the sampler's epoch set so every rank shuffles alike."""
    micro = step * grad_accum
    loader.set_epoch(micro // len(loader))
    return accelerator.skip_first_batches(loader, micro % len(loader)) if micro % len(loader) else loader


def rank_checksums(accelerator: Accelerator, model: torch.nn.Module) -> list[str]:
    """A sha256 of every rank's weights, gathered to all ranks; raises when they differ (DDP fell out of sync)."""
    import hashlib

    blob = b"".join(t.detach().float().cpu().numpy().tobytes() for t in accelerator.unwrap_model(model).state_dict().values())
    digest = torch.tensor(list(hashlib.sha256(blob).digest()), dtype=torch.uint8, device=accelerator.device)
    gathered = accelerator.gather(digest[None]).cpu().numpy()  # (world, 32)
    checksums = [bytes(row).hex()[:16] for row in gathered]
    if len(set(checksums)) != 1:
        raise RuntimeError(f"the ranks' weights differ after training (checksums {checksums}): DDP fell out of sync")
    return checksums


def write_reports(metrics: Mapping[str, Any], metrics_path: Path, plots: Path, checkpoints: Path, curves: tuple[str, ...]) -> None:
    """The final metrics JSON (DVC metrics), and the CSV curves kept beside the checkpoints copied to
    the plots folder (DVC plots); each written atomically."""
    from shapeflow.manifest import atomic_write_text

    atomic_write_text(metrics_path, json.dumps(dict(metrics), indent=2) + "\n")
    plots.mkdir(parents=True, exist_ok=True)
    for name in curves:
        src = checkpoints / name
        if src.is_file():
            atomic_write_text(plots / name, src.read_text())


def run_name(stage: str) -> str:
    """The MLflow run name of a stage: the DVC experiment's name when `dvc exp run` started it, so
    the train_vae, train_dit and evaluate runs of one experiment share a name (and the compare view
    lines them up by it); otherwise the stage and the start time."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return experiment if experiment else f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def pipeline_tags() -> dict[str, str]:
    """Tags every stage's run carries: the DVC experiment it ran in, when it ran in one."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return {"dvc_exp": experiment} if experiment else {}


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_hash(data_dir: str | Path, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 that dvc.lock records for the stage output at `data_dir`, or None when not tracked."""
    lock_path = Path(lock_file)
    if not lock_path.is_file():
        return None
    try:
        rel = Path(os.path.relpath(Path(data_dir).resolve(), lock_path.parent.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return None
    lock = yaml.safe_load(lock_path.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == rel:
                return out.get("md5")
    return None


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


class Tracker:
    """One MLflow run per training, written by rank 0 only (other ranks hold an inactive tracker).

    The run id is kept in the checkpoints, so a resumed training goes on logging into its own run.
    The tracking URI is $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    """

    def __init__(self, active: bool):
        self.active = active
        self.run_id: str | None = None
        self._client = None

    def start(self, experiment: str, run_name: str, run_id: str | None, tags: Mapping[str, str], params: Mapping[str, Any]) -> str | None:
        if not self.active:
            return None
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
        self._client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
            self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            return run_id
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        run = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(_metric_name(k), float(v), now, step) for k, v in metrics.items()])

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        if self.active:
            self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)

    @contextlib.contextmanager
    def ends_on_error(self):
        """Around a training loop: an interrupt ends the run as KILLED, an error as FAILED (re-raised)."""
        try:
            yield
        except KeyboardInterrupt:
            self.end("KILLED")
            raise
        except Exception:
            self.end("FAILED")
            raise


def _metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . space : / only: 'f@0.02' -> 'f_0.02'."""
    return re.sub(r"[^\w\-. :/]", "_", name)
