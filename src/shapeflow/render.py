"""Preview images of meshes, rendered in software (numpy), so they need no display or GL, and the
folder of sample meshes written around them (`write_samples`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from shapeflow.geometry.mesh import is_watertight_shape
from shapeflow.manifest import atomic_path, atomic_write_text

LIGHT = np.array([0.4, 0.5, 0.75]) / np.linalg.norm([0.4, 0.5, 0.75])


def render(mesh: trimesh.Trimesh, size: int = 256, points: int = 60_000, seed: int = 0) -> np.ndarray:
    """A shaded view (size, size, 3) uint8 of `mesh`, splatting surface samples into a z-buffer.

    The view looks at the origin from the front-right and above; normalised space ([-1, 1]^3) fills
    the frame.
    """
    image = np.full((size, size, 3), 255, np.uint8)
    if len(mesh.faces) == 0:
        return image
    pts, face_idx = trimesh.sample.sample_surface(mesh, points, seed=seed)
    normals = mesh.face_normals[face_idx]
    yaw, pitch = np.radians(35.0), np.radians(25.0)
    rot_y = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    view = rot_x @ rot_y
    p, n = pts @ view.T, normals @ view.T
    px = np.clip(((p[:, 0] / 1.8 + 0.5) * (size - 1)).round().astype(int), 0, size - 1)
    py = np.clip(((0.5 - p[:, 1] / 1.8) * (size - 1)).round().astype(int), 0, size - 1)
    depth = p[:, 2]  # larger is nearer the viewer
    shade = 0.25 + 0.75 * np.abs(n @ LIGHT)  # two-sided: inward normals still shade
    order = np.argsort(depth)  # far first, so near splats overwrite
    flat = np.full(size * size, -1, np.int64)
    for dy in (0, 1):  # 2x2 splats close the gaps between samples
        for dx in (0, 1):
            cell = np.clip(py[order] + dy, 0, size - 1) * size + np.clip(px[order] + dx, 0, size - 1)
            flat[cell] = order
    hit = flat >= 0
    colour = np.array([90, 140, 200]) * shade[flat[hit], None]
    image.reshape(-1, 3)[hit] = colour.clip(0, 255).astype(np.uint8)
    return image


def preview_grid(
    meshes: list[trimesh.Trimesh | None], titles: list[str], tile: int = 256, columns: int = 4
) -> np.ndarray:
    """The meshes rendered side by side, `columns` a row, each titled; None leaves its tile blank.
    (H, W, 3) uint8."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(meshes) // columns))
    canvas = Image.new("RGB", (columns * tile, rows * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (mesh, title) in enumerate(zip(meshes, titles, strict=True)):
        x, y = (i % columns) * tile, (i // columns) * tile
        if mesh is None:
            continue
        canvas.paste(Image.fromarray(render(mesh, tile, seed=i)), (x, y))
        draw.text((x + 6, y + 4), title, fill=(0, 0, 0))
    return np.asarray(canvas)


def write_samples(
    results: list[tuple[str, trimesh.Trimesh]],
    out: Path,
    seed: int,
    columns: int = 4,
    layout: list[int | None] | None = None,
) -> list[dict[str, Any]]:
    """sample_<i>.glb and .obj per (category, mesh), preview.png (`columns` tiles a row, in the order
    of `layout`: indices into `results`, None for a blank tile; default all in order), samples.json;
    each file written atomically."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (category, mesh) in enumerate(results):
        stem = f"sample_{i:03d}"
        for ext in ("glb", "obj"):
            with atomic_path(out / f"{stem}.{ext}") as tmp:
                mesh.export(tmp, file_type=ext)
        rows.append(
            {
                "file": stem,
                "category": category,
                "faces": int(len(mesh.faces)),
                "watertight": is_watertight_shape(mesh),
                "seed": seed,
            }
        )
    order = list(range(len(results))) if layout is None else layout
    titles = ["" if i is None else f"{i}: {results[i][0]}" if results[i][0] else str(i) for i in order]
    grid = preview_grid([None if i is None else results[i][1] for i in order], titles, columns=max(1, columns))
    with atomic_path(out / "preview.png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    atomic_write_text(out / "samples.json", json.dumps(rows, indent=2) + "\n")
    return rows
