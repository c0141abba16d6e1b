"""The train_vae stage run as users run it: a real process (or two), real checkpoints, real MLflow."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VAE, kill_at_first_checkpoint, subset
from training_runs import PYTHON, TWO_CPU_RANKS, env_for, run_cli, stage_cli, tracked_runs

from shapeflow import manifest as mf

SMALL = TINY_VAE | {
    "batch_size": 2,
    "log_every": 2,
    "val_objects": 2,
    "val_resolution": 32,
}


def write_params(folder: Path, **train_vae) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": 0, "train_vae": SMALL | train_vae}))
    return path


def stage_args(work: Path, samples: Path, params: Path, *extra: str) -> list[str]:
    return stage_cli(
        params, "train-vae", samples, work / "vae", "--meshes", samples.parent / "watertight", *extra, work=work
    )


def train(work: Path, samples: Path, params: Path, *extra: str, launcher: tuple[str, ...] = PYTHON):
    return run_cli(stage_args(work, samples, params, *extra), work, launcher)


def runs(work: Path):
    return tracked_runs(work, "shapeflow-train_vae")


@pytest.mark.slow
def test_stage_writes_weights_metrics_curves_and_one_tracked_run(two_samples, tmp_path):
    params = write_params(tmp_path, steps=6, checkpoint_every=3, lr=7e-4, val_objects=1, val_every=3)
    proc = train(tmp_path, two_samples, params, "--val-split", "train")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "vae").iterdir()} == {"model.safetensors", "config.json"}
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["config"]["num_latents"] == 16 and config["meta"]["steps"] == 6
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert (
        metrics["steps"] == 6 and metrics["world_size"] == 1 and metrics["val_objects"] == 2
    )  # the last validation: all
    with open(tmp_path / "reports" / "val.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [3, 6]
    assert 0.0 <= metrics["val_f@0.02"] <= 1.0
    with open(tmp_path / "reports" / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert {"loss", "volume", "near", "sharp", "kl", "lr", "grad_norm", "samples_per_s"} <= set(rows[0])
    assert not (tmp_path / "ck").exists()  # checkpoints go once the weights are out

    client, found = runs(tmp_path)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "train_vae" and run.data.tags["world_size"] == "1"
    assert {"git_commit", "dvc_data_hash", "data_manifest_sha256"} <= set(run.data.tags)
    assert run.data.params["train_vae.lr"] == "0.0007" and run.data.params["model_config.num_latents"] == "16"
    assert {"loss", "volume", "near", "sharp", "kl", "lr", "grad_norm", "samples_per_s", "val_cd", "val_f_0.02"} <= set(
        run.data.metrics
    )
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    # The VAE is an MLflow model, registered as a version of shapeflow-vae linked to this run.
    (version,) = client.search_model_versions("name='shapeflow-vae'")
    assert version.run_id == run.info.run_id and {"val_cd", "val_f_0.02"} <= set(version.tags)


def first_two(samples: Path, folder: Path) -> Path:
    """A copy of the first two objects (by key) of `samples` in folder/samples, its watertight beside it."""
    keys = sorted(p.stem for p in (samples / "objects").glob("*.npz"))[:2]
    two = subset(samples, folder / "samples", lambda row: row["key"] in keys)
    (folder / "watertight").symlink_to(samples.parent / "watertight")
    return two


@pytest.fixture(scope="module")
def two_samples(builtin_samples, tmp_path_factory) -> Path:
    """Two of the built-in objects: for the tests of the stage's outputs, resuming and ranks, whose
    last validation (the whole split) needs no more."""
    return first_two(builtin_samples, tmp_path_factory.mktemp("two"))


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(two_samples, tmp_path):
    builtin_samples = two_samples
    params = write_params(tmp_path, steps=40, checkpoint_every=4, val_every=0, val_objects=1)
    cmd = [sys.executable, *stage_args(tmp_path, builtin_samples, params, "--val-split", "train")]
    saved = kill_at_first_checkpoint(cmd, tmp_path, env_for(tmp_path), tmp_path / "ck")
    assert not (tmp_path / "vae").exists()
    assert 4 <= saved < 40

    rerun = train(tmp_path, builtin_samples, params, "--val-split", "train")
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stderr.splitlines() if "resuming from step" in line]
    assert resumed and int(resumed[0].split("resuming from step ")[1].split()[0]) >= saved
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["steps"] == 40
    with open(tmp_path / "reports" / "loss.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == list(range(2, 41, 2))  # no step logged twice, none missing
    _, found = runs(tmp_path)
    assert len(found) == 1 and found[0].info.status == "FINISHED"  # the resumed run is the same run


@pytest.mark.slow
def test_a_training_stopped_by_sigterm_ends_its_mlflow_run_as_killed(two_samples, tmp_path):
    params = write_params(tmp_path, steps=400, checkpoint_every=2, val_every=0, val_objects=1)
    cmd = [sys.executable, *stage_args(tmp_path, two_samples, params, "--val-split", "train")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "ck").glob("step_*/trainer.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.1)
    _, found = runs(tmp_path)  # still training: the run says so, and names the data it reads
    assert [r.info.status for r in found] == ["RUNNING"] and len(found[0].inputs.dataset_inputs) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "train-vae: interrupted" in err, err[-4000:]
    _, found = runs(tmp_path)
    assert [r.info.status for r in found] == ["KILLED"]


@pytest.mark.slow
def test_changed_params_do_not_resume_an_incompatible_checkpoint(two_samples, tmp_path):
    builtin_samples = two_samples
    params = write_params(tmp_path, steps=4, checkpoint_every=2, val_every=0, val_objects=1)
    first = train(tmp_path, builtin_samples, params, "--val-split", "train")
    assert first.returncode == 0, first.stderr
    # Leave a checkpoint behind as a killed run would, then change a param.
    (tmp_path / "ck" / "step_00000002").mkdir(parents=True)
    (tmp_path / "ck" / "step_00000002" / "trainer.json").write_text(json.dumps({"step": 2, "fingerprint": "other"}))
    params = write_params(tmp_path, steps=4, checkpoint_every=2, val_every=0, val_objects=1, lr=1e-3)
    second = train(tmp_path, builtin_samples, params, "--val-split", "train")
    assert second.returncode == 0, second.stderr
    assert "other params or data: starting over" in second.stderr and "resuming" not in second.stderr


@pytest.mark.slow
def test_two_ranks_on_cpu_end_with_identical_weights_and_one_run(two_samples, tmp_path):
    # One object a rank and step, and the last validation scores just those two (validating is
    # most of the time such a test takes).
    params = write_params(tmp_path, steps=4, checkpoint_every=2, val_objects=1, batch_size=1)
    proc = train(tmp_path, two_samples, params, "--val-split", "train", launcher=TWO_CPU_RANKS)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    checksums = metrics["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    _, found = runs(tmp_path)
    assert len(found) == 1 and found[0].data.tags["world_size"] == "2"


def test_missing_samples_and_bad_model_params_fail_with_a_clear_message(builtin_samples, tmp_path):
    params = write_params(tmp_path, steps=2)
    missing = train(tmp_path, tmp_path / "nowhere", params)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "manifest.csv" in missing.stderr
    params = write_params(tmp_path, steps=2, model={"widht": 64})
    bad = train(tmp_path, builtin_samples, params)
    assert bad.returncode == 2 and "train_vae.preset/model" in bad.stderr and "widht" in bad.stderr
    assert not (tmp_path / "vae").exists()


def test_an_empty_split_is_named(builtin_samples, tmp_path):
    only_train = subset(builtin_samples, tmp_path / "samples", lambda row: row["split"] == "train")
    (tmp_path / "watertight").symlink_to(builtin_samples.parent / "watertight")
    params = write_params(tmp_path, steps=2)
    proc = train(tmp_path, only_train, params, "--val-split", "test")
    assert proc.returncode == 0, proc.stderr
    assert "no objects in the 'test' split" in proc.stderr
    # The plots DVC expects are written all the same, val.csv with its header alone.
    assert (tmp_path / "reports" / "val.csv").read_text().splitlines() == ["step,cd,f@0.01,f@0.02,empty"]
    assert len((tmp_path / "reports" / "loss.csv").read_text().splitlines()) > 1


OVERFIT = {
    "steps": 1000,
    "batch_size": 1,
    "lr": 3e-3,
    "warmup_steps": 20,
    "min_lr_ratio": 0.02,
    "log_every": 250,
    "checkpoint_every": 5000,
    "val_resolution": 128,
    "loss": {"kl_weight": 0.0},
    "data": {
        "input_points": 1024,
        "sharp_points": 64,
        "volume_points": 256,
        "near_points": 1536,
        "sharp_near_points": 256,
    },
}


@pytest.mark.slow
def test_tiny_preset_overfits_one_builtin_shape(builtin_samples, tmp_path):
    chair = subset(builtin_samples, tmp_path / "samples", lambda row: row["category"] == "chair")
    (tmp_path / "watertight").symlink_to(builtin_samples.parent / "watertight")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "train_vae": {"preset": "tiny", **OVERFIT}}))
    # The suite's thread setting (SHAPEFLOW_THREADS) holds: the result does not hang on the thread count.
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *stage_args(tmp_path, chair, params, "--val-split", "train")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    print(f"overfit one chair: F@0.02 {metrics['val_f@0.02']:.4f}, CD {metrics['val_cd']:.4f}, {seconds:.0f} s")
    assert metrics["train_objects"] == 1 and metrics["val_objects"] == 1
    assert metrics["val_f@0.02"] >= 0.99


def test_a_checkpoint_of_another_architecture_under_the_same_params_is_not_resumed():
    # The same params section can mean another network when a preset's fields change between
    # versions: the resume fingerprint covers the resolved model config as well.
    from shapeflow import config
    from shapeflow.models.vae import vae_config
    from shapeflow.stages.train_vae import fingerprint

    params = config.load_params(None)
    now = fingerprint(params, vae_config("local"), "data", 1)
    assert now == fingerprint(params, vae_config("local"), "data", 1)
    assert now != fingerprint(params, vae_config("local", {"planes": False}), "data", 1)


@pytest.mark.slow
def test_thin_shells_left_out_and_balanced_epochs_are_recorded_in_the_metrics_and_mlflow(two_samples, tmp_path):
    from shapeflow.dataset import list_objects, shell_ratios

    ratios = shell_ratios(two_samples.parent / "watertight")
    low, high = sorted(ratios[o.key] for o in list_objects(two_samples, "train"))
    assert low < high
    threshold = (low + high) / 2  # one of the two objects is below it
    data = TINY_VAE["data"] | {"min_shell_ratio": threshold}
    params = write_params(tmp_path, steps=2, val_every=0, val_objects=1, balance="category", data=data)
    proc = train(tmp_path, two_samples, params, "--val-split", "train")
    assert proc.returncode == 0, proc.stderr
    assert f"left out 1 of 2 objects whose watertight shell_ratio is below {threshold:g}" in proc.stderr
    assert "VAE on 1 objects, 1 categories balanced" in proc.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["train_objects"] == 1 and metrics["thin_shells_left_out"] == 1
    _, found = runs(tmp_path)
    logged = found[0].data.params
    assert logged["train_vae.balance"] == "category" and logged["thin_shells_left_out"] == "1"
    assert float(logged["train_vae.data.min_shell_ratio"]) == threshold


@pytest.mark.slow
def test_a_second_training_into_the_same_checkpoints_is_refused(two_samples, tmp_path):
    params = write_params(tmp_path, steps=4, checkpoint_every=2, val_every=0, val_objects=1)
    with mf.writing_lock(tmp_path / "ck"):  # a first training, still going
        second = train(tmp_path, two_samples, params, "--val-split", "train")
    assert second.returncode == 2
    assert f"{tmp_path / 'ck'}: another run is writing into it (pid {os.getpid()}:" in second.stderr
    assert not (tmp_path / "ck").exists() and not (tmp_path / "vae").exists()


@pytest.mark.slow
def test_a_kill_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(two_samples, tmp_path):
    """Two train objects in batches of one: two batches an epoch, so the checkpoint at step 3 is in the
    middle of an epoch. The resumed run must draw the same batches, point subsets and noise."""
    from safetensors.torch import load_file

    def weights(work: Path, kill: bool) -> dict:
        work.mkdir()
        params = write_params(work, steps=8, batch_size=1, checkpoint_every=3, val_every=0, val_objects=1)
        if kill:
            cmd = [sys.executable, *stage_args(work, two_samples, params, "--val-split", "train")]
            assert kill_at_first_checkpoint(cmd, work, env_for(work), work / "ck") >= 3
            # On a busy machine the kill may come after the checkpoint at step 6 (an epoch boundary):
            # leave the one at step 3, mid-epoch, which is what this test is about.
            for later in (work / "ck").glob("step_*"):
                if int(later.name.split("_")[1]) > 3:
                    shutil.rmtree(later)
        done = train(work, two_samples, params, "--val-split", "train")
        assert done.returncode == 0, done.stderr
        assert ("resuming from step 3" in done.stderr) == kill
        return load_file(work / "vae" / "model.safetensors")

    straight, resumed = weights(tmp_path / "straight", False), weights(tmp_path / "killed", True)
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


# -- the grid family --------------------------------------------------------------------------------

GRID = {"family": "grid", "preset": "tiny", "model": {}}


@pytest.fixture(scope="module")
def two_grid_samples(grid_samples, tmp_path_factory) -> Path:
    """Two of the built-in objects with their grids (sample stage run for the grid family)."""
    return first_two(grid_samples, tmp_path_factory.mktemp("two_grid"))


@pytest.mark.slow
def test_grid_family_overfits_one_builtin_shape(grid_samples, tmp_path):
    chair = subset(grid_samples, tmp_path / "samples", lambda row: row["category"] == "chair")
    (tmp_path / "watertight").symlink_to(grid_samples.parent / "watertight")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "train_vae": OVERFIT | GRID | {"steps": 300, "log_every": 50}}))
    proc = run_cli(stage_args(tmp_path, chair, params, "--val-split", "train"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    print(f"grid VAE, one chair: F@0.02 {metrics['val_f@0.02']:.4f}, CD {metrics['val_cd']:.4f}")
    assert metrics["train_objects"] == 1 and metrics["val_f@0.02"] >= 0.99
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["format"] == "shapeflow.grid_vae/1" and saved["config"]["resolution"] == 32  # the data's grids
    with open(tmp_path / "reports" / "loss.csv", newline="") as fh:
        assert {"cells", "coarse"} <= set(csv.DictReader(fh).fieldnames)
    _, found = runs(tmp_path)
    assert found[0].data.params["train_vae.family"] == "grid"


@pytest.mark.slow
def test_grid_family_two_ranks_end_with_identical_weights(two_grid_samples, tmp_path):
    params = write_params(tmp_path, steps=4, checkpoint_every=2, val_objects=1, batch_size=1, **GRID)
    proc = train(tmp_path, two_grid_samples, params, "--val-split", "train", launcher=TWO_CPU_RANKS)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["rank_checksums"])) == 1


@pytest.mark.slow
def test_grid_family_killed_training_resumes(two_grid_samples, tmp_path):
    params = write_params(tmp_path, steps=20, checkpoint_every=4, val_every=0, val_objects=1, **GRID)
    cmd = [sys.executable, *stage_args(tmp_path, two_grid_samples, params, "--val-split", "train")]
    saved = kill_at_first_checkpoint(cmd, tmp_path, env_for(tmp_path), tmp_path / "ck")
    assert 4 <= saved < 20 and not (tmp_path / "vae").exists()
    rerun = train(tmp_path, two_grid_samples, params, "--val-split", "train")
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from step {saved}" in rerun.stderr
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["steps"] == 20


def test_grid_family_on_samples_without_grids_says_to_rerun_the_sample_stage(two_samples, tmp_path):
    params = write_params(tmp_path, steps=2, **GRID)
    proc = train(tmp_path, two_samples, params)
    assert proc.returncode != 0
    assert "train_vae.family: grid needs the sample stage's grids" in proc.stderr
    assert "dvc repro sample" in proc.stderr
