"""End to end: the real `dvc repro` of this repo's dvc.yaml (accelerate launch included) on tiny presets, in a scratch git repo."""

from __future__ import annotations

import csv
import json
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
    # The 8 objects may leave the test split empty: score the train split.
    "evaluate": {"split": "train", "resolution": 32, "recon_points": 500, "gen_points": 128, "previews": 2},
}
STAGES = ("fetch", "watertight", "sample", "train_vae", "train_dit", "evaluate")


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
    evaluated = json.loads((repo / "eval" / "metrics.json").read_text())
    with open(repo / "data" / "samples" / "manifest.csv", newline="") as fh:
        train = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    # Every train object reconstructed; one sample per train object (as many per category as it has).
    assert evaluated["recon"]["objects"] == len(train) and evaluated["generation"]["samples"] == len(train)

    assert ran(dvc(repo, "repro")) == set()
    assert "up to date" in dvc(repo, "status")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["watertight"]["resolution"] = 40
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = dvc(repo, "repro")
    assert ran(third) == {"watertight", "sample", "train_vae", "train_dit", "evaluate"}, third[-3000:]


@pytest.mark.slow
def test_two_experiments_line_up_in_dvc_exp_show_metrics_diff_and_mlflow(repo):
    git = ["git", "-c", "user.name=shapeflow-test", "-c", "user.email=test@localhost"]
    if not (repo / "dvc.lock").is_file():
        dvc(repo, "repro")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True)
    for name, points in (("coarse", 300), ("fine", 600)):
        out = dvc(repo, "exp", "run", "-n", name, "-S", f"evaluate.recon_points={points}")
        assert ran(out) == {"evaluate"}, out[-3000:]

    shown = _json_of(dvc(repo, "exp", "show", "--json"))
    exps = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            newest = experiment["revs"][0]
            exps[newest["name"]] = newest
    assert {"coarse", "fine"} <= set(exps)
    for name, points in (("coarse", 300), ("fine", 600)):
        data = exps[name]["data"]
        assert data["params"]["params.yaml"]["data"]["evaluate"]["recon_points"] == points
        assert "cd" in data["metrics"]["eval/metrics.json"]["data"]["recon"]
    diff = _json_of(dvc(repo, "metrics", "diff", exps["coarse"]["rev"], exps["fine"]["rev"], "--json"))
    assert "recon.floor.cd" in diff["eval/metrics.json"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("shapeflow-evaluate")
    named = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"coarse", "fine"} <= set(named)
    assert named["coarse"].data.tags["dvc_exp"] == "coarse"
    assert named["coarse"].data.params["evaluate.recon_points"] == "300" and named["fine"].data.params["evaluate.recon_points"] == "600"
    # The same param keys and metric names, so MLflow's compare view lines the two runs up.
    assert set(named["coarse"].data.params) == set(named["fine"].data.params)
    assert set(named["coarse"].data.metrics) == set(named["fine"].data.metrics)


def _json_of(output: str):
    """The JSON document in a command's output (dvc may print notices around it)."""
    start = min(i for i in (output.find("{"), output.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(output[start:])[0]
