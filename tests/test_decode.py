"""Decoding a signed-distance field to a mesh."""

from __future__ import annotations

import numpy as np
import torch

from shapeflow.geometry.decode import decode_grid, decode_mesh
from shapeflow.metrics import surface_metrics


def sphere(q: torch.Tensor) -> torch.Tensor:
    return q.norm(dim=-1) - 0.5


def thin_box(q: torch.Tensor) -> torch.Tensor:
    half = torch.tensor([0.6, 0.04, 0.3])
    return (q.abs() - half).max(dim=-1).values


def sphere_points(n: int, seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).normal(size=(n, 3))
    return 0.5 * p / np.linalg.norm(p, axis=1, keepdims=True)


def test_sphere_decodes_to_a_closed_outward_mesh_on_the_surface():
    mesh = decode_mesh(sphere, 64)
    assert mesh.is_watertight
    assert mesh.volume > 0  # outward faces
    assert abs(mesh.volume - 4 / 3 * np.pi * 0.125) < 0.01
    metrics = surface_metrics(mesh, sphere_points(100_000))
    assert metrics["f@0.02"] > 0.99 and metrics["cd"] < 0.012


def test_coarse_to_fine_matches_the_dense_grid_where_the_sign_matters():
    dense_axis = torch.linspace(-1, 1, 65)
    grid = torch.stack(torch.meshgrid(dense_axis, dense_axis, dense_axis, indexing="ij"), -1)
    dense = thin_box(grid.reshape(-1, 3)).reshape(65, 65, 65).numpy()
    fine = decode_grid(thin_box, 64)
    assert np.array_equal(fine < 0, dense < 0)
    near = np.abs(dense) < 0.1
    assert np.allclose(fine[near], dense[near], atol=1e-6)


def test_a_field_without_a_surface_gives_an_empty_mesh():
    mesh = decode_mesh(lambda q: q.norm(dim=-1) + 1.0, 32)
    assert len(mesh.faces) == 0 and len(mesh.vertices) == 0
