"""The rectified-flow engine: conventions, solvers, inversion, guidance, couplings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from scipy.linalg import expm

from celldit import ImageDiT
from celldit.flow import RectifiedFlow, integrate, invert, ot_pairing, velocity_fn

# ---------------------------------------------------------------- conventions


def test_interpolant_endpoints_and_target():
    """t = 0 is the source, t = 1 is data, and the target is the straight-line velocity."""
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    flow = RectifiedFlow()
    assert torch.equal(flow.interpolate(x0, x1, torch.zeros(5)), x0)
    assert torch.equal(flow.interpolate(x0, x1, torch.ones(5)), x1)
    mid = flow.interpolate(x0, x1, torch.full((5,), 0.25))
    torch.testing.assert_close(mid, 0.75 * x0 + 0.25 * x1)
    torch.testing.assert_close(flow.target_velocity(x0, x1), x1 - x0)


def test_loss_is_zero_for_the_exact_velocity_and_model_gets_scaled_time():
    x0, x1 = torch.randn(8, 4), torch.randn(8, 4)
    seen = {}

    def oracle(x, t_scaled):
        seen["t"] = t_scaled
        return x1 - x0

    flow = RectifiedFlow(time_scale=1000.0)
    t = torch.rand(8)
    assert flow.loss(oracle, x1, x0, t=t).item() == 0.0
    torch.testing.assert_close(seen["t"], t * 1000.0)
    # a wrong prediction has loss equal to its mean squared error
    assert flow.loss(lambda x, s: torch.zeros_like(x), x1, x0, t=t).item() == pytest.approx(
        (x1 - x0).pow(2).mean().item(), rel=1e-6
    )


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    uni = RectifiedFlow("uniform").sample_t(20000, generator=g)
    ln = RectifiedFlow("logit_normal").sample_t(20000, generator=g)
    assert 0 <= uni.min() and uni.max() <= 1 and abs(uni.mean().item() - 0.5) < 0.01
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.median().item() - 0.5) < 0.02
    assert ln.std() < uni.std()  # logit-normal concentrates at mid times
    with pytest.raises(ValueError, match="time_sampling"):
        RectifiedFlow("cosine")


# ---------------------------------------------------------------- solvers

A = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]])  # a damped rotation


def linear_field(x, t):
    return x @ A.T


def exact_linear(x0, t):
    return x0 @ torch.from_numpy(expm(A.double().numpy() * t)).T.float()


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(method, order):
    """Halving the step divides the global error by 2**order on a known linear field."""
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    A64 = A.double()
    truth = x0 @ torch.from_numpy(expm(A64.numpy())).T
    errors = []
    for steps in (8, 16, 32):
        out = integrate(lambda x, t: x @ A64.T, x0, steps=steps, method=method)
        errors.append((out - truth).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    for r in ratios:
        assert 2**order * 0.8 < r < 2**order * 1.25, (method, errors, ratios)


def test_euler_with_many_steps_agrees_with_adaptive_solver():
    def field(x, t):  # nonlinear and time dependent
        return torch.sin(x) + t[:, None] * torch.cos(2 * x)

    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    euler = integrate(field, x0, steps=4000, method="euler")
    adaptive = integrate(field, x0, method="adaptive", rtol=1e-9, atol=1e-9)
    coarse = integrate(field, x0, steps=5, method="euler")
    assert (euler - adaptive).abs().max() < 1e-3
    assert (coarse - adaptive).abs().max() > 1e-2  # the comparison can fail


def test_inversion_then_generation_returns_the_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3))

    def field(x, t):
        return net(torch.cat([x, t[:, None]], dim=1))

    x1 = torch.randn(32, 3)
    with torch.no_grad():
        x0 = invert(field, x1, steps=100, method="rk4")
        back = integrate(field, x0, steps=100, method="rk4")
    assert (x0 - x1).abs().max() > 0.05  # inversion moved the points
    assert (back - x1).abs().max() < 1e-4


def test_unknown_solver_and_bad_steps():
    with pytest.raises(ValueError, match="unknown method"):
        integrate(linear_field, torch.zeros(1, 2), method="leapfrog")
    with pytest.raises(ValueError, match="steps"):
        integrate(linear_field, torch.zeros(1, 2), steps=0)


def test_trajectory_starts_at_source_and_ends_at_result():
    x0 = torch.tensor([[1.0, 0.0]])
    traj = integrate(linear_field, x0, steps=10, method="heun", return_trajectory=True)
    assert len(traj) == 11 and torch.equal(traj[0], x0)
    torch.testing.assert_close(traj[-1], integrate(linear_field, x0, steps=10, method="heun"))
    torch.testing.assert_close(traj[-1], exact_linear(x0, 1.0), atol=2e-3, rtol=0)


# ---------------------------------------------------------------- guidance


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    model = ImageDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    for p in model.parameters():  # leave adaLN-Zero so the output is not trivially zero
        nn.init.normal_(p, std=0.05)
    return model.eval()


def test_cfg_scale_one_equals_conditional_prediction(tiny_dit):
    flow = RectifiedFlow()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    y, null = torch.tensor([0, 2, 4]), torch.full((3,), 5)
    with torch.no_grad():
        cond = flow.velocity(tiny_dit, x, t, y=y)
        guided = velocity_fn(tiny_dit, flow, {"y": y}, {"y": null}, cfg_scale=1.0)(x, t)
        # the batched guidance path itself, at scale 1, too
        batched = velocity_fn(tiny_dit, flow, {"y": y}, {"y": null}, cfg_scale=1.0 + 1e-12)(x, t)
        uncond = flow.velocity(tiny_dit, x, t, y=null)
        scaled = velocity_fn(tiny_dit, flow, {"y": y}, {"y": null}, cfg_scale=4.0)(x, t)
    assert tiny_dit.learn_sigma and cond.shape == x.shape  # learned-sigma channels dropped
    torch.testing.assert_close(guided, cond)
    torch.testing.assert_close(batched, cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=0)
    assert not torch.allclose(scaled, cond, atol=1e-3)


def test_first_three_channel_guidance_matches_original_dit(tiny_dit):
    flow = RectifiedFlow(time_scale=1.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0])
    y, null = torch.tensor([1, 3]), torch.full((2,), 5)
    with torch.no_grad():
        ours = velocity_fn(tiny_dit, flow, {"y": y}, {"y": null}, cfg_scale=3.0, guidance_channels=3)(x, t)
        official = tiny_dit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0)
    torch.testing.assert_close(ours[:, :3], official[:2, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:, 3:], official[:2, 3:4], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- couplings


def test_ot_pairing_recovers_a_shuffle_and_lowers_cost():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(64, 5, generator=g)
    shuffle = torch.randperm(64, generator=g)
    x0 = x1[shuffle] + 0.01 * torch.randn(64, 5, generator=g)
    perm = ot_pairing(x0, x1)
    torch.testing.assert_close(x0[perm], x1, atol=0.1, rtol=0)
    noise = torch.randn(64, 5, generator=g)
    perm = ot_pairing(noise, x1)
    assert sorted(perm.tolist()) == list(range(64))
    assert (noise[perm] - x1).pow(2).sum() < 0.8 * (noise - x1).pow(2).sum()


# ---------------------------------------------------------------- end to end


def rbf_mmd2(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Biased squared MMD with a sum of RBF kernels (multi-scale, so it sees the modes)."""
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    k = sum(torch.exp(-d2 / (2 * h**2)) for h in bandwidths)
    n = len(a)
    return (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).item()


def mixture(n: int, g: torch.Generator) -> torch.Tensor:
    """Four well-separated Gaussian modes on a square (std 0.15)."""
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]) * 1.5
    return centres[torch.randint(0, 4, (n,), generator=g)] + 0.15 * torch.randn(n, 2, generator=g)


def test_trained_flow_samples_match_a_gaussian_mixture():
    """A small MLP trained with the engine generates the 4-mode target.

    Threshold: the MMD of the generated sample to the target must be within 3x the
    largest MMD seen between two independent target samples of the same size (the null
    spread), while a moment-matched single Gaussian, the failure this guards against,
    scores far above it.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
    model = lambda x, t: net(torch.cat([x, t[:, None] / 1000.0], dim=1))  # noqa: E731
    flow = RectifiedFlow()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _step in range(1500):
        loss = flow.loss(model, mixture(256, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-100:]) < 0.8 * sum(losses[:100])
    n = 500
    with torch.no_grad():
        samples = integrate(velocity_fn(model, flow), torch.randn(n, 2, generator=g), steps=50, method="heun")
    null = [rbf_mmd2(mixture(n, g), mixture(n, g)) for _ in range(5)]
    target = mixture(n, g)
    gaussian = target.mean(0) + torch.randn(n, 2, generator=g) * target.std(0)
    threshold = 3 * max(null)
    assert rbf_mmd2(samples, mixture(n, g)) < threshold
    assert rbf_mmd2(gaussian, mixture(n, g)) > threshold
    # every mode is populated
    quadrant = (samples[:, 0] > 0).long() * 2 + (samples[:, 1] > 0).long()
    counts = torch.bincount(quadrant, minlength=4)
    assert counts.min() > n / 4 * 0.6 and math.isclose(counts.sum().item(), n)
