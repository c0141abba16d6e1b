"""MLflow tracking and provenance: one run per stage, tagged with what made its inputs.

The tracking URI is $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from shapeflow import manifest as mf
from shapeflow.interrupts import uninterrupted

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def run_name(stage: str) -> str:
    """The MLflow run name of a stage: the DVC experiment's name when `dvc exp run` started it, so
    the train_vae, train_dit and evaluate runs of one experiment share a name (and the compare view
    lines them up by it); otherwise the stage and the start time."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return experiment if experiment else f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


# Set by the Prefect flows for the stages they start (flows/pipeline.py): the flow run behind a stage.
PREFECT_ENV = {
    "prefect_flow_run_id": "SHAPEFLOW_PREFECT_FLOW_RUN_ID",
    "prefect_flow_run_url": "SHAPEFLOW_PREFECT_FLOW_RUN_URL",
}


def prefect_env(flow_run_id: str, flow_run_url: str | None) -> dict[str, str]:
    """The environment a Prefect flow gives the stages it starts, for `pipeline_tags` to read."""
    values = {"prefect_flow_run_id": flow_run_id, "prefect_flow_run_url": flow_run_url}
    return {PREFECT_ENV[tag]: value for tag, value in values.items() if value}


def pipeline_tags() -> dict[str, str]:
    """Tags every stage's run carries: the DVC experiment it ran in, and the Prefect flow run that
    started it, when there are."""
    experiment = os.environ.get("DVC_EXP_NAME")
    tags = {"dvc_exp": experiment} if experiment else {}
    return tags | {tag: os.environ[var] for tag, var in PREFECT_ENV.items() if os.environ.get(var)}


def tag_runs(run_ids: Mapping[str, str], tags: Mapping[str, str]) -> list[str]:
    """Set `tags` on the MLflow runs `run_ids` (by stage); the stages whose run was not found (a
    tracking store that is elsewhere now, a run deleted) are returned, not raised."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    missed = []
    for stage, run_id in run_ids.items():
        try:
            with uninterrupted():
                for key, value in tags.items():
                    client.set_tag(run_id, key, value)
        except MlflowException:
            missed.append(stage)
    return missed


def provenance_tags(stage: str, **dvc_inputs: str | Path) -> dict[str, str]:
    """The tags that say what made a stage's run: `pipeline_tags`, the stage, the git commit, and
    per input `name=path` the md5 dvc.lock records for it as `dvc_<name>_hash` ('untracked' when
    dvc.lock has none)."""
    tags = pipeline_tags() | {"stage": stage, "git_commit": git_commit()}
    return tags | {f"dvc_{name}_hash": dvc_hash(path) or "untracked" for name, path in dvc_inputs.items()}


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    try:
        git = {"cwd": cwd, "capture_output": True, "text": True, "check": True}
        head = subprocess.run(["git", "rev-parse", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git)
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
    """One MLflow run, written by one process (the others hold an inactive tracker).

    A training keeps the run id in its checkpoints, so a resumed training goes on logging into its
    own run.
    """

    def __init__(self, active: bool):
        self.active = active
        self.run_id: str | None = None
        self._client = None

    def start(
        self, experiment: str, run_name: str, run_id: str | None, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str | None:
        """A new run in `experiment` with these tags and (flattened) params, or, given `run_id`,
        that run again with the tags updated. -> the run id (None when inactive)."""
        if not self.active:
            return None
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
        self._client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = run_id
            with uninterrupted():
                self._client.update_run(run_id, status="RUNNING")
                self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            return run_id
        with uninterrupted():
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
        items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
        with uninterrupted():
            self._client.log_batch(self.run_id, metrics=items)

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows of one table (the same columns) as an MLflow table artifact (JSON, shown in the UI)."""
        if not self.active or not rows:
            return
        columns = list(rows[0])
        data = {c: [mf.finite_or_none(row.get(c)) for row in rows] for c in columns}
        with uninterrupted():
            self._client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        if self.active:
            with uninterrupted():
                self._client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            with uninterrupted():
                self._client.set_terminated(self.run_id, status=status)

    @contextlib.contextmanager
    def ends_on_error(self):
        """Around a stage's work: an interrupt ends the run as KILLED, an error as FAILED (re-raised)."""
        try:
            yield
        except KeyboardInterrupt:
            self.end("KILLED")
            raise
        except Exception:
            self.end("FAILED")
            raise


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . space : / only: 'f@0.02' -> 'f_0.02'."""
    return re.sub(r"[^\w\-. :/]", "_", name)
