"""The grid family's data: coarse truncated grids and near-surface cells, computed coarse to fine,
equal the dense computation; the sample stage writes them only for the grid family."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trimesh

from shapeflow import config
from shapeflow.dataset import load_arrays
from shapeflow.geometry import grids
from shapeflow.geometry.sampling import sample_grids
from shapeflow.stages import sample


def sphere(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points, axis=1) - 0.55


def thin_plate(points: np.ndarray) -> np.ndarray:
    """A plate 0.04 thick: under two cells of the 64^3 grid (0.031 each)."""
    d = np.abs(points) - np.array([0.7, 0.5, 0.02])
    return np.linalg.norm(np.maximum(d, 0), axis=1) + np.minimum(d.max(axis=1), 0)


class Counted:
    def __init__(self, fn):
        self.fn, self.queries = fn, 0

    def __call__(self, points: np.ndarray) -> np.ndarray:
        self.queries += len(points)
        return self.fn(points).astype(np.float32)


@pytest.mark.parametrize("shape", [sphere, thin_plate])
def test_the_coarse_to_fine_grid_is_the_dense_grid_clipped_at_a_fraction_of_the_queries(shape):
    counted = Counted(shape)
    grid = grids.truncated_grid(counted, 64, 0.1)
    dense = np.clip(shape(grids.cell_centres(64)), -0.1, 0.1).reshape(64, 64, 64)
    np.testing.assert_allclose(grid, dense, atol=1e-6)
    assert (grid < 0).any() and (grid > 0).any()
    assert counted.queries < 0.5 * 64**3


@pytest.mark.parametrize("shape", [sphere, thin_plate])
def test_near_surface_cells_are_exactly_the_fine_cells_within_the_band(shape):
    grid = grids.truncated_grid(shape, 32, 0.1)
    band = 2 * 2.0 / 128
    index, values = grids.surface_cells(shape, grid, 128, band)
    dense = shape(grids.cell_centres(128))
    expected = np.argwhere((np.abs(dense) < band).reshape(128, 128, 128))
    np.testing.assert_array_equal(index, expected)  # C order, the same set
    np.testing.assert_allclose(values, dense.reshape(128, 128, 128)[tuple(index.T)], atol=1e-6)


def test_resolutions_that_are_not_powers_of_two_apart_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        grids.truncated_grid(sphere, 48, 0.1)
    grid = grids.truncated_grid(sphere, 32, 0.1)
    with pytest.raises(ValueError, match="sparse resolution 96"):
        grids.surface_cells(sphere, grid, 96, 0.03)


def test_grid_params_are_checked():
    with pytest.raises(config.ParamsError, match=r"sample\.grid\.sparse_resolution"):
        config._build(config.Params, {"sample": {"grid": {"resolution": 64, "sparse_resolution": 96}}}, "")
    with pytest.raises(config.ParamsError, match=r"sample\.grid\.truncation"):
        config._build(config.Params, {"sample": {"grid": {"truncation": 0}}}, "")
    with pytest.raises(config.ParamsError, match=r"train_vae\.family"):
        config._build(config.Params, {"train_vae": {"family": "voxel"}}, "")


def test_sample_grids_of_a_mesh_are_compact_and_agree_with_its_points():
    mesh = trimesh.creation.box(extents=(1.2, 0.8, 0.4))
    arrays = sample_grids(mesh, config.GridSampleParams(resolution=32, sparse_resolution=64))
    assert arrays["grid_sdf"].dtype == np.float16 and arrays["grid_sdf"].shape == (32, 32, 32)
    assert arrays["sparse_index"].dtype == np.uint16 and arrays["sparse_sdf"].dtype == np.float16
    centres = grids.cell_centres(64, arrays["sparse_index"].astype(np.int64))
    inside = np.all(np.abs(centres) < [0.6, 0.4, 0.2], axis=1)
    assert ((arrays["sparse_sdf"] < 0) == inside).all()
    assert np.abs(arrays["sparse_sdf"]).max() < 2 * 2 / 64


def write_mesh_folder(root, n=2):
    root.mkdir()
    for i in range(n):
        trimesh.creation.icosphere(subdivisions=2, radius=0.3 + 0.1 * i).export(root / f"ball{i}.ply")
    return root


def small_params(family: str, **grid) -> config.Params:
    base = config.Params()
    small = dataclasses.replace(
        base.sample, surface=256, sharp=0, volume=256, near=128, sharp_near=0,
        grid=config.GridSampleParams(resolution=32, sparse_resolution=64, **grid),
    )  # fmt: skip
    return dataclasses.replace(
        base,
        sample=small,
        train_vae=dataclasses.replace(base.train_vae, family=family),
        compute=dataclasses.replace(base.compute, workers=1),
    )


def test_the_sample_stage_writes_grids_only_for_the_grid_family(tmp_path):
    src = write_mesh_folder(tmp_path / "meshes")
    records = sample.run(small_params("vecset"), src, tmp_path / "points")
    arrays = load_arrays(tmp_path / "points" / records[0]["path"])
    assert "grid_sdf" not in arrays
    # The grid settings do not touch a VecSet run's outputs.
    assert sample.params_hash(small_params("vecset")) == sample.params_hash(small_params("vecset", band_cells=1.0))
    records = sample.run(small_params("grid"), src, tmp_path / "grids")
    assert all(r["status"] == "ok" for r in records)
    arrays = load_arrays(tmp_path / "grids" / records[0]["path"])
    assert arrays["grid_sdf"].shape == (32, 32, 32) and len(arrays["sparse_index"]) > 0
    assert sample.params_hash(small_params("grid")) != sample.params_hash(small_params("grid", band_cells=1.0))
