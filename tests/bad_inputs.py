"""Small mesh files, bad and good, for tests of every stage.

`make_bad_inputs(folder)` writes one file per way a mesh file can be unusable; `EXPECTED_REASON`
maps each case to a regular expression its error message (or manifest reason) must match.
`make_good_inputs(folder)` writes small valid meshes in every supported format, so a stage test can
mix both in one folder and check that the good ones still get through.

The files are written by hand (text, struct) rather than with the loaders under test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# A regular expression per bad case that its MeshError message must match (case-insensitive).
EXPECTED_REASON = {
    "empty": r"empty file",
    "truncated_obj": r"truncated",
    "points_only_ply": r"no faces.*points",
    "nan_coords": r"NaN",
    "inf_coords": r"\binf\b",
    "all_degenerate": r"no faces left.*degenerate",
    "huge_coords": r"huge coordinates",
    "far_vertex": r"extreme coordinate range",
    "bad_glb": r"glb|glTF",
    "not_a_mesh": r"not a mesh.*PNG",
    "text_as_obj": r"no faces.*not a mesh",
    "same_point": r"all 42 vertices are at the same point",
    "zero_based_obj": r"face index 0.*start at 1",
    "bad_draco": r"Draco-compressed data cannot be decoded",
}

# A closed unit cube: 8 corners, 12 outward-facing triangles.
CUBE_VERTICES = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=float
)
# Each side as a quad, corners counter-clockwise seen from outside.
CUBE_QUADS = np.array([[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [1, 2, 6, 5], [2, 3, 7, 6], [3, 0, 4, 7]])
CUBE_FACES = np.concatenate([CUBE_QUADS[:, [0, 1, 2]], CUBE_QUADS[:, [0, 2, 3]]])


def obj_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    """OBJ text: one `v` line per vertex, one 1-based `f` line per face."""
    lines = [f"v {x!r} {y!r} {z!r}" for x, y, z in np.asarray(vertices, dtype=float).tolist()]
    lines += ["f " + " ".join(str(i + 1) for i in face) for face in np.asarray(faces).tolist()]
    return "\n".join(lines) + "\n"


def icosphere(subdivisions: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere (vertices, faces), outward winding."""
    t = (1.0 + 5**0.5) / 2.0
    v = [
        [-1, t, 0],
        [1, t, 0],
        [-1, -t, 0],
        [1, -t, 0],
        [0, -1, t],
        [0, 1, t],
        [0, -1, -t],
        [0, 1, -t],
        [t, 0, -1],
        [t, 0, 1],
        [-t, 0, -1],
        [-t, 0, 1],
    ]
    f = [
        [0, 11, 5],
        [0, 5, 1],
        [0, 1, 7],
        [0, 7, 10],
        [0, 10, 11],
        [1, 5, 9],
        [5, 11, 4],
        [11, 10, 2],
        [10, 7, 6],
        [7, 1, 8],
        [3, 9, 4],
        [3, 4, 2],
        [3, 2, 6],
        [3, 6, 8],
        [3, 8, 9],
        [4, 9, 5],
        [2, 4, 11],
        [6, 2, 10],
        [8, 6, 7],
        [9, 8, 1],
    ]
    vertices = [np.array(p, dtype=float) / np.linalg.norm(p) for p in v]
    faces = f
    for _ in range(subdivisions):
        midpoint: dict[tuple[int, int], int] = {}

        def mid(a: int, b: int, midpoint: dict[tuple[int, int], int] = midpoint) -> int:
            key = (min(a, b), max(a, b))
            if key not in midpoint:
                p = vertices[a] + vertices[b]
                vertices.append(p / np.linalg.norm(p))
                midpoint[key] = len(vertices) - 1
            return midpoint[key]

        faces = [
            new
            for a, b, c in faces
            for new in (
                [a, mid(a, b), mid(c, a)],
                [b, mid(b, c), mid(a, b)],
                [c, mid(c, a), mid(b, c)],
                [mid(a, b), mid(b, c), mid(c, a)],
            )
        ]
    return np.array(vertices), np.array(faces)


def open_cylinder(segments: int = 16, height: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Side wall of a cylinder without caps (vertices, faces)."""
    angle = np.linspace(0.0, 2 * np.pi, segments, endpoint=False)
    ring = np.column_stack([np.cos(angle), np.sin(angle)])  # (S, 2)
    vertices = np.concatenate(
        [np.column_stack([ring, np.zeros(segments)]), np.column_stack([ring, np.full(segments, height)])]
    )
    i = np.arange(segments)
    j = (i + 1) % segments
    faces = np.concatenate([np.column_stack([i, j, j + segments]), np.column_stack([i, j + segments, i + segments])])
    return vertices, faces


def ply_tristrips_bytes(vertices: np.ndarray, strips: list[list[int]]) -> bytes:
    """Binary little-endian PLY whose faces are triangle strips (element `tristrips`, -1 restarts)."""
    flat = [i for strip in strips for i in (*strip, -1)][:-1]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
        "element tristrips 1\nproperty list int int vertex_indices\nend_header\n"
    )
    body = np.asarray(vertices, dtype="<f4").tobytes()
    body += struct.pack("<i", len(flat)) + np.asarray(flat, dtype="<i4").tobytes()
    return header.encode() + body


def cube_tristrips() -> list[list[int]]:
    """The closed unit cube as six strips, one per side: quad (a, b, c, d) is the strip a b d c."""
    return [[a, b, d, c] for a, b, c, d in CUBE_QUADS.tolist()]


def glb_bytes(gltf: dict, binary: bytes) -> bytes:
    """A binary glTF 2.0 container, written from the spec: header, JSON chunk, BIN chunk."""
    text = json.dumps(gltf).encode()
    text += b" " * (-len(text) % 4)
    binary += b"\x00" * (-len(binary) % 4)
    chunks = struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(binary), b"BIN\x00") + binary
    return b"glTF" + struct.pack("<II", 2, 12 + len(chunks)) + chunks


def two_node_scene(extra_points: bool = True) -> tuple[dict, bytes]:
    """glTF JSON and binary for one cube mesh placed by two nodes.

    Node 0 moves the cube by +3 along x; node 1 (a child of node 0) scales it by 2 and moves it by
    +2 along z, so its world transform is translate(3, 0, 0) @ translate(0, 0, 2) @ scale(2). With
    `extra_points`, a third node holds a point primitive that loaders must drop.
    """
    positions = CUBE_VERTICES.astype("<f4").tobytes()  # 96 bytes
    indices = CUBE_FACES.astype("<u4").tobytes()  # 144 bytes
    binary = positions + indices
    gltf = {
        "asset": {"version": "2.0"},
        "scene": 0,
        "scenes": [{"nodes": [0] + ([2] if extra_points else [])}],
        "nodes": [
            {"mesh": 0, "translation": [3.0, 0.0, 0.0], "children": [1]},
            {"mesh": 0, "translation": [0.0, 0.0, 2.0], "scale": [2.0, 2.0, 2.0]},
        ],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": 4}]}],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": len(positions)},
            {"buffer": 0, "byteOffset": len(positions), "byteLength": len(indices)},
        ],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": 8, "type": "VEC3", "min": [0, 0, 0], "max": [1, 1, 1]},
            {"bufferView": 1, "componentType": 5125, "count": 36, "type": "SCALAR"},
        ],
    }
    if extra_points:
        gltf["nodes"].append({"mesh": 1})
        gltf["meshes"].append({"primitives": [{"attributes": {"POSITION": 0}, "mode": 0}]})
    return gltf, binary


def draco_glb_bytes(vertices: np.ndarray, faces: np.ndarray, translation=(0.0, 0.0, 0.0), plain_cube=False) -> bytes:
    """A GLB whose one mesh is Draco-compressed (KHR_draco_mesh_compression), placed by a node at
    `translation` and scaled by 2; with `plain_cube`, a second node holds the uncompressed unit cube.

    The accessors of the compressed primitive carry counts but no buffer view, as the extension
    specifies: a reader without a decoder has nothing but zeros to show for them.
    """
    import DracoPy

    draco = DracoPy.encode(
        np.asarray(vertices, dtype=np.float32), np.asarray(faces, dtype=np.uint32), preserve_order=True
    )
    _, cube = two_node_scene(extra_points=False)  # the cube's positions (96 bytes), then its indices
    binary = draco + b"\x00" * (-len(draco) % 4)
    gltf = {
        "asset": {"version": "2.0"},
        "extensionsUsed": ["KHR_draco_mesh_compression"],
        "extensionsRequired": ["KHR_draco_mesh_compression"],
        "scene": 0,
        "scenes": [{"nodes": [0, 1] if plain_cube else [0]}],
        "nodes": [{"mesh": 0, "translation": list(translation), "scale": [2.0, 2.0, 2.0]}, {"mesh": 1}],
        "meshes": [
            {
                "primitives": [
                    {
                        "attributes": {"POSITION": 0},
                        "indices": 1,
                        "mode": 4,
                        "extensions": {"KHR_draco_mesh_compression": {"bufferView": 0, "attributes": {"POSITION": 0}}},
                    }
                ]
            },
            {"primitives": [{"attributes": {"POSITION": 2}, "indices": 3, "mode": 4}]},
        ],
        "buffers": [{"byteLength": len(binary) + len(cube)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": len(draco)},
            {"buffer": 0, "byteOffset": len(binary), "byteLength": 96},
            {"buffer": 0, "byteOffset": len(binary) + 96, "byteLength": 144},
        ],
        "accessors": [
            {"componentType": 5126, "count": len(vertices), "type": "VEC3", "min": [-1, -1, -1], "max": [1, 1, 1]},
            {"componentType": 5125, "count": 3 * len(faces), "type": "SCALAR"},
            {"bufferView": 1, "componentType": 5126, "count": 8, "type": "VEC3", "min": [0, 0, 0], "max": [1, 1, 1]},
            {"bufferView": 2, "componentType": 5125, "count": 36, "type": "SCALAR"},
        ],
    }
    return glb_bytes(gltf, binary + cube)


def make_bad_inputs(folder: Path) -> dict[str, Path]:
    """Write one unusable mesh file per case of `EXPECTED_REASON` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sphere_v, sphere_f = icosphere(1)
    files: dict[str, tuple[str, bytes]] = {}
    files["empty"] = ("empty.obj", b"")
    # A cube whose faces count vertices from 0, as some exporters write them: every face would be
    # off by one vertex (and the last would point past the end).
    zero_based = obj_text(CUBE_VERTICES, CUBE_FACES).splitlines()
    zero_based = [
        " ".join(["f", *(str(int(i) - 1) for i in line.split()[1:])]) if line.startswith("f ") else line
        for line in zero_based
    ]
    files["zero_based_obj"] = ("zero_based.obj", ("\n".join(zero_based) + "\n").encode())
    # The vertex block stops after 10 of 42 vertices and the last face line is cut mid-way.
    truncated = obj_text(sphere_v[:10], sphere_f)
    files["truncated_obj"] = ("truncated.obj", truncated[: len(truncated) - 4].encode())
    points = "".join(f"{x} {y} {z}\n" for x, y, z in sphere_v.tolist())
    files["points_only_ply"] = (
        "points.ply",
        (
            f"ply\nformat ascii 1.0\nelement vertex {len(sphere_v)}\n"
            "property float x\nproperty float y\nproperty float z\nend_header\n" + points
        ).encode(),
    )
    nan_v = sphere_v.copy()
    nan_v[5, 1] = np.nan
    files["nan_coords"] = ("nan.obj", obj_text(nan_v, sphere_f).encode())
    inf_v = sphere_v.copy()
    inf_v[7, 2] = np.inf
    files["inf_coords"] = ("inf.obj", obj_text(inf_v, sphere_f).encode())
    # Faces over three points on one line, and faces that repeat a vertex: none has any area.
    line_v = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], dtype=float)
    line_f = [[0, 1, 2], [1, 2, 3], [0, 0, 3], [2, 2, 2]]
    files["all_degenerate"] = ("degenerate.obj", obj_text(line_v, line_f).encode())
    files["huge_coords"] = ("huge.obj", obj_text(sphere_v * 1e12, sphere_f).encode())
    # A unit sphere plus one small triangle a million units away: the box dwarfs every edge.
    far_v = np.concatenate([sphere_v, [[1e6, 0, 0], [1e6 + 0.1, 0, 0], [1e6, 0.1, 0]]])
    far_f = np.concatenate([sphere_f, [[42, 43, 44]]])
    files["far_vertex"] = ("far_vertex.obj", obj_text(far_v, far_f).encode())
    scene = glb_bytes(*two_node_scene(extra_points=False))
    files["bad_glb"] = ("bad.glb", scene[: len(scene) // 2])
    files["not_a_mesh"] = ("image.obj", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    files["text_as_obj"] = ("notes.obj", b"Shopping list:\n- milk\n- bread\n")
    # Every vertex at the origin: what a Draco-compressed glTF gives a reader without a decoder.
    files["same_point"] = ("same_point.obj", obj_text(sphere_v * 0.0, sphere_f).encode())
    # A Draco-compressed primitive whose compressed bytes are not Draco data.
    gltf, binary = two_node_scene(extra_points=False)
    gltf["extensionsUsed"] = ["KHR_draco_mesh_compression"]
    gltf["meshes"][0]["primitives"][0]["extensions"] = {
        "KHR_draco_mesh_compression": {"bufferView": 0, "attributes": {"POSITION": 0}}
    }
    files["bad_draco"] = ("bad_draco.glb", glb_bytes(gltf, binary))
    return _write_all(folder, files)


def make_good_inputs(folder: Path) -> dict[str, Path]:
    """Write small valid meshes, one per supported format, into `folder`.

    box (obj, closed), icosphere (ascii ply, closed), open_cylinder (stl, open), tristrips (binary
    ply of strips, closed cube), scene (glb, two placed cubes), external (gltf with its buffer in a
    separate .bin), off_box (off, closed), flat (obj, a tilted planar sheet).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sphere_v, sphere_f = icosphere(2)
    cyl_v, cyl_f = open_cylinder()
    gltf, binary = two_node_scene(extra_points=False)
    external = dict(gltf, buffers=[{"uri": "external_data.bin", "byteLength": len(binary)}])
    files: dict[str, tuple[str, bytes]] = {
        "box": ("box.obj", obj_text(CUBE_VERTICES * [1.0, 2.0, 0.5], CUBE_FACES).encode()),
        "icosphere": ("icosphere.ply", _ascii_ply(sphere_v, sphere_f)),
        "open_cylinder": ("open_cylinder.stl", _binary_stl(cyl_v, cyl_f)),
        "tristrips": ("tristrips.ply", ply_tristrips_bytes(CUBE_VERTICES + 5.0, cube_tristrips())),
        "scene": ("scene.glb", glb_bytes(*two_node_scene())),
        "external": ("external.gltf", json.dumps(external).encode()),
        "off_box": ("box.off", _off(CUBE_VERTICES * 3.0, CUBE_FACES)),
        "flat": ("flat.obj", obj_text(*_tilted_grid()).encode()),
    }
    (folder / "external_data.bin").write_bytes(binary)
    return _write_all(folder, files)


def _write_all(folder: Path, files: dict[str, tuple[str, bytes]]) -> dict[str, Path]:
    paths = {}
    for case, (name, data) in files.items():
        paths[case] = folder / name
        paths[case].write_bytes(data)
    return paths


def _tilted_grid(n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """An n x n grid of squares in the plane x + y + z = 1: a flat but not axis-aligned sheet."""
    u, v = np.meshgrid(np.arange(n + 1, dtype=float), np.arange(n + 1, dtype=float), indexing="ij")
    e1, e2 = np.array([1.0, -1.0, 0.0]) / 2**0.5, np.array([1.0, 1.0, -2.0]) / 6**0.5
    vertices = np.array([1, 1, 1]) / 3 + u.reshape(-1, 1) * e1 + v.reshape(-1, 1) * e2
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    return vertices, np.concatenate([np.column_stack([a, b, c]), np.column_stack([a, c, d])])


def _ascii_ply(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    header = (
        f"ply\nformat ascii 1.0\nelement vertex {len(vertices)}\nproperty double x\nproperty double y\n"
        f"property double z\nelement face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    rows = [f"{x!r} {y!r} {z!r}" for x, y, z in vertices.tolist()] + [f"3 {a} {b} {c}" for a, b, c in faces.tolist()]
    return (header + "\n".join(rows) + "\n").encode()


def _binary_stl(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    corners = vertices[faces]  # (F, 3, 3)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    record = np.zeros(len(faces), dtype=[("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attr", "<u2")])
    record["normal"], record["corners"] = normals, corners
    return b"shapeflow test cylinder".ljust(80, b" ") + struct.pack("<I", len(faces)) + record.tobytes()


def _off(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    rows = ["OFF", f"{len(vertices)} {len(faces)} 0"]
    rows += [f"{x!r} {y!r} {z!r}" for x, y, z in vertices.tolist()] + [f"3 {a} {b} {c}" for a, b, c in faces.tolist()]
    return ("\n".join(rows) + "\n").encode()
