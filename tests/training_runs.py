"""The training stages run as users run them: a process (or two ranks) with its own MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
PYTHON = (sys.executable,)
TWO_CPU_RANKS = (
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(ROOT / "configs" / "accelerate" / "multi_cpu.yaml"),
)


def stage_cli(params: Path, command: str, *args: str | Path, work: Path) -> list[str]:
    """`-m shapeflow.cli --params PARAMS COMMAND ARGS...` with the stage's checkpoints in work/ck and its
    reports (metrics.json, loss.csv, val.csv) in work/reports."""
    outputs = [
        "--checkpoints",
        work / "ck",
        "--metrics",
        work / "reports" / "metrics.json",
        "--plots",
        work / "reports",
    ]
    return ["-m", "shapeflow.cli", "--params", str(params), command, *map(str, args), *map(str, outputs)]


def env_for(work: Path) -> dict[str, str]:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", OMP_NUM_THREADS="1")


def run_cli(args: Sequence[str], work: Path, launcher: Sequence[str] = PYTHON) -> subprocess.CompletedProcess:
    """`python -m shapeflow.cli ...` (args from '-m' on) in `work`, its MLflow store work/mlflow.db."""
    return subprocess.run([*launcher, *args], cwd=work, env=env_for(work), capture_output=True, text=True, timeout=600)


def tracked_runs(work: Path, experiment: str):
    """(client, the runs of `experiment`) in work/mlflow.db."""
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []
