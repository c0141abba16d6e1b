"""Building blocks shared by the VAE and the DiT.

Attention goes through `F.scaled_dot_product_attention`, which picks flash or memory-efficient
kernels on a GPU and a fused CPU kernel otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FourierEmbedder(nn.Module):
    """xyz -> [xyz, sin(2^k pi xyz), cos(2^k pi xyz)] for k < num_freqs (NeRF-style features)."""

    def __init__(self, num_freqs: int, include_input: bool = True):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)
        self.include_input = include_input
        self.out_dim = 3 * (2 * num_freqs + int(include_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., 3) -> (..., out_dim)
        angles = (x[..., None] * self.freqs).flatten(-2)  # (..., 3 * num_freqs)
        parts = [x] if self.include_input else []
        return torch.cat([*parts, angles.sin(), angles.cos()], dim=-1)


class MLP(nn.Module):
    def __init__(self, width: int, mult: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, mult * width)
        self.proj = nn.Linear(mult * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Attention(nn.Module):
    """Multi-head attention from `x` to `context` (self-attention when context is None)."""

    def __init__(self, width: int, heads: int, context_width: int | None = None, qkv_bias: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.to_q = nn.Linear(width, width, bias=qkv_bias)
        self.to_kv = nn.Linear(context_width or width, 2 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """bias: added to the attention logits, (B, H, N, M) or broadcastable to it."""
        context = x if context is None else context
        q = self._split(self.to_q(x))  # (B, H, N, D)
        k, v = (self._split(t) for t in self.to_kv(context).chunk(2, dim=-1))  # (B, H, M, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, C)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, H, N, C / H)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class SelfBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@torch.no_grad()
def farthest_point_indices(points: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (B, n) of `n` farthest points of each cloud in `points` (B, N, 3).

    Iterative and batched, on the points' device. The first pick is the point farthest from the
    cloud's centroid, so the chosen set depends on the points, not on their order.
    """
    batch, count, _ = points.shape
    if n > count:
        raise ValueError(f"cannot pick {n} farthest points out of {count}")
    rows = torch.arange(batch, device=points.device)
    nearest = ((points - points.mean(dim=1, keepdim=True)) ** 2).sum(-1)  # (B, N)
    chosen = torch.zeros(batch, n, dtype=torch.long, device=points.device)
    for i in range(n):
        last = nearest.argmax(dim=1)  # (B,)
        chosen[:, i] = last
        nearest = torch.minimum(nearest, ((points - points[rows, last][:, None]) ** 2).sum(-1))
        nearest[rows, last] = -1.0  # never picked twice, even among duplicate points
    return chosen


def gather_points(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, N, C) at index (B, M) -> (B, M, C)."""
    return torch.gather(values, 1, index[..., None].expand(-1, -1, values.shape[-1]))
