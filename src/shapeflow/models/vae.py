"""VecSet VAE (3DShape2VecSet, with Dora's optional sharp-edge branch): point cloud in, SDF out.

encode: Fourier features of the surface points (and normals) -> queries picked by farthest point
sampling cross-attend to all points -> self-attention blocks -> diagonal Gaussian over a set of
`num_latents` tokens of `latent_channels` each.
decode: up-projection -> self-attention blocks -> tokens.
query:  Fourier-embedded query points cross-attend to the tokens -> signed distance (negative inside).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shapeflow.models import io
from shapeflow.models.layers import (
    MLP,
    Attention,
    FourierEmbedder,
    SelfBlock,
    farthest_point_indices,
    gather_points,
)


@dataclass(frozen=True)
class VAEConfig(io.ModelConfig):
    KIND = "VAE"

    num_latents: int = 64  # latent tokens per shape
    latent_channels: int = 16  # channels per latent token
    width: int = 128  # transformer width
    heads: int = 4
    enc_layers: int = 1  # self-attention blocks after the point cross-attention
    dec_layers: int = 3  # self-attention blocks after the up-projection
    num_freqs: int = 8  # Fourier frequencies per axis
    use_normals: bool = True  # feed surface normals to the encoder
    sharp_branch: bool = False  # Dora: a second cross-attention over the salient-edge points
    sharp_latents: int = 0  # of num_latents, how many queries are picked from the salient points
    qkv_bias: bool = False
    # Anchored latents: each latent token also carries the xyz of the surface point it was picked at;
    # the encoder's attention is biased towards near points (a Gaussian of the distance, one learnt
    # width per head, starting between the two `locality` radii), and each query reads only its
    # `neighbours` nearest tokens, seen from its offset to their anchors (LocalQueryDecoder).
    anchored: bool = False
    neighbours: int = 8
    locality: tuple[float, float] = (0.05, 0.4)
    # Anchored only: before the cross-attention, each token also reads its `encoder_neighbours`
    # nearest input points from their offsets to its anchor and their normals (LocalPointReader), a
    # description of the surface around it that does not depend on where the anchor sits. 0: off.
    encoder_neighbours: int = 0
    # Anchored only: each decoded token also predicts a plane (a unit normal and an offset from its
    # anchor); the query decoder sees the query's signed distance s = n . (query - anchor) + b to each
    # neighbour's plane and adds a blend of them to the field. Near the surface the field then starts as
    # a distance to the local tangent plane, where without it the sign has to come from products of the
    # token and the offset that the decoder's one hidden layer learns only slowly.
    planes: bool = False
    # The field is the last Linear's output times output_scale. Set near the loss's truncation, it
    # lets that Linear work at O(1): Adam moves every weight by about lr a step, which at scale 1
    # makes the predicted distances jitter by about as much as the near-surface distances are.
    output_scale: float = 1.0

    def check(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        self.check_at_least_one("num_latents", "latent_channels", "width", "heads", "num_freqs", "neighbours")
        if self.encoder_neighbours < 0:
            raise ValueError(f"encoder_neighbours must be 0 or more, got {self.encoder_neighbours}")
        if self.encoder_neighbours and not self.anchored:
            raise ValueError("encoder_neighbours needs anchored: true")
        if not self.output_scale > 0:
            raise ValueError(f"output_scale must be positive, got {self.output_scale}")
        if self.planes and not self.anchored:
            raise ValueError("planes needs anchored: true")
        if self.enc_layers < 0 or self.dec_layers < 0:
            raise ValueError("enc_layers and dec_layers must be 0 or more")
        if not 0 <= self.sharp_latents < self.num_latents:
            raise ValueError(f"sharp_latents must be in [0, num_latents), got {self.sharp_latents}")
        if self.sharp_latents and not self.sharp_branch:
            raise ValueError("sharp_latents needs sharp_branch: true")
        if len(self.locality) != 2 or not 0 < self.locality[0] <= self.locality[1]:
            raise ValueError(f"locality must be two radii 0 < r0 <= r1, got {self.locality}")

    @property
    def latent_dim(self) -> int:
        """Channels per latent token as the DiT sees them: the anchor's xyz first when anchored."""
        return self.latent_channels + 3 * int(self.anchored)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VAEConfig:
        if "locality" in raw:  # a list in JSON
            raw = {**raw, "locality": tuple(float(r) for r in raw["locality"])}
        return super().from_dict(raw)


PRESETS: dict[str, VAEConfig] = {
    # Small enough to train on a 2-core CPU in minutes; output scale 0.1, near the loss's truncation.
    "tiny": VAEConfig(output_scale=0.1),
    # tiny's width with 256 anchored tokens, each also reading its 16 nearest input points and
    # predicting a tangent plane, decoded by the local query decoder at output scale 0.1: the default
    # for training on the built-in set on a CPU.
    "local": VAEConfig(num_latents=256, anchored=True, encoder_neighbours=16, planes=True, output_scale=0.1),
    # The size published VecSet models use (3DShape2VecSet, Dora, CraftsMan3D): 512 x 64 latents,
    # width 768, 8 encoder and 16 decoder blocks.
    "base": VAEConfig(
        num_latents=512, latent_channels=64, width=768, heads=12, enc_layers=8, dec_layers=16, num_freqs=8
    ),
}


def vae_config(preset: str, overrides: dict[str, Any] | None = None) -> VAEConfig:
    """A named preset with some fields replaced; raises ValueError naming a bad preset or key."""
    return VAEConfig.from_preset(PRESETS, preset, overrides)


INITIAL_LOGVAR = -6.0


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per latent channel. With `anchors` (B, M, 3), the latents that
    `sample` and `mode` return carry them as their first three channels (exact, not sampled)."""

    def __init__(self, moments: torch.Tensor, anchors: torch.Tensor | None = None):  # (B, M, 2C)
        self.mean, logvar = moments.float().chunk(2, dim=-1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.anchors = anchors

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self._with_anchors(self.mean + (0.5 * self.logvar).exp() * noise)

    def mode(self) -> torch.Tensor:
        return self._with_anchors(self.mean)

    def _with_anchors(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.anchors is None else torch.cat([self.anchors.to(z.dtype), z], dim=-1)

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per shape, averaged over latent tokens and channels. (B,)"""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).mean(dim=(1, 2))


class PointEmbed(nn.Module):
    """Points (and normals) -> width-sized tokens."""

    def __init__(self, num_freqs: int, width: int, use_normals: bool):
        super().__init__()
        self.fourier = FourierEmbedder(num_freqs)
        self.use_normals = use_normals
        self.proj = nn.Linear(self.fourier.out_dim + 3 * int(use_normals), width)

    def forward(self, points: torch.Tensor, normals: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.fourier(points)  # (B, N, F)
        if self.use_normals:
            feats = torch.cat([feats, normals], dim=-1)
        return self.proj(feats)  # (B, N, C)


class LocalityBias(nn.Module):
    """-||x - a||^2 / (2 r_h^2) per head h: attention logits that favour near anchors, r_h learnt."""

    def __init__(self, heads: int, radii: tuple[float, float]):
        super().__init__()
        r = torch.logspace(math.log10(radii[0]), math.log10(radii[1]), heads)
        self.log_scale = nn.Parameter(-torch.log(2.0 * r**2))  # (H,)

    def forward(self, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:  # (B, N, 3), (B, M, 3)
        d2 = torch.cdist(x.float(), anchors.float()).square()  # (B, N, M)
        return -self.log_scale.exp()[:, None, None] * d2[:, None]  # (B, H, N, M)


def _nearest(centres: torch.Tensor, item_xyz: torch.Tensor, k: int) -> torch.Tensor:
    """The indices (B, Q, k) of the k items nearest to each centre (B, Q, 3); item_xyz (B, M, 3).

    For one batch of centres that lie close together (a decoder's chunk of nearby grid points), only
    the items that can be among any centre's k nearest are compared (_near_candidates): the same
    neighbours, for a fraction of the distances and of topk's work. Distances are taken pair by pair
    (not through a matrix product, whose rounding depends on the other items), so a distance is the
    same whichever items it is compared with and near ties break the same way."""
    centres, item_xyz = centres.float(), item_xyz.float()
    if centres.shape[0] == 1 and item_xyz.shape[1] > 2 * k:
        candidates = _near_candidates(centres[0], item_xyz[0], k)
        if 2 * len(candidates) <= item_xyz.shape[1]:
            return candidates[_k_smallest(centres, item_xyz[:, candidates], k)]
    return _k_smallest(centres, item_xyz, k)


def _k_smallest(centres: torch.Tensor, item_xyz: torch.Tensor, k: int) -> torch.Tensor:
    distance = torch.cdist(centres, item_xyz, compute_mode="donot_use_mm_for_euclid_dist")
    return distance.topk(k, dim=-1, largest=False).indices


def _near_candidates(centres: torch.Tensor, items: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the items (M, 3) that may be among the k nearest of some centre (Q, 3).

    With c the middle of the centres' bounding box and r the farthest centre from it, every centre
    has c's k nearest items within d_k(c) + r, so its own k nearest are that close to it and within
    d_k(c) + 2r of c (triangle inequality); a little slack covers rounding."""
    middle = (centres.amin(0) + centres.amax(0)) / 2
    spread = (centres - middle).norm(dim=1).max()
    reach = (items - middle).norm(dim=1)
    bound = reach.kthvalue(k).values + 2 * spread
    return (reach <= bound * (1 + 1e-5) + 1e-6).nonzero()[:, 0]


def _take(items: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """items (B, M, C) at idx (B, Q, k) -> (B * Q * k, C), one index_select over the flattened batch
    (several times faster on a CPU than torch.gather with an index expanded over the channels)."""
    b, m = items.shape[:2]
    flat = (idx + torch.arange(b, device=idx.device)[:, None, None] * m).reshape(-1)
    return items.reshape(b * m, -1).index_select(0, flat)


def _add_product(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base + a @ b, written into base (a contiguous tensor the caller made and no longer needs), which
    saves addmm's copy of base: 7 % of a local decoder's query on a CPU. Under autocast the product
    stays out of place, so that it runs in the autocast dtype."""
    if torch.is_autocast_enabled(base.device.type):
        return torch.addmm(base, a, b)
    return base.addmm_(a, b)


def _pool_heads(hidden: torch.Tensor, to_value_logit: nn.Linear, heads: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, k, C) per (centre, neighbour) pair -> to_value_logit's C values and `heads` logits
    (and `extra` more logits) per pair; per head, the values averaged over the k neighbours with the
    softmax of its logits -> (N, C), and the extra logits (N, k, extra).

    The values are never formed per pair: the value map is affine and the softmax weights sum to one,
    so the weighted mean of the values is the value map of the weighted mean of the hidden vectors,
    one (C / heads x C) product per head and centre instead of a (C x C) one per pair.
    """
    width = hidden.shape[-1]
    weight, bias = to_value_logit.weight, to_value_logit.bias
    logits = F.linear(hidden, weight[width:], bias[width:])  # (N, k, heads + extra)
    attn = logits[..., :heads].softmax(dim=1)
    pooled = attn.transpose(1, 2) @ hidden  # (N, heads, C)
    value_map = weight[:width].unflatten(0, (heads, -1))  # (heads, C / heads, C)
    x = torch.einsum("nhc,hdc->nhd", pooled, value_map).flatten(1) + bias[:width]  # (N, C)
    return x, logits[..., heads:]


def _read_neighbours(
    centres: torch.Tensor, items: torch.Tensor, item_xyz: torch.Tensor, k: int,
    rel: PointEmbed, to_value_logit: nn.Linear, heads: int,
) -> torch.Tensor:
    """For each centre (B, Q, 3), its k nearest items (B, M, C) at item_xyz (B, M, 3), each seen from
    its offset: hidden = gelu(item + rel(offset)); one Linear to a value and a logit per head; the
    values averaged over the k neighbours with the softmax of their logits. -> (B, Q, C)"""
    b, q = centres.shape[:2]
    k = min(k, item_xyz.shape[1])
    idx = _nearest(centres, item_xyz, k)  # (B, Q, k)
    # rel's bias is added to the M items once instead of to the B * Q * k pairs.
    near_item = _take(items + rel.proj.bias, idx)  # (B * Q * k, C), a tensor of its own (_add_product)
    offset = (centres[:, :, None] - _take(item_xyz.to(items.dtype), idx).view(b, q, k, 3)).flatten(0, 2)
    hidden = F.gelu(_add_product(near_item, rel.fourier(offset), rel.proj.weight.t()))
    x, _ = _pool_heads(hidden.view(b * q, k, -1), to_value_logit, heads)
    return x.view(b, q, -1)


class LocalPointReader(nn.Module):
    """Anchored encoder: each anchor reads its k nearest input points, from their offsets to it
    (anchor - point) and their normals, so the description of a patch is the same wherever it sits."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = config
        self.k, self.heads = c.encoder_neighbours, c.heads
        self.from_normal = nn.Linear(3, c.width)
        self.rel = PointEmbed(c.num_freqs, c.width, use_normals=False)
        self.to_value_logit = nn.Linear(c.width, c.width + c.heads)

    def forward(self, anchors: torch.Tensor, points: torch.Tensor, normals: torch.Tensor | None) -> torch.Tensor:
        items = self.from_normal(normals if normals is not None else torch.zeros_like(points))  # (B, N, C)
        return _read_neighbours(anchors, items, points, self.k, self.rel, self.to_value_logit, self.heads)


class PointEncoder(nn.Module):
    """FPS queries cross-attend to the point tokens (and, with the sharp branch, to the salient ones)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = PointEmbed(c.num_freqs, c.width, c.use_normals)
        self.norm_q = nn.LayerNorm(c.width)
        self.norm_ctx = nn.LayerNorm(c.width)
        self.attn = Attention(c.width, c.heads, c.width, c.qkv_bias)
        if c.sharp_branch:
            self.norm_sharp = nn.LayerNorm(c.width)
            self.sharp_attn = Attention(c.width, c.heads, c.width, c.qkv_bias)
        self.norm_mlp = nn.LayerNorm(c.width)
        self.mlp = MLP(c.width)
        self.locality = LocalityBias(c.heads, c.locality) if c.anchored else None
        self.reader = LocalPointReader(c) if c.encoder_neighbours else None

    def forward(
        self,
        points: torch.Tensor,  # (B, N, 3)
        normals: torch.Tensor | None,
        sharp_points: torch.Tensor | None = None,  # (B, S, 3)
        sharp_normals: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, M, C) and the points they were picked at (B, M, 3)."""
        c = self.config
        tokens = self.embed(points, normals)  # (B, N, C)
        idx = farthest_point_indices(points, c.num_latents - c.sharp_latents)
        queries = gather_points(tokens, idx)  # (B, M, C)
        anchors = gather_points(points, idx)  # (B, M, 3)
        if c.sharp_branch:
            if sharp_points is None:
                raise ValueError("this VAE has a sharp-edge branch: sharp_points are required")
            sharp_tokens = self.embed(sharp_points, sharp_normals)  # (B, S, C)
            if c.sharp_latents:
                sharp_idx = farthest_point_indices(sharp_points, c.sharp_latents)
                queries = torch.cat([queries, gather_points(sharp_tokens, sharp_idx)], dim=1)
                anchors = torch.cat([anchors, gather_points(sharp_points, sharp_idx)], dim=1)
        if self.reader is not None:
            queries = queries + self.reader(anchors, points, normals)
        bias = sharp_bias = None
        if self.locality is not None:
            bias = self.locality(anchors, points)  # (B, H, M, N)
            if c.sharp_branch:
                sharp_bias = self.locality(anchors, sharp_points)
        q = self.norm_q(queries)
        x = queries + self.attn(q, self.norm_ctx(tokens), bias)
        if c.sharp_branch:
            x = x + self.sharp_attn(q, self.norm_sharp(sharp_tokens), sharp_bias)
        return x + self.mlp(self.norm_mlp(x)), anchors  # (B, M, C), (B, M, 3)


class Decoded(NamedTuple):
    """What the query decoder reads: the decoded tokens, and their anchors when the VAE has them."""

    tokens: torch.Tensor  # (B, M, C)
    anchors: torch.Tensor | None  # (B, M, 3)


class _FieldDecoder(nn.Module):
    """What both query decoders end with: features per query (B, Q, C) -> a residual MLP, a norm and
    one Linear -> signed distances (B, Q), times output_scale."""

    def _add_field_head(self, c: VAEConfig) -> None:
        self.norm_mlp = nn.LayerNorm(c.width)
        self.mlp = MLP(c.width)
        self.norm = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, 1)
        self.scale = c.output_scale

    def _field(self, x: torch.Tensor) -> torch.Tensor:  # (B, Q, C) -> (B, Q)
        x = x + self.mlp(self.norm_mlp(x))
        return self.out(self.norm(x)).squeeze(-1) * self.scale


class QueryDecoder(_FieldDecoder):
    """Query points cross-attend to the decoded tokens -> one signed distance each."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = config
        self.embed = PointEmbed(c.num_freqs, c.width, use_normals=False)
        self.norm_q = nn.LayerNorm(c.width)
        self.norm_ctx = nn.LayerNorm(c.width)
        self.attn = Attention(c.width, c.heads, c.width, c.qkv_bias)
        self._add_field_head(c)

    def forward(self, queries: torch.Tensor, decoded: Decoded) -> torch.Tensor:  # (B, Q, 3) -> (B, Q)
        q = self.embed(queries)  # (B, Q, C)
        # The query's own embedding stays in the residual stream (3DShape2VecSet's decoder drops it),
        # so the field depends on where it is asked even before the attention has learnt to.
        return self._field(q + self.attn(self.norm_q(q), self.norm_ctx(decoded.tokens)))


class LocalQueryDecoder(_FieldDecoder):
    """Anchored latents: each query reads its `neighbours` nearest tokens, each seen from the query's
    offset to the token's anchor (as POCO does with point features), and attends over them.

    Per (query, token) pair: hidden = gelu(U LN(token) + R fourier(query - anchor)), one Linear from
    it to a value and a logit per head; softmax over the neighbours; MLP; signed distance. With
    `planes`, the pair's hidden also sees fourier(s), s = n . (query - anchor) + b the query's signed
    distance to the token's plane, and the field gains r tanh(sum_i w_i s_i / r), w a softmax over the
    neighbours of one more logit per pair and r learnt (starting at 0.1).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = config
        self.k, self.heads, self.planes = c.neighbours, c.heads, c.planes
        self.norm_tok = nn.LayerNorm(c.width)
        self.from_token = nn.Linear(c.width, c.width)
        self.rel = PointEmbed(c.num_freqs, c.width, use_normals=False)
        self.to_value_logit = nn.Linear(c.width, c.width + c.heads + int(c.planes))
        if c.planes:
            self.to_plane = nn.Linear(c.width, 4)
            self.plane_fourier = FourierEmbedder(c.num_freqs)
            self.from_plane = nn.Linear(2 * c.num_freqs + 1, c.width)
            self.log_reach = nn.Parameter(torch.tensor(math.log(0.1)))
        self._add_field_head(c)

    def forward(self, queries: torch.Tensor, decoded: Decoded) -> torch.Tensor:  # (B, Q, 3) -> (B, Q)
        normed = self.norm_tok(decoded.tokens)
        tokens = self.from_token(normed)  # (B, M, C)
        if not self.planes:
            x = _read_neighbours(queries, tokens, decoded.anchors, self.k, self.rel, self.to_value_logit, self.heads)
            return self._field(x)  # from (B, Q, C)
        anchors, width = decoded.anchors, tokens.shape[-1]
        b, q = queries.shape[:2]
        k = min(self.k, anchors.shape[1])
        plane = self.to_plane(normed)  # (B, M, 4)
        # Per token, once: the token with both embeddings' biases added; its plane and anchor.
        shifted = tokens + self.rel.proj.bias + self.from_plane.bias
        geometry = torch.cat([F.normalize(plane[..., :3], dim=-1), plane[..., 3:], anchors.to(tokens.dtype)], dim=-1)
        idx = _nearest(queries, anchors, k)
        near_token = _take(shifted, idx)  # (B * Q * k, C), a tensor of its own (_add_product)
        normal, offset, near_anchor = _take(geometry, idx).split([3, 1, 3], dim=-1)
        rel = (queries[:, :, None] - near_anchor.view(b, q, k, 3)).flatten(0, 2)  # (B * Q * k, 3)
        dist = (normal * rel).sum(-1, keepdim=True) + offset  # signed distance to each neighbour's plane
        # rel(rel) + from_plane(fourier(dist)) as one product: their features side by side.
        feats = torch.cat([self.rel.fourier(rel), self.plane_fourier(dist)], dim=-1)
        embed = torch.cat([self.rel.proj.weight, self.from_plane.weight], dim=1)  # (C, F_rel + F_plane)
        hidden = F.gelu(_add_product(near_token, feats, embed.t())).view(b * q, k, width)
        x, plane_logit = _pool_heads(hidden, self.to_value_logit, self.heads, extra=1)  # (B * Q, C), (B * Q, k, 1)
        blend = (plane_logit.softmax(dim=1) * dist.view(b * q, k, 1)).sum(dim=(1, 2)).view(b, q)
        reach = self.log_reach.exp()
        return self._field(x.view(b, q, width)) + reach * torch.tanh(blend / reach)


class VecSetVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        config.check()
        c = config
        self.config = c
        self.encoder = PointEncoder(c)
        self.enc_blocks = nn.ModuleList(SelfBlock(c.width, c.heads, c.qkv_bias) for _ in range(c.enc_layers))
        self.to_moments = nn.Linear(c.width, 2 * c.latent_channels)
        self.from_latents = nn.Linear(c.latent_channels, c.width)
        self.anchor_embed = PointEmbed(c.num_freqs, c.width, use_normals=False) if c.anchored else None
        self.dec_blocks = nn.ModuleList(SelfBlock(c.width, c.heads, c.qkv_bias) for _ in range(c.dec_layers))
        self.query_decoder = LocalQueryDecoder(c) if c.anchored else QueryDecoder(c)
        self.apply(_init_weights)
        # Start with a narrow posterior (std e^-3 = 0.05) instead of N(., 1): with unit noise the
        # latents carry almost nothing at first and the decoder learns to ignore them; the KL term
        # widens the posterior as far as reconstruction allows.
        nn.init.constant_(self.to_moments.bias[c.latent_channels :], INITIAL_LOGVAR)

    def encode(
        self,
        points: torch.Tensor,
        normals: torch.Tensor | None = None,
        sharp_points: torch.Tensor | None = None,
        sharp_normals: torch.Tensor | None = None,
    ) -> DiagonalGaussian:
        x, anchors = self.encoder(points, normals, sharp_points, sharp_normals)  # (B, M, C), (B, M, 3)
        for block in self.enc_blocks:
            x = block(x)
        # over (B, M, latent_channels); latents (B, M, latent_dim)
        return DiagonalGaussian(self.to_moments(x), anchors if self.config.anchored else None)

    def decode(self, latents: torch.Tensor) -> Decoded:  # (B, M, latent_dim)
        latents = latents.to(self.from_latents.weight.dtype)
        anchors = None
        if self.config.anchored:
            anchors, latents = latents[..., :3], latents[..., 3:]
        x = self.from_latents(latents)  # (B, M, C)
        if anchors is not None:
            x = x + self.anchor_embed(anchors)
        for block in self.dec_blocks:
            x = block(x)
        return Decoded(x, anchors)

    def query(self, decoded: Decoded, queries: torch.Tensor) -> torch.Tensor:  # -> (B, Q) signed distances
        return self.query_decoder(queries, decoded)

    def forward(
        self,
        points: torch.Tensor,
        normals: torch.Tensor | None,
        queries: torch.Tensor,
        sharp_points: torch.Tensor | None = None,
        sharp_normals: torch.Tensor | None = None,
        sample_posterior: bool = True,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(points, normals, sharp_points, sharp_normals)
        latents = posterior.sample() if sample_posterior else posterior.mode()
        return self.query(self.decode(latents), queries), posterior


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


LossKind = Literal["l1", "mse", "bce"]


def field_loss(pred: torch.Tensor, sdf: torch.Tensor, kind: LossKind, truncation: float) -> torch.Tensor:
    """Per-point loss of a predicted field against the true signed distance. Same shape as `pred`.

    l1 / mse: truncated SDF regression: the target is clipped to +-truncation (far from the surface
    only the sign matters); the prediction is not, so a wrong sign always has a gradient.
    bce: occupancy, with -pred read as the logit of "inside", so the surface is the zero level set
    for every kind and one decoder serves them all.
    """
    pred = pred.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(-pred, (sdf < 0).float(), reduction="none")
    target = sdf.clamp(-truncation, truncation)
    if kind == "l1":
        return (pred - target).abs()
    if kind == "mse":
        return (pred - target) ** 2
    raise ValueError(f"unknown loss kind {kind!r}; known: l1, mse, bce")


FORMAT = "shapeflow.vecset_vae/1"


def save_pretrained(model: VecSetVAE, folder: str | Path, meta: dict[str, Any] | None = None) -> None:
    """model.safetensors and config.json ({format, config, meta}) in `folder`, each written atomically."""
    io.save(model, folder, FORMAT, meta)


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu") -> VecSetVAE:
    """The VAE saved by `save_pretrained` in `folder`, in eval mode."""
    build = lambda config: VecSetVAE(VAEConfig.from_dict(config))  # noqa: E731
    return io.load(folder, FORMAT, "train the VAE first (dvc repro train_vae)", build, device)
