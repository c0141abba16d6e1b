"""The train_dit stage and `shapeflow generate` run as users run them: real processes, real MLflow."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml
from conftest import kill_at_first_checkpoint
from training_runs import PYTHON, TWO_CPU_RANKS, env_for, run_cli, stage_cli, tracked_runs

from shapeflow.models.vae import VecSetVAE, save_pretrained, vae_config

VAE_DATA = {"input_points": 256, "sharp_points": 64}
SMALL = {
    "model": {"width": 64, "depth": 2},
    "batch_size": 4,
    "log_every": 2,
    "val_every": 0,
    "warmup_steps": 2,
    "final_samples": 2,
    "generate": {"steps": 2, "resolution": 32, "guidance": 2.0},
}


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory) -> Path:
    """An untrained small VAE: the stage's mechanics do not depend on how good it is."""
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    save_pretrained(VecSetVAE(vae_config("tiny", {"num_latents": 16, "width": 64})), folder, {"steps": 0})
    return folder


def write_params(folder: Path, **train_dit) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": 0, "train_vae": {"data": VAE_DATA}, "train_dit": SMALL | train_dit}))
    return path


def stage_args(work: Path, vae: Path, samples: Path, params: Path) -> list[str]:
    return stage_cli(params, "train-dit", vae, samples, work / "dit", "--cache", work / "cache", work=work)


def train(work: Path, vae: Path, samples: Path, params: Path, launcher: tuple[str, ...] = PYTHON):
    return run_cli(stage_args(work, vae, samples, params), work, launcher)


def runs(work: Path):
    return tracked_runs(work, "shapeflow-train_dit")


@pytest.mark.slow
def test_stage_writes_raw_and_ema_weights_scores_and_one_tracked_run(builtin_samples, small_vae, tmp_path):
    params = write_params(tmp_path, steps=6, checkpoint_every=3)
    proc = train(tmp_path, small_vae, builtin_samples, params)
    assert proc.returncode == 0, proc.stderr
    dit = tmp_path / "dit"
    assert {p.name for p in dit.iterdir()} == {"raw", "ema", "generator.json"}
    raw = (dit / "raw" / "model.safetensors").read_bytes()
    assert raw != (dit / "ema" / "model.safetensors").read_bytes()  # the EMA lags the raw weights
    info = json.loads((dit / "generator.json").read_text())
    categories = {
        row["category"] for row in csv.DictReader(open(builtin_samples / "manifest.csv")) if row["split"] == "train"
    }
    assert info["classes"] == sorted(categories)
    assert len(info["latent_stats"]["mean"]) == 16 + 3 * int(vae_config("tiny").anchored)
    assert info["t_shift"] == 1.0  # t_shift auto on VecSet latents

    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["gen_samples"] == 2
    assert 0.0 <= metrics["gen_watertight_share"] <= 1.0
    assert "no objects in the val split" in proc.stderr and "val_loss" not in metrics  # this fixture has no val split
    with open(tmp_path / "reports" / "loss.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [2, 4, 6]
    assert not (tmp_path / "ck").exists()

    client, found = runs(tmp_path)
    assert len(found) == 1
    run = found[0]
    assert run.data.tags["stage"] == "train_dit" and run.data.tags["world_size"] == "1"
    assert {"git_commit", "dvc_data_hash", "dvc_vae_hash", "latent_cache_key"} <= set(run.data.tags)
    assert run.data.params["train_dit.batch_size"] == "4" and run.data.params["model_config.num_classes"] == str(
        len(categories)
    )
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    # The DiT (with its VAE) is an MLflow model, registered as a version of shapeflow-dit with its scores,
    # and the samples it was trained on are the run's dataset input.
    (version,) = client.search_model_versions("name='shapeflow-dit'")
    assert version.run_id == run.info.run_id and "gen_watertight_share" in version.tags
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id and logged.name == "mlflow-model"
    location = Path(logged.artifact_location.removeprefix("file://"))
    spec = yaml.safe_load(((location if location.is_absolute() else tmp_path / location) / "MLmodel").read_text())
    assert "glb" in spec["signature"]["outputs"] and "guidance" in spec["signature"]["params"]
    assert (
        (location if location.is_absolute() else tmp_path / location)
        .joinpath("artifacts/dit/ema/model.safetensors")
        .is_file()
    )
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == builtin_samples.name and dataset.tags[0].value == "training"

    # Other DiT settings (here: unconditional) retrain, but read the latents from the cache.
    params = write_params(tmp_path, steps=4, lr=1e-4, final_samples=1, conditional=False)
    again = train(tmp_path, small_vae, builtin_samples, params)
    assert again.returncode == 0, again.stderr
    assert "latents from the cache" in again.stderr and "encoded" not in again.stderr
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert json.loads((dit / "generator.json").read_text())["classes"] == []
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["gen_samples"] == 1 and "gen_category_match" not in metrics


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(builtin_samples, small_vae, tmp_path):
    params = write_params(tmp_path, steps=400, checkpoint_every=5, final_samples=0, log_every=5)
    cmd = [sys.executable, *stage_args(tmp_path, small_vae, builtin_samples, params)]
    saved = kill_at_first_checkpoint(cmd, tmp_path, env_for(tmp_path), tmp_path / "ck")
    assert not (tmp_path / "dit").exists()
    assert 5 <= saved < 400

    rerun = train(tmp_path, small_vae, builtin_samples, params)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stderr.splitlines() if "resuming from step" in line]
    assert resumed and int(resumed[0].split("resuming from step ")[1].split()[0]) >= saved
    with open(tmp_path / "reports" / "loss.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == list(range(5, 401, 5))
    _, found = runs(tmp_path)
    assert len(found) == 1 and found[0].info.status == "FINISHED"


@pytest.mark.slow
def test_two_ranks_on_cpu_end_with_identical_weights_and_one_run(builtin_samples, small_vae, tmp_path):
    params = write_params(tmp_path, steps=4, checkpoint_every=2, final_samples=0)
    proc = train(tmp_path, small_vae, builtin_samples, params, launcher=TWO_CPU_RANKS)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["rank_checksums"])) == 1
    _, found = runs(tmp_path)
    assert len(found) == 1 and found[0].data.tags["world_size"] == "2"


def test_params_the_vae_fixes_and_a_missing_vae_are_refused_with_a_clear_message(builtin_samples, small_vae, tmp_path):
    bad = train(tmp_path, small_vae, builtin_samples, write_params(tmp_path, steps=2, model={"latent_dim": 8}))
    assert bad.returncode == 2 and "latent_dim" in bad.stderr and "follow from the VAE" in bad.stderr
    missing = train(tmp_path, tmp_path / "novae", builtin_samples, write_params(tmp_path, steps=2))
    assert missing.returncode == 2 and "novae" in missing.stderr
    assert not (tmp_path / "dit").exists()


@pytest.fixture(scope="module")
def trained_dit(builtin_samples, small_vae, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dit")
    proc = train(work, small_vae, builtin_samples, write_params(work, steps=4, final_samples=0))
    assert proc.returncode == 0, proc.stderr
    return work


def generate(work: Path, vae: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        "-m",
        "shapeflow.cli",
        "--params",
        str(work / "params.yaml"),
        "generate",
        str(out),
        "--dit",
        str(work / "dit"),
        "--vae",
        str(vae),
        *args,
    ]
    return run_cli(cmd, work)


@pytest.mark.slow
def test_generate_writes_meshes_and_a_preview_and_repeats_itself_for_a_seed(trained_dit, small_vae, tmp_path):
    from PIL import Image

    args = ("--n", "3", "--category", "chair", "--steps", "3", "--resolution", "32", "--seed", "7")
    first = generate(trained_dit, small_vae, tmp_path / "a", *args)
    assert first.returncode == 0, first.stderr
    rows = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert [r["category"] for r in rows] == ["chair"] * 3
    for i in range(3):
        for ext in ("glb", "obj"):
            assert (tmp_path / "a" / f"sample_{i:03d}.{ext}").stat().st_size > 0
    image = Image.open(tmp_path / "a" / "preview.png")
    assert image.size == (4 * 256, 256)
    second = generate(trained_dit, small_vae, tmp_path / "b", *args)
    assert second.returncode == 0, second.stderr
    for i in range(3):
        a = trimesh.load(tmp_path / "a" / f"sample_{i:03d}.obj", force="mesh", process=False)
        b = trimesh.load(tmp_path / "b" / f"sample_{i:03d}.obj", force="mesh", process=False)
        assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)


@pytest.mark.slow
def test_generate_loads_a_registered_version_by_its_models_uri(trained_dit, small_vae, tmp_path):
    args = ("--n", "2", "--category", "chair", "--steps", "3", "--resolution", "32", "--seed", "3")
    from_files = generate(trained_dit, small_vae, tmp_path / "files", *args)
    assert from_files.returncode == 0, from_files.stderr
    cmd = ["-m", "shapeflow.cli", "--params", str(trained_dit / "params.yaml"), "generate", str(tmp_path / "registry")]
    from_registry = run_cli([*cmd, "--model", "models:/shapeflow-dit/1", *args], trained_dit)
    assert from_registry.returncode == 0, from_registry.stderr
    for i in range(2):
        a = (tmp_path / "files" / f"sample_{i:03d}.obj").read_bytes()
        assert a == (tmp_path / "registry" / f"sample_{i:03d}.obj").read_bytes()
    missing = run_cli([*cmd, "--model", "models:/shapeflow-dit/9", *args], trained_dit)
    assert missing.returncode != 0 and "shapeflow-dit" in missing.stderr


@pytest.mark.slow
def test_generate_names_an_unknown_category_and_writes_nothing(trained_dit, small_vae, tmp_path):
    proc = generate(trained_dit, small_vae, tmp_path / "out", "--n", "1", "--category", "spaceship")
    assert proc.returncode == 2 and "spaceship" in proc.stderr and "chair" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_anchor_weight_lands_on_an_anchored_vaes_xyz_only_and_must_be_positive(tmp_path):
    import dataclasses

    import torch

    from shapeflow import config
    from shapeflow.stages.train_dit import channel_weights

    p = dataclasses.replace(config.TrainDiTParams(), anchor_weight=4.0)
    torch.testing.assert_close(channel_weights(p, 6, anchored=True), torch.tensor([4.0, 4.0, 4.0, 1.0, 1.0, 1.0]))
    assert channel_weights(p, 6, anchored=False) is None  # plain latents have no xyz channels
    assert channel_weights(dataclasses.replace(p, anchor_weight=1.0), 6, anchored=True) is None
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train_dit": {"anchor_weight": 0}}))
    with pytest.raises(config.ParamsError, match="train_dit.anchor_weight"):
        config.load_params(path)


def test_the_thin_shells_train_vae_leaves_out_are_left_out_of_the_dit_train_latents(
    builtin_samples, small_vae, tmp_path
):
    import dataclasses

    import torch
    from accelerate import Accelerator

    from shapeflow import config
    from shapeflow.dataset import list_objects, shell_ratios
    from shapeflow.stages import train_dit

    meshes = builtin_samples.parent / "watertight"
    ratios = shell_ratios(meshes)
    train_keys = [o.key for o in list_objects(builtin_samples, "train")]
    threshold = sorted(ratios[k] for k in train_keys)[len(train_keys) // 2]  # about half the objects are below
    thin = sorted(k for k in train_keys if ratios[k] < threshold)
    assert thin
    data = config.VAEDataParams(**VAE_DATA)
    params = config.Params(train_vae=config.TrainVAEParams(data=data))
    paths = train_dit.Paths(
        small_vae, builtin_samples, tmp_path / "dit", tmp_path / "ck", tmp_path / "m.json", tmp_path, tmp_path, meshes
    )
    accelerator = Accelerator(cpu=True)
    every = train_dit.training_data(params, paths, accelerator)
    filtered = dataclasses.replace(params.train_vae, data=dataclasses.replace(data, min_shell_ratio=threshold))
    kept = train_dit.training_data(dataclasses.replace(params, train_vae=filtered), paths, accelerator)
    assert every.left_out == [] and kept.left_out == thin
    rows = [i for i, o in enumerate(every.train.objects) if o.key not in thin]
    assert [o.key for o in kept.train.objects] == [every.train.objects[i].key for i in rows]
    assert kept.key == every.key and len(list(tmp_path.glob("latents-*.npz"))) == 1  # one encoding serves both
    torch.testing.assert_close(kept.train.latents, every.train.latents[rows])
    assert [o.key for o in kept.val.objects] == [o.key for o in every.val.objects]  # val is not filtered


@pytest.mark.slow
def test_a_kill_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(builtin_samples, small_vae, tmp_path):
    """Batches of 1 over the train split: the checkpoint at step 3 is in the middle of an epoch. The
    resumed run must draw the same batches, times and noise as the uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    def weights(work: Path, kill: bool) -> dict:
        work.mkdir()
        params = write_params(work, steps=10, batch_size=1, checkpoint_every=3, final_samples=0, log_every=1)
        if kill:
            cmd = [sys.executable, *stage_args(work, small_vae, builtin_samples, params)]
            assert kill_at_first_checkpoint(cmd, work, env_for(work), work / "ck") >= 3
        done = train(work, small_vae, builtin_samples, params)
        assert done.returncode == 0, done.stderr
        assert ("resuming from step" in done.stderr) == kill
        return {
            f"{kind}.{k}": v
            for kind in ("raw", "ema")
            for k, v in load_file(next((work / "dit" / kind).glob("*.safetensors"))).items()
        }

    straight, resumed = weights(tmp_path / "straight", False), weights(tmp_path / "killed", True)
    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def test_t_shift_takes_a_positive_number_or_auto(tmp_path):
    from shapeflow import config
    from shapeflow.models import families
    from shapeflow.models.grid_vae import grid_vae_config

    path = tmp_path / "params.yaml"
    for value, expected in (("auto", "auto"), (2.5, 2.5), (3, 3.0)):
        path.write_text(yaml.safe_dump({"train_dit": {"flow": {"t_shift": value}}}))
        assert config.load_params(path).train_dit.flow.t_shift == expected
    bad = (("fast", "a number or one of \\['auto'\\] is required, got 'fast'"), (0, "positive or auto"))
    for value, message in bad:
        path.write_text(yaml.safe_dump({"train_dit": {"flow": {"t_shift": value}}}))
        with pytest.raises(config.ParamsError, match=f"train_dit.flow.t_shift: .*{message}"):
            config.load_params(path)
    assert families.flow_shift("auto", grid_vae_config("tiny")) == families.T_SHIFT["grid"]
    assert families.flow_shift("auto", vae_config("tiny")) == families.T_SHIFT["vecset"] == 1.0
    assert families.flow_shift(2.5, grid_vae_config("tiny")) == 2.5
