"""Decoding a signed-distance field to a mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shapeflow.geometry.decode import crossed_corners, decode_grid, decode_mesh, grid_to_mesh
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


@pytest.mark.parametrize("resolution", [32, 40])  # 40: blocks padded past the grid
def test_a_shape_that_reaches_the_box_is_capped_there_and_closed(resolution):
    # A slab through the whole box (inside |z| < 0.3 everywhere on the box's sides): marching cubes
    # alone would leave it open where it meets the box; the mesh is closed at the box's faces.
    mesh = decode_mesh(lambda q: q[:, 2].abs() - 0.3, resolution)
    assert mesh.is_watertight and mesh.volume > 0
    assert abs(mesh.volume - 2.0 * 2.0 * 0.6) < 0.05
    assert np.abs(mesh.vertices).max() <= 1.0 + 1e-6


def test_a_surface_on_the_grid_planes_between_marching_blocks_is_meshed_and_closed():
    # A cube whose faces lie on the grid planes 16 and 48 of 64, where marching-cubes blocks meet:
    # whole planes of exact zeros, which PyMCubes counts as inside.
    values = dense_grid(lambda q: (q.abs() - 0.5).max(dim=-1).values, 64)
    assert (values == 0).sum() > 6 * 31**2
    mesh = grid_to_mesh(values)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert abs(mesh.volume - 1.0) < 1e-6


def thin_plate(q: torch.Tensor) -> torch.Tensor:  # 0.008 thick: under one cell even at 128^3
    half = torch.tensor([0.6, 0.004, 0.3])
    return (q.abs() - half).max(dim=-1).values


def thin_rod(q: torch.Tensor) -> torch.Tensor:  # radius 0.003 along x
    return torch.maximum(q[:, 1:].norm(dim=-1) - 0.003, q[:, 0].abs() - 0.7)


def dense_grid(field, resolution: int) -> np.ndarray:
    axis = torch.linspace(-1, 1, resolution + 1)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    return field(grid.reshape(-1, 3)).reshape((resolution + 1,) * 3).numpy()


@pytest.mark.parametrize("field", [thin_box, thin_plate, thin_rod, sphere], ids=lambda f: f.__name__)
@pytest.mark.parametrize("resolution", [64, 128])
def test_hierarchical_decoding_gives_the_dense_grid_mesh_for_a_distance_field(field, resolution):
    dense = dense_grid(field, resolution)
    fine = decode_grid(field, resolution)
    crossed = crossed_corners(dense)
    assert crossed.any()
    # Where the dense surface is, the values are the field's own; everywhere the sign agrees.
    assert np.allclose(fine[crossed], dense[crossed], atol=1e-6)
    assert np.array_equal(fine < 0, dense < 0)
    ours, reference = grid_to_mesh(fine), grid_to_mesh(dense)
    assert ours.is_watertight
    assert np.allclose(np.sort(ours.vertices, axis=0), np.sort(reference.vertices, axis=0), atol=1e-6)
    assert len(ours.faces) == len(reference.faces)


def test_field_queries_grow_with_the_surface_not_the_volume():
    queries = {}
    for resolution in (64, 128, 256):
        count = [0]

        def counted(q: torch.Tensor, count=count) -> torch.Tensor:
            count[0] += len(q)
            return sphere(q)

        decode_grid(counted, resolution)
        queries[resolution] = count[0]
    # Doubling R multiplies a dense grid's queries by 8 and a surface band's by 4.
    assert queries[256] / queries[128] < 4.5 and queries[128] / queries[64] < 4.5
    assert queries[256] < 0.05 * 257**3


def test_a_resolution_that_is_not_base_times_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="resolution 96 is not base 64"):
        decode_grid(sphere, 96, base=64)


def test_a_thin_part_between_the_coarse_grid_points_is_found_when_the_margin_covers_the_slope():
    # A plate 0.008 thick around y = 1/64: it holds grid points of the 128^3 grid only (odd indices),
    # none of the coarser levels. Its field is scaled down 4x: slope 1/4.
    def shallow(q: torch.Tensor) -> torch.Tensor:
        half = torch.tensor([0.6, 0.004, 0.3])
        return 0.25 * ((q - torch.tensor([0.0, 1 / 64, 0.0])).abs() - half).max(dim=-1).values

    dense = dense_grid(shallow, 128)
    crossed = crossed_corners(dense)
    assert crossed.any()
    assert np.array_equal(decode_grid(shallow, 128, slope=0.25)[crossed] < 0, dense[crossed] < 0)
    # A margin for a slope far below the field's skips the plate at the coarse levels.
    missed = decode_grid(shallow, 128, slope=0.02)
    assert (missed > 0).all() and len(grid_to_mesh(missed).faces) == 0


def test_the_cover_test_only_skips_cells_the_balls_about_their_corners_fill():
    from shapeflow.geometry.decode import _CORNERS, _covered

    # Radii around the scale where the test decides (half a diagonal is 0.87 of the width).
    radii = torch.rand(3000, 8, generator=torch.Generator().manual_seed(0)) * 1.4
    covered = _covered(radii, 1.0)
    assert 0 < covered.sum() < len(radii)
    points = torch.rand(4000, 3, generator=torch.Generator().manual_seed(1))
    reach = torch.cdist(points, torch.tensor(_CORNERS, dtype=torch.float32))  # (P, 8)
    inside_some_ball = (reach[None] < radii[covered][:, None, :]).any(2)  # (covered cells, P)
    assert inside_some_ball.all()  # no point of a covered cell outside every ball: no surface there


def test_cells_beside_a_plane_that_the_corner_balls_cover_are_not_split():
    # A plane through the middle of a layer of 128^3 cells: the layers beside it have corners half a
    # cell from it, inside the margin, but their far corners' balls (1.5 cells) cover their near
    # halves, so one refinement to 256^3 splits the crossed layer alone.
    queries = []

    def plane(q: torch.Tensor) -> torch.Tensor:
        queries.append(len(q))
        return q[:, 2] - (-1 + 64.5 * 2 / 128)

    values = decode_grid(plane, 256, base=128)
    layer = 257 * 257 * 3 - 129 * 129 * 2  # the layer's fine grid points, less the coarse ones it holds
    assert sum(queries) == 129**3 + layer
    inside = torch.linspace(-1, 1, 257) < -1 + 64.5 * 2 / 128
    assert np.array_equal(values < 0, np.broadcast_to(inside.numpy(), values.shape))
    # The margin alone splits the layers beside it too.
    queries.clear()
    decode_grid(plane, 256, base=128, cover=False)
    assert sum(queries) > 129**3 + 2 * layer


def test_the_last_level_probes_exactly_the_new_points_outside_the_corner_balls():
    from shapeflow.geometry.decode import _CORNERS, NEAREST_REACH, _uncovered_points

    radii = torch.rand(2000, 8, generator=torch.Generator().manual_seed(2)) * 1.2
    uncovered = _uncovered_points(radii, 2.0)  # cells 2 wide: the new points sit at 0, 1 or 2
    new = [(i, j, k) for i in range(3) for j in range(3) for k in range(3) if 1 in (i, j, k)]
    reach = torch.cdist(torch.tensor(new, dtype=torch.float32), 2.0 * torch.tensor(_CORNERS, dtype=torch.float32))
    nearest = reach <= reach.amin(1, keepdim=True) + 1e-6
    near_surface = ((radii[:, None, :] <= NEAREST_REACH * reach[None]) & nearest[None]).any(2)
    assert torch.equal(uncovered, ~(reach[None] < radii[:, None, :]).any(2) | near_surface)
    assert (near_surface & (reach[None] < radii[:, None, :]).any(2)).any()  # probed though covered
    assert 0 < uncovered.sum() < uncovered.numel()


def test_a_plate_between_the_grid_points_of_the_level_before_the_last_is_found_by_probing():
    # A plate 0.004 thick around y = 1/128: grid points of 256^3 hold it (odd indices), none of
    # 128^3. The cells of 128^3 around it have corners 0.0058 away, under the margin but with balls
    # that miss the middle of their faces; probing those points finds the plate and splits the cells.
    queries = []

    def plate(q: torch.Tensor) -> torch.Tensor:
        queries.append(len(q))
        half = torch.tensor([0.6, 0.002, 0.3])
        return ((q - torch.tensor([0.0, 1 / 128, 0.0])).abs() - half).max(dim=-1).values

    values = decode_grid(plate, 256, base=128)
    probed = sum(queries)
    dense = dense_grid(plate, 256)
    crossed = crossed_corners(dense)
    assert crossed.any() and np.array_equal(values < 0, dense < 0)
    assert np.array_equal(values[crossed], dense[crossed])
    assert grid_to_mesh(values).is_watertight
    # Splitting every cell under the margin asks more.
    queries.clear()
    decode_grid(plate, 256, base=128, cover=False)
    assert probed < sum(queries)


def test_query_chunks_follow_the_device(monkeypatch):
    from shapeflow.geometry import decode

    assert decode.default_chunk("cpu") == decode.CPU_CHUNK
    low, high = decode.GPU_CHUNK_BOUNDS
    for free, expected in ((1 << 20, low), (4 * decode.QUERY_BYTES * 100_000, 65536), (1 << 40, high)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert decode.default_chunk("cuda") == expected


def finned_ball(q: torch.Tensor) -> torch.Tensor:
    """A ball with a fin 0.008 thick around y = 1/64 (grid points of 128^3 only) reaching out to
    x = 0.9, as four times a distance: slope 4."""
    ball = q.norm(dim=-1) - 0.4
    fin = ((q - torch.tensor([0.6, 1 / 64, 0.0])).abs() - torch.tensor([0.3, 0.004, 0.2])).max(dim=-1).values
    return 4 * torch.minimum(ball, fin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("field", [thin_rod, finned_ball], ids=lambda f: f.__name__)  # finned_ball: surface following
def test_decoding_on_the_gpu_gives_the_cpu_mesh(field):
    cpu = decode_grid(field, 128)
    gpu = decode_grid(lambda q: field(q.cpu()).to(q.device), 128, device="cuda")
    assert np.array_equal(cpu < 0, gpu < 0)
    assert len(grid_to_mesh(gpu).faces) == len(grid_to_mesh(cpu).faces)


def test_following_the_surface_finds_a_part_steeper_than_the_margin_assumes():
    dense = dense_grid(finned_ball, 128)
    crossed = crossed_corners(dense)
    # The margin for slope 1 misses most of the fin where it leaves the ball ...
    unfollowed = decode_grid(finned_ball, 128, follow=False)
    assert ((unfollowed < 0) != (dense < 0))[crossed].sum() > 100
    # ... and following the crossed cells from the ball's surface finds all of it.
    followed = decode_grid(finned_ball, 128)
    assert np.array_equal(followed[crossed], dense[crossed])
    assert np.array_equal(followed < 0, dense < 0)
