"""Rectified flow: the one definition of the noise process, shared by training and sampling.

Convention: z_t = (1 - t) * noise + t * data, so t = 0 is pure noise and t = 1 is data, and the
velocity dz_t/dt = data - noise is what the network learns to predict. Sampling integrates
dz/dt = v(z, t) from t = 0 (noise) to t = 1.

A velocity function has the signature `velocity_fn(z, t, **extra_args) -> v`, with z (B, ...), t (B,)
and v shaped like z; `extra_args` (k-diffusion's name) carries what conditions it, e.g. {"y": labels}
for a class-conditional model, or {"y": labels, "guidance": 3.0, "null_label": n} for
`partial(cfg_velocity, model)`. `loss` and the samplers pass it through unchanged. Samplers are pure
functions `sampler(velocity_fn, x0, steps, *, extra_args=None) -> x1`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

VelocityFn = Callable[..., torch.Tensor]  # (z, t, **extra_args) -> v


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = t / (t + shift * (1 - t)), i.e. logit(t') = logit(t) - log(shift).

    shift = 1 is the identity; shift > 1 moves every t towards the noise end (t = 0), which SD3 uses
    for larger inputs, where the same noise level destroys less of the signal. Monotone, with 0 and 1
    fixed, so quantiles map through it (the median of t' is the shifted median of t).
    """
    _check_positive("shift", shift)
    return t / (t + shift * (1 - t))


def sample_t(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n training times from the logit-normal distribution (SD3), then shifted. (n,) float32 in (0, 1).

    t = sigmoid(mean + std * e), e ~ N(0, 1), so the median is sigmoid(mean); then
    t' = t / (t + shift * (1 - t)) = sigmoid(mean - log(shift) + std * e), median sigmoid(mean - log(shift)).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _check_positive("std", std)
    _check_positive("shift", shift)
    e = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(mean - math.log(shift) + std * e)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name} must be > 0, got {value}")


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (B,) -> (B, 1, ..., 1), to broadcast over the trailing dims of `like` (B, ...)."""
    if t.shape != like.shape[:1]:
        raise ValueError(f"t must have shape ({like.shape[0]},), one time per sample; got {tuple(t.shape)}")
    return t.to(like.dtype).reshape(-1, *(1,) * (like.ndim - 1))


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) * noise + t * data, with t (B,) one time per sample. Shaped like data."""
    t = _per_sample(t, data)
    return (1 - t) * noise + t * data


def velocity_target(data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """dz_t / dt = data - noise: what the network regresses."""
    return data - noise


def loss(
    velocity_fn: VelocityFn,
    data: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    channel_weights: torch.Tensor | None = None,
    extra_args: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Per-sample flow-matching loss (B,): mean over each sample's elements of
    (velocity_fn(z_t, t, **extra_args) - (data - noise))^2, in float32. Take `.mean()` for the batch loss.

    channel_weights (C,), over the last dim: a weighted mean instead, sum(w_c * err) / sum(w_c) per
    element position, so weights of all ones are the plain mean.
    """
    pred = velocity_fn(interpolate(data, noise, t), t, **(extra_args or {}))
    err = (pred.float() - velocity_target(data, noise).float()) ** 2
    if channel_weights is not None:
        w = channel_weights.to(err)
        if w.shape != err.shape[-1:]:
            raise ValueError(f"channel_weights must have shape ({err.shape[-1]},), got {tuple(w.shape)}")
        err = err * (w / w.mean())
    return err.flatten(1).mean(dim=1)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 times from 0 to 1: uniform, then through `shift_t` (shift > 1: smaller steps near noise)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return shift_t(torch.linspace(0.0, 1.0, steps + 1, device=device), shift)


@torch.no_grad()
def euler_sample(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    steps: int,
    *,
    shift: float = 1.0,
    extra_args: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Integrate dz/dt = velocity_fn(z, t, **extra_args) from noise x0 at t = 0 to t = 1 in `steps` Euler steps.

    The field is evaluated at the start of each step, t_0 = 0 ... t_{steps-1} < 1, never at t = 1.
    On the straight paths of a single data point the Euler step is exact for any step count.
    """
    ts = time_grid(steps, shift, device=x0.device)
    extra_args = extra_args or {}
    x = x0
    for t, t_next in itertools.pairwise(ts):
        v = velocity_fn(x, t.expand(x.shape[0]), **extra_args)
        x = x + (t_next - t).to(x.dtype) * v
    return x


def cfg_velocity(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    guidance: float,
    null_label: int,
) -> torch.Tensor:
    """Classifier-free guidance: v = v_uncond + g * (v_cond - v_uncond), with model(x, t, y) -> v.

    v_cond = model(x, t, y), v_uncond = model(x, t, null_label). g = 1 is the conditional model alone
    and g = 0 the unconditional one (each one forward pass over B); any other g runs both branches as
    one forward pass over 2B; g > 1 pushes samples further towards their class. As a velocity
    function: `partial(cfg_velocity, model)` with extra_args {"y": ..., "guidance": ..., "null_label": ...}.
    """
    if guidance == 1:
        return model(x, t, y)
    null = torch.full_like(y, null_label)
    if guidance == 0:
        return model(x, t, null)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label replaced by `null_label` with probability p (classifier-free guidance training)."""
    if not 0 <= p <= 1:
        raise ValueError(f"label drop probability must be in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_label), y)
