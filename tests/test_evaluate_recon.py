"""`shapeflow evaluate-recon`: a folder of meshes through watertight and sample, scored by the VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml

from shapeflow import cli
from shapeflow.models.vae import VecSetVAE, save_pretrained, vae_config


@pytest.fixture
def vae(tmp_path) -> Path:
    """A small untrained VAE: the command's mechanics do not depend on how good it is."""
    import torch

    torch.manual_seed(0)
    save_pretrained(VecSetVAE(vae_config("tiny", {"num_latents": 16, "width": 64})), tmp_path / "vae", {"steps": 0})
    return tmp_path / "vae"


def small_params(folder: Path) -> Path:
    """folder/params.yaml: small sample counts and a coarse decode, one worker."""
    path = folder / "params.yaml"
    small = {
        "watertight": {"resolution": 48},
        "sample": {"surface": 2048, "sharp": 256, "volume": 2048, "near": 1024, "sharp_near": 256},
        "compute": {"workers": 1},
        "train_vae": {"data": {"input_points": 256, "sharp_points": 64}},
        "evaluate": {"resolution": 32, "recon_points": 2000},
    }
    path.write_text(yaml.safe_dump(small))
    return path


def test_evaluate_recon_scores_a_folder_of_meshes_and_lists_the_ones_that_failed(vae, tmp_path, capsys):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.box((1.0, 0.6, 0.4)).export(meshes / "box.obj")
    trimesh.creation.icosphere(3, 0.5).export(meshes / "ball.ply")
    (meshes / "broken.obj").write_text("v 0 0 0\nv 1 0 0\n")  # vertices, no faces
    (meshes / "box_again.obj").write_bytes((meshes / "box.obj").read_bytes())  # scored once, as box.obj
    params_file = small_params(tmp_path)
    argv = [
        "--params",
        str(params_file),
        "evaluate-recon",
        str(meshes),
        "--vae",
        str(vae),
        "--work",
        str(tmp_path / "work"),
    ]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    by_name = {r["source"]: r for r in report["objects"]}
    assert set(by_name) == {"box.obj", "ball.ply", "broken.obj"}
    assert by_name["box.obj"]["status"] == "ok" and by_name["ball.ply"]["status"] == "ok"
    assert by_name["broken.obj"]["status"] == "failed" and by_name["broken.obj"]["reason"].startswith("raw: ")
    assert report["mean"]["objects"] == 2 and report["mean"]["failed"] == 1
    # Seconds a mesh (encode, decode, marching cubes), per mesh and their mean, beside the figures.
    assert report["decode_s"] == pytest.approx((by_name["box.obj"]["decode_s"] + by_name["ball.ply"]["decode_s"]) / 2)
    assert report["decode_s"] > 0 and report["resolution"] > 0
    assert "box.obj" in table and "ball.ply" in table and "broken.obj" in table and "mean of 2 meshes" in table
    # A rerun picks up the finished preprocessing and scores the same.
    assert cli.main(argv) == 0
    again = json.loads((tmp_path / "work" / "report.json").read_text())
    assert again["mean"] == report["mean"]


def test_a_grid_family_vae_gets_the_grids_it_reads(tmp_path):
    # The params say vecset and 64^3 grids; the VAE reads 32^3 grids: the samples follow the VAE.
    import torch

    from shapeflow.models import families
    from shapeflow.models.grid_vae import GridVAE, grid_vae_config

    torch.manual_seed(0)
    families.save_vae(GridVAE(grid_vae_config("tiny")), tmp_path / "vae", {"steps": 0})
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.icosphere(3, 0.5).export(meshes / "ball.ply")
    params_file = small_params(tmp_path)
    argv = ["--params", str(params_file), "evaluate-recon", str(meshes), "--vae", str(tmp_path / "vae")]
    assert cli.main([*argv, "--work", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert [r["status"] for r in report["objects"]] == ["ok"]
    (npz,) = (tmp_path / "work" / "samples" / "objects").glob("*.npz")
    with np.load(npz) as arrays:
        assert arrays["grid_sdf"].shape == (32, 32, 32) and int(arrays["sparse_resolution"]) == 128
