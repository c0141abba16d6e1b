"""The watertight remesher on small grids: closedness, where the surface lands, parts kept."""

from __future__ import annotations

import igl
import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from shapeflow.geometry.sampling import sample_surface
from shapeflow.geometry.watertight import WatertightError, dense_baseline, find_parts, grid_step, watertight
from shapeflow.metrics import chamfer_distance

R = 64


def mesh_chamfer(mesh_a: trimesh.Trimesh, mesh_b: trimesh.Trimesh, n: int) -> float:
    """Chamfer distance between two surfaces, `n` uniform points on each."""
    rng = np.random.default_rng(0)
    return chamfer_distance(sample_surface(mesh_a, n, rng)[0], sample_surface(mesh_b, n, rng)[0])


def normalised(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    v = mesh.vertices - mesh.bounds.mean(axis=0)
    return trimesh.Trimesh(v * (1.9 / np.ptp(v, axis=0).max()), mesh.faces, process=False)


def remesh(mesh: trimesh.Trimesh, resolution: int = R, **kw) -> tuple[trimesh.Trimesh, object]:
    result = watertight(mesh.vertices, mesh.faces, resolution=resolution, **kw)
    out = trimesh.Trimesh(result.vertices, result.faces)  # process=True, as a user would load it
    return out, result


def sphere() -> trimesh.Trimesh:
    return normalised(trimesh.creation.icosphere(subdivisions=4))


def test_closed_input_keeps_its_surface_and_the_eps_shell_does_not():
    mesh = sphere()
    out, result = remesh(mesh)
    assert out.is_watertight and out.is_winding_consistent and out.volume > 0
    assert result.closed_parts == 1 and result.open_parts == 0 and not result.sign_fallback
    assert mesh_chamfer(mesh, out, n=100_000) <= 1.0 / R
    assert out.volume == pytest.approx(mesh.volume, rel=0.02)
    # The eps shell grows the surface by eps = 2/R all round: its volume shows it.
    shell, _ = remesh(mesh, keep_closed_surface=False)
    r_shell = 0.95 + 2.0 / R
    assert shell.volume == pytest.approx(mesh.volume * (r_shell / 0.95) ** 3, rel=0.03)


def test_inside_out_closed_input_is_turned_outward():
    mesh = sphere()
    flipped = trimesh.Trimesh(mesh.vertices, mesh.faces[:, ::-1], process=False)
    out, result = remesh(flipped)
    assert result.closed_parts == 1
    assert out.is_watertight and out.volume == pytest.approx(mesh.volume, rel=0.02)


def test_open_input_gets_the_eps_shell_within_eps():
    mesh = sphere()
    keep = mesh.triangles_center[:, 2] < 0.9  # cut a cap off: an open bowl
    bowl = trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)
    out, result = remesh(bowl)
    assert result.open_parts == 1 and out.is_watertight
    eps = 2.0 / R
    assert mesh_chamfer(bowl, out, n=100_000) <= eps + 2.0 / R


def test_narrow_band_matches_the_dense_baseline_on_open_input():
    """Same field near the surface, so the same surface as the dense baseline with exact distances everywhere."""
    mesh = sphere()
    keep = np.abs(mesh.triangles_center[:, 0]) > 0.3  # two open caps facing each other
    caps = trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)
    ours, _ = remesh(caps, resolution=48)

    def exact_udf(points):
        d2, _, _ = igl.point_mesh_squared_distance(points, caps.vertices, caps.faces)
        return np.sqrt(d2)

    v, f = dense_baseline(caps.vertices, caps.faces, 48, exact_udf)
    dense = trimesh.Trimesh(v, f)
    assert ours.is_watertight and dense.is_watertight
    assert len(ours.faces) == len(dense.faces)
    assert ours.volume == pytest.approx(dense.volume, rel=1e-4)
    gap, _ = cKDTree(dense.vertices).query(ours.vertices)
    assert gap.max() < 1e-3 * grid_step(48)


def test_self_intersecting_closed_part_falls_back_to_the_eps_shell():
    """A closed, consistently wound sphere whose top vertex is pulled down through the bottom: its
    pseudo-normal sign is wrong where the spike pokes out, which must not leave a hollow result."""
    sphere3 = trimesh.creation.icosphere(subdivisions=3)
    v = sphere3.vertices.copy()
    v[np.argmax(v[:, 2])] = (0.0, 0.0, -1.6)
    mesh = normalised(trimesh.Trimesh(v, sphere3.faces, process=False))
    out, result = remesh(mesh)
    assert result.sign_fallback and result.closed_parts == 0
    assert out.is_watertight and result.components == 1
    assert out.volume > 0.9 * (4 / 3) * np.pi * (0.95 * 2 / 2.6) ** 3  # solid, not a shell


def test_small_hole_is_sealed_and_interior_is_solid():
    mesh = sphere()
    hole = np.argmax(mesh.triangles_center[:, 2])  # one small triangle, narrower than eps
    holed = trimesh.Trimesh(mesh.vertices, np.delete(mesh.faces, hole, axis=0), process=False)
    out, result = remesh(holed)
    assert result.open_parts == 1 and out.is_watertight
    assert result.components == 1  # solid: no inner wall
    assert out.volume > 0.95 * mesh.volume


def test_overlapping_closed_parts_become_their_union():
    a = trimesh.creation.box(extents=(1.6, 0.6, 0.6))
    b = trimesh.creation.box(extents=(0.6, 1.6, 0.6))
    both = normalised(trimesh.util.concatenate([a, b]))
    out, result = remesh(both)
    assert result.closed_parts == 2 and result.components == 1
    union = 2 * 1.6 * 0.6 * 0.6 - 0.6**3
    scale = 1.9 / 1.6
    assert out.volume == pytest.approx(union * scale**3, rel=0.03)
    # No wall is left inside the union: every output vertex is on the union's boundary.
    inside_both = (np.abs(out.vertices) < 0.6 * scale / 2 - 2 * grid_step(R)).all(axis=1)
    assert not inside_both.any()


def test_every_separate_part_is_kept():
    big = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    small = trimesh.creation.icosphere(subdivisions=3, radius=0.25)
    small.apply_translation((2.2, 0, 0))
    wheel = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    wheel.apply_translation((-1.5, 0, 0))
    parts = normalised(trimesh.util.concatenate([big, small, wheel]))
    out, result = remesh(parts)
    assert result.components == 3
    assert len(out.split(only_watertight=True)) == 3


def test_mixed_closed_and_open_parts():
    solid = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    sheet = trimesh.Trimesh([[-1.5, -0.5, 0], [-0.7, -0.5, 0], [-0.7, 0.5, 0], [-1.5, 0.5, 0]], [[0, 1, 2], [0, 2, 3]])
    out, result = remesh(normalised(trimesh.util.concatenate([solid, sheet])))
    assert result.closed_parts == 1 and result.open_parts == 1
    assert out.is_watertight and result.components == 2


def test_thin_features_vanish_loudly_not_silently():
    flat = trimesh.creation.box(extents=(1.0, 1.0, 1e-4))
    mesh = normalised(flat)
    with pytest.raises(WatertightError, match="vanished|fragments"):
        watertight(mesh.vertices, mesh.faces, resolution=32)


def test_rejects_unnormalised_input():
    mesh = trimesh.creation.box(extents=(3, 3, 3))
    with pytest.raises(WatertightError, match="normalise"):
        watertight(mesh.vertices, mesh.faces, resolution=32)


def test_find_parts_flags_open_and_inconsistent_parts():
    box = trimesh.creation.box()
    faces = box.faces.copy()
    faces[0] = faces[0][::-1]  # one face against its neighbours
    parts = find_parts(box.vertices, faces)
    assert parts.n_open == 1 and parts.n_closed == 0
    assert find_parts(box.vertices, box.faces).n_closed == 1


@pytest.mark.slow
def test_resolution_512_runs_on_cpu():
    mesh = normalised(trimesh.creation.torus(major_radius=1.0, minor_radius=0.3))
    out, result = remesh(mesh, resolution=512)
    assert out.is_watertight and result.components == 1
    assert out.volume == pytest.approx(mesh.volume, rel=0.01)
