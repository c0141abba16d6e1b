"""The two families of VAE latents behind one interface.

vecset (shapeflow.models.vae): a set of latent tokens read from surface points.
grid (shapeflow.models.grid_vae): a latent grid read from the sample stage's truncated SDF grid.

Both have `encode(**encoder_inputs) -> DiagonalGaussian` over (B, M, D) latents, `decode(latents)`
and `query(decoded, points) -> signed distances`, and `config.num_latents` / `config.latent_dim`, so
the DiT, the inference pipelines and the stages treat them alike; what differs is what the encoder
reads (`encoder_inputs`) and how the DiT orders the tokens (`token_grid`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapeflow.config import VAEDataParams
from shapeflow.dataset import GRID_ARRAYS
from shapeflow.dataset import encoder_inputs as point_inputs
from shapeflow.models import grid_vae, io, vae

AnyVAE = vae.VecSetVAE | grid_vae.GridVAE
AnyVAEConfig = vae.VAEConfig | grid_vae.GridVAEConfig
FAMILIES = ("vecset", "grid")
GRID_ARRAY = GRID_ARRAYS[0]  # the grid the encoder reads
# train_dit.flow.t_shift "auto" per family. A grid latent (16^3 x 8 numbers by default, 6.7x VecSet's
# 256 x 19) is spatially redundant: noise at a given t hides less of it, so its DiT trains and samples
# with times shifted towards the noise end, where the coarse shape and the class are decided (SD3's
# resolution-dependent shift). Measured in docs/grid-family.md.
T_SHIFT = {"vecset": 1.0, "grid": 3.0}


def family_of(model: AnyVAE | AnyVAEConfig) -> str:
    """The family of a VAE or of its config: "grid" or "vecset"."""
    return "grid" if isinstance(model, (grid_vae.GridVAE, grid_vae.GridVAEConfig)) else "vecset"


def vae_config(family: str, preset: str, overrides: dict[str, Any] | None = None) -> AnyVAEConfig:
    """A named preset of the family with some fields replaced; ValueError naming a bad family, preset or key."""
    if family == "grid":
        return grid_vae.grid_vae_config(preset, overrides)
    if family == "vecset":
        return vae.vae_config(preset, overrides)
    raise ValueError(f"unknown VAE family {family!r}; known: {list(FAMILIES)}")


def build_vae(cfg: AnyVAEConfig) -> AnyVAE:
    return grid_vae.GridVAE(cfg) if isinstance(cfg, grid_vae.GridVAEConfig) else vae.VecSetVAE(cfg)


def save_vae(model: AnyVAE, folder: str | Path, meta: dict[str, Any] | None = None) -> None:
    """model.safetensors and config.json, in the family's format, each written atomically."""
    module = grid_vae if isinstance(model, grid_vae.GridVAE) else vae
    module.save_pretrained(model, folder, meta)


def _saved_format(folder: str | Path) -> str | None:
    """The format config.json in `folder` names; None when it is missing or unreadable."""
    path = Path(folder) / io.CONFIG
    try:
        body = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None
    return body.get("format") if isinstance(body, dict) else None


def config_from(body: dict[str, Any]) -> AnyVAEConfig:
    """The config in a saved VAE's config.json ({format, config, meta})."""
    if body.get("format") not in (vae.FORMAT, grid_vae.FORMAT):
        raise ValueError(f"not a VAE's config (format {vae.FORMAT!r} or {grid_vae.FORMAT!r})")
    cls = grid_vae.GridVAEConfig if body["format"] == grid_vae.FORMAT else vae.VAEConfig
    return cls.from_dict(body["config"])


def load_config(folder: str | Path) -> AnyVAEConfig:
    """The config of the VAE saved in `folder`, without its weights."""
    path = Path(folder) / io.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; train the VAE first (dvc repro train_vae)")
    try:
        return config_from(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def load_vae(folder: str | Path, device: torch.device | str = "cpu") -> AnyVAE:
    """The VAE saved in `folder`, of whichever family its config.json names, in eval mode. A missing
    file or a folder of another format gets the loader's own message (io.load)."""
    module = grid_vae if _saved_format(folder) == grid_vae.FORMAT else vae
    return module.load_pretrained(folder, device)


def encoder_inputs(
    model: AnyVAE, arrays: dict[str, np.ndarray], data: VAEDataParams, seed: int
) -> dict[str, torch.Tensor]:
    """What `model.encode` reads for one object of a sample-stage output, batched (1, ...); for the
    point family a fixed (seeded) draw of its points."""
    if isinstance(model, vae.VecSetVAE):
        return point_inputs(arrays, data, seed)
    if GRID_ARRAY not in arrays:
        raise ValueError(
            "this object's samples have no grid: the grid family needs the sample stage run with "
            "train_vae.family: grid (dvc repro sample)"
        )
    return {"grid": torch.from_numpy(arrays[GRID_ARRAY].astype(np.float32))[None, None]}


def token_grid(cfg: AnyVAEConfig) -> int:
    """The side of the grid the latent tokens lie on in C order (0: an unordered set)."""
    return cfg.latent_side if isinstance(cfg, grid_vae.GridVAEConfig) else 0


def flow_shift(setting: float | str, cfg: AnyVAEConfig) -> float:
    """The rectified-flow time shift for this VAE's latents: `setting` itself, or the family's
    T_SHIFT when it is "auto"."""
    if setting == "auto":
        return T_SHIFT[family_of(cfg)]
    return float(setting)
