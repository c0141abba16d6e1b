"""Surface, salient-edge and supervision sampling, and the signed distance behind it."""

from __future__ import annotations

import igl
import numpy as np
import pytest
import trimesh

from shapeflow.config import SampleParams
from shapeflow.geometry import sdf
from shapeflow.geometry.sampling import (
    edge_candidates,
    farthest_points,
    sample_object,
    sample_sharp,
    sample_surface,
    sharp_edge_table,
)

HALF = np.array([0.75, 0.5, 0.25])  # half extents of the test box


def box() -> trimesh.Trimesh:
    return trimesh.creation.box(extents=2 * HALF)


def ball(radius: float = 0.8, subdivisions: int = 4) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


def box_sdf(points: np.ndarray, half: np.ndarray = HALF) -> np.ndarray:
    """Analytic signed distance to an axis-aligned box centred at the origin."""
    q = np.abs(points) - half
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + inside


def sharp_edges(mesh: trimesh.Trimesh, angle_deg: float) -> np.ndarray:
    """End points of the sharp edges, (E, 2, 3)."""
    return mesh.vertices[sharp_edge_table(mesh, angle_deg)[0]]


def distance_to_segments(points: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Distance from each point to the nearest of the segments (E, 2, 3)."""
    a, b = segments[:, 0], segments[:, 1]  # (E, 3)
    ab = b - a
    t = np.einsum("pei,ei->pe", points[:, None] - a[None], ab) / (ab * ab).sum(1)
    t = np.clip(t, 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]  # (P, E, 3)
    return np.linalg.norm(points[:, None] - closest, axis=2).min(axis=1)


SMALL = SampleParams(
    surface=2000, sharp=500, volume=3000, near=1500, near_scales=(0.005, 0.02), sharp_near=800, sharp_near_scale=0.005
)


# ------------------------------------------------------------------------------------------- sdf


def test_box_signed_distance_is_exact_with_negative_inside():
    mesh = box()
    pts = np.random.default_rng(0).uniform(-1, 1, size=(5000, 3))
    got = sdf.signed_distance(mesh.vertices, mesh.faces, pts, backend="cpu")
    np.testing.assert_allclose(got, box_sdf(pts), atol=1e-9)
    inside = np.all(np.abs(pts) < HALF, axis=1)
    assert inside.any() and (~inside).any()
    assert np.all(got[inside] < 0) and np.all(got[~inside] > 0)


def test_unsigned_distance_is_the_magnitude():
    mesh = box()
    pts = np.random.default_rng(1).uniform(-1, 1, size=(2000, 3))
    got = sdf.unsigned_distance(mesh.vertices, mesh.faces, pts, backend="cpu")
    np.testing.assert_allclose(got, np.abs(box_sdf(pts)), atol=1e-9)


def test_sphere_signed_distance_matches_the_analytic_one():
    radius = 0.8
    mesh = ball(radius)
    pts = np.random.default_rng(2).uniform(-1, 1, size=(5000, 3))
    got = sdf.signed_distance(mesh.vertices, mesh.faces, pts, backend="cpu")
    # The icosphere lies inside the true sphere by at most its sagitta.
    sagitta = radius - np.linalg.norm(mesh.triangles_center, axis=1).min()
    np.testing.assert_allclose(got, np.linalg.norm(pts, axis=1) - radius, atol=sagitta + 1e-9)
    r = np.linalg.norm(pts, axis=1)
    assert np.all(got[r < radius - sagitta] < 0) and np.all(got[r > radius] > 0)


def test_sign_follows_the_winding_number_where_a_closed_mesh_overlaps_itself():
    # Two overlapping cubes in one mesh. Just left of x = 0 a point is inside cube a, yet its nearest
    # face is cube b's side x = 0, which faces away from it: a sign from the nearest face (libigl's
    # pseudo-normal) calls it outside; the winding number (1 there) calls it inside.
    a = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b.apply_translation((0.5, 0.0, 0.0))
    both = trimesh.util.concatenate([a, b])
    pts = np.array([[-0.05, 0.0, 0.0], [-0.1, 0.2, 0.1], [0.25, 0.0, 0.0], [2.0, 0.0, 0.0], [-0.7, 0.0, 0.0]])
    got = sdf.signed_distance(both.vertices, both.faces, pts, backend="cpu")
    np.testing.assert_allclose(got, [-0.05, -0.1, -0.25, 1.0, 0.2], atol=1e-12)


def test_points_behind_a_face_interior_are_decided_inside_and_no_others():
    mesh = box()
    V, F = np.asarray(mesh.vertices, float), np.asarray(mesh.faces, np.int64)
    pts = np.array(
        [
            [0.3, 0.3, 0.2],  # inside, nearest point inside a triangle of the top side
            [0.7, 0.1, -0.15],  # inside, nearest point inside a triangle of the +x side
            [0.3, 0.3, 0.3],  # outside, in front of the top side
            [0.8, 0.6, 0.0],  # outside, nearest point on an edge of the box
            [0.0, 0.0, 0.2],  # inside, but nearest the diagonal between a side's two triangles
        ]
    )
    sq, face, closest = igl.point_mesh_squared_distance(pts, V, F)
    decided = sdf.behind_nearest_face(V, F, pts, face, closest)
    np.testing.assert_array_equal(decided, [True, True, False, False, False])
    # Wherever it decides, it agrees with the winding number, on a mesh that overlaps itself too.
    two = trimesh.util.concatenate([mesh, mesh.copy().apply_translation((0.4, 0.2, 0.1))])
    V2, F2 = np.asarray(two.vertices, float), np.asarray(two.faces, np.int64)
    many = np.random.default_rng(4).uniform(-1, 1, size=(4000, 3))
    sq, face, closest = igl.point_mesh_squared_distance(many, V2, F2)
    decided = sdf.behind_nearest_face(V2, F2, many, face, closest)
    inside = igl.fast_winding_number(V2, F2, many) > 0.5
    assert decided.sum() > 100 and not (decided & ~inside).any()


def test_inputs_are_checked():
    mesh = box()
    with pytest.raises(ValueError, match="points"):
        sdf.signed_distance(mesh.vertices, mesh.faces, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="faces"):
        sdf.signed_distance(mesh.vertices, mesh.faces + 100, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="backend"):
        sdf.signed_distance(mesh.vertices, mesh.faces, np.zeros((4, 3)), backend="gpu")
    assert sdf.signed_distance(mesh.vertices, mesh.faces, np.zeros((0, 3))).shape == (0,)


@pytest.mark.skipif(sdf.cuda_available(), reason="a CUDA device with cubvh is present")
def test_cuda_backend_without_a_gpu_says_what_is_missing():
    mesh = box()
    with pytest.raises(RuntimeError, match="cubvh"):
        sdf.signed_distance(mesh.vertices, mesh.faces, np.zeros((4, 3)), backend="cuda")


@pytest.mark.skipif(not sdf.cuda_available(), reason="needs torch with a CUDA device and cubvh")
def test_cuda_backend_agrees_with_the_cpu():
    mesh = ball(0.8, 3)
    pts = np.random.default_rng(3).uniform(-1, 1, size=(20000, 3))
    cpu = sdf.signed_distance(mesh.vertices, mesh.faces, pts, backend="cpu")
    gpu = sdf.signed_distance(mesh.vertices, mesh.faces, pts, backend="cuda")
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)


# --------------------------------------------------------------------------------------- surface


def test_surface_points_lie_on_the_surface_with_their_face_normals():
    pts, normals = sample_surface(box(), 4000, np.random.default_rng(0))
    assert pts.shape == normals.shape == (4000, 3)
    assert pts.dtype == normals.dtype == np.float32
    np.testing.assert_allclose(box_sdf(pts.astype(np.float64)), 0.0, atol=1e-6)
    # On a box each normal is the axis of the side the point lies on.
    axis = np.abs(normals).argmax(axis=1)
    np.testing.assert_allclose(np.abs(pts[np.arange(4000), axis]), HALF[axis], atol=1e-6)
    np.testing.assert_allclose(np.sign(pts[np.arange(4000), axis]), np.sign(normals[np.arange(4000), axis]))


def test_surface_points_are_uniform_by_area():
    pts, normals = sample_surface(box(), 40_000, np.random.default_rng(1))
    axis = np.abs(normals).argmax(axis=1)
    side_area = np.array([HALF[1] * HALF[2], HALF[0] * HALF[2], HALF[0] * HALF[1]])  # per axis
    share = np.bincount(axis, minlength=3) / len(axis)
    np.testing.assert_allclose(share, side_area / side_area.sum(), atol=0.01)


# ------------------------------------------------------------------------------------ salient edges


def test_box_has_twelve_sharp_edges_at_ninety_degrees():
    mesh = box()
    segments = sharp_edges(mesh, 30.0)
    assert segments.shape == (12, 2, 3)
    np.testing.assert_allclose(np.abs(segments), np.broadcast_to(HALF, segments.shape))  # corner to corner
    lengths = np.sort(np.linalg.norm(segments[:, 1] - segments[:, 0], axis=1))
    np.testing.assert_allclose(lengths, np.repeat(np.sort(2 * HALF), 4))
    assert len(sharp_edges(mesh, 89.0)) == 12
    assert len(sharp_edges(mesh, 91.0)) == 0  # the dihedral angle is 90 degrees exactly


def test_sphere_has_no_sharp_edges():
    assert sharp_edges(ball(), 30.0).shape == (0, 2, 3)


def test_edge_normal_is_the_mean_of_its_two_face_normals():
    mesh = box()
    edges, normals = sharp_edge_table(mesh, 30.0)
    mid = mesh.vertices[edges].mean(axis=1)  # (12, 3) edge midpoints
    expected = np.where(np.isclose(np.abs(mid), HALF), np.sign(mid), 0.0) / np.sqrt(2.0)
    np.testing.assert_allclose(normals, expected, atol=1e-12)


def test_candidates_are_spread_along_edges_in_proportion_to_length():
    mesh = box()
    edges, normals = sharp_edge_table(mesh, 30.0)
    pts, _ = edge_candidates(mesh.vertices, edges, normals, budget=1200)
    assert len(pts) >= 8 + 1200 - 12  # the corners, plus the budget less one rounding per edge
    segments = mesh.vertices[edges]
    np.testing.assert_allclose(distance_to_segments(pts, segments), 0.0, atol=1e-12)
    # Points per edge direction follow the total length of the edges along it.
    interior = pts[8:]
    along = np.argmin(np.isclose(np.abs(interior), HALF).astype(int), axis=1)  # the free coordinate
    share = np.bincount(along, minlength=3) / len(interior)
    np.testing.assert_allclose(share, HALF / HALF.sum(), atol=0.01)


def test_sharp_points_lie_on_the_edges_of_a_box():
    mesh = box()
    pts, normals, is_edge, n_edges = sample_sharp(mesh, 600, 30.0, np.random.default_rng(0))
    assert pts.shape == normals.shape == (600, 3) and is_edge.shape == (600,)
    assert pts.dtype == normals.dtype == np.float32 and is_edge.dtype == bool
    assert n_edges == 12 and is_edge.all()
    assert distance_to_segments(pts.astype(np.float64), sharp_edges(mesh, 30.0)).max() < 1e-6
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-6)
    # Farthest point sampling covers every edge.
    dist = distance_to_segments(mesh.vertices[np.unique(sharp_edge_table(mesh, 30.0)[0])], sharp_edges(mesh, 30.0))
    assert dist.max() < 1e-12
    per_edge = np.array(
        [(distance_to_segments(pts.astype(np.float64), seg[None]) < 1e-6).sum() for seg in sharp_edges(mesh, 30.0)]
    )
    assert per_edge.min() >= 10


def test_a_sphere_fills_its_salient_points_from_the_surface():
    radius = 0.8
    pts, normals, is_edge, n_edges = sample_sharp(ball(radius), 300, 30.0, np.random.default_rng(0))
    assert pts.shape == (300, 3) and n_edges == 0 and not is_edge.any()
    assert np.all(np.abs(np.linalg.norm(pts, axis=1) - radius) < 0.01)


def test_farthest_points_do_not_use_the_global_generator():
    pts = np.random.default_rng(5).uniform(size=(3000, 3))
    np.random.seed(1)
    a = farthest_points(pts, 200, np.random.default_rng(7))
    np.random.seed(2)
    b = farthest_points(pts, 200, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 200
    small = farthest_points(pts[:20], 5, np.random.default_rng(7))  # below one kd-tree bucket
    assert len(np.unique(small)) == 5
    with pytest.raises(ValueError, match="farthest point"):
        farthest_points(pts[:10], 11, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------- object


def test_sample_object_shapes_and_dtypes():
    out = sample_object(box(), SMALL, seed=0)
    n_near = SMALL.near * len(SMALL.near_scales)
    expected = {
        "surface_points": (SMALL.surface, 3),
        "surface_normals": (SMALL.surface, 3),
        "sharp_points": (SMALL.sharp, 3),
        "sharp_normals": (SMALL.sharp, 3),
        "sharp_is_edge": (SMALL.sharp,),
        "vol_points": (SMALL.volume, 3),
        "vol_sdf": (SMALL.volume,),
        "near_points": (n_near, 3),
        "near_sdf": (n_near,),
        "near_scale": (n_near,),
        "sharp_near_points": (SMALL.sharp_near, 3),
        "sharp_near_sdf": (SMALL.sharp_near,),
        "n_sharp_edges": (),
    }
    assert {k: v.shape for k, v in out.items()} == expected
    for key in expected:
        if key.endswith(("points", "normals", "sdf")):
            assert out[key].dtype == np.float32, key
    assert out["near_scale"].dtype == np.int8 and out["sharp_is_edge"].dtype == bool
    assert int(out["n_sharp_edges"]) == 12


def test_sample_object_is_deterministic_for_a_seed():
    mesh = box()
    a, b, c = sample_object(mesh, SMALL, 3), sample_object(mesh, SMALL, 3), sample_object(mesh, SMALL, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["surface_points"], c["surface_points"])
    assert not np.array_equal(a["vol_points"], c["vol_points"])


def test_supervision_distances_are_those_of_the_stored_points():
    out = sample_object(box(), SMALL, seed=1)
    for name in ("vol", "near", "sharp_near"):
        pts = out[f"{name}_points"].astype(np.float64)
        np.testing.assert_allclose(out[f"{name}_sdf"], box_sdf(pts), atol=1e-6)
    vol = out["vol_points"]
    assert vol.min() >= -1.0 and vol.max() <= 1.0
    inside_share = (out["vol_sdf"] < 0).mean()
    assert inside_share == pytest.approx(np.prod(HALF), abs=0.03)  # box volume / 8


def test_near_surface_noise_scales_are_respected():
    # A big box: near its flat sides the distance of a jittered point is |N(0, s)| along the normal,
    # whose mean is s * sqrt(2 / pi).
    params = SampleParams(
        surface=10, sharp=10, volume=10, near=6000, near_scales=(0.004, 0.03), sharp_near=6000, sharp_near_scale=0.01
    )
    big = trimesh.creation.box(extents=(1.8, 1.8, 1.8))
    out = sample_object(big, params, seed=0)
    for index, scale in enumerate(params.near_scales):
        block = out["near_scale"] == index
        assert block.sum() == params.near
        mean_abs = np.abs(out["near_sdf"][block]).mean()
        assert mean_abs == pytest.approx(scale * np.sqrt(2 / np.pi), rel=0.1)
    # Near an edge the distance to the edge line is the length of a 2-D Gaussian: mean s*sqrt(pi/2).
    on_edge = distance_to_segments(out["sharp_near_points"].astype(np.float64)[:2000], sharp_edges(big, 30.0))
    assert on_edge.mean() == pytest.approx(params.sharp_near_scale * np.sqrt(np.pi / 2), rel=0.1)


def test_no_salient_points_asked_for_falls_back_to_the_surface():
    params = SampleParams(surface=500, sharp=0, volume=10, near=10, sharp_near=200)
    out = sample_object(ball(), params, seed=0)
    assert out["sharp_points"].shape == (0, 3) and out["sharp_near_points"].shape == (200, 3)
    assert np.abs(out["sharp_near_sdf"]).max() < 0.05
