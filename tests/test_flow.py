"""Rectified flow: interpolation, t sampling, the Euler sampler, CFG, label dropout, and that
training with `flow.loss` then sampling with `flow.euler_sample` recovers a known 2-D mixture."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from shapeflow import flow

pytestmark = pytest.mark.usefixtures("one_thread")


def test_interpolation_is_noise_at_t0_and_data_at_t1_per_sample():
    data, noise = torch.randn(3, 5, 2), torch.randn(3, 5, 2)
    z = flow.interpolate(data, noise, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(z[0], noise[0])
    assert torch.equal(z[1], data[1])
    torch.testing.assert_close(z[2], 0.75 * noise[2] + 0.25 * data[2])


def test_velocity_target_is_the_time_derivative_of_the_interpolation():
    data, noise, t = torch.randn(4, 3), torch.randn(4, 3), torch.full((4,), 0.3)
    dt = 1e-3
    slope = (flow.interpolate(data, noise, t + dt) - flow.interpolate(data, noise, t)) / dt
    torch.testing.assert_close(slope, flow.velocity_target(data, noise), atol=1e-3, rtol=1e-3)


def test_loss_is_per_sample_mean_squared_velocity_error_and_zero_for_the_true_velocity():
    data, noise, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.tensor([0.2, 0.7])

    def true_velocity(z, tt):  # each sample's data is a point mass: its paths are straight
        return (data - z) / (1 - tt)[:, None, None]

    torch.testing.assert_close(flow.loss(true_velocity, data, noise, t), torch.zeros(2), atol=1e-5, rtol=0)
    per_sample = flow.loss(lambda z, tt, y: torch.zeros_like(z) + y, data, noise, t, extra_args={"y": 1.0})
    torch.testing.assert_close(per_sample, ((1.0 - (data - noise)) ** 2).mean(dim=(1, 2)))


def test_channel_weights_scale_each_channels_share_of_the_loss():
    data, noise, t = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.tensor([0.2, 0.7])
    off_in_first = lambda z, tt: torch.tensor([1.0, 0.0, 0.0]).expand_as(z)  # noqa: E731  error 1 in channel 0 only
    plain = flow.loss(off_in_first, data, noise, t)
    torch.testing.assert_close(plain, torch.full((2,), 1 / 3))
    torch.testing.assert_close(flow.loss(off_in_first, data, noise, t, torch.ones(3)), plain)
    # Weight 4 on channel 0: 4 * 1 / mean(4, 1, 1) / 3 channels = 2/3 per element.
    torch.testing.assert_close(
        flow.loss(off_in_first, data, noise, t, torch.tensor([4.0, 1.0, 1.0])), torch.full((2,), 2 / 3)
    )
    with pytest.raises(ValueError, match="channel_weights"):
        flow.loss(off_in_first, data, noise, t, torch.ones(4))


def test_euler_on_the_straight_paths_of_one_data_point_is_exact_for_few_steps():
    c = torch.tensor([[0.5, -2.0, 3.0]])
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))

    def true_velocity(z, t):  # of z_t = (1 - t) noise + t c
        return (c - z) / (1 - t)[:, None]

    for steps, shift in ((1, 1.0), (3, 1.0), (4, 3.0)):
        out = flow.euler_sample(true_velocity, noise, steps, shift=shift)
        torch.testing.assert_close(out, c.expand(6, 3), atol=1e-5, rtol=0)


def test_euler_evaluates_at_the_start_of_each_step_with_one_time_per_sample():
    seen = []

    def constant(z, t):
        seen.append(t.clone())
        return torch.ones_like(z)

    out = flow.euler_sample(constant, torch.zeros(2, 3), 4)
    torch.testing.assert_close(out, torch.ones(2, 3))
    assert [s.tolist() for s in seen] == [[0.0, 0.0], [0.25, 0.25], [0.5, 0.5], [0.75, 0.75]]


def test_euler_passes_the_extra_args_to_every_evaluation():
    seen = []

    def scaled(z, t, *, scale):
        seen.append(scale)
        return scale * torch.ones_like(z)

    out = flow.euler_sample(scaled, torch.zeros(2, 3), 4, extra_args={"scale": 2.0})
    torch.testing.assert_close(out, torch.full((2, 3), 2.0))
    assert seen == [2.0] * 4


def test_time_grid_shift_puts_smaller_steps_near_noise():
    grid = flow.time_grid(10, shift=3.0)
    assert grid[0] == 0 and grid[-1] == 1
    steps = grid.diff()
    assert (steps > 0).all() and (steps.diff() > 0).all()  # growing from the noise end


def test_logit_normal_t_is_in_the_open_interval_with_median_sigmoid_mean():
    t = flow.sample_t(20_000, mean=0.5, std=1.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20_000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01


def test_shift_moves_the_median_as_the_formula_says():
    g = torch.Generator().manual_seed(1)
    plain = flow.sample_t(20_000, 0.0, 1.0, generator=g)
    shifted = flow.sample_t(20_000, 0.0, 1.0, shift=3.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, flow.shift_t(plain, 3.0))  # same draws, mapped through t'
    assert abs(shifted.median().item() - 0.5 / (0.5 + 3.0 * 0.5)) < 0.01  # t' = t / (t + s (1 - t))


class Linear2Class(nn.Module):
    """v = W x + b_y, with a different bias per label: conditional and null outputs differ."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bias = nn.Embedding(3, 3)

    def forward(self, x, t, y):
        return self.lin(x) * t[:, None] + self.bias(y)


def test_cfg_guidance_1_is_conditional_0_is_unconditional_else_the_extrapolation():
    torch.manual_seed(0)
    model, x, t, y = Linear2Class(), torch.randn(4, 3), torch.rand(4), torch.tensor([0, 1, 0, 1])
    null = torch.full_like(y, 2)
    with torch.no_grad():
        v_cond, v_uncond = model(x, t, y), model(x, t, null)
        torch.testing.assert_close(flow.cfg_velocity(model, x, t, y, 1.0, 2), v_cond)
        torch.testing.assert_close(flow.cfg_velocity(model, x, t, y, 0.0, 2), v_uncond)
        guided = flow.cfg_velocity(model, x, t, y, 3.0, 2)
    torch.testing.assert_close(guided, v_uncond + 3.0 * (v_cond - v_uncond))
    assert not torch.allclose(v_cond, v_uncond)


def test_label_dropout_replaces_about_p_of_the_labels_with_null_and_keeps_the_rest():
    y = torch.randint(0, 5, (20_000,), generator=torch.Generator().manual_seed(0))
    out = flow.drop_labels(y, 0.2, 5, torch.Generator().manual_seed(1))
    dropped = out == 5
    assert abs(dropped.float().mean().item() - 0.2) < 0.01
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(flow.drop_labels(y, 0.0, 5), y)
    assert (flow.drop_labels(y, 1.0, 5) == 5).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: flow.sample_t(4, std=0.0), "std must be > 0"),
        (lambda: flow.sample_t(4, shift=-1.0), "shift must be > 0"),
        (lambda: flow.sample_t(0), "n must be at least 1"),
        (lambda: flow.euler_sample(lambda z, t: z, torch.zeros(1, 2), 0), "steps must be an integer >= 1"),
        (lambda: flow.time_grid(2.5), "steps must be an integer >= 1"),
        (lambda: flow.drop_labels(torch.zeros(3, dtype=torch.long), 1.5, 9), r"must be in \[0, 1\]"),
        (lambda: flow.interpolate(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2)), "one time per sample"),
    ],
)
def test_invalid_arguments_are_refused_with_a_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# A known target: four equal Gaussians of std SIGMA at the corners of a square.
MODES = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
SIGMA = 0.1
NULL = len(MODES)
SEED = 0
BATCH, SAMPLE_STEPS = 256, 50


class VelocityMLP(nn.Module):
    """[x, sin/cos features of t] (+ a label embedding) -> velocity, for 2-D points."""

    def __init__(self, num_classes: int = 0, width: int = 128):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, 5, dtype=torch.float32))
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.inp = nn.Linear(2 + 2 * len(self.freqs), width)
        layers = [nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU()]
        self.body = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x, t, y=None):  # (B, 2), (B,), (B,) -> (B, 2)
        angles = t[:, None] * self.freqs
        h = self.inp(torch.cat([x, angles.sin(), angles.cos()], dim=-1))
        return self.body(h if self.label is None else h + self.label(y))


def train_on_the_mixture(seed: int, conditional: bool, steps: int) -> tuple[VelocityMLP, torch.Generator]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = VelocityMLP(len(MODES) if conditional else 0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        mode = torch.randint(len(MODES), (BATCH,), generator=g)
        data = MODES[mode] + SIGMA * torch.randn(BATCH, 2, generator=g)
        noise = torch.randn(BATCH, 2, generator=g)
        t = flow.sample_t(BATCH, 0.0, 1.0, generator=g)
        extra_args = {"y": flow.drop_labels(mode, 0.1, NULL, g)} if conditional else None
        loss = flow.loss(net, data, noise, t, extra_args=extra_args).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval(), g


def nearest_mode(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> index of each sample's nearest mode, and whether it lies within 3 SIGMA of it."""
    dist, index = torch.cdist(samples, MODES).min(dim=1)
    return index, dist < 3 * SIGMA


def mixture_statistics(seed: int) -> dict[str, float]:
    """Unconditional: train, draw 4000 samples, and measure them against the mixture."""
    net, g = train_on_the_mixture(seed, conditional=False, steps=2000)
    samples = flow.euler_sample(net, torch.randn(4000, 2, generator=g), SAMPLE_STEPS)
    index, near = nearest_mode(samples)
    shares = torch.bincount(index[near], minlength=len(MODES)).float() / len(samples)
    spread = (samples - MODES[index])[near].std(dim=0) / SIGMA  # per axis, in units of SIGMA
    return {
        "near": near.float().mean().item(),
        "share_min": shares.min().item(),
        "share_max": shares.max().item(),
        "spread_min": spread.min().item(),
        "spread_max": spread.max().item(),
    }


def test_flow_learns_a_mixture_of_gaussians():
    # A true sample lies within 3 SIGMA of its mode with probability 1 - exp(-4.5) = 98.9 % (2-D);
    # each mode holds 25 %; inside the disc the per-axis std is 0.97 SIGMA.
    # Measured over seeds 0-5: near 0.954-0.964, shares 0.223-0.251, spread 0.84-0.91.
    stats = mixture_statistics(SEED)
    assert stats["near"] >= 0.90, stats
    assert 0.15 <= stats["share_min"] and stats["share_max"] <= 0.35, stats
    assert 0.7 <= stats["spread_min"] and stats["spread_max"] <= 1.25, stats


def conditional_hits(seed: int, guidance: float) -> torch.Tensor:
    """Conditional: per class, the share of its samples within 3 SIGMA of its own mode. (len(MODES),)"""
    net, g = train_on_the_mixture(seed, conditional=True, steps=1000)
    per_class = 500
    y = torch.arange(len(MODES)).repeat_interleave(per_class)
    velocity = functools.partial(flow.cfg_velocity, net)
    extra_args = {"y": y, "guidance": guidance, "null_label": NULL}
    samples = flow.euler_sample(velocity, torch.randn(len(y), 2, generator=g), SAMPLE_STEPS, extra_args=extra_args)
    index, near = nearest_mode(samples)
    return ((index == y) & near).float().view(len(MODES), per_class).mean(dim=1)


def test_flow_with_classifier_free_guidance_puts_each_class_at_its_mode():
    hits = conditional_hits(SEED, guidance=2.0)  # measured over seeds 0-5: 1.0 for every class
    assert (hits >= 0.90).all(), hits
