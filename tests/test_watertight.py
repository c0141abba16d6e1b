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
    shell, _ = remesh(mesh, keep_closed_surface=False, winding=False)
    r_shell = 0.95 + 2.0 / R
    assert shell.volume == pytest.approx(mesh.volume * (r_shell / 0.95) ** 3, rel=0.03)


def test_inside_out_closed_input_is_turned_outward():
    mesh = sphere()
    flipped = trimesh.Trimesh(mesh.vertices, mesh.faces[:, ::-1], process=False)
    out, result = remesh(flipped)
    assert result.closed_parts == 1
    assert out.is_watertight and out.volume == pytest.approx(mesh.volume, rel=0.02)


def test_open_input_gets_the_eps_shell_within_eps_without_the_winding_rule():
    mesh = sphere()
    keep = mesh.triangles_center[:, 2] < 0.9  # cut a cap off: an open bowl
    bowl = trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)
    out, result = remesh(bowl, winding=False)
    assert result.open_parts == 1 and out.is_watertight and result.inside_rule == "shell"
    eps = 2.0 / R
    assert mesh_chamfer(bowl, out, n=100_000) <= eps + 2.0 / R
    assert out.volume < 0.2 * mesh.volume  # a double-walled shell


def floor_and_distance(mesh: trimesh.Trimesh, out: trimesh.Trimesh, n: int = 150_000) -> tuple[float, float]:
    """(the sampling floor: CD between two samplings of `mesh`; CD from `mesh` to `out`)."""
    return mesh_chamfer(mesh, mesh, n), mesh_chamfer(mesh, out, n)


def without_faces(mesh: trimesh.Trimesh, drop: np.ndarray) -> trimesh.Trimesh:
    return trimesh.Trimesh(mesh.vertices, mesh.faces[~drop], process=False)


@pytest.mark.parametrize("shape", ["box_without_lid", "sphere_without_cap"])
def test_wide_holes_are_capped_into_a_solid(shape):
    """A hole far wider than the band: the winding number of the rest makes the inside solid and
    caps the hole, instead of a thin double-walled shell."""
    if shape == "box_without_lid":
        solid = normalised(trimesh.creation.box(extents=(1.0, 0.8, 0.6)))
        holed = without_faces(solid, solid.triangles_center[:, 2] > 0.5)
    else:
        solid = sphere()
        holed = without_faces(solid, solid.triangles_center[:, 2] > 0.6)  # a cap 0.58 across
    out, result = remesh(holed)
    assert out.is_watertight and out.is_winding_consistent and result.components == 1
    assert result.inside_rule == "winding" and not result.sign_fallback
    assert out.volume >= 0.9 * solid.volume
    # The kept faces stay where they are: every input point is on the output surface.
    gap, _ = cKDTree(out.sample(50_000)).query(holed.sample(20_000))
    assert np.mean(gap) <= 1.0 / R


@pytest.mark.parametrize("cut", [0.6, 0.3, 0.0])
def test_a_sphere_cut_anywhere_is_capped_flat_across_the_cut(cut):
    """w is 1/2 on the disk across a spherical hole, so the capped solid is the sphere less the
    segment above the cut, however wide the hole (at 0.0 it is half the sphere)."""
    ball = sphere()
    holed = without_faces(ball, ball.triangles_center[:, 2] > cut)
    out, result = remesh(holed)
    assert out.is_watertight and result.inside_rule == "winding"
    r = 0.95
    segment = np.pi * (r - cut) ** 2 * (3 * r - (r - cut)) / 3
    assert out.volume == pytest.approx(4 / 3 * np.pi * r**3 - segment, rel=0.05)


def test_narrow_holes_sit_on_the_input_surface():
    """A scan with small gaps: the surface stays on the input, not eps outside it."""
    mesh = normalised(trimesh.creation.icosphere(subdivisions=4))
    rng = np.random.default_rng(3)
    holed = without_faces(mesh, np.isin(np.arange(len(mesh.faces)), rng.choice(len(mesh.faces), 30, replace=False)))
    out, result = remesh(holed)
    assert result.inside_rule == "winding" and out.is_watertight
    floor, distance = floor_and_distance(holed, out)
    assert distance <= floor + 1.0 / R
    assert out.volume == pytest.approx(mesh.volume, rel=0.02)


def sheets() -> dict[str, trimesh.Trimesh]:
    n = 16
    u, v = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    grid_faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    angle = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    rim = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=1)
    disk_v = np.concatenate([[[0.0, 0.0, 0.0]], rim])
    disk_f = np.stack([np.zeros(48, int), 1 + np.arange(48), 1 + (np.arange(48) + 1) % 48], axis=1)
    return {
        "flat_sheet": trimesh.Trimesh(np.stack([u.ravel(), v.ravel(), 0.3 * u.ravel()], 1), grid_faces),
        "flat_disk": trimesh.Trimesh(disk_v, disk_f),
        "wavy_sheet": trimesh.Trimesh(np.stack([u.ravel(), v.ravel(), 0.2 * np.sin(3 * u.ravel())], 1), grid_faces),
    }


@pytest.mark.parametrize("name", ["flat_sheet", "flat_disk", "wavy_sheet"])
def test_sheets_become_closed_slabs(name):
    mesh = normalised(sheets()[name])
    out, result = remesh(mesh)
    assert out.is_watertight and out.is_winding_consistent and out.volume > 0
    assert result.inside_rule == "shell"
    floor, distance = floor_and_distance(mesh, out)
    assert distance <= floor + 4.0 / R


def test_narrow_band_matches_the_dense_baseline_on_open_input():
    """Same field near the surface, so the same surface as the dense baseline with exact distances everywhere."""
    mesh = sphere()
    keep = np.abs(mesh.triangles_center[:, 0]) > 0.3  # two open caps facing each other
    caps = trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)
    ours, _ = remesh(caps, resolution=48, winding=False)

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


def test_self_intersecting_closed_part_is_sorted_out_by_the_winding_number():
    """A closed, consistently wound sphere whose top vertex is pulled down through the bottom: its
    pseudo-normal sign is wrong where the spike pokes out. Redone as open parts, the winding number
    drops the faces inside the body and keeps the outer surface."""
    sphere3 = trimesh.creation.icosphere(subdivisions=3)
    v = sphere3.vertices.copy()
    v[np.argmax(v[:, 2])] = (0.0, 0.0, -1.6)
    mesh = normalised(trimesh.Trimesh(v, sphere3.faces, process=False))
    out, result = remesh(mesh)
    assert result.sign_fallback and result.closed_parts == 0 and "winding" in result.inside_rule
    assert out.is_watertight and result.components == 1
    assert out.volume > 0.9 * (4 / 3) * np.pi * (0.95 * 2 / 2.6) ** 3  # solid, not a shell
    # The outer surface is where the input's is, not eps = 2/R outside it.
    d2, _, _ = igl.point_mesh_squared_distance(out.sample(20_000), mesh.vertices, mesh.faces)
    assert np.median(np.sqrt(d2)) <= 0.25 / R


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


def test_closed_part_thinner_than_the_grid_becomes_a_slab():
    paper = normalised(trimesh.creation.box(extents=(1.0, 1.0, 1e-4)))
    out, result = remesh(paper, resolution=32)
    assert out.is_watertight and result.inside_rule == "shell"
    assert np.ptp(out.vertices[:, 2]) == pytest.approx(2 * 2.0 / 32, rel=0.3)


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
