"""The evaluate stage: what it writes, what it logs, how it fails."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import subset
from mlflow.tracking import MlflowClient

from shapeflow import cli, config
from shapeflow.models.vae import VecSetVAE, save_pretrained, vae_config
from shapeflow.stages import evaluate, train_dit

VAE_DATA = config.VAEDataParams(input_points=256, sharp_points=64)
EVAL = config.EvaluateParams(split="train", resolution=32, recon_points=2000, gen_points=256, previews=2)
GENERATE = config.GenerateParams(steps=2, resolution=32)


def params(**evaluate_fields) -> config.Params:
    return config.Params(
        train_vae=config.TrainVAEParams(data=VAE_DATA),
        train_dit=config.TrainDiTParams(
            model={"width": 64, "depth": 2},
            steps=4,
            batch_size=4,
            log_every=2,
            warmup_steps=2,
            val_every=0,
            final_samples=0,
            generate=GENERATE,
        ),
        evaluate=config.replace(EVAL, **evaluate_fields),
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def models(builtin_samples, tmp_path_factory, one_thread_module) -> tuple[Path, Path]:
    """A small untrained VAE (with the run id its training would have recorded) and a DiT trained a few
    steps on its latents: the stage's mechanics do not depend on how good they are."""
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    save_pretrained(
        VecSetVAE(vae_config("tiny", {"num_latents": 16, "width": 64})),
        root / "vae",
        {"steps": 0, "mlflow_run_id": "vae-run-1"},
    )
    paths = train_dit.Paths(
        root / "vae",
        builtin_samples,
        root / "dit",
        root / "ck",
        root / "r" / "metrics.json",
        root / "r",
        root / "cache",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'train.db'}")
        train_dit.run(params(), paths)
    return root / "vae", root / "dit"


@pytest.fixture(scope="module")
def one_thread_module():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def evaluated(models, builtin_samples, tmp_path_factory) -> tuple[Path, dict, Path]:
    vae, dit = models
    work = tmp_path_factory.mktemp("eval")
    db = work / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        metrics = evaluate.run(
            params(), evaluate.Paths(vae, dit, builtin_samples, builtin_samples.parent / "watertight", work / "eval")
        )
    return work / "eval", metrics, db


def test_stage_writes_metrics_per_object_and_per_category_rows_and_previews(evaluated):
    out, metrics, _ = evaluated
    written = json.loads((out / "metrics.json").read_text())
    assert written["split"] == "train"
    recon, gen = written["recon"], written["generation"]
    assert recon["objects"] == 8 and recon["failed"] == 0
    rows = read_csv(out / "plots" / "recon.csv")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    # The headline is the mean of the per-object rows.
    assert recon["iou_volume"] == pytest.approx(np.mean([float(r["iou_volume"]) for r in rows]), rel=1e-4)
    assert recon["nc"] == pytest.approx(np.mean([float(r["nc"]) for r in rows]), rel=1e-4)
    categories = read_csv(out / "plots" / "recon_categories.csv")
    assert sorted(r["category"] for r in categories) == sorted(r["category"] for r in rows)
    # Two samplings of one surface with 2,000 points: close, but not perfect (the noise floor).
    assert 0.0 < recon["floor"]["cd"] < 0.06 and recon["floor"]["nc"] > 0.9
    # One sample per category of the split (one object each), scored against the 8 references.
    assert gen["samples"] == 8 and gen["references"] == 8
    assert len(read_csv(out / "plots" / "generation.csv")) == 8
    assert len(read_csv(out / "plots" / "generation_categories.csv")) == 8
    # The floor's "samples" are the references resampled: every reference covered, each its twin's nearest.
    assert gen["floor"]["cov_cd"] == 1.0 and gen["floor"]["1nna_cd"] == 0.0
    assert gen["floor"]["mmd_cd"] < gen["mmd_cd"]
    # Category match: a 1-NN classifier over the train split. Every category has one object here, and
    # an object is never its own neighbour, so the real shapes match none (the floor); the samples are
    # scored against the same 8 shapes. No category reaches 10 training objects: no "common" figure.
    assert gen["floor"]["category_match"] == 0.0 and 0.0 <= gen["category_match"] <= 1.0
    assert gen["common_categories"] == 0 and written["generation"]["category_match_common"] is None
    gen_rows = read_csv(out / "plots" / "generation.csv")
    assert all(r["nearest_key"] and r["nearest_category"] for r in gen_rows)
    assert {r["train_objects"] for r in read_csv(out / "plots" / "generation_categories.csv")} == {"1"}
    for folder in ("samples", "recon"):
        assert (out / folder / "preview.png").stat().st_size > 1000
    # The samples preview: preview_per_category (4) of each of the 8 categories, which has one sample.
    assert len(list((out / "samples").glob("*.glb"))) == 8 and len(list((out / "recon").glob("*.glb"))) == 2
    assert metrics["recon"]["objects"] == 8
    # Wall times beside the metrics (run.json), not in them: seconds a reconstruction, all phases.
    timings = json.loads((out / "run.json").read_text())["timings"]
    assert 0 < timings["recon_decode_s"] * timings["recon_objects"] <= timings["recon_s"]
    assert "decode_s" not in rows[0]


def test_stage_logs_one_run_tagged_with_the_model_runs_and_all_sections(evaluated, models):
    _, metrics, db = evaluated
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("shapeflow-evaluate")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    dit_run = json.loads((models[1] / "generator.json").read_text())["mlflow_run_id"]
    assert run.data.tags["vae_run_id"] == "vae-run-1" and run.data.tags["dit_run_id"] == dit_run
    assert run.data.tags["stage"] == "evaluate" and run.data.tags["git_commit"]
    assert run.data.params["evaluate.resolution"] == "32" and run.data.params["train_dit.steps"] == "4"
    assert run.data.metrics["recon.cd"] == pytest.approx(metrics["recon"]["cd"])
    assert run.data.metrics["generation.mmd_cd"] == pytest.approx(metrics["generation"]["mmd_cd"])
    # The compare view opens on the first metric logged: the headline F-score, counts last, and the
    # per-category figures as tables instead of a hundred metric keys.
    logged = [m.key for m in run.data._metric_objs]
    assert logged[:3] == ["recon.f_0.02", "recon.f_0.01", "recon.cd"] and logged[-1].endswith(
        ("objects", "failed", "empty", "samples", "references", "common_categories")
    )
    assert not any(name.startswith("category.") for name in logged)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recon", "samples", "plots", "tables"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "tables/recon_categories.json")).read_text())
    assert "f@0.02" in table["columns"] and len(table["data"]) == metrics["recon"]["objects"]  # a category each


def test_a_corrupt_sample_file_fails_that_object_and_the_others_are_scored(
    models, builtin_samples, tmp_path, monkeypatch
):
    copy = subset(builtin_samples, tmp_path / "samples", lambda row: True)
    rows = read_csv(copy / "manifest.csv")
    broken = copy / rows[0]["path"]
    broken.write_bytes(b"not an npz")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = evaluate.run(
        params(), evaluate.Paths(models[0], None, copy, builtin_samples.parent / "watertight", tmp_path / "eval")
    )
    assert metrics["recon"]["objects"] == 7 and metrics["recon"]["failed"] == 1
    assert "generation" not in metrics
    failed = [r for r in read_csv(tmp_path / "eval" / "plots" / "recon.csv") if r["status"] == "failed"]
    assert [r["key"] for r in failed] == [rows[0]["key"]] and str(broken) in failed[0]["reason"]
    assert np.isfinite(metrics["recon"]["iou_volume"])


def test_bad_evaluate_params_name_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    for section, key in (
        ({"resolution": 8}, "evaluate.resolution"),
        ({"split": "dev"}, "evaluate.split"),
        ({"gen_points": 10}, "evaluate.gen_points"),
    ):
        path.write_text(yaml.safe_dump({"evaluate": section}))
        with pytest.raises(config.ParamsError, match=key):
            config.load_params(path)


def test_missing_models_are_a_clear_error(builtin_samples, tmp_path, capsys):
    argv = [
        "evaluate",
        str(tmp_path / "no-vae"),
        "none",
        str(builtin_samples),
        str(builtin_samples.parent / "watertight"),
        str(tmp_path / "eval"),
    ]
    assert cli.main(argv) == 2
    assert "no-vae/model.safetensors: missing" in capsys.readouterr().err


def test_a_perfect_reconstruction_scores_iou_one_and_the_noise_floor(models, builtin_samples, tmp_path, monkeypatch):
    """With the reference's exact signed distance in place of the VAE, every figure is at its best:
    the sign plumbing, the point sets and the floor are what the stage says they are."""
    import torch

    from shapeflow.geometry.mesh import sampled_frame
    from shapeflow.geometry.sdf import signed_distance

    meshes = builtin_samples.parent / "watertight"
    paths = evaluate.reference_paths(meshes)
    current = {}

    def exact(vae, arrays, data, seed, resolution, device, autocast=None):
        mesh = sampled_frame(paths[current["key"]])[0]

        def field(q: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(
                signed_distance(mesh.vertices, mesh.faces, q.numpy().astype(np.float64)).astype(np.float32)
            )

        return field, mesh

    original = evaluate.recon_object

    def recon_object(vae, obj, *args, **kwargs):
        current["key"] = obj.key
        return original(vae, obj, *args, **kwargs)

    monkeypatch.setattr(evaluate, "reconstruct", exact)
    monkeypatch.setattr(evaluate, "recon_object", recon_object)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = evaluate.run(
        params(recon_objects=3), evaluate.Paths(models[0], None, builtin_samples, meshes, tmp_path / "eval")
    )
    recon = metrics["recon"]
    assert recon["objects"] == 3 and recon["iou_volume"] == 1.0 and recon["iou_near"] == 1.0
    assert recon["nc"] == pytest.approx(recon["floor"]["nc"], abs=0.02)
    assert recon["cd"] == pytest.approx(recon["floor"]["cd"], rel=0.1)
    assert recon["f@0.02"] == pytest.approx(recon["floor"]["f@0.02"], abs=0.05)
    assert recon["watertight_share"] == 1.0


def test_nearest_training_shape_is_never_the_object_itself():
    dist = np.array([[0.0, 0.5, 0.2], [0.3, 0.1, 0.9]])
    keys, category = ["a", "b", "c"], {"a": "tree", "b": "rock", "c": "tree"}
    # Row 0 is object "a" (distance 0 to itself): its neighbour is "c"; row 1 is a generated shape.
    assert evaluate.nearest_train(dist, ["a", None], keys, category) == [("c", "tree", 0.2), ("b", "rock", 0.1)]
    (row,) = evaluate.nearest_train(np.array([[0.0]]), ["a"], ["a"], {"a": "tree"})
    assert row[:2] == ("", "") and np.isnan(row[2])


def test_preview_takes_the_first_samples_of_each_category():
    categories = ["rock", "rock", "rock", "tree", "bush", "tree", "tree"]
    assert evaluate.preview_pick(categories, 2, 8) == [4, 0, 1, 3, 5]
    assert evaluate.preview_pick([None] * 5, 2, 3) == [0, 1, 2]


def test_preview_puts_each_category_on_a_row_of_its_own():
    picked = [(c, None) for c in ("bush", "rock", "rock", "rock", "tree")]
    assert evaluate.category_rows_layout(picked, 3) == [0, None, None, 1, 2, 3, 4]
    assert evaluate.category_rows_layout([(None, None)] * 3, 2) == [0, 1, 2]


def test_the_grid_family_goes_through_the_dit_and_the_same_evaluation(grid_samples, tmp_path, one_thread_module):
    # An untrained tiny grid VAE, a DiT trained a few steps on its latent grids (patchified), and the
    # evaluate stage: the same metrics as the VecSet family, the runs tagged with the family.
    import torch

    from shapeflow.models import families
    from shapeflow.models.grid_vae import GridVAE, grid_vae_config

    torch.manual_seed(0)
    families.save_vae(GridVAE(grid_vae_config("tiny")), tmp_path / "vae", {"steps": 0, "mlflow_run_id": "vae-run-2"})
    grid_params = params(recon_objects=2, gen_per_category=1)
    paths = train_dit.Paths(
        tmp_path / "vae", grid_samples, tmp_path / "dit", tmp_path / "ck", tmp_path / "r" / "metrics.json",
        tmp_path / "r", tmp_path / "cache",
    )  # fmt: skip
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", db)
        train_dit.run(grid_params, paths)
        dit_config = json.loads((tmp_path / "dit" / "raw" / "config.json").read_text())["config"]
        assert dit_config["grid_side"] == 8 and dit_config["num_tokens"] == 512 and dit_config["patch_size"] == 2
        # t_shift auto: the grid family's shift, which the sampler reads back from generator.json
        assert json.loads((tmp_path / "dit" / "generator.json").read_text())["t_shift"] == families.T_SHIFT["grid"] > 1
        metrics = evaluate.run(
            grid_params,
            evaluate.Paths(tmp_path / "vae", tmp_path / "dit", grid_samples, grid_samples.parent / "watertight",
                           tmp_path / "eval"),
        )  # fmt: skip
    assert {"cd", "f@0.02", "nc", "iou_volume"} <= set(metrics["recon"])
    assert {"watertight_share", "mmd_cd", "cov_cd", "category_match"} <= set(metrics["generation"])
    client = MlflowClient(tracking_uri=db)
    for experiment in ("shapeflow-train_dit", "shapeflow-evaluate"):
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.data.tags["vae_family"] == "grid"
