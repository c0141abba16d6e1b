"""Load, clean and normalise triangle meshes; their edge topology and enclosed volume.

Every stage reads meshes through `load_mesh`, so a file that cannot be trusted is rejected here once,
with a `MeshError` that names the file and says what is wrong, instead of surfacing later as NaNs in
a grid or a silent empty result. Loading keeps the faces as the file has them; `clean_mesh` is the
single place where vertices are welded and junk faces dropped. `closed_mesh` and `sampled_frame`
give a closed, outward mesh as the sample stage sees it.

The numeric rules, relative to L, the longest side of the bounding box of the referenced vertices:

- |coordinate| <= 1e9 (MAX_ABS_COORD): beyond it a file is corrupt or in units that need rescaling.
- the vertices the faces use are not all one point (all zero is what a compressed glTF read without
  its decoder gives).
- L <= 1e5 x the median edge length (MAX_BOX_TO_EDGE): normalised to [-0.95, 0.95] and stored as
  float32 (spacing ~6e-8 of L), a typical edge then still spans more than 100 float32 steps. A
  larger ratio almost always means a stray vertex far from the rest, and the shape would collapse.
- vertices closer than 1e-7 L (MERGE_RATIO, about the float32 spacing) are one vertex.
- a face whose height is below 1e-10 of its longest edge (DEGENERATE_RATIO) has no area.
- a flat mesh (a card, a sign, a leaf) is kept: the watertight stage gives it a thin closed slab.
"""

from __future__ import annotations

import base64
import contextvars
import io
import json
import logging
import re
import struct
import urllib.parse
from pathlib import Path

import numpy as np
import plyfile
import scipy.sparse
import trimesh

log = logging.getLogger(__name__)

MAX_ABS_COORD = 1e9
# The most faces a mesh may have when loaded (None: no bound); the per-object runner sets it from
# compute.max_faces around each object.
FACE_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("face_limit", default=None)
MAX_BOX_TO_EDGE = 1e5
MERGE_RATIO = 1e-7
DEGENERATE_RATIO = 1e-10
HALF_SPAN = 0.95  # the longest side of a normalised mesh spans [-HALF_SPAN, HALF_SPAN]
MESH_SUFFIXES = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")

GLB_MAGIC = b"glTF"
_GLB_JSON = 0x4E4F534A  # chunk type "JSON"
_GLB_BIN = 0x004E4942  # chunk type "BIN\0"
DRACO_EXTENSION = "KHR_draco_mesh_compression"
_GL_POINTS, _GL_TRIANGLES = 0, 4  # primitive modes
_GL_FLOAT, _GL_UNSIGNED_INT = 5126, 5125  # accessor component types

# Leading bytes of common files that are not meshes, so a renamed image gets a clear message.
_FOREIGN_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG image",
    b"\xff\xd8\xff": "JPEG image",
    b"GIF8": "GIF image",
    b"%PDF": "PDF document",
    b"PK\x03\x04": "ZIP archive",
    b"\x1f\x8b": "gzip archive",
    b"RIFF": "RIFF (WebP/WAV/AVI) file",
}

# What the parsers (trimesh, plyfile, json, struct) raise on a corrupt or truncated file.
_PARSE_ERRORS = (
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    EOFError,
    OSError,
    struct.error,
    plyfile.PlyParseError,
)


class MeshError(ValueError):
    """A mesh file or mesh that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------- load


def load_mesh(path: str | Path) -> trimesh.Trimesh:
    """Read a mesh file into one triangle mesh (geometry only), faces as the file has them.

    Scenes (glb/gltf, multi-object obj) are flattened with their node transforms applied; points
    and lines are dropped. PLY triangle strips and Draco-compressed glTF primitives are decoded here
    because trimesh reads them as no faces at all and as all-zero vertices respectively. A mesh whose
    vertices all sit at one point is refused.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if not path.is_file():
        raise MeshError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise MeshError(f"{path}: unsupported mesh format {suffix!r}; supported: {', '.join(MESH_SUFFIXES)}")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    _sniff(path, suffix, head)
    try:
        vertices, faces = _read(path, suffix, head)
    except MeshError:
        raise
    except _PARSE_ERRORS as exc:
        raise MeshError(
            f"{path}: cannot read as {suffix[1:].upper()} (corrupt or truncated file?): {type(exc).__name__}: {exc}"
        ) from exc
    limit = FACE_LIMIT.get()
    if limit and len(faces) > limit:
        raise MeshError(f"{path}: {len(faces):,} faces, more than the {limit:,} allowed (compute.max_faces)")
    _check_geometry(path, vertices, faces)
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)


def _sniff(path: Path, suffix: str, head: bytes) -> None:
    """Reject files whose first bytes already show they are not the mesh their name claims."""
    if not head:
        raise MeshError(f"{path}: empty file (0 bytes)")
    for magic, kind in _FOREIGN_MAGIC.items():
        if head.startswith(magic):
            raise MeshError(f"{path}: not a mesh: the file is a {kind}, named {suffix}")
    if suffix == ".glb" and not head.startswith(GLB_MAGIC):
        raise MeshError(f"{path}: not a binary glTF: it does not start with 'glTF' (starts {head[:8]!r})")
    if suffix == ".ply" and not head.startswith(b"ply"):
        raise MeshError(f"{path}: not a PLY file: it does not start with 'ply' (starts {head[:8]!r})")
    if suffix in (".obj", ".off", ".gltf") and b"\x00" in head:
        raise MeshError(f"{path}: not a mesh: binary data in a text format ({suffix})")


def _read(path: Path, suffix: str, head: bytes) -> tuple[np.ndarray, np.ndarray]:
    if suffix == ".ply" and b"element tristrips" in head.split(b"end_header", 1)[0]:
        return _read_ply_with_strips(path)
    if suffix in (".glb", ".gltf"):
        glb = gltf_to_glb(path) if suffix == ".gltf" else path.read_bytes()
        glb = decode_draco(path, glb)
        loaded = trimesh.load(io.BytesIO(glb), file_type="glb", process=False, skip_materials=True)
    else:
        if suffix == ".obj":
            _check_obj_indices(path)
        loaded = trimesh.load(path, file_type=suffix[1:], process=False, skip_materials=True)
    return _flatten(path, loaded)


# A face line with a vertex reference of 0 ("f 0 1 2", "f 1/1 0/2 2/3"): OBJ counts from 1, so such
# a file was written by a 0-based exporter and every face would point one vertex off.
_OBJ_ZERO_INDEX = re.compile(rb"^[ \t]*f[ \t]+(?:[^\n]*?[ \t])?0(?=[/ \t\r\n]|$)", re.MULTILINE)


def _check_obj_indices(path: Path) -> None:
    match = _OBJ_ZERO_INDEX.search(path.read_bytes())
    if match:
        line = match.group(0).strip().decode("ascii", "replace")
        raise MeshError(
            f"{path}: face index 0 in {line!r}...: OBJ vertex indices start at 1 "
            "(written by an exporter that counts from 0?)"
        )


def _flatten(path: Path, loaded: trimesh.parent.Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and faces of every triangle mesh in `loaded`, node transforms applied."""
    parts = loaded.dump() if isinstance(loaded, trimesh.Scene) else [loaded]
    meshes = [p for p in parts if isinstance(p, trimesh.Trimesh) and len(p.faces)]
    if not meshes:
        raise MeshError(f"{path}: no faces: {_describe(parts)}")
    vertices, faces = trimesh.util.append_faces([m.vertices for m in meshes], [m.faces for m in meshes])
    return np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)  # (V, ...), (F, 3)


def _describe(parts: list) -> str:
    """What a file held instead of faces, for the message."""
    points = sum(len(p.vertices) for p in parts if isinstance(p, trimesh.PointCloud))
    if points:
        return f"the file holds only points ({points} of them)"
    if any(not isinstance(p, (trimesh.Trimesh, trimesh.PointCloud)) for p in parts):
        return "the file holds only lines or other geometry without surfaces"
    if parts:
        return "the file holds vertices but no faces"
    return "the file holds no geometry (not a mesh file?)"


def _read_ply_with_strips(path: Path) -> tuple[np.ndarray, np.ndarray]:
    ply = plyfile.PlyData.read(str(path))
    names = [e.name for e in ply.elements]
    if "vertex" not in names:
        raise MeshError(f"{path}: PLY without a 'vertex' element")
    vert = ply["vertex"]
    vertices = np.column_stack([np.asarray(vert[c], dtype=np.float64) for c in "xyz"])  # (V, 3)
    faces = [decode_tristrips(_list_property(path, ply["tristrips"]))]
    if "face" in names:
        faces.append(_fan_triangulate(_list_property(path, ply["face"])))
    return vertices, np.concatenate(faces)


def _list_property(path: Path, element: plyfile.PlyElement) -> list[np.ndarray]:
    for name in ("vertex_indices", "vertex_index"):
        if name in element.data.dtype.names:
            return list(element[name])
    raise MeshError(f"{path}: PLY element '{element.name}' has no 'vertex_indices' list")


def decode_tristrips(strips: list[np.ndarray]) -> np.ndarray:
    """Triangles of PLY triangle strips: -1 restarts a strip; every other triangle flips its winding.

    Triangles that repeat a vertex only stitch strips together and carry no surface: they are left
    out. Returns (F, 3) int64.
    """
    if not strips:
        return np.zeros((0, 3), dtype=np.int64)
    flat = np.concatenate([np.append(np.asarray(s, dtype=np.int64), -1) for s in strips])  # (N,)
    n = len(flat)
    if n < 3:
        return np.zeros((0, 3), dtype=np.int64)
    idx = np.arange(n)
    start = np.maximum.accumulate(np.where(flat < 0, idx + 1, 0))  # first index of each one's strip
    i = idx[:-2]
    a, b, c = flat[:-2], flat[1:-1], flat[2:]
    valid = (a >= 0) & (b >= 0) & (c >= 0)
    odd = (i - start[:-2]) % 2 == 1
    tris = np.column_stack([np.where(odd, b, a), np.where(odd, a, b), c])[valid]  # (F, 3)
    distinct = (tris[:, 0] != tris[:, 1]) & (tris[:, 1] != tris[:, 2]) & (tris[:, 0] != tris[:, 2])
    return tris[distinct]


def _fan_triangulate(polygons: list[np.ndarray]) -> np.ndarray:
    """Triangles of polygon faces (a fan from each polygon's first vertex), grouped by size."""
    sizes = np.fromiter((len(p) for p in polygons), dtype=np.int64, count=len(polygons))
    out = [np.zeros((0, 3), dtype=np.int64)]
    for k in np.unique(sizes[sizes >= 3]):
        poly = np.stack([polygons[j] for j in np.flatnonzero(sizes == k)]).astype(np.int64)  # (P, k)
        for j in range(1, k - 1):
            out.append(poly[:, [0, j, j + 1]])
    return np.concatenate(out)


def _check_geometry(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Reject what would poison later stages: broken indices, non-finite or extreme coordinates."""
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise MeshError(
            f"{path}: malformed vertices: 3 coordinates per vertex expected, got array of "
            f"shape {vertices.shape} (truncated or corrupt file?)"
        )
    if len(faces) == 0:
        raise MeshError(f"{path}: no faces")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(
            f"{path}: faces refer to vertex {int(faces.max())} (min {int(faces.min())}) but "
            f"the file has {len(vertices)} vertices (truncated or corrupt file?)"
        )
    finite = np.isfinite(vertices)
    if not finite.all():
        n_nan = int(np.isnan(vertices).sum())
        n_inf = int((~finite).sum()) - n_nan
        what = " and ".join(s for s in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else "") if s)
        raise MeshError(f"{path}: {what} vertex coordinate(s)")
    used = vertices[np.unique(faces)]  # (U, 3) only what the faces reach
    if not np.ptp(used, axis=0).any():
        raise MeshError(
            f"{path}: all {len(used)} vertices are at the same point {tuple(used[0].tolist())}: no shape "
            "(geometry that was never decoded, such as a Draco-compressed glTF read without a decoder, or a "
            "corrupt file?)"
        )
    reach = float(np.abs(used).max())
    if reach > MAX_ABS_COORD:
        raise MeshError(
            f"{path}: huge coordinates: |coord| reaches {reach:.3g}, beyond {MAX_ABS_COORD:.0e} "
            "(corrupt file, or units that need rescaling first)"
        )
    longest = float(np.ptp(used, axis=0).max())
    edges = np.linalg.norm(vertices[faces[:, [1, 2, 0]]] - vertices[faces], axis=-1).ravel()  # (3F,)
    edges = edges[edges > 0]
    if len(edges) and longest > MAX_BOX_TO_EDGE * float(np.median(edges)):
        median = float(np.median(edges))
        raise MeshError(
            f"{path}: extreme coordinate range: the bounding box (longest side {longest:.3g}) "
            f"is {longest / median:.3g} times the median edge length ({median:.3g}), over the "
            f"limit of {MAX_BOX_TO_EDGE:.0e}; normalised to float32 the shape would collapse "
            "(a stray vertex far from the rest?)"
        )


# ----------------------------------------------------------------------------------------- glTF


def gltf_to_glb(path: str | Path) -> bytes:
    """Pack a .gltf and the buffers and images it refers to into one self-contained .glb.

    Lossless: the JSON is kept, every buffer and image lands in the single binary chunk. A missing
    buffer is an error (it holds geometry); a missing image only loses its texture and is reported.
    A buffer or image outside the .gltf's folder is an error (`_uri_bytes`).
    """
    path = Path(path)
    try:
        gltf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MeshError(f"{path}: not a glTF file: not valid JSON ({exc})") from exc
    if not isinstance(gltf, dict) or "asset" not in gltf:
        raise MeshError(f"{path}: not a glTF file: no 'asset' entry in its JSON")
    if "EXT_meshopt_compression" in gltf.get("extensionsUsed", []):
        raise MeshError(f"{path}: glTF with EXT_meshopt_compression cannot be packed into a .glb here")
    blob = bytearray()
    starts = []
    for i, buf in enumerate(gltf.get("buffers", [])):
        if "uri" not in buf:
            raise MeshError(f"{path}: buffer {i} has no uri (only a .glb may carry an embedded buffer)")
        data = _uri_bytes(path, buf["uri"], f"buffer {i}")
        if len(data) < buf["byteLength"]:
            raise MeshError(
                f"{path}: buffer {i} holds {len(data)} bytes, fewer than its byteLength "
                f"{buf['byteLength']} (truncated?)"
            )
        starts.append(_append_aligned(blob, data[: buf["byteLength"]]))
    for view in gltf.get("bufferViews", []):
        view["byteOffset"] = view.get("byteOffset", 0) + starts[view["buffer"]]
        view["buffer"] = 0
    _embed_images(path, gltf, blob)
    if blob:
        gltf["buffers"] = [{"byteLength": len(blob)}]
    else:
        gltf.pop("buffers", None)
    return pack_glb(gltf, bytes(blob))


def _embed_images(path: Path, gltf: dict, blob: bytearray) -> None:
    views = gltf.setdefault("bufferViews", [])
    for i, image in enumerate(gltf.get("images", [])):
        if "uri" not in image:
            continue
        try:
            data = _uri_bytes(path, image["uri"], f"image {i}")
        except UnsafeUriError:
            raise
        except MeshError as exc:
            log.warning("%s; the image keeps its external uri", exc)
            continue
        views.append({"buffer": 0, "byteOffset": _append_aligned(blob, data), "byteLength": len(data)})
        image["bufferView"] = len(views) - 1
        image.setdefault("mimeType", _mime_type(image.pop("uri")))
    if not views:
        gltf.pop("bufferViews")


class UnsafeUriError(MeshError):
    """A glTF refers to a file outside its own folder (or to no file at all, but a URL)."""


def _uri_bytes(path: Path, uri: str, what: str) -> bytes:
    """The bytes a buffer or image URI of the .gltf at `path` refers to: a base64 data URI, or a file
    inside the .gltf's own folder. The URI is percent-decoded before any check, and the file's real
    path (links followed) must lie inside that folder: a glTF must not pack other files into the
    dataset (`../../secret`, `%2Fetc%2Fpasswd`, a link leading out)."""
    if not isinstance(uri, str):
        raise MeshError(f"{path}: {what}: uri is not a string")
    if uri.startswith("data:"):
        header, _, payload = uri.partition(",")
        if not header.endswith(";base64"):
            raise MeshError(f"{path}: {what}: only base64 data URIs are supported")
        return base64.b64decode(payload)
    decoded = urllib.parse.unquote(uri)
    folder = path.parent.resolve()
    relative = Path(decoded)
    if "://" in decoded or relative.is_absolute() or decoded.startswith(("/", "\\")) or "\x00" in decoded:
        raise UnsafeUriError(f"{path}: {what}: uri {uri!r} is not a file path relative to the .gltf")
    source = (folder / relative).resolve()
    if not source.is_relative_to(folder):
        raise UnsafeUriError(f"{path}: {what}: uri {uri!r} leads outside the folder of the .gltf ({folder})")
    if not source.is_file():
        raise MeshError(f"{path}: {what}: external file {uri!r} not found beside it")
    return source.read_bytes()


def _mime_type(uri: str) -> str:
    if uri.startswith("data:"):
        return uri[5:].split(";", 1)[0]
    suffix = Path(urllib.parse.unquote(uri)).suffix.lower()
    return {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".ktx2": "image/ktx2"}.get(
        suffix, "image/png"
    )


def _append_aligned(blob: bytearray, data: bytes) -> int:
    """Append `data` at the next 4-byte boundary (glTF accessor alignment); returns its offset."""
    blob.extend(b"\x00" * (-len(blob) % 4))
    start = len(blob)
    blob.extend(data)
    return start


def pack_glb(gltf: dict, binary: bytes = b"") -> bytes:
    """A binary glTF 2.0 container: 12-byte header, JSON chunk, optional BIN chunk."""
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<II", len(text), _GLB_JSON) + text
    if binary:
        binary += b"\x00" * (-len(binary) % 4)
        chunks += struct.pack("<II", len(binary), _GLB_BIN) + binary
    return GLB_MAGIC + struct.pack("<II", 2, 12 + len(chunks)) + chunks


def unpack_glb(path: str | Path, glb: bytes) -> tuple[dict, bytes]:
    """The JSON and the binary chunk (b"" when it has none) of a binary glTF."""
    if len(glb) < 20 or not glb.startswith(GLB_MAGIC):
        raise MeshError(f"{path}: not a binary glTF: no 'glTF' header")
    json_length, kind = struct.unpack_from("<II", glb, 12)
    if kind != _GLB_JSON or 20 + json_length > len(glb):
        raise MeshError(f"{path}: binary glTF whose first chunk is not a complete JSON chunk (truncated?)")
    try:
        gltf = json.loads(glb[20 : 20 + json_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MeshError(f"{path}: binary glTF whose JSON chunk is not valid JSON ({exc})") from exc
    start = 20 + json_length
    if start + 8 <= len(glb):
        length, kind = struct.unpack_from("<II", glb, start)
        if kind == _GLB_BIN:
            return gltf, glb[start + 8 : start + 8 + length]
    return gltf, b""


def decode_draco(path: str | Path, glb: bytes) -> bytes:
    """`glb` with every Draco-compressed primitive (KHR_draco_mesh_compression) decoded into plain
    position and index accessors; `glb` itself when it has none.

    A loader without a decoder sees such a primitive as accessors that hold no data, and trimesh
    fills them with zeros with only a warning. A decoded primitive keeps its geometry alone (its
    normals, texture coordinates and morph targets are dropped, as loading drops them anyway); the
    nodes are untouched, so their transforms apply as to any other mesh. Raises MeshError when
    DracoPy is missing or the compressed data cannot be decoded.
    """
    json_length = struct.unpack_from("<I", glb, 12)[0] if len(glb) >= 20 else 0
    if DRACO_EXTENSION.encode() not in glb[20 : 20 + json_length]:
        return glb
    gltf, binary = unpack_glb(path, glb)
    try:
        import DracoPy
    except ImportError as exc:
        raise MeshError(
            f"{path}: the geometry is Draco-compressed ({DRACO_EXTENSION}) and the DracoPy package that "
            "decodes it is not installed (pip install DracoPy)"
        ) from exc
    blob = bytearray(binary)
    views = gltf.get("bufferViews", [])
    for m, mesh in enumerate(gltf.get("meshes", [])):
        for p, primitive in enumerate(mesh.get("primitives", [])):
            draco = primitive.get("extensions", {}).pop(DRACO_EXTENSION, None)
            if draco is None:
                continue
            view = views[draco["bufferView"]]
            if view.get("buffer", 0) != 0:
                raise MeshError(f"{path}: mesh {m} primitive {p}: Draco data outside the binary chunk")
            start = view.get("byteOffset", 0)
            try:
                decoded = DracoPy.decode(binary[start : start + view["byteLength"]])
            except Exception as exc:  # DracoPy raises exception types of its own on data it cannot decode
                raise MeshError(
                    f"{path}: mesh {m} primitive {p}: the Draco-compressed data cannot be decoded "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            positions = _draco_positions(decoded, draco.get("attributes", {}).get("POSITION"))
            primitive["attributes"] = {"POSITION": _append_accessor(gltf, blob, positions.astype("<f4"), "VEC3")}
            primitive.pop("targets", None)
            faces = getattr(decoded, "faces", None)
            if faces is not None and len(faces):
                indices = np.asarray(faces).astype("<u4").ravel()
                primitive.update(indices=_append_accessor(gltf, blob, indices, "SCALAR"), mode=_GL_TRIANGLES)
            else:  # a point cloud: dropped with the other points
                primitive.pop("indices", None)
                primitive["mode"] = _GL_POINTS
            if not primitive["extensions"]:
                del primitive["extensions"]
    for name in ("extensionsUsed", "extensionsRequired"):
        kept = [e for e in gltf.get(name, []) if e != DRACO_EXTENSION]
        if kept:
            gltf[name] = kept
        else:
            gltf.pop(name, None)
    buffers = gltf.get("buffers") or [{}]
    gltf["buffers"] = [{**buffers[0], "byteLength": len(blob)}, *buffers[1:]]
    return pack_glb(gltf, bytes(blob))


def _draco_positions(decoded, unique_id: int | None) -> np.ndarray:
    """(N, 3) float64 vertex positions of a DracoPy mesh: the attribute the glTF maps POSITION to (the
    mesh's points where DracoPy does not list its attributes)."""
    for attribute in getattr(decoded, "attributes", ()):
        if attribute["unique_id"] == unique_id:
            return np.asarray(attribute["data"], dtype=np.float64).reshape(-1, 3)
    return np.asarray(decoded.points, dtype=np.float64).reshape(-1, 3)


def _append_accessor(gltf: dict, blob: bytearray, array: np.ndarray, kind: str) -> int:
    """Append `array` (float32 rows of 3, or uint32 scalars) to `blob` with a buffer view and an
    accessor of its own; returns the accessor's index."""
    views = gltf.setdefault("bufferViews", [])
    views.append({"buffer": 0, "byteOffset": _append_aligned(blob, array.tobytes()), "byteLength": array.nbytes})
    accessor = {"bufferView": len(views) - 1, "count": len(array), "type": kind}
    if kind == "VEC3":
        accessor.update(componentType=_GL_FLOAT, min=array.min(axis=0).tolist(), max=array.max(axis=0).tolist())
    else:
        accessor["componentType"] = _GL_UNSIGNED_INT
    accessors = gltf.setdefault("accessors", [])
    accessors.append(accessor)
    return len(accessors) - 1


# ---------------------------------------------------------------------------------------- clean


def clean_mesh(mesh: trimesh.Trimesh, where: str = "") -> trimesh.Trimesh:
    """Weld vertices by position, drop zero-area and duplicate faces and unused vertices.

    Welding ignores UVs and normals on purpose: texture seams split a closed surface into pieces
    that only position tells apart. Duplicates are faces over the same three vertices in any order;
    the first one is kept. The counts of what was dropped go into `metadata["clean"]`.
    """
    where = where or "mesh"
    vertices = np.asarray(mesh.vertices, dtype=np.float64)  # (V, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64)  # (F, 3)
    if len(faces) == 0:
        raise MeshError(f"{where}: no faces")
    # Unused vertices go first: a far-away one must not stretch the welding grid.
    vertices, faces = _weld(*_drop_unreferenced(vertices, faces))
    degenerate = _degenerate(vertices, faces)
    kept = faces[~degenerate]
    _, first = np.unique(np.sort(kept, axis=1), axis=0, return_index=True)
    unique = kept[np.sort(first)]
    n_dup = len(kept) - len(unique)
    if len(unique) == 0:
        raise MeshError(
            f"{where}: no faces left after cleaning: {int(degenerate.sum())} of {len(faces)} "
            f"faces are degenerate (zero area), {n_dup} duplicate"
        )
    vertices, unique = _drop_unreferenced(vertices, unique)
    cleaned = trimesh.Trimesh(vertices=vertices, faces=unique, process=False)
    cleaned.metadata["clean"] = {
        "faces_in": len(mesh.faces),
        "degenerate": int(degenerate.sum()),
        "duplicate": n_dup,
        "faces_out": len(unique),
    }
    return cleaned


def _weld(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices that fall in the same cell of a grid of spacing MERGE_RATIO x the box size."""
    lo = vertices.min(axis=0)
    size = float(np.ptp(vertices, axis=0).max()) or 1.0
    cells = np.round((vertices - lo) / (MERGE_RATIO * size)).astype(np.int64)  # (V, 3)
    _, first, inverse = np.unique(cells, axis=0, return_index=True, return_inverse=True)
    return vertices[first], inverse.reshape(-1)[faces]


def _degenerate(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) True where a face repeats a vertex or its height is ~0 next to its longest edge."""
    corners = vertices[faces]  # (F, 3, 3)
    twice_area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    longest = np.linalg.norm(corners[:, [1, 2, 0]] - corners, axis=2).max(axis=1)  # (F,)
    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 0] == faces[:, 2])
    # height = twice_area / longest; compared without dividing so a zero-length face is degenerate too.
    return repeated | (twice_area <= DEGENERATE_RATIO * longest**2)


def _drop_unreferenced(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used, inverse = np.unique(faces, return_inverse=True)
    return vertices[used], inverse.reshape(faces.shape)


# ------------------------------------------------------------------------------------ normalise


def normalise(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, float, np.ndarray]:
    """Centre the bounding box at the origin and scale its longest side to [-0.95, 0.95].

    Returns (normalised mesh, scale, offset) with original = normalised * scale + offset.
    """
    vertices = np.asarray(mesh.vertices, dtype=np.float64)  # (V, 3)
    faces = np.asarray(mesh.faces)
    used = vertices[np.unique(faces)] if len(faces) else vertices  # the box of what the faces reach
    lo, hi = used.min(axis=0), used.max(axis=0)
    offset = (lo + hi) / 2.0  # (3,)
    scale = float((hi - lo).max()) / (2.0 * HALF_SPAN)
    if not scale > 0:
        raise MeshError("cannot normalise a mesh whose bounding box has no extent")
    normalised = trimesh.Trimesh(vertices=(vertices - offset) / scale, faces=faces, process=False)
    return normalised, scale, offset


def load_clean(path: str | Path) -> trimesh.Trimesh:
    """`load_mesh` then `clean_mesh`, errors naming the file."""
    return clean_mesh(load_mesh(path), where=str(path))


# ------------------------------------------------------------------------------------- topology


def half_edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end vertex of every half-edge, (3F,) each: half-edge 3f+k runs from corner k to
    corner k+1 of face f."""
    return faces.ravel(), faces[:, [1, 2, 0]].ravel()


def edge_keys(start: np.ndarray, stop: np.ndarray, n_vertices: int) -> np.ndarray:
    """One int64 per undirected edge (start, stop), the same whichever way it runs."""
    return np.minimum(start, stop) * n_vertices + np.maximum(start, stop)


def adjacent_half_edges(start: np.ndarray, stop: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """The two half-edges, (A,) and (A,), of every edge of exactly two distinct faces.

    On a consistently oriented manifold (every closed mesh the sample stage accepts) each directed
    half-edge occurs once and its twin runs the other way, so one sparse-matrix lookup finds every
    twin. Other meshes fall back to sorting the undirected edges. Both are single numpy/scipy calls
    over all edges.
    """
    twin = _twins(start, stop, n_vertices)
    if twin is not None:
        first = np.flatnonzero(twin > np.arange(len(twin)))  # each edge once, from one side
        second = twin[first]
    else:
        first, second = _pairs_by_sorting(start, stop, n_vertices)
    same_face = first // 3 == second // 3  # a face that repeats a vertex can meet itself
    if same_face.any():
        first, second = first[~same_face], second[~same_face]
    return first, second


def edge_defects(faces: np.ndarray, n_vertices: int) -> dict[str, int]:
    """Counts of what keeps a mesh from being closed and consistently oriented.

    `boundary`: edges with one face; `overshared`: edges with more than two; `misoriented`: edges
    whose two faces run along them in the same direction (neighbours disagree on the outside).
    All zero exactly when every half-edge has one twin running the other way.
    """
    faces = np.asarray(faces, dtype=np.int64)
    start, stop = half_edges(faces)
    twin = _twins(start, stop, n_vertices)
    if twin is not None:  # every directed half-edge is unique: only boundaries can be left
        return {"boundary": int((twin < 0).sum()), "overshared": 0, "misoriented": 0}
    _, edge, count = np.unique(edge_keys(start, stop, n_vertices), return_inverse=True, return_counts=True)
    forward = np.bincount(edge, weights=start < stop, minlength=len(count))  # (E,) faces running low -> high
    return {
        "boundary": int((count == 1).sum()),
        "overshared": int((count > 2).sum()),
        "misoriented": int(((count == 2) & (forward != 1)).sum()),
    }


def _twins(start: np.ndarray, stop: np.ndarray, n_vertices: int) -> np.ndarray | None:
    """For every half-edge the one running the other way (-1 on a boundary), or None when some
    directed half-edge occurs twice (an edge of more than two faces, or misoriented faces)."""
    lookup = scipy.sparse.csr_matrix(
        (np.arange(1, len(start) + 1), (start, stop)), shape=(n_vertices, n_vertices)
    )  # entry (a, b) = 1 + the half-edge running a -> b; a repeated one would be summed away
    if lookup.nnz != len(start):
        return None
    return np.asarray(lookup[stop, start]).ravel() - 1  # (3F,)


def _pairs_by_sorting(start: np.ndarray, stop: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-edge pairs of the undirected edges that occur exactly twice, found by one sort."""
    key = edge_keys(start, stop, n_vertices)  # (3F,)
    order = np.argsort(key)
    same = key[order[1:]] == key[order[:-1]]  # (3F-1,) sorted neighbours on one edge
    before = np.concatenate([[False], same[:-1]])
    after = np.concatenate([same[1:], [False]])
    twice = same & ~before & ~after  # a run of exactly two
    return order[:-1][twice], order[1:][twice]


def face_volumes(triangles: np.ndarray) -> np.ndarray:
    """(F,) signed volume of the tetrahedron each triangle of `triangles` (F, 3, 3) spans with the origin.

    Summed over a closed surface (over each closed part with np.bincount): the volume it encloses,
    negative when its faces point inwards (divergence theorem). The one formula every volume here
    uses; trimesh's `mass_properties` gives the same sum but computes the inertia integrals too, ten
    times the cost.
    """
    return np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])) / 6.0


def is_watertight_shape(mesh: trimesh.Trimesh) -> bool:
    """A non-empty mesh whose every edge is shared by exactly two faces, consistently wound."""
    return len(mesh.faces) > 0 and bool(mesh.is_watertight) and bool(mesh.is_winding_consistent)


# ----------------------------------------------------------------------------- closed and framed


def closed_mesh(path: str | Path) -> tuple[trimesh.Trimesh, bool]:
    """The mesh at `path`, checked closed and consistently oriented, and whether it was inside out.

    Watertight-stage output is used as loaded. Anything else gets `clean_mesh` first (welding
    turns an STL triangle soup or UV-split vertices into a connected surface) and must then pass.
    """
    mesh = load_mesh(path)
    if any(edge_defects(mesh.faces, len(mesh.vertices)).values()):
        mesh = clean_mesh(mesh, where=str(path))
        defects = edge_defects(mesh.faces, len(mesh.vertices))
        if defects["boundary"] or defects["overshared"]:
            raise ValueError(
                f"not watertight ({defects['boundary']} boundary edge(s), {defects['overshared']} edge(s) "
                "shared by more than two faces): run `shapeflow watertight` first"
            )
        if defects["misoriented"]:
            raise ValueError(
                f"not consistently oriented ({defects['misoriented']} edge(s) whose two faces disagree on "
                "the outside): run `shapeflow watertight` first"
            )
    # A closed mesh whose faces all point inwards has negative volume: turn it outside out so that
    # inside means inside.
    inverted = bool(face_volumes(mesh.triangles).sum() < 0)
    if inverted:
        mesh.invert()
    return mesh, inverted


def sampled_frame(path: str | Path) -> tuple[trimesh.Trimesh, bool, float, np.ndarray]:
    """(mesh, inverted, scale, offset): the mesh at `path` exactly as the sample stage samples it,
    closed, outward and normalised. Watertight-stage output is normalised already, but the
    marching-cubes surface's box is not the source's (the shell adds up to eps on every side), so
    normalising again rescales it by up to 1 + eps: stages that compare against these surfaces load
    them through here."""
    mesh, inverted = closed_mesh(path)
    mesh, scale, offset = normalise(mesh)
    return mesh, inverted, scale, offset
