"""Grid VAE (the structured-latent family of TRELLIS's sparse-structure VAE): a grid in, a grid of
latents, a field out.

encode: the truncated signed-distance grid (B, 1, R, R, R) -> space-to-depth (pixel unshuffle) ->
3-D convolutions, ResBlock3d and DownsampleBlock3d per level -> a diagonal Gaussian over a latent grid
(B, latent_channels, L, L, L), L = R / 2^levels. The DiT sees it as L^3 tokens in C order.
decode: latent grid -> ResBlock3d and UpsampleBlock3d (a convolution, then `pixel_shuffle_3d`, not a
transposed convolution) back to R^3 -> a feature grid whose first channel is the coarse field.
query: the fine stage, evaluated only where it is asked (near the surface when decoding, at the
sampled points and the near-surface cells when training): the feature grid interpolated trilinearly
at each query point, with Fourier features of the point, through an MLP to a correction of the
coarse field. Gather only; no dense grid finer than R is ever built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shapeflow.models import io
from shapeflow.models.layers import FourierEmbedder
from shapeflow.models.vae import DiagonalGaussian, INITIAL_LOGVAR


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C * f^3, D, H, W) -> (B, C, D f, H f, W f): channels to space, as nn.PixelShuffle in 3-D."""
    b, c, d, h, w = x.shape
    if c % factor**3:
        raise ValueError(f"pixel_shuffle_3d: {c} channels are not a multiple of {factor}^3")
    x = x.view(b, c // factor**3, factor, factor, factor, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // factor**3, d * factor, h * factor, w * factor)


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, D f, H f, W f) -> (B, C * f^3, D, H, W): the inverse of `pixel_shuffle_3d`."""
    b, c, d, h, w = x.shape
    if d % factor or h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle_3d: the grid {(d, h, w)} is not a multiple of {factor}")
    x = x.view(b, c, d // factor, factor, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * factor**3, d // factor, h // factor, w // factor)


@dataclass(frozen=True)
class GridVAEConfig(io.ModelConfig):
    KIND = "grid VAE"

    resolution: int = 32  # cells per axis of the input grid (the sample stage's sample.grid.resolution)
    # Channels per level, finest first: the first level works at resolution / 2 (after a space-to-depth
    # step), each next one at half the previous; the latent grid has resolution / 2^len(channels) cells.
    channels: tuple[int, ...] = (16, 32)
    res_blocks: int = 1  # ResBlock3d per level, in the encoder and in the decoder
    latent_channels: int = 8
    feature_channels: int = 8  # the decoded feature grid at the input resolution (the first is the coarse field)
    field_width: int = 64  # the fine stage's MLP
    num_freqs: int = 6  # Fourier frequencies per axis of the fine stage's query features
    truncation: float = 0.1  # the input grid's truncation: inputs are divided by it, the coarse field times it
    output_scale: float = 0.1  # the fine stage's correction is its last Linear's output times this

    def check(self) -> None:
        self.check_at_least_one("resolution", "latent_channels", "feature_channels", "field_width", "num_freqs")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels: one or more positive widths, got {list(self.channels)}")
        if self.resolution % 2 ** len(self.channels):
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of 2^{len(self.channels)} (one halving per level)"
            )
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks must be 0 or more, got {self.res_blocks}")
        if not (self.truncation > 0 and self.output_scale > 0):
            raise ValueError("truncation and output_scale must be positive")

    @property
    def latent_side(self) -> int:
        return self.resolution // 2 ** len(self.channels)

    @property
    def num_latents(self) -> int:
        """Latent tokens per shape as the DiT sees them: the latent grid's cells."""
        return self.latent_side**3

    @property
    def latent_dim(self) -> int:
        return self.latent_channels

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GridVAEConfig:
        if "channels" in raw:  # a list in JSON and YAML
            raw = {**raw, "channels": tuple(int(c) for c in raw["channels"])}
        return super().from_dict(raw)


PRESETS: dict[str, GridVAEConfig] = {
    # 32^3 in, a 8^3 x 8 latent grid: the tests' size.
    "tiny": GridVAEConfig(),
    # 64^3 in, a 16^3 x 8 latent grid (TRELLIS's sparse-structure latent shape) at CPU widths.
    "local": GridVAEConfig(resolution=64, channels=(16, 32), feature_channels=8),
    # TRELLIS's widths: 64^3 in, 16^3 x 8 latents, levels of 128 and 512 channels, two blocks each.
    "base": GridVAEConfig(resolution=64, channels=(128, 512), res_blocks=2, feature_channels=32, field_width=128),
}


def grid_vae_config(preset: str, overrides: dict[str, Any] | None = None) -> GridVAEConfig:
    """A named preset with some fields replaced; raises ValueError naming a bad preset or key."""
    return GridVAEConfig.from_preset(PRESETS, preset, overrides)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock3d(nn.Module):
    """GroupNorm, SiLU, 3x3x3 convolution, twice, plus the input (TRELLIS's ResBlock3d, no time input)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(channels), nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = _norm(channels), nn.Conv3d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class DownsampleBlock3d(nn.Module):
    """Halve the grid: space-to-depth (8x the channels), then a 1x1x1 convolution to `out` channels."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.proj = nn.Conv3d(8 * channels, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_unshuffle_3d(x, 2))


class UpsampleBlock3d(nn.Module):
    """Double the grid: a 3x3x3 convolution to 8x `out` channels, then depth-to-space."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, 8 * out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class GridDecoded(NamedTuple):
    """What the fine stage reads: the decoded feature grid (B, F, R, R, R); channel 0 is the coarse field."""

    features: torch.Tensor


class GridVAE(nn.Module):
    def __init__(self, config: GridVAEConfig):
        super().__init__()
        config.check()
        c = config
        self.config = c
        widths = c.channels
        # Encoder: space-to-depth at the input, then per level its blocks and a halving to the next.
        self.stem = nn.Conv3d(8, widths[0], 3, padding=1)
        enc: list[nn.Module] = []
        for i, width in enumerate(widths):
            enc += [ResBlock3d(width) for _ in range(c.res_blocks)]
            if i + 1 < len(widths):
                enc.append(DownsampleBlock3d(width, widths[i + 1]))
        self.encoder = nn.Sequential(*enc)
        self.enc_out = nn.Sequential(_norm(widths[-1]), nn.SiLU(), nn.Conv3d(widths[-1], 2 * c.latent_channels, 1))
        # Decoder: the mirror image, ending with a doubling to the input resolution.
        self.dec_in = nn.Conv3d(c.latent_channels, widths[-1], 3, padding=1)
        dec: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            out = widths[i - 1] if i else c.feature_channels
            dec += [ResBlock3d(widths[i]) for _ in range(c.res_blocks)]
            dec += [_norm(widths[i]), nn.SiLU(), UpsampleBlock3d(widths[i], out)]
        self.decoder = nn.Sequential(*dec)
        # Fine stage: trilinear features and Fourier features of the query -> MLP -> a correction.
        self.fourier = FourierEmbedder(c.num_freqs)
        self.field = nn.Sequential(
            nn.Linear(c.feature_channels + self.fourier.out_dim, c.field_width),
            nn.SiLU(),
            nn.Linear(c.field_width, c.field_width),
            nn.SiLU(),
            nn.Linear(c.field_width, 1),
        )
        nn.init.zeros_(self.field[-1].weight)
        nn.init.zeros_(self.field[-1].bias)
        nn.init.constant_(self.enc_out[-1].bias[c.latent_channels :], INITIAL_LOGVAR)

    def encode(self, grid: torch.Tensor) -> DiagonalGaussian:
        """grid (B, 1, R, R, R) truncated signed distances -> posterior over (B, L^3, latent_channels)."""
        c = self.config
        if tuple(grid.shape[-3:]) != (c.resolution,) * 3:
            raise ValueError(f"this grid VAE reads {c.resolution}^3 grids, got {tuple(grid.shape[-3:])}")
        x = pixel_unshuffle_3d(grid.to(self.stem.weight.dtype) / c.truncation, 2)
        moments = self.enc_out(self.encoder(self.stem(x)))  # (B, 2C, L, L, L)
        return DiagonalGaussian(moments.flatten(2).transpose(1, 2))  # (B, L^3, 2C) in C order

    def decode(self, latents: torch.Tensor) -> GridDecoded:  # (B, L^3, C)
        side = self.config.latent_side
        z = latents.to(self.dec_in.weight.dtype).transpose(1, 2).unflatten(2, (side, side, side))
        return GridDecoded(self.decoder(self.dec_in(z)))

    def coarse(self, decoded: GridDecoded) -> torch.Tensor:
        """The coarse field at the input grid's cell centres, (B, R, R, R)."""
        return decoded.features[:, 0] * self.config.truncation

    def query(self, decoded: GridDecoded, queries: torch.Tensor) -> torch.Tensor:  # (B, Q, 3) -> (B, Q)
        # grid_sample's (x, y, z) index (W, H, D); the grids are (D, H, W) = (x, y, z), so flip.
        where = queries.flip(-1)[:, :, None, None].to(decoded.features.dtype)  # (B, Q, 1, 1, 3)
        feats = F.grid_sample(decoded.features, where, mode="bilinear", padding_mode="border", align_corners=False)
        feats = feats[:, :, :, 0, 0].transpose(1, 2)  # (B, Q, F)
        correction = self.field(torch.cat([feats, self.fourier(queries.to(feats.dtype))], dim=-1)).squeeze(-1)
        return feats[..., 0] * self.config.truncation + correction * self.config.output_scale

    def forward(
        self, grid: torch.Tensor, queries: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, DiagonalGaussian]:
        """-> the field at the queries (B, Q), the coarse field (B, R, R, R), the posterior."""
        posterior = self.encode(grid)
        decoded = self.decode(posterior.sample() if sample_posterior else posterior.mode())
        return self.query(decoded, queries), self.coarse(decoded), posterior


FORMAT = "shapeflow.grid_vae/1"


def save_pretrained(model: GridVAE, folder: str | Path, meta: dict[str, Any] | None = None) -> None:
    io.save(model, folder, FORMAT, meta)


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu") -> GridVAE:
    build = lambda config: GridVAE(GridVAEConfig.from_dict(config))  # noqa: E731
    return io.load(folder, FORMAT, "train the VAE first (dvc repro train_vae)", build, device)
