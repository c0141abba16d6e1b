"""From a trained DiT and VAE to meshes: `shapeflow generate`.

Noise (seeded) -> Euler integration of the flow (with classifier-free guidance when the DiT is
class-conditional) -> de-normalised latent tokens -> VAE decoder -> signed distances on a grid ->
marching cubes. The train_dit stage scores its final samples through the same `Generator`.

Every shape the VAE was trained on lies inside the normalisation box [-0.95, 0.95]^3 (DESIGN.md), so
outside it a shape's signed distance is at least the distance to the box. A sample's field is held
to that bound before marching cubes: the decoder is least accurate in the margin between the box
and the grid's edge, and a field just below zero there (a chair's legs end at y = -0.95; the VAE's
reconstruction of five of the first 16 val objects read -0.001 to -0.02 at y = +-1) leaves the mesh
open at the edge of the grid. Inside the box no sign changes. Reconstructions (train_vae's
validation, evaluate) are scored on the VAE's field as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from shapeflow import config, flow
from shapeflow.geometry.decode import FieldFn, decode_mesh
from shapeflow.geometry.mesh import HALF_SPAN
from shapeflow.manifest import atomic_path, atomic_write_text
from shapeflow.models import dit as dit_lib
from shapeflow.models.vae import VecSetVAE, load_pretrained as load_vae

log = logging.getLogger("shapeflow.generate")

GENERATOR_FILE = "generator.json"  # beside the DiT weights: classes, latent statistics, flow params
EMA_DIR, RAW_DIR = "ema", "raw"


def box_distance(points: torch.Tensor, half: float = HALF_SPAN) -> torch.Tensor:
    """Signed distance (Q,) from points (Q, 3) to the cube [-half, half]^3, negative inside."""
    d = points.abs() - half
    return d.clamp_min(0).norm(dim=-1) + d.amax(dim=-1).clamp_max(0)


def within_box(field: FieldFn, half: float = HALF_SPAN) -> FieldFn:
    """max(field, distance to the box): positive outside the box, the field's sign inside it."""
    return lambda q: torch.maximum(field(q).float(), box_distance(q.float(), half))


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of the training latents: the DiT works on (z - mean) / std."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    @classmethod
    def of(cls, latents: torch.Tensor) -> LatentStats:  # (N, M, D)
        flat = latents.reshape(-1, latents.shape[-1]).double()
        return cls(flat.mean(0).float(), flat.std(0).clamp_min(1e-6).float())

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LatentStats:
        return cls(torch.tensor(raw["mean"], dtype=torch.float32), torch.tensor(raw["std"], dtype=torch.float32))


class Generator:
    """A DiT (EMA weights unless told otherwise) and the VAE whose latents it was trained on."""

    def __init__(self, dit: dit_lib.DiT, vae: VecSetVAE, stats: LatentStats, classes: list[str], t_shift: float = 1.0):
        self.dit, self.vae, self.stats, self.classes, self.t_shift = dit, vae, stats, classes, t_shift
        self.device = next(dit.parameters()).device

    @classmethod
    def load(cls, dit_dir: str | Path, vae_dir: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> Generator:
        dit_dir = Path(dit_dir)
        info_path = dit_dir / GENERATOR_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: missing; train the DiT first (dvc repro train_dit)")
        info = json.loads(info_path.read_text())
        dit = dit_lib.load_pretrained(dit_dir / (EMA_DIR if ema and (dit_dir / EMA_DIR).is_dir() else RAW_DIR), device)
        vae = load_vae(vae_dir, device)
        if vae.config.latent_dim != dit.config.latent_dim:
            raise ValueError(
                f"{vae_dir}: VAE latents have {vae.config.latent_dim} channels, the DiT in {dit_dir} expects "
                f"{dit.config.latent_dim}: was the VAE retrained after the DiT?"
            )
        return cls(dit, vae, LatentStats.from_dict(info["latent_stats"]), list(info["classes"]), float(info["t_shift"]))

    def labels(self, n: int, category: str | None) -> torch.Tensor | None:
        """(n,) labels: all `category`, or the classes in turn when none is given; None if unconditional."""
        if not self.classes:
            if category is not None:
                raise ValueError(f"this DiT is unconditional: --category {category!r} cannot be honoured")
            return None
        if category is None:
            return torch.arange(n, device=self.device) % len(self.classes)
        if category not in self.classes:
            raise ValueError(f"unknown category {category!r}; this DiT knows {self.classes}")
        return torch.full((n,), self.classes.index(category), device=self.device)

    @torch.no_grad()
    def sample_latents(self, labels: torch.Tensor | None, n: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
        """n latent token sets (n, M, D) in the VAE's units, from noise seeded by `seed`."""
        c = self.dit.config
        noise = torch.randn((n, c.num_tokens, c.latent_dim), generator=torch.Generator().manual_seed(seed)).to(self.device)
        if labels is None:
            velocity = lambda z, t: self.dit(z, t)  # noqa: E731
        else:
            velocity = lambda z, t: flow.cfg_velocity(self.dit, z, t, labels, guidance, c.null_label)  # noqa: E731
        return self.stats.denormalise(flow.euler_sample(velocity, noise, steps, shift=self.t_shift))

    @torch.no_grad()
    def to_mesh(self, latents: torch.Tensor, resolution: int) -> trimesh.Trimesh:  # (M, D) -> mesh
        decoded = self.vae.decode(latents[None].to(self.device))
        field = within_box(lambda q: self.vae.query(decoded, q[None])[0])
        return decode_mesh(field, resolution, device=self.device)

    def generate(
        self, n: int, category: str | None, steps: int, guidance: float, seed: int, resolution: int, batch: int = 16
    ) -> list[tuple[str, trimesh.Trimesh]]:
        """n (category name, mesh) pairs; the same arguments always give the same meshes."""
        labels = self.labels(n, category)
        out = []
        for start in range(0, n, batch):
            part = None if labels is None else labels[start : start + batch]
            latents = self.sample_latents(part, min(batch, n - start), steps, guidance, seed + start)
            for i, z in enumerate(latents):
                name = "" if part is None else self.classes[int(part[i])]
                out.append((name, self.to_mesh(z, resolution)))
        return out


def is_watertight_shape(mesh: trimesh.Trimesh) -> bool:
    """A non-empty mesh whose every edge is shared by exactly two faces, consistently wound."""
    return len(mesh.faces) > 0 and bool(mesh.is_watertight) and bool(mesh.is_winding_consistent)


# -- preview -----------------------------------------------------------------------------------------

LIGHT = np.array([0.4, 0.5, 0.75]) / np.linalg.norm([0.4, 0.5, 0.75])


def render(mesh: trimesh.Trimesh, size: int = 256, points: int = 60_000, seed: int = 0) -> np.ndarray:
    """A shaded view (size, size, 3) uint8 of `mesh`, splatting surface samples into a z-buffer.

    Software only (numpy), so it runs without a display or GL. The view looks at the origin from
    the front-right and above; normalised space ([-1, 1]^3) fills the frame.
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


def preview_grid(meshes: list[trimesh.Trimesh], titles: list[str], tile: int = 256, columns: int = 4) -> np.ndarray:
    """The meshes rendered side by side, `columns` a row, each titled. (H, W, 3) uint8."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(meshes) // columns))
    canvas = Image.new("RGB", (columns * tile, rows * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (mesh, title) in enumerate(zip(meshes, titles)):
        x, y = (i % columns) * tile, (i // columns) * tile
        canvas.paste(Image.fromarray(render(mesh, tile, seed=i)), (x, y))
        draw.text((x + 6, y + 4), title, fill=(0, 0, 0))
    return np.asarray(canvas)


def write_outputs(results: list[tuple[str, trimesh.Trimesh]], out: Path, seed: int) -> list[dict[str, Any]]:
    """sample_<i>.glb and .obj per mesh, preview.png, samples.json; each file written atomically."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (category, mesh) in enumerate(results):
        stem = f"sample_{i:03d}"
        for ext in ("glb", "obj"):
            with atomic_path(out / f"{stem}.{ext}") as tmp:
                mesh.export(tmp, file_type=ext)
        rows.append({"file": stem, "category": category, "faces": int(len(mesh.faces)),
                     "watertight": is_watertight_shape(mesh), "seed": seed})  # fmt: skip
    titles = [f"{i}: {category}" if category else str(i) for i, (category, _) in enumerate(results)]
    grid = preview_grid([mesh for _, mesh in results], titles)
    with atomic_path(out / "preview.png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    atomic_write_text(out / "samples.json", json.dumps(rows, indent=2) + "\n")
    return rows


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="sample shapes from the trained DiT: meshes (glb, obj) and a preview PNG")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--n", type=int, default=8, help="how many shapes (default: %(default)s)")
    p.add_argument("--category", help="category to ask for (default: the categories in turn)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: train_dit.generate.guidance)")
    p.add_argument("--steps", type=int, help="Euler steps (default: train_dit.generate.steps)")
    p.add_argument("--resolution", type=int, help="decode grid points per axis (default: train_dit.generate.resolution)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same shapes (default: %(default)s)")
    p.add_argument("--dit", type=Path, default=Path("models/dit"), help="train_dit output (default: %(default)s)")
    p.add_argument("--vae", type=Path, default=Path("models/vae"), help="train_vae output (default: %(default)s)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA ones")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    params = config.load_params(args.params)
    g = config.replace(params.train_dit.generate, steps=args.steps, guidance=args.guidance, resolution=args.resolution)
    if args.n < 1:
        raise config.ParamsError(f"--n: at least 1, got {args.n}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = Generator.load(args.dit, args.vae, device, ema=not args.raw)
    try:
        generator.labels(args.n, args.category)
    except ValueError as exc:
        raise config.ParamsError(str(exc)) from exc
    results = generator.generate(args.n, args.category, g.steps, g.guidance, args.seed, g.resolution)
    rows = write_outputs(results, args.out, args.seed)
    tight = sum(r["watertight"] for r in rows)
    print(f"generate: {len(rows)} shapes in {args.out} ({tight} watertight), preview {args.out / 'preview.png'}")
    return 0
