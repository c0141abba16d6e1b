"""Tests of the built-in procedural dataset: determinism, geometry of clean objects, recorded defects."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import trimesh
from trimesh.ray.ray_triangle import RayMeshIntersector

from shapeflow.data import builtin
from shapeflow.data.builtin import (
    CATEGORIES,
    DEFECTS,
    OFFSET_RANGE,
    QUANTUM,
    SCALE_RANGE,
    apply_defects,
    export_bytes,
    generate_builtin,
    make_shape,
    quantise,
)

NORMALISED_LONGEST = 1.9  # longest side after the pipeline's normalisation
MIN_NORMALISED_THICKNESS = 0.03  # two voxels of a 128^3 grid over [-1, 1]^3


@pytest.fixture(scope="module")
def clean_objects() -> list[builtin.BuiltinObject]:
    return list(generate_builtin(per_category=3, defect_share=0.0, seed=11))


@pytest.fixture(scope="module")
def mixed_objects() -> list[builtin.BuiltinObject]:
    return list(generate_builtin(per_category=6, defect_share=0.5, seed=5))


def processed(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The mesh as a consumer that welds coincident vertices sees it."""
    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)


def pieces(mesh: trimesh.Trimesh) -> list[trimesh.Trimesh]:
    return list(processed(mesh).split(only_watertight=False))


def has_duplicate_rows(faces: np.ndarray) -> bool:
    return len(np.unique(np.sort(faces, axis=1), axis=0)) < len(faces)


def zero_area_count(mesh: trimesh.Trimesh) -> int:
    extent = float(np.ptp(mesh.vertices, axis=0).max())
    return int((mesh.area_faces <= 1e-12 * extent**2).sum())


def load_ply(data: bytes) -> trimesh.Trimesh:
    return trimesh.load(io.BytesIO(data), file_type="ply", process=False)


def inward_ray_lengths(part: trimesh.Trimesh, count: int = 256) -> np.ndarray:
    """Length of the ray from surface points along the inward normal to where it leaves the part."""
    points, face = trimesh.sample.sample_surface(part, count, seed=0)
    inward = -part.face_normals[face]
    origins = points + 1e-7 * inward  # just inside, so the face the ray starts on is not hit again
    hits, ray, hit_face = RayMeshIntersector(part).intersects_location(origins, inward, multiple_hits=True)
    distance = np.where(hit_face != face[ray], np.linalg.norm(hits - points[ray], axis=1), np.inf)
    first = np.full(count, np.inf)
    np.minimum.at(first, ray, distance)
    return first


# ---------------------------------------------------------------------------------------------
# The dataset as a whole
# ---------------------------------------------------------------------------------------------


def test_categories_are_distinct_and_enough() -> None:
    assert len(CATEGORIES) >= 8
    assert len(set(CATEGORIES)) == len(CATEGORIES)


def test_every_category_produced_with_unique_names(clean_objects) -> None:
    assert [o.category for o in clean_objects] == [c for c in CATEGORIES for _ in range(3)]
    names = [o.name for o in clean_objects]
    assert len(set(names)) == len(names)
    assert names[:2] == [f"{CATEGORIES[0]}-0000", f"{CATEGORIES[0]}-0001"]


def test_same_seed_gives_same_bytes_and_other_seed_differs() -> None:
    first = [(o.name, o.defects, export_bytes(o.mesh)) for o in generate_builtin(2, 0.5, seed=7)]
    again = [(o.name, o.defects, export_bytes(o.mesh)) for o in generate_builtin(2, 0.5, seed=7)]
    other = [export_bytes(o.mesh) for o in generate_builtin(2, 0.5, seed=8)]
    assert first == again
    assert all(a[2] != b for a, b in zip(first, other, strict=True))


def test_keys_are_unique(mixed_objects) -> None:
    keys = {hashlib.sha256(export_bytes(o.mesh)).hexdigest() for o in mixed_objects}
    assert len(keys) == len(mixed_objects)


def test_growing_the_dataset_keeps_earlier_objects() -> None:
    small = {o.name: (o.defects, export_bytes(o.mesh)) for o in generate_builtin(2, 0.3, seed=3)}
    large = {o.name: (o.defects, export_bytes(o.mesh)) for o in generate_builtin(4, 0.3, seed=3)}
    assert len(large) == 2 * len(small)
    assert all(large[name] == value for name, value in small.items())


@pytest.mark.parametrize("per_category, share", [(5, 0.0), (5, 0.3), (5, 0.5), (4, 0.25), (3, 1.0)])
def test_defect_share_is_respected(per_category: int, share: float) -> None:
    objects = list(generate_builtin(per_category, share, seed=2))
    for category in CATEGORIES:
        damaged = sum(bool(o.defects) for o in objects if o.category == category)
        # the nearest whole number to per_category * share (either one when it is a half)
        assert abs(damaged - per_category * share) <= 0.5, (category, damaged)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_category": -1, "defect_share": 0.3, "seed": 0},
        {"per_category": 2, "defect_share": 1.5, "seed": 0},
        {"per_category": 2, "defect_share": 0.3, "seed": -4},
        {"per_category": 2.5, "defect_share": 0.3, "seed": 0},
    ],
)
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="builtin"):
        next(generate_builtin(**kwargs))


def test_unknown_category_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown category 'sofa'"):
        make_shape("sofa", np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Clean objects
# ---------------------------------------------------------------------------------------------


def test_clean_parts_are_closed_and_outward(clean_objects) -> None:
    for obj in clean_objects:
        assert obj.defects == ()
        parts = pieces(obj.mesh)
        assert len(parts) >= 1
        for part in parts:
            assert part.is_watertight, obj.name
            assert part.is_winding_consistent, obj.name
            assert part.volume > 0, obj.name


def test_clean_objects_have_no_duplicate_or_degenerate_faces(clean_objects) -> None:
    for obj in clean_objects:
        assert not has_duplicate_rows(obj.mesh.faces), obj.name
        assert zero_area_count(obj.mesh) == 0, obj.name


def test_multi_part_families_keep_parts_separate(clean_objects) -> None:
    """Parts overlap but are not merged: a mug is a cup and a handle, a chair has legs."""
    counts = {o.category: len(pieces(o.mesh)) for o in clean_objects}
    assert counts["mug"] == 2
    assert counts["chair"] >= 6
    assert counts["lamp"] >= 4


def test_face_counts_within_bounds(clean_objects, mixed_objects) -> None:
    for obj in clean_objects:
        assert 300 <= len(obj.mesh.faces) <= 20_000, (obj.name, len(obj.mesh.faces))
    for obj in mixed_objects:
        assert 250 <= len(obj.mesh.faces) <= 24_000, (obj.name, len(obj.mesh.faces))


def test_objects_are_not_normalised(clean_objects) -> None:
    longest = np.array([np.ptp(o.mesh.vertices, axis=0).max() for o in clean_objects])
    centres = np.array([o.mesh.bounds.mean(axis=0) for o in clean_objects])
    assert np.all((longest >= SCALE_RANGE[0] - 1e-9) & (longest <= SCALE_RANGE[1] + 1e-9))
    assert np.all((centres >= OFFSET_RANGE[0]) & (centres <= OFFSET_RANGE[1]))
    assert np.ptp(longest) > 0.5  # sizes really vary
    assert np.ptp(centres, axis=0).min() > 0.5  # and so do positions, on every axis
    assert np.linalg.norm(centres, axis=1).min() > 1e-3


def test_y_is_up(clean_objects) -> None:
    """Tall, narrow families are tallest along Y, as Objaverse (glTF) assets are."""
    for obj in clean_objects:
        if obj.category in ("vase", "bottle", "lamp"):
            extents = np.ptp(obj.mesh.vertices, axis=0)
            assert extents[1] == extents.max(), obj.name


def test_parts_are_thick_enough_after_normalisation(clean_objects) -> None:
    """Every part survives a 128^3 grid: its thickness (inward ray length) is at least two voxels.

    The 2nd percentile over the part's surface is used instead of the minimum because a ray started
    right at a convex corner leaves the part through the neighbouring face after any short distance.
    """
    for obj in clean_objects[::3]:  # one object per category keeps the test fast
        scale = NORMALISED_LONGEST / float(np.ptp(obj.mesh.vertices, axis=0).max())
        for part in pieces(obj.mesh):
            thickness = np.percentile(inward_ray_lengths(part), 2) * scale
            assert thickness >= MIN_NORMALISED_THICKNESS, (obj.name, thickness)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def test_export_round_trips_the_quantised_arrays(mixed_objects) -> None:
    for obj in [o for o in mixed_objects if o.defects][:6] + mixed_objects[:2]:
        data = export_bytes(obj.mesh)
        assert data.startswith(b"ply\nformat binary_little_endian 1.0\n")
        loaded = load_ply(data)
        np.testing.assert_array_equal(loaded.vertices, quantise(obj.mesh.vertices))
        assert np.abs(loaded.vertices - obj.mesh.vertices).max() <= QUANTUM / 2
        np.testing.assert_array_equal(loaded.faces, obj.mesh.faces)


def test_export_bytes_do_not_depend_on_the_last_bits_of_the_float_maths(mixed_objects) -> None:
    # Another CPU or maths library may give each coordinate an ulp or two more or less: the object's
    # bytes, so its key and its split, stay the same.
    rng = np.random.default_rng(0)
    for obj in mixed_objects[:8]:
        v = np.asarray(obj.mesh.vertices)
        nudged = v + rng.integers(-2, 3, size=v.shape) * np.spacing(v)
        assert not np.array_equal(nudged, v)
        other = trimesh.Trimesh(nudged, obj.mesh.faces, process=False)
        assert export_bytes(other) == export_bytes(obj.mesh)


def test_export_keeps_defects_as_generated() -> None:
    clean = make_shape("shelf", np.random.default_rng(1))
    names = ["duplicate_faces", "degenerate_faces"]
    damaged, _ = apply_defects(clean, np.random.default_rng(2), names=names)
    loaded = load_ply(export_bytes(damaged))
    assert has_duplicate_rows(loaded.faces)
    assert zero_area_count(loaded) > 0
    assert len(loaded.vertices) == len(damaged.vertices)


# ---------------------------------------------------------------------------------------------
# Defects, one at a time
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=[("mug", 0), ("chair", 1), ("ring", 2), ("shelf", 3)], ids=lambda p: p[0])
def clean_mesh(request) -> trimesh.Trimesh:
    category, seed = request.param
    return make_shape(category, np.random.default_rng(seed))


def damage(mesh: trimesh.Trimesh, name: str, seed: int = 0) -> trimesh.Trimesh:
    damaged, applied = apply_defects(mesh, np.random.default_rng(seed), names=[name])
    assert applied == (name,)
    return damaged


def test_apply_defects_leaves_its_input_alone(clean_mesh) -> None:
    vertices, faces = clean_mesh.vertices.copy(), clean_mesh.faces.copy()
    apply_defects(clean_mesh, np.random.default_rng(0), names=list(DEFECTS))
    np.testing.assert_array_equal(clean_mesh.vertices, vertices)
    np.testing.assert_array_equal(clean_mesh.faces, faces)


def test_unknown_defect_is_refused(clean_mesh) -> None:
    with pytest.raises(ValueError, match="unknown defect"):
        apply_defects(clean_mesh, np.random.default_rng(0), names=["melted"])


def test_holes_open_the_mesh(clean_mesh) -> None:
    damaged = damage(clean_mesh, "holes")
    assert len(damaged.faces) < len(clean_mesh.faces)
    clean_rows = {tuple(f) for f in clean_mesh.faces}
    assert all(tuple(f) in clean_rows for f in damaged.faces)
    assert not processed(damaged).is_watertight


def test_flipped_faces_break_winding(clean_mesh) -> None:
    damaged = damage(clean_mesh, "flipped_faces")
    assert len(damaged.faces) == len(clean_mesh.faces)
    reversed_rows = (damaged.faces != clean_mesh.faces).any(axis=1)
    assert reversed_rows.any()
    np.testing.assert_array_equal(damaged.faces[reversed_rows], clean_mesh.faces[reversed_rows][:, ::-1])
    assert not processed(damaged).is_winding_consistent


def test_duplicate_faces_repeat_rows(clean_mesh) -> None:
    damaged = damage(clean_mesh, "duplicate_faces")
    assert len(damaged.faces) > len(clean_mesh.faces)
    assert has_duplicate_rows(damaged.faces)


def test_degenerate_faces_have_zero_area(clean_mesh) -> None:
    damaged = damage(clean_mesh, "degenerate_faces")
    assert zero_area_count(damaged) == len(damaged.faces) - len(clean_mesh.faces) > 0


@pytest.mark.parametrize("seed", range(4))  # both ways of separating (crack and loose part) come up
def test_separate_pieces_add_connected_pieces(clean_mesh, seed: int) -> None:
    damaged = damage(clean_mesh, "separate_pieces", seed)
    assert len(damaged.faces) >= len(clean_mesh.faces)
    assert len(pieces(damaged)) > len(pieces(clean_mesh))


def test_overlapping_part_is_closed_and_cuts_the_surface(clean_mesh) -> None:
    damaged = damage(clean_mesh, "overlapping_parts")
    added = damaged.faces[len(clean_mesh.faces) :]
    extra = processed(trimesh.Trimesh(damaged.vertices, added, process=False))
    np.testing.assert_array_equal(damaged.faces[: len(clean_mesh.faces)], clean_mesh.faces)
    assert extra.is_watertight and extra.is_winding_consistent and extra.volume > 0
    assert len(pieces(damaged)) == len(pieces(clean_mesh)) + 1
    _, distance, _ = trimesh.proximity.closest_point(clean_mesh, [extra.center_mass])
    assert distance[0] < 0.5 * extra.extents.min()  # its centre is on the surface: it pokes through


# ---------------------------------------------------------------------------------------------
# Defects as generated
# ---------------------------------------------------------------------------------------------


def test_generated_defects_are_really_there(mixed_objects) -> None:
    seen: set[str] = set()
    for obj in [o for o in mixed_objects if o.defects]:
        index = int(obj.name.rsplit("-", 1)[1])
        clean = make_shape(obj.category, builtin._object_rng(5, obj.category, index))
        assert set(obj.defects) <= set(DEFECTS) and len(obj.defects) == len(set(obj.defects))
        seen.update(obj.defects)
        mesh = processed(obj.mesh)
        if "holes" in obj.defects:
            assert not mesh.is_watertight, obj.name
        if "flipped_faces" in obj.defects:
            assert not mesh.is_winding_consistent, obj.name
        if "duplicate_faces" in obj.defects:
            assert has_duplicate_rows(obj.mesh.faces), obj.name
        if "degenerate_faces" in obj.defects:
            assert zero_area_count(obj.mesh) > 0, obj.name
        if {"separate_pieces", "overlapping_parts"} & set(obj.defects):
            assert len(mesh.split(only_watertight=False)) > len(pieces(clean)), obj.name
    assert seen == set(DEFECTS)  # 24 damaged objects draw every kind of defect
