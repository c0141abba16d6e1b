"""Mesh loading, cleaning, normalisation and edge topology (shapeflow.geometry.mesh)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import urllib.parse
from pathlib import Path

import bad_inputs
import numpy as np
import pytest
import trimesh

from shapeflow.geometry.mesh import (
    MeshError,
    adjacent_half_edges,
    clean_mesh,
    decode_draco,
    decode_tristrips,
    edge_defects,
    gltf_to_glb,
    half_edges,
    load_clean,
    load_mesh,
    normalise,
    unpack_glb,
)

DATA = Path(__file__).parent / "data"
SHARED_MESHES = Path("/work/shared/meshes")
SHARED_DATASETS = Path("/work/shared/datasets")


def pieces(mesh: trimesh.Trimesh) -> int:
    """Number of face-connected pieces."""
    return len(trimesh.graph.connected_components(mesh.face_adjacency, nodes=np.arange(len(mesh.faces))))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return bad_inputs.make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    return bad_inputs.make_good_inputs(tmp_path_factory.mktemp("good"))


@pytest.mark.parametrize("case", sorted(bad_inputs.EXPECTED_REASON))
def test_bad_input_raises_mesh_error_naming_file_and_problem(bad, case):
    path = bad[case]
    with pytest.raises(MeshError) as info:
        load_clean(path)
    message = str(info.value)
    assert str(path) in message
    assert re.search(bad_inputs.EXPECTED_REASON[case], message, re.IGNORECASE), message


def test_missing_file_is_file_not_found_with_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.obj"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_mesh(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "mesh.fbx"
    path.write_bytes(b"Kaydara FBX Binary")
    with pytest.raises(MeshError, match="unsupported mesh format"):
        load_mesh(path)


@pytest.mark.parametrize("case", ["box", "icosphere", "tristrips", "scene", "external", "off_box"])
def test_good_closed_inputs_load_clean_and_closed(good, case):
    mesh = load_clean(good[case])
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # outward winding survives loading


def test_open_cylinder_loads_open(good):
    mesh = load_clean(good["open_cylinder"])
    assert len(mesh.faces) == 32 and not mesh.is_watertight


def test_decode_tristrips_restart_and_alternating_winding():
    strips = [np.array([0, 1, 2, 3, -1, 4, 5, 6, 7, 8]), np.array([9, 10, 11])]
    tris = decode_tristrips(strips)
    expected = [[0, 1, 2], [2, 1, 3], [4, 5, 6], [6, 5, 7], [6, 7, 8], [9, 10, 11]]
    np.testing.assert_array_equal(tris, expected)


def test_decode_tristrips_drops_stitching_triangles():
    # Repeating vertex 3 joins two strips without a restart; the triangles that repeat it are empty.
    tris = decode_tristrips([np.array([0, 1, 2, 3, 3, 4, 5, 6])])
    assert all(len(set(t)) == 3 for t in tris.tolist())
    assert [0, 1, 2] in tris.tolist() and [2, 1, 3] in tris.tolist()


def test_tristrips_ply_file_gives_closed_cube(tmp_path):
    path = tmp_path / "cube_strips.ply"
    path.write_bytes(bad_inputs.ply_tristrips_bytes(bad_inputs.CUBE_VERTICES, bad_inputs.cube_tristrips()))
    assert len(trimesh.load(path, process=False).vertices) == 8  # trimesh alone sees no faces here
    mesh = load_mesh(path)
    assert len(mesh.faces) == 12
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(1.0)


def test_glb_scene_flattens_with_node_transforms_and_drops_points(good):
    mesh = load_mesh(good["scene"])
    assert len(mesh.faces) == 24  # two cubes; the point primitive is gone
    np.testing.assert_allclose(mesh.bounds, [[3, 0, 0], [5, 2, 4]])
    assert mesh.volume == pytest.approx(1.0 + 8.0)  # the child node is scaled by 2
    assert pieces(mesh) == 2


def test_gltf_with_external_buffer_packs_to_equivalent_glb(good, tmp_path):
    glb = tmp_path / "packed.glb"
    glb.write_bytes(gltf_to_glb(good["external"]))
    a, b = load_mesh(good["external"]), load_mesh(glb)
    np.testing.assert_allclose(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.faces, b.faces)


def test_gltf_missing_buffer_is_mesh_error(good, tmp_path):
    lonely = tmp_path / "lonely.gltf"
    shutil.copy(good["external"], lonely)
    with pytest.raises(MeshError, match=r"external_data\.bin.*not found"):
        load_mesh(lonely)


def gltf_pointing_at(folder: Path, buffer_uri: str, image_uri: str | None = None) -> Path:
    """A copy of the good external .gltf in `folder` whose buffer (and optionally an image) URI is
    replaced; the real buffer stays beside it so only the URI decides."""
    good = bad_inputs.make_good_inputs(folder / "src")
    gltf = json.loads(good["external"].read_text())
    gltf["buffers"][0]["uri"] = buffer_uri
    if image_uri is not None:
        gltf["buffers"][0]["uri"] = "external_data.bin"
        gltf["images"] = [{"uri": image_uri}]
    path = folder / "src" / "attack.gltf"
    path.write_text(json.dumps(gltf))
    return path


@pytest.mark.parametrize(
    "uri",
    [
        "../secret/SECRET.bin",
        "..%2Fsecret%2FSECRET.bin",
        "%2E%2E/secret/SECRET.bin",
        "ABSOLUTE",
        "ABSOLUTE_ENCODED",
        "inside_link.bin",
    ],
)
@pytest.mark.parametrize("kind", ["buffer", "image"])
def test_gltf_uri_outside_its_folder_is_refused_naming_the_uri(tmp_path, uri, kind):
    """A .gltf must not pack files from elsewhere on the machine into the dataset."""
    secret = tmp_path / "secret" / "SECRET.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"top secret " * 200)
    if uri == "ABSOLUTE":
        uri = str(secret)
    elif uri == "ABSOLUTE_ENCODED":
        uri = urllib.parse.quote(str(secret), safe="")  # %2F...: absolute only once decoded
    path = gltf_pointing_at(tmp_path, *(("external_data.bin", uri) if kind == "image" else (uri,)))
    if uri == "inside_link.bin":
        (path.parent / "inside_link.bin").symlink_to(secret)
    with pytest.raises(MeshError, match=r"(leads outside|not a file path relative)") as info:
        gltf_to_glb(path)
    assert repr(uri) in str(info.value) and str(path) in str(info.value)


def test_gltf_uri_with_escapes_inside_its_folder_still_loads(tmp_path):
    path = gltf_pointing_at(tmp_path, "sub%20dir/../external_data.bin")
    (path.parent / "sub dir").mkdir()
    assert len(load_mesh(path).faces) == 24


def test_gltf_not_json_is_mesh_error(tmp_path):
    path = tmp_path / "broken.gltf"
    path.write_text('{"asset": {"version": "2.0"}, "buffers": [')
    with pytest.raises(MeshError, match="not valid JSON"):
        load_mesh(path)


def test_draco_glb_decodes_to_the_encoded_mesh_with_node_transforms(tmp_path):
    vertices, faces = bad_inputs.icosphere(2)
    path = tmp_path / "draco.glb"
    path.write_bytes(bad_inputs.draco_glb_bytes(vertices, faces, translation=(5.0, 0.0, -1.0), plain_cube=True))
    mesh = load_mesh(path)
    assert len(mesh.vertices) == len(vertices) + 8 and len(mesh.faces) == len(faces) + 12  # the sphere and a cube
    # The two meshes are appended in the scene's order; the sphere's vertices keep the encoded order.
    start = 8 if np.allclose(mesh.vertices[:8], bad_inputs.CUBE_VERTICES) else 0
    cube = np.r_[0:start, start + len(vertices) : len(mesh.vertices)]
    np.testing.assert_allclose(mesh.vertices[cube], bad_inputs.CUBE_VERTICES)
    sphere = mesh.vertices[start : start + len(vertices)]
    # Draco quantises positions to 14 bits over the box (side ~2): steps of ~1.2e-4.
    np.testing.assert_allclose(sphere, vertices * 2.0 + [5.0, 0.0, -1.0], atol=5e-4)
    sphere_faces = mesh.faces[(mesh.faces >= start).all(axis=1) & (mesh.faces < start + len(vertices)).all(axis=1)]
    np.testing.assert_array_equal(sphere_faces - start, faces)
    closed = clean_mesh(mesh, "draco")
    assert pieces(closed) == 2 and closed.is_watertight
    # What trimesh is given: plain accessors, the extension gone.
    gltf, _ = unpack_glb(path, decode_draco(path, path.read_bytes()))
    assert "extensionsUsed" not in gltf and "extensionsRequired" not in gltf
    assert all("extensions" not in p for m in gltf["meshes"] for p in m["primitives"])


def test_draco_glb_without_dracopy_is_a_mesh_error_naming_it(tmp_path, monkeypatch):
    vertices, faces = bad_inputs.icosphere(1)
    path = tmp_path / "draco.glb"
    path.write_bytes(bad_inputs.draco_glb_bytes(vertices, faces))
    monkeypatch.setitem(sys.modules, "DracoPy", None)  # import DracoPy now raises ImportError
    with pytest.raises(MeshError, match=r"Draco-compressed.*DracoPy .*not installed"):
        load_mesh(path)


def test_all_zero_vertices_are_refused_whatever_the_format(tmp_path):
    vertices, faces = bad_inputs.icosphere(1)
    path = tmp_path / "zeros.ply"
    path.write_bytes(bad_inputs._ascii_ply(vertices * 0.0 + [1.5, -2.0, 0.25], faces))
    with pytest.raises(MeshError, match=r"all 42 vertices are at the same point \(1\.5, -2\.0, 0\.25\)"):
        load_mesh(path)


@pytest.mark.skipif(
    not (SHARED_DATASETS / "draco").is_dir(), reason=f"{SHARED_DATASETS} (real datasets) is not on this machine"
)
def test_shared_draco_glb_matches_the_same_asset_as_obj():
    """A real Draco-compressed GLB against the uncompressed OBJ of the same Quaternius bush."""
    draco = load_mesh(SHARED_DATASETS / "draco" / "draco_bush.glb")
    plain = load_mesh(SHARED_DATASETS / "quaternius" / "bush" / "ultimate_space_pack__Bush_1.obj")
    np.testing.assert_allclose(draco.bounds, plain.bounds, atol=1e-4 * plain.extents.max())
    a, b = clean_mesh(draco, "draco"), clean_mesh(plain, "plain")
    assert (len(a.vertices), len(a.faces)) == (len(b.vertices), len(b.faces)) == (1146, 2300)
    assert a.area == pytest.approx(b.area, rel=1e-6)


def test_uv_seam_obj_welds_into_one_closed_piece():
    raw = load_mesh(DATA / "spot.obj")
    assert pieces(raw) > 1  # the UV seams split it as loaded
    mesh = clean_mesh(raw, "spot")
    assert pieces(mesh) == 1
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert len(mesh.faces) == len(raw.faces) == 5856


def test_seam_cube_welds(tmp_path):
    # Every side of the cube has its own four vertices, as an exporter writes per-side UVs.
    quads = bad_inputs.CUBE_QUADS
    vertices = bad_inputs.CUBE_VERTICES[quads.ravel()]  # (24, 3)
    own = np.arange(24).reshape(6, 4)
    faces = np.concatenate([own[:, [0, 1, 2]], own[:, [0, 2, 3]]])
    path = tmp_path / "seams.obj"
    path.write_text(bad_inputs.obj_text(vertices, faces))
    raw = load_mesh(path)
    assert not raw.is_watertight
    mesh = clean_mesh(raw)
    assert len(mesh.vertices) == 8 and mesh.is_watertight and mesh.volume == pytest.approx(1.0)


def test_clean_drops_duplicate_degenerate_and_unreferenced():
    vertices = np.concatenate([bad_inputs.CUBE_VERTICES, [[9.0, 9.0, 9.0]]])  # vertex 8 is unused
    faces = np.concatenate(
        [
            bad_inputs.CUBE_FACES,
            bad_inputs.CUBE_FACES[:2, ::-1],  # the same two faces, reversed: duplicates
            [[0, 1, 1]],  # repeats a vertex
        ]
    )
    mesh = clean_mesh(trimesh.Trimesh(vertices, faces, process=False), "test")
    assert len(mesh.faces) == 12 and len(mesh.vertices) == 8
    assert mesh.metadata["clean"] == {"faces_in": 15, "degenerate": 1, "duplicate": 2, "faces_out": 12}
    assert mesh.is_watertight


def test_clean_names_where_in_errors():
    line = trimesh.Trimesh(np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], dtype=float), [[0, 1, 2]], process=False)
    with pytest.raises(MeshError, match=r"^thing\.obj: no faces left after cleaning"):
        clean_mesh(line, "thing.obj")


def test_a_flat_mesh_is_kept():
    sheet = trimesh.Trimesh(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float), [[0, 1, 2]], process=False)
    assert len(clean_mesh(sheet, "sheet.obj").faces) == 1


def test_normalise_round_trip():
    rng = np.random.default_rng(0)
    vertices = rng.normal(size=(50, 3)) * [3.0, 0.5, 1.0] + [100.0, -20.0, 7.0]
    faces = rng.permutation(np.arange(51) % 50).reshape(17, 3)  # every vertex is used
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    normed, scale, offset = normalise(mesh)
    lo, hi = normed.bounds
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-12)
    assert (hi - lo).max() == pytest.approx(1.9)
    assert np.abs(normed.vertices).max() == pytest.approx(0.95)
    np.testing.assert_allclose(normed.vertices * scale + offset, vertices, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(normed.faces, mesh.faces)


def test_normalise_rejects_a_point():
    mesh = trimesh.Trimesh(np.zeros((3, 3)), [[0, 1, 2]], process=False)
    with pytest.raises(MeshError, match="no extent"):
        normalise(mesh)


def test_adjacent_half_edges_match_trimesh_adjacency():
    meshes = (
        trimesh.creation.box(),
        trimesh.creation.icosphere(subdivisions=2),
        trimesh.creation.cylinder(radius=0.5, height=1.0, sections=12),
    )
    for mesh in meshes:
        start, stop = half_edges(np.asarray(mesh.faces))
        first, second = adjacent_half_edges(start, stop, len(mesh.vertices))
        got = {tuple(sorted(p)) for p in np.column_stack([first // 3, second // 3]).tolist()}
        assert got == {tuple(sorted(p)) for p in mesh.face_adjacency.tolist()}
        edges = np.sort(np.column_stack([start[first], stop[first]]), axis=1)
        assert {tuple(e) for e in edges.tolist()} == {tuple(e) for e in np.sort(mesh.face_adjacency_edges, 1).tolist()}
    # An edge of three faces has no dihedral angle and pairs with nothing (the slow path).
    first, _ = adjacent_half_edges(*half_edges(np.array([[0, 1, 2], [1, 0, 3], [0, 1, 4]])), 5)
    assert len(first) == 0


def test_edge_defects_count_what_keeps_a_mesh_open():
    faces = np.asarray(trimesh.creation.box().faces)
    assert edge_defects(faces, 8) == {"boundary": 0, "overshared": 0, "misoriented": 0}
    assert edge_defects(faces[:-1], 8)["boundary"] == 3
    flipped = faces.copy()
    flipped[0] = flipped[0, ::-1]
    assert edge_defects(flipped, 8) == {"boundary": 0, "overshared": 0, "misoriented": 3}
    assert edge_defects(np.concatenate([faces, faces[:1]]), 8)["overshared"] == 3


# Face counts as loaded (no welding) and after clean_mesh; igea's strips decode to a closed surface.
SHARED = {
    "stanford-bunny.obj": (69451, 69451),
    "teapot.obj": (6320, 6320),
    "suzanne.obj": (968, 967),
    "fandisk.obj": (12946, 12946),
    "cow.obj": (5804, 5804),
    "spot.obj": (5856, 5856),
    "beetle.obj": (2053, 2053),
    "igea.ply": (268686, 268686),
}


@pytest.mark.skipif(not SHARED_MESHES.is_dir(), reason=f"{SHARED_MESHES} (real test meshes) is not on this machine")
@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_real_meshes(name):
    raw = load_mesh(SHARED_MESHES / name)
    mesh = clean_mesh(raw, name)
    assert (len(raw.faces), len(mesh.faces)) == SHARED[name]
    if name in ("igea.ply", "spot.obj", "cow.obj", "fandisk.obj"):
        assert mesh.is_watertight and mesh.volume > 0


def test_bad_inputs_cover_every_expected_reason(tmp_path):
    written = bad_inputs.make_bad_inputs(tmp_path)
    assert set(written) == set(bad_inputs.EXPECTED_REASON)
    assert all(p.is_file() for p in written.values())
    assert json.loads((bad_inputs.make_good_inputs(tmp_path / "g")["external"]).read_text())["buffers"][0]["uri"]
