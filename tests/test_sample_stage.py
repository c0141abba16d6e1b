"""`shapeflow sample` on a small folder: outputs, failures with reasons, resuming, sharding."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import trimesh
from bad_inputs import CUBE_FACES, CUBE_VERTICES, icosphere, obj_text, open_cylinder

from shapeflow import cli
from shapeflow.stages.sample import object_seed

PARAMS = """
seed: 7
sample:
  surface: 300
  sharp: 100
  volume: 400
  near: 150
  near_scales: [0.005, 0.02]
  sharp_near: 120
  sharp_near_scale: 0.005
"""

KEYS = {
    "surface_points",
    "surface_normals",
    "sharp_points",
    "sharp_normals",
    "sharp_is_edge",
    "vol_points",
    "vol_sdf",
    "near_points",
    "near_sdf",
    "near_scale",
    "sharp_near_points",
    "sharp_near_sdf",
    "n_sharp_edges",
}


def write_inputs(folder: Path) -> None:
    """Three closed meshes (one a triangle soup), an open one, a misoriented one, and a file that
    is not a mesh."""
    folder.mkdir(parents=True)
    (folder / "box.obj").write_text(obj_text(CUBE_VERTICES * [1.0, 2.0, 0.5], CUBE_FACES))
    sphere_v, sphere_f = icosphere(2)
    trimesh.Trimesh(sphere_v, sphere_f, process=False).export(folder / "ball.ply")
    # STL stores every triangle with its own corners: closed only once welded.
    trimesh.Trimesh(CUBE_VERTICES, CUBE_FACES, process=False).export(folder / "soup.stl")
    (folder / "open.obj").write_text(obj_text(*open_cylinder()))
    misoriented = CUBE_FACES.copy()
    misoriented[0] = misoriented[0, ::-1]
    (folder / "misoriented.obj").write_text(obj_text(CUBE_VERTICES, misoriented))
    (folder / "image.obj").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))


def sample(src: Path, dst: Path, params: Path, *extra: str) -> int:
    return cli.main(["--params", str(params), "sample", str(src), str(dst), "--workers", "1", *extra])


def manifest_rows(dst: Path) -> dict[str, dict[str, str]]:
    with open(dst / "manifest.csv", newline="") as fh:
        return {row["source"]: row for row in csv.DictReader(fh)}


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "meshes"
    write_inputs(src)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    return src, params


def test_good_objects_get_npz_and_bad_ones_a_reason(setup, tmp_path):
    src, params = setup
    dst = tmp_path / "samples"
    assert sample(src, dst, params) == 0
    rows = manifest_rows(dst)
    assert set(rows) == {"box.obj", "ball.ply", "soup.stl", "open.obj", "misoriented.obj", "image.obj"}
    assert rows["open.obj"]["status"] == "failed"
    assert "not watertight" in rows["open.obj"]["reason"] and "shapeflow watertight" in rows["open.obj"]["reason"]
    assert rows["misoriented.obj"]["status"] == "failed"
    assert "not consistently oriented" in rows["misoriented.obj"]["reason"]
    assert rows["image.obj"]["status"] == "failed" and "PNG" in rows["image.obj"]["reason"]
    for name in ("box.obj", "ball.ply", "soup.stl"):
        row = rows[name]
        assert row["status"] == "ok" and row["reason"] == ""
        with np.load(dst / row["path"], allow_pickle=False) as npz:
            assert set(npz.files) == KEYS
            assert npz["surface_points"].shape == (300, 3) and npz["near_sdf"].shape == (300,)
            assert npz["vol_sdf"].dtype == np.float32 and npz["near_scale"].dtype == np.int8
            assert int(npz["n_sharp_edges"]) == int(row["n_sharp_edges"])
            # The stored points are in normalised space: the longest side spans [-0.95, 0.95].
            assert 0.9 < np.abs(npz["surface_points"]).max() <= 0.95 + 1e-6
            assert (npz["vol_sdf"] < 0).any() and (npz["vol_sdf"] > 0).any()
    assert int(rows["box.obj"]["n_sharp_edges"]) == 12 and int(rows["ball.ply"]["n_sharp_edges"]) == 0
    assert int(rows["soup.stl"]["n_sharp_edges"]) == 12
    # The box spans 2 along y: scale and offset undo the normalisation.
    assert float(rows["box.obj"]["scale"]) == pytest.approx(2.0 / 1.9)
    assert float(rows["box.obj"]["offset_y"]) == pytest.approx(1.0)
    assert not [p for p in dst.rglob("*") if ".tmp" in p.name]


def test_rerun_skips_what_is_done_and_new_params_redo_it(setup, tmp_path):
    src, params = setup
    dst = tmp_path / "samples"
    assert sample(src, dst, params) == 0
    npz = {p.name: p.stat().st_mtime_ns for p in (dst / "objects").iterdir()}
    assert len(npz) == 3
    assert sample(src, dst, params) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (dst / "objects").iterdir()} == npz
    assert {r["status"] for r in manifest_rows(dst).values()} == {"ok", "failed"}
    params.write_text(PARAMS.replace("seed: 7", "seed: 8"))
    assert sample(src, dst, params) == 0
    assert all(p.stat().st_mtime_ns != npz[p.name] for p in (dst / "objects").iterdir())


def test_results_do_not_depend_on_sharding_or_workers(setup, tmp_path):
    src, params = setup
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert sample(src, whole, params) == 0
    for rank in (0, 1):
        cli.main(
            [
                "--params",
                str(params),
                "sample",
                str(src),
                str(sharded),
                "--workers",
                "2",
                "--rank",
                str(rank),
                "--world-size",
                "2",
            ]
        )
    assert (sharded / "manifest.csv").is_file()
    rows_whole, rows_sharded = manifest_rows(whole), manifest_rows(sharded)
    assert {k: r["status"] for k, r in rows_whole.items()} == {k: r["status"] for k, r in rows_sharded.items()}
    for name, row in rows_whole.items():
        if row["status"] != "ok":
            continue
        with np.load(whole / row["path"]) as a, np.load(sharded / rows_sharded[name]["path"]) as b:
            for key in KEYS:
                np.testing.assert_array_equal(a[key], b[key])


def test_watertight_output_carries_its_columns_and_inside_out_meshes_are_turned(tmp_path):
    """A watertight-stage style input: manifest.csv plus objects/<key>.ply in normalised space."""
    src = tmp_path / "watertight"
    (src / "objects").mkdir(parents=True)
    sphere_v, sphere_f = icosphere(2)
    meshes = {"a" * 64: (sphere_v * 0.95, sphere_f), "b" * 64: (sphere_v * 0.95, sphere_f[:, ::-1])}
    lines = ["key,path,status,reason,category,split,source,license,scale,offset_x,offset_y,offset_z"]
    for key, (v, f) in meshes.items():
        trimesh.Trimesh(v, f, process=False).export(src / "objects" / f"{key}.ply")
        lines.append(f"{key},objects/{key}.ply,ok,,chair,train,local:{key[0]}.obj,CC0,2.5,1.0,-2.0,0.5")
    lines.append(f"{'c' * 64},,failed,upstream trouble,chair,train,local:c.obj,CC0")
    (src / "manifest.csv").write_text("\n".join(lines) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    dst = tmp_path / "samples"
    assert sample(src, dst, params) == 0
    rows = {r["key"]: r for r in manifest_rows(dst).values()}
    assert set(rows) == {"a" * 64, "b" * 64}  # the upstream failure is not retried
    for row in rows.values():
        assert row["status"] == "ok" and row["category"] == "chair" and row["license"] == "CC0"
        assert row["split"] == "train"
        # Normalising again changes nothing: the upstream transform back to the source frame carries over.
        assert float(row["scale"]) == pytest.approx(2.5, rel=1e-6)
        assert [float(row[f"offset_{a}"]) for a in "xyz"] == pytest.approx([1.0, -2.0, 0.5], abs=1e-5)
        with np.load(dst / row["path"], allow_pickle=False) as npz:
            inside = np.linalg.norm(npz["vol_points"], axis=1) < 0.9
            assert (npz["vol_sdf"][inside] < 0).all()
    assert rows["a" * 64]["inverted"] == "False" and rows["b" * 64]["inverted"] == "True"


def test_object_seed_depends_on_seed_and_key_only():
    assert object_seed(0, "abc") == object_seed(0, "abc")
    assert len({object_seed(0, "abc"), object_seed(1, "abc"), object_seed(0, "abd")}) == 3
    assert 0 <= object_seed(123, "k") < 2**64


def test_an_input_remade_under_the_same_key_is_sampled_again(tmp_path):
    """watertight keeps an object's key when it remakes its mesh (another resolution): sample must
    see the new file, not skip the object because its params did not change."""
    src = tmp_path / "meshes"
    src.mkdir()
    (src / "box.obj").write_text(obj_text(CUBE_VERTICES * [1.0, 2.0, 0.5], CUBE_FACES))
    sphere_v, sphere_f = icosphere(2)
    trimesh.Trimesh(sphere_v, sphere_f, process=False).export(src / "ball.ply")
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    watertight, dst = tmp_path / "watertight", tmp_path / "samples"

    def remesh(resolution: int) -> None:
        argv = [
            "--params",
            str(params),
            "watertight",
            str(src),
            str(watertight),
            "--workers",
            "1",
            "--resolution",
            str(resolution),
        ]
        assert cli.main(argv) == 0

    remesh(24)
    assert sample(watertight, dst, params) == 0
    first = {key: row["input_sha256"] for key, row in manifest_rows(dst).items()}
    stamps = {p.name: p.stat().st_mtime_ns for p in (dst / "objects").iterdir()}
    remesh(32)
    assert sample(watertight, dst, params) == 0
    second = {key: row["input_sha256"] for key, row in manifest_rows(dst).items()}
    assert first.keys() == second.keys() and all(first[k] != second[k] for k in first)
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in (dst / "objects").iterdir())
