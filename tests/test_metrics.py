"""Shape and generation metrics against answers known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from shapeflow.metrics import (
    chamfer_distance,
    coverage,
    fscore,
    generation_metrics,
    mmd,
    normal_consistency,
    one_nna,
    pairwise_chamfer,
    point_metrics,
    surface_metrics,
    volume_iou,
)


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """n directions uniform on the unit sphere."""
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def plane_patch(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniform points on the unit square in the plane z = 0."""
    return np.column_stack([rng.uniform(0, 1, size=(n, 2)), np.zeros(n)])


def grid(spacing: float, per_side: int) -> np.ndarray:
    """A square grid of points in the plane z = 0."""
    u = np.arange(per_side) * spacing
    x, y = np.meshgrid(u, u, indexing="ij")
    return np.column_stack([x.ravel(), y.ravel(), np.zeros(x.size)])


def box_sdf(points: np.ndarray, centre: np.ndarray, half: float) -> np.ndarray:
    """Analytic signed distance to an axis-aligned cube."""
    q = np.abs(points - centre) - half
    return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)


def ellipsoids(rng: np.random.Generator, count: int, n: int = 256) -> list[np.ndarray]:
    """Clouds on ellipsoids whose semi-axes are drawn uniformly from [0.3, 0.9], all from one distribution."""
    return [unit_vectors(rng, n) * rng.uniform(0.3, 0.9, size=3) for _ in range(count)]


def spheres(rng: np.random.Generator, count: int, n: int) -> list[np.ndarray]:
    return [unit_vectors(rng, n) * rng.uniform(0.4, 0.6) for _ in range(count)]


def cubes(rng: np.random.Generator, count: int, n: int) -> list[np.ndarray]:
    """Clouds on cube surfaces of half side in [0.4, 0.6]: uniform in the cube, one coordinate pushed to a face."""
    clouds = []
    for _ in range(count):
        p = rng.uniform(-1, 1, size=(n, 3))
        p[np.arange(n), rng.integers(0, 3, n)] = rng.choice([-1.0, 1.0], n)
        clouds.append(p * rng.uniform(0.4, 0.6))
    return clouds


def pairwise_nna(gen: list[np.ndarray], ref: list[np.ndarray]) -> float:
    return one_nna(pairwise_chamfer(gen), pairwise_chamfer(ref), pairwise_chamfer(gen, ref))


# Chamfer distance and F-score


def test_chamfer_of_identical_clouds_is_zero():
    points = np.random.default_rng(0).normal(size=(1000, 3))
    assert chamfer_distance(points, points.copy()) == 0.0


def test_fscore_of_identical_clouds_is_one():
    points = np.random.default_rng(0).normal(size=(1000, 3))
    assert fscore(points, points.copy(), tau=1e-6) == 1.0


def test_chamfer_of_a_translated_copy_is_at_most_the_shift():
    rng = np.random.default_rng(1)
    points = 0.5 * unit_vectors(rng, 20_000)
    shift = 0.02 * unit_vectors(rng, 1)[0]
    cd = chamfer_distance(points, points + shift)
    assert 0.0 < cd <= 0.02 + 1e-12


def test_chamfer_of_a_plane_patch_shifted_along_its_normal_is_the_shift():
    points = plane_patch(np.random.default_rng(2), 20_000)
    assert chamfer_distance(points, points + [0.0, 0.0, 0.03]) == pytest.approx(0.03, rel=1e-9)


def test_fscore_of_a_shifted_sparse_grid_is_one_above_the_shift_and_zero_well_below():
    points = grid(spacing=0.1, per_side=20)
    shifted = points + 0.02 * np.array([0.6, 0.0, 0.8])  # |shift| = 0.02, far under the spacing
    assert fscore(points, shifted, tau=0.025) == 1.0
    assert fscore(points, shifted, tau=0.005) == 0.0


def test_chamfer_of_concentric_spheres_is_the_radius_difference():
    rng = np.random.default_rng(3)
    directions = unit_vectors(rng, 30_000)
    cd = chamfer_distance(0.5 * directions[:15_000], 0.6 * directions[15_000:])
    assert cd == pytest.approx(0.1, rel=0.03)


def test_chamfer_of_concentric_spheres_is_never_below_the_radius_difference():
    rng = np.random.default_rng(4)
    cd = chamfer_distance(0.3 * unit_vectors(rng, 5000), 0.75 * unit_vectors(rng, 5000))
    assert cd >= 0.45 - 1e-9


# Volume IoU


def test_volume_iou_of_identical_fields_is_one():
    sdf = np.random.default_rng(5).normal(size=10_000)
    assert volume_iou(sdf, sdf.copy()) == 1.0


def test_volume_iou_of_cubes_overlapping_by_half_is_a_third():
    points = np.random.default_rng(6).uniform(-1, 1, size=(200_000, 3))
    a = box_sdf(points, np.array([-0.25, 0.0, 0.0]), 0.5)
    b = box_sdf(points, np.array([0.25, 0.0, 0.0]), 0.5)  # intersection 1/2, union 3/2 of a unit cube
    assert volume_iou(a, b) == pytest.approx(1 / 3, abs=0.01)


def test_volume_iou_of_complementary_fields_is_zero():
    points = np.random.default_rng(7).uniform(-1, 1, size=(10_000, 3))
    sdf = np.linalg.norm(points, axis=1) - 0.6
    assert volume_iou(sdf, -sdf) == 0.0


def test_volume_iou_of_two_empty_insides_is_one():
    assert volume_iou(np.ones(100), np.full(100, 0.5)) == 1.0


def test_volume_iou_rejects_fields_of_different_shapes():
    with pytest.raises(ValueError, match=r"\(10,\).*\(11,\)"):
        volume_iou(np.zeros(10), np.zeros(11))


# Normal consistency


def test_normal_consistency_of_identical_clouds_is_one():
    rng = np.random.default_rng(8)
    points, normals = rng.normal(size=(5000, 3)), unit_vectors(rng, 5000)
    assert normal_consistency(points, normals, points, normals) == pytest.approx(1.0)


def test_normal_consistency_ignores_orientation():
    rng = np.random.default_rng(9)
    points, normals = rng.normal(size=(5000, 3)), unit_vectors(rng, 5000)
    assert normal_consistency(points, normals, points, -normals) == pytest.approx(1.0)


def test_normal_consistency_normalises_the_normals():
    rng = np.random.default_rng(10)
    points, normals = rng.normal(size=(5000, 3)), unit_vectors(rng, 5000)
    lengths = rng.uniform(0.1, 10.0, size=(5000, 1))
    assert normal_consistency(points, normals * lengths, points, normals) == pytest.approx(1.0)


def test_normal_consistency_counts_a_zero_normal_as_zero():
    points = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    normals = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert normal_consistency(points, normals, points, normals) == 0.5


def test_normal_consistency_is_the_absolute_cosine_to_the_nearest_point():
    points = plane_patch(np.random.default_rng(11), 2000)
    up = np.tile([0.0, 0.0, 1.0], (2000, 1))
    tilted = np.tile([np.sin(np.pi / 3), 0.0, np.cos(np.pi / 3)], (2000, 1))  # 60 degrees from up
    assert normal_consistency(points, up, points + [0.0, 0.0, 0.01], tilted) == pytest.approx(0.5)


def test_normal_consistency_of_random_normals_is_a_half():
    rng = np.random.default_rng(12)
    points = rng.normal(size=(20_000, 3))
    value = normal_consistency(points, unit_vectors(rng, 20_000), points, unit_vectors(rng, 20_000))
    assert value == pytest.approx(0.5, abs=0.02)  # |cos| of independent uniform directions is uniform on [0, 1]


# Pairwise Chamfer, MMD, COV, 1-NNA


def test_surface_metrics_of_an_empty_mesh_are_zero_f_and_nan_distance():
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
    ref = 0.5 * unit_vectors(np.random.default_rng(0), 100)
    metrics = surface_metrics(empty, ref)
    assert metrics["f@0.01"] == metrics["f@0.02"] == 0.0 and np.isnan(metrics["cd"]) and "nc" not in metrics
    assert np.isnan(surface_metrics(empty, ref, reference_normals=ref)["nc"])


def test_surface_metrics_drop_when_the_surface_is_off():
    ref = 0.5 * unit_vectors(np.random.default_rng(0), 100_000)
    on = surface_metrics(trimesh.creation.icosphere(subdivisions=4, radius=0.5), ref, reference_normals=ref)
    assert on["f@0.02"] > 0.99 and on["cd"] < 0.012 and on["nc"] > 0.99
    shrunk = surface_metrics(trimesh.creation.icosphere(subdivisions=4, radius=0.45), ref)
    assert 0.045 < shrunk["cd"] < 0.06 and shrunk["f@0.02"] < 0.05


def test_point_metrics_score_normals_only_when_both_sides_have_them():
    rng = np.random.default_rng(0)
    points = unit_vectors(rng, 2000)
    assert set(point_metrics(points, points)) == {"cd", "f@0.01", "f@0.02"}
    scores = point_metrics(points, points, points, points)
    assert scores["cd"] == 0.0 and scores["f@0.01"] == 1.0 and scores["nc"] == pytest.approx(1.0)


def test_pairwise_chamfer_matches_chamfer_distance():
    rng = np.random.default_rng(13)
    a = [rng.normal(size=(n, 3)) for n in (50, 80, 120)]
    b = [rng.normal(size=(n, 3)) for n in (60, 90)]
    d = pairwise_chamfer(a, b)
    assert d.shape == (3, 2)
    expected = [[chamfer_distance(x, y) for y in b] for x in a]
    np.testing.assert_allclose(d, expected, rtol=1e-12)


def test_pairwise_chamfer_against_itself_is_symmetric_with_zero_diagonal():
    rng = np.random.default_rng(14)
    a = [rng.normal(size=(n, 3)) for n in (50, 80, 120, 70)]
    d = pairwise_chamfer(a)
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    np.testing.assert_allclose(d[0, 2], chamfer_distance(a[0], a[2]), rtol=1e-12)
    assert (d[~np.eye(4, dtype=bool)] > 0).all()


# Every generated cloud (row) is nearest to reference 0, while each reference has a different nearest row.
D_GEN_REF = np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.8], [0.15, 0.4, 0.7]])


def test_mmd_takes_the_min_over_generated_rows_for_each_reference_column():
    assert mmd(D_GEN_REF) == pytest.approx((0.1 + 0.3 + 0.7) / 3)


def test_coverage_counts_references_that_are_some_generated_clouds_nearest():
    assert coverage(D_GEN_REF) == pytest.approx(1 / 3)


def test_generated_set_equal_to_reference_has_zero_mmd_and_full_coverage():
    clouds = ellipsoids(np.random.default_rng(15), 6, n=128)
    d = pairwise_chamfer(clouds, [c.copy() for c in clouds])
    assert mmd(d) == 0.0
    assert coverage(d) == 1.0


def test_generated_clouds_all_equal_to_one_reference_cover_one_over_r():
    ref = ellipsoids(np.random.default_rng(16), 5, n=128)
    gen = [ref[2].copy() for _ in range(4)]
    assert coverage(pairwise_chamfer(gen, ref)) == pytest.approx(1 / 5)


def test_one_nna_of_well_separated_sets_is_one():
    within = np.array([[0.0, 0.1], [0.1, 0.0]])
    assert one_nna(within, within, np.ones((2, 2))) == 1.0


def test_one_nna_counts_ties_as_misclassified():
    within = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert one_nna(within, within, np.ones((2, 2))) == 0.0


def test_one_nna_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="d_gr"):
        one_nna(np.zeros((2, 2)), np.zeros((3, 3)), np.zeros((2, 2)))


def test_one_nna_of_two_samples_of_one_distribution_is_about_a_half():
    rng = np.random.default_rng(0)
    assert pairwise_nna(ellipsoids(rng, 40), ellipsoids(rng, 40)) == pytest.approx(0.5, abs=0.15)


def test_one_nna_of_spheres_against_cubes_is_near_one():
    rng = np.random.default_rng(17)
    assert pairwise_nna(spheres(rng, 20, 128), cubes(rng, 20, 128)) >= 0.95


def test_one_nna_of_copies_of_the_reference_is_zero():
    ref = ellipsoids(np.random.default_rng(18), 10, n=128)
    assert pairwise_nna([c.copy() for c in ref], ref) == 0.0


# generation_metrics


def test_generation_metrics_of_copies():
    ref = ellipsoids(np.random.default_rng(19), 6, n=128)
    assert generation_metrics([c.copy() for c in ref], ref) == {"mmd_cd": 0.0, "cov_cd": 1.0, "1nna_cd": 0.0}


@pytest.mark.parametrize("gen_count, ref_count", [(0, 3), (3, 0)])
def test_generation_metrics_rejects_an_empty_set(gen_count, ref_count):
    clouds = ellipsoids(np.random.default_rng(20), 3, n=64)
    with pytest.raises(ValueError, match="at least one cloud"):
        generation_metrics(clouds[:gen_count], clouds[:ref_count])


def test_generation_metrics_without_a_second_generated_cloud_leaves_1nna_nan():
    rng = np.random.default_rng(21)
    ref = ellipsoids(rng, 3, n=64)
    metrics = generation_metrics([ref[1].copy()], ref)
    assert np.isnan(metrics["1nna_cd"])
    assert metrics["mmd_cd"] == pytest.approx(mmd(pairwise_chamfer([ref[1]], ref)))
    assert metrics["cov_cd"] == pytest.approx(1 / 3)
