"""Diffusion Transformer (DiT, Peebles & Xie 2023) over the VAE's latent tokens.

VecSet latents are an unordered set: no patchify and no positional embedding; every layer acts per
token or through attention, and the network is permutation-equivariant over tokens. Grid latents
(`grid_side` > 0: tokens on a grid_side^3 grid in C order) are patchified: each patch_size^3 block of
cells becomes one token, with a fixed 3-D sin-cos position, and the output is unpatchified back.
Each block: adaLN-zero self-attention (shift/scale/gate from the timestep + pooled class embedding),
cross-attention to the class's condition tokens, adaLN-zero MLP. The network predicts the
rectified-flow velocity; the flow itself (t, interpolation, target, sampler, CFG) lives in
`shapeflow.flow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shapeflow.models import io
from shapeflow.models.layers import MLP


@dataclass(frozen=True)
class DiTConfig(io.ModelConfig):
    KIND = "DiT"

    latent_dim: int = 16  # channels per input token (the VAE's latent_dim)
    num_tokens: int = 64  # tokens per set the sampler draws; the network itself accepts any count
    width: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width
    num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1, and num_classes is "null"
    qk_norm: bool = True  # RMSNorm on q and k per head (keeps attention logits bounded)
    cond_tokens: int = 1  # condition tokens each class embedding becomes (cross-attention context)
    grid_side: int = 0  # 0: the tokens are a set; else they are the cells of a grid_side^3 grid in C order
    patch_size: int = 2  # grid tokens: cells per patch along an axis

    def check(self) -> None:
        self.check_at_least_one(
            "latent_dim", "num_tokens", "width", "depth", "heads", "mlp_ratio", "cond_tokens", "patch_size"
        )
        if self.grid_side:
            if self.grid_side % self.patch_size:
                raise ValueError(f"patch_size {self.patch_size} must divide the latent grid's side {self.grid_side}")
            if self.num_tokens != self.grid_side**3:
                raise ValueError(f"num_tokens {self.num_tokens} must be grid_side^3 = {self.grid_side**3}")

        if self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (unconditional) or more, got {self.num_classes}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")

    @property
    def null_label(self) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional branch)."""
        return self.num_classes


PRESETS: dict[str, DiTConfig] = {
    # Matches the tiny VAE (64 x 16 latents); trains on a 2-core CPU.
    "tiny": DiTConfig(),
    # DiT-B (width 768, 12 blocks, 12 heads) over the base VAE's 512 x 64 latents.
    "base": DiTConfig(latent_dim=64, num_tokens=512, width=768, depth=12, heads=12),
}


def dit_config(preset: str, overrides: dict[str, Any] | None = None) -> DiTConfig:
    """A named preset with some fields replaced; raises ValueError naming a bad preset or key."""
    return DiTConfig.from_preset(PRESETS, preset, overrides)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, N, C) with (B, C) per sample


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t (the DDPM/DiT step scale) -> MLP -> (B, width)."""

    SCALE = 1000.0
    MAX_PERIOD = 10_000.0

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(self.MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, C)
        args = self.SCALE * t.float()[:, None] * self.freqs  # (B, F / 2)
        feats = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, F)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """Labels -> `cond_tokens` tokens each; row `num_classes` is the learnt null class."""

    def __init__(self, num_classes: int, width: int, cond_tokens: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, cond_tokens * width)
        self.width = width

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, K, C)
        return self.table(y).unflatten(-1, (-1, self.width))


class Attention(nn.Module):
    """Multi-head attention from `x` to `context` (self-attention when None), with optional QK-norm.

    Unlike `layers.Attention`, q and k can be RMS-normalised per head (SD3, ViT-22B): it keeps the
    attention logits from growing without bound, which is what makes large DiTs diverge.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(width, 2 * width)
        self.q_norm = nn.RMSNorm(width // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.q_norm(self._split(self.to_q(x)))  # (B, H, N, D)
        k, v = (self._split(t) for t in self.to_kv(context).chunk(2, dim=-1))  # (B, H, M, D)
        out = F.scaled_dot_product_attention(q, self.k_norm(k), v)  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, C)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, H, N, C / H)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class CrossAttention(nn.Module):
    """Pre-norm cross-attention to the condition tokens, added as a plain (ungated) residual.

    Plain, as in PixArt-alpha: the condition tokens already carry the class, and the timestep
    reaches this path through the tokens the adaLN-modulated layers produce. Its output projection
    is zero-initialised (see `DiT.initialize_weights`), so a block is still the identity at init.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.norm_x = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qk_norm)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # (B, N, C), (B, K, C)
        return x + self.attn(self.norm_x(x), self.norm_ctx(context))


class DiTBlock(nn.Module):
    """adaLN-zero self-attention, cross-attention to the condition (when there is one), adaLN-zero MLP."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = config
        self.norm1 = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(c.width, c.heads, c.qk_norm)
        self.cross = CrossAttention(c.width, c.heads, c.qk_norm) if c.num_classes else None
        self.norm2 = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(c.width, c.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.width, 6 * c.width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, C) tokens, c (B, C) conditioning vector, context (B, K, C) condition tokens."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, C) each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = self.cross(x, context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, N, C), (B, C) -> (B, N, out)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def patchify(x: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """Tokens of a side^3 grid in C order (B, side^3, D) -> one token per patch^3 block, the blocks in
    C order and each block's cells in C order: (B, (side / patch)^3, patch^3 D)."""
    b, _, d = x.shape
    n = side // patch
    x = x.view(b, n, patch, n, patch, n, patch, d).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, n**3, patch**3 * d)


def unpatchify(x: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """The inverse of `patchify`: (B, (side / patch)^3, patch^3 D) -> (B, side^3, D)."""
    b, _, pd = x.shape
    n, d = side // patch, pd // patch**3
    x = x.view(b, n, n, n, patch, patch, patch, d).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, side**3, d)


def sincos_3d(n: int, width: int) -> torch.Tensor:
    """Fixed positions of an n^3 grid's cells in C order (n^3, width): a third of the channels for each
    axis, half sines and half cosines of the cell's index at geometric frequencies (as MAE's 2-D ones);
    the channels a third of the width leaves over (width mod 6) are zero."""
    per_axis = width // 6 * 2
    freqs = 1.0 / 10_000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2))
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    parts = []
    for axis in range(3):
        angles = index[:, axis, None] * freqs  # (n^3, per_axis / 2)
        parts += [angles.sin(), angles.cos()]
    parts.append(torch.zeros(len(index), width - 3 * per_axis, dtype=torch.float64))
    return torch.cat(parts, dim=-1).float()


class DiT(nn.Module):
    """Velocity network v(z_t, t, y) over latent tokens (B, M, latent_dim): a set, or a grid's cells."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.check()
        c = config
        self.config = c
        token_dim = c.latent_dim * (c.patch_size**3 if c.grid_side else 1)
        self.x_embed = nn.Linear(token_dim, c.width)
        if c.grid_side:
            self.register_buffer("pos_embed", sincos_3d(c.grid_side // c.patch_size, c.width), persistent=False)
        self.t_embed = TimestepEmbedder(c.width)
        self.y_embed = ClassEmbedder(c.num_classes, c.width, c.cond_tokens) if c.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.depth))
        self.final = FinalLayer(c.width, token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier Linears, N(0, 0.02) embeddings, and zeros wherever a block's update or
        the output leaves the network, so the untrained DiT is the identity on tokens and predicts 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [block.cross.attn.proj for block in self.blocks if block.cross is not None]
        zero += [self.final.adaLN_modulation[-1], self.final.linear]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, M, latent_dim) noisy latents, t (B,) in [0, 1] (0 noise, 1 data), y (B,) labels or None.

        y None, or a label equal to `config.null_label`, is the unconditional (null) class.
        -> velocity (B, M, latent_dim).
        """
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        cfg = self.config
        if cfg.grid_side:
            h = self.x_embed(patchify(x, cfg.grid_side, cfg.patch_size)) + self.pos_embed.to(x.dtype)  # (B, N, C)
        else:
            h = self.x_embed(x)  # (B, M, C)
        c = self.t_embed(t)  # (B, C)
        context = None
        if self.y_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.config.null_label, dtype=torch.long, device=x.device)
            context = self.y_embed(y)  # (B, K, C)
            c = c + context.mean(dim=1)
        elif y is not None:
            raise ValueError("this DiT is unconditional (num_classes: 0): y must be None")
        for block in self.blocks:
            h = block(h, c, context)
        out = self.final(h, c)
        return unpatchify(out, cfg.grid_side, cfg.patch_size) if cfg.grid_side else out  # (B, M, latent_dim)


FORMAT = "shapeflow.dit/1"


def save_pretrained(model: DiT, folder: str | Path, meta: dict[str, Any] | None = None) -> None:
    """model.safetensors and config.json ({format, config, meta}) in `folder`, each written atomically."""
    io.save(model, folder, FORMAT, meta)


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu") -> DiT:
    """The DiT saved by `save_pretrained` in `folder`, in eval mode."""
    build = lambda config: DiT(DiTConfig.from_dict(config))  # noqa: E731
    return io.load(folder, FORMAT, "train the DiT first (dvc repro train_dit)", build, device)
