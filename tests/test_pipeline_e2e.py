"""End to end: the real `dvc repro` of this repo's dvc.yaml (accelerate launch included) on tiny presets, in a scratch git repo."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "seed": 0,
    "fetch": {"builtin": {"per_category": 1, "defect_share": 0.5}},
    "watertight": {"resolution": 32},
    "sample": {"surface": 512, "sharp": 128, "volume": 512, "near": 256, "sharp_near": 128},
    "compute": {"workers": 2},
    "train_vae": {
        "model": {"num_latents": 16, "width": 64},
        "data": {"input_points": 256, "sharp_points": 64, "volume_points": 128, "near_points": 128, "sharp_near_points": 64},
        "steps": 4, "batch_size": 2, "log_every": 2, "checkpoint_every": 2, "val_resolution": 32,
        "accelerate_config": "configs/accelerate/default.yaml",
    },
    "train_dit": {
        "model": {"width": 64, "depth": 2}, "steps": 4, "batch_size": 2, "log_every": 2, "checkpoint_every": 2,
        "val_every": 0, "final_samples": 2, "generate": {"steps": 2, "resolution": 32},
        "accelerate_config": "configs/accelerate/default.yaml",
    },
}
STAGES = ("fetch", "watertight", "sample", "train_vae", "train_dit")


def dvc(repo: Path, *args: str) -> str:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "configs", repo / "configs")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    return repo


@pytest.mark.slow
def test_repro_builds_all_data_stages_then_does_nothing_then_only_what_changed(repo):
    first = dvc(repo, "repro")
    assert ran(first) == set(STAGES)
    for stage in ("raw", "watertight", "samples"):
        with open(repo / "data" / stage / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), (stage, rows)
    npz = next((repo / "data" / "samples" / "objects").glob("*.npz"))
    with np.load(npz, allow_pickle=False) as arrays:
        assert arrays["surface_points"].shape == (512, 3)
    assert (repo / "models" / "vae" / "model.safetensors").is_file()
    metrics = yaml.safe_load((repo / "reports" / "train_vae" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["world_size"] == 1
    assert (repo / "models" / "dit" / "ema" / "model.safetensors").is_file()
    dit_metrics = yaml.safe_load((repo / "reports" / "train_dit" / "metrics.json").read_text())
    assert dit_metrics["steps"] == 4 and dit_metrics["gen_samples"] == 2

    assert ran(dvc(repo, "repro")) == set()
    assert "up to date" in dvc(repo, "status")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["watertight"]["resolution"] = 40
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = dvc(repo, "repro")
    assert ran(third) == {"watertight", "sample", "train_vae", "train_dit"}, third[-3000:]
