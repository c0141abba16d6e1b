"""Inference pipelines: from a trained VAE (and DiT) to fields and meshes.

`reconstruct`: an object's npz samples -> VAE encoder (posterior mean) -> latent tokens -> field -> mesh.
`ShapePipeline`: noise (seeded) -> Euler integration of the flow (with classifier-free guidance when the
DiT is class-conditional) -> de-normalised latent tokens -> VAE decoder -> signed distances on a grid ->
marching cubes.

Every shape the VAE was trained on lies inside the normalisation box [-0.95, 0.95]^3 (docs/conventions.md), so
outside it a shape's signed distance is at least the distance to the box. A sample's field is held
to that bound before marching cubes (`within_box`): the decoder is least accurate in the margin between
the box and the grid's edge, where a field just below zero would reach the edge of the grid (the mesh
is then capped there, see geometry.decode.grid_to_mesh). Inside the box no sign changes.
Reconstructions are scored on the VAE's field as it is: a field still negative at the grid's edge
shows as a cap there, away from the reference surface.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from shapeflow import config, flow
from shapeflow.geometry.decode import FieldFn, decode_mesh
from shapeflow.geometry.mesh import HALF_SPAN
from shapeflow.models import dit as dit_lib
from shapeflow.models.families import AnyVAE, encoder_inputs, load_vae

GENERATOR_FILE = "generator.json"  # beside the DiT weights: classes, latent statistics, flow params
EMA_DIR, RAW_DIR = "ema", "raw"


def decode_autocast(device: torch.device | str):
    """The autocast the decoder's field queries run under: bf16 on a GPU, none on a CPU (where bf16
    matmuls are slower than float32)."""
    if torch.device(device).type == "cuda":
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def reconstruct(
    model: AnyVAE,
    arrays: dict[str, np.ndarray],
    data: config.VAEDataParams,
    seed: int,
    resolution: int,
    device: torch.device,
    autocast=None,
) -> tuple[FieldFn, trimesh.Trimesh]:
    """An object's reconstruction: the posterior mean of its seeded encoder view (its points, or its
    grid for the grid family), decoded; the field (query points (Q, 3) -> signed distances (Q,)) it
    defines, and its mesh.
    `autocast`: a context factory (default: `decode_autocast(device)`)."""
    autocast = autocast or decode_autocast(device)
    inputs = {k: v.to(device) for k, v in encoder_inputs(model, arrays, data, seed).items()}
    with autocast():
        tokens = model.decode(model.encode(**inputs).mode())

    def field(q: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model.query(tokens, q[None])[0]

    return field, decode_mesh(field, resolution, device=device)


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


class ShapePipeline:
    """A DiT (EMA weights unless told otherwise) and the VAE whose latents it was trained on."""

    def __init__(self, dit: dit_lib.DiT, vae: AnyVAE, stats: LatentStats, classes: list[str], t_shift: float = 1.0):
        self.dit, self.vae, self.stats, self.classes, self.t_shift = dit, vae, stats, classes, t_shift
        self.device = next(dit.parameters()).device

    @classmethod
    def load(
        cls, dit_dir: str | Path, vae_dir: str | Path, device: str | torch.device = "cpu", ema: bool = True
    ) -> ShapePipeline:
        dit_dir = Path(dit_dir)
        info_path = dit_dir / GENERATOR_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: missing; train the DiT first (dvc repro train_dit)")
        info = json.loads(info_path.read_text())
        dit = dit_lib.load_pretrained(dit_dir / (EMA_DIR if ema and (dit_dir / EMA_DIR).is_dir() else RAW_DIR), device)
        vae = load_vae(vae_dir, device)
        if dit.config.grid_side and dit.config.num_tokens != vae.config.num_latents:
            raise ValueError(
                f"{vae_dir}: the VAE's latent grid has {vae.config.num_latents} cells, the DiT in {dit_dir} "
                f"expects {dit.config.num_tokens}: was the VAE retrained after the DiT?"
            )
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
    def sample_latents(
        self, labels: torch.Tensor | None, n: int, steps: int, guidance: float, seed: int
    ) -> torch.Tensor:
        """n latent token sets (n, M, D) in the VAE's units, from noise seeded by `seed`."""
        c = self.dit.config
        noise = torch.randn((n, c.num_tokens, c.latent_dim), generator=torch.Generator().manual_seed(seed)).to(
            self.device
        )
        if labels is None:
            velocity, extra_args = self.dit, None
        else:
            velocity = functools.partial(flow.cfg_velocity, self.dit)
            extra_args = {"y": labels, "guidance": guidance, "null_label": c.null_label}
        latents = flow.euler_sample(velocity, noise, steps, shift=self.t_shift, extra_args=extra_args)
        return self.stats.denormalise(latents)

    @torch.no_grad()
    def to_mesh(self, latents: torch.Tensor, resolution: int) -> trimesh.Trimesh:  # (M, D) -> mesh
        autocast = decode_autocast(self.device)
        with autocast():
            decoded = self.vae.decode(latents[None].to(self.device))

        def field(q: torch.Tensor) -> torch.Tensor:
            with autocast():
                return self.vae.query(decoded, q[None])[0].float()

        return decode_mesh(within_box(field), resolution, device=self.device)

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
