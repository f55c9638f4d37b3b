"""The MMF loss, tested against maths.

* the analytic case: Gaussian data ``N(mu, s^2 I)`` has a linear flow and a closed-form average velocity;
* gradients against hand-written references built on an independent derivative
  (``torch.autograd.functional.jvp``, the double-backward trick) in float64;
* the limits ``lam = 0`` (MeanFlow), ``lam = 1`` (full gradient), ``r = t`` (flow matching).
"""

import math

import pytest
import torch

from mmf_diffusers import MMFScheduler, ModularMeanFlowLoss, TimeSampler, sg_lambda
from mmf_diffusers.derivatives import finite_difference_derivative, jvp_derivative
from mmf_diffusers.toy import TwoTimeMLP

DIM = 2
MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
S = 0.5


# --- the analytic case ------------------------------------------------------------------------------------------
# x ~ N(mu, s^2 I), z_t = (1 - t) x + t e: z_t ~ N(m(t), sigma(t)^2 I) with m(t) = (1 - t) mu and
# sigma(t)^2 = (1 - t)^2 s^2 + t^2. The flow maps standardised coordinates onto themselves:
# z_r = m(r) + sigma(r) / sigma(t) (z_t - m(t)), so u(z, r, t) = (z - z_r) / (t - r) in closed form and the
# instantaneous velocity is v(z, t) = m'(t) + sigma'(t) / sigma(t) (z - m(t)).


def _m(t):
    return (1 - t)[:, None] * MU


def _sigma(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)[:, None]


def exact_velocity(z, t):
    dsigma = ((t - (1 - t) * S**2) / torch.sqrt((1 - t) ** 2 * S**2 + t**2))[:, None]
    return -MU + dsigma / _sigma(t) * (z - _m(t))


def exact_average_velocity(z, r, t):
    """Closed-form u(z, r, t); at r = t (where the quotient is 0/0) it is the instantaneous velocity."""
    h = (t - r)[:, None]
    z_r = _m(r) + _sigma(r) / _sigma(t) * (z - _m(t))
    safe_h = torch.where(h > 0, h, torch.ones_like(h))
    return torch.where(h > 0, (z - z_r) / safe_h, exact_velocity(z, t))


def gaussian_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = MU + S * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    e = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    return x, e, r, t


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference"])
def test_exact_u_satisfies_meanflow_identity(derivative):
    # u = v - (t - r) du/dt along the true flow (tangent = instantaneous velocity).
    x, e, r, t = gaussian_batch(512, seed=0)
    z = (1 - t)[:, None] * x + t[:, None] * e
    v = exact_velocity(z, t)
    estimator = jvp_derivative if derivative == "jvp" else finite_difference_derivative
    kwargs = {} if derivative == "jvp" else {"eps": 1e-6}
    u, dudt = estimator(exact_average_velocity, z, r, t, v, create_graph=False, **kwargs)
    residual = u + (t - r)[:, None] * dudt - v
    tol = 1e-10 if derivative == "jvp" else 1e-5  # forward difference: O(eps) error
    assert residual.abs().max().item() < tol
    # Not trivially satisfied: the derivative term is of the order of the velocity.
    assert ((t - r)[:, None] * dudt).abs().mean().item() > 0.1


class OffsetScaleModel(torch.nn.Module):
    """The exact u with two learnable perturbations: u_theta = (1 + a) u_exact + b."""

    def __init__(self, a=0.0, b=(0.0, 0.0)):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z, r, t):
        return (1 + self.a) * exact_average_velocity(z, r, t) + self.b


def _loss_gradient(model, lam, tangent="conditional", n=200_000, seed=1):
    x, e, r, t = gaussian_batch(n, seed)
    out = ModularMeanFlowLoss(derivative="jvp", tangent=tangent)(model, x, lam, t=t, r=r, noise=e)
    model.zero_grad()
    out.loss.backward()
    return model.a.grad.item(), model.b.grad.clone(), out


def test_exact_u_minimises_expected_loss():
    # With the stop-gradient loss (lam = 0) the exact model is a stationary point: the gradient of the loss with
    # respect to an offset b and a scale a, added to the exact model, is ~0 (Monte Carlo error ~ 1e-2) ...
    grad_a, grad_b, _ = _loss_gradient(OffsetScaleModel(), lam=0.0)
    assert abs(grad_a) < 0.015 and grad_b.abs().max().item() < 0.015
    # ... and clearly non-zero away from it: the error is averaged over the D = 2 dimensions, so
    # d/db of E[mean_d (b + residual)_d^2] = 2 b / D = b at the exact model.
    grad_a, grad_b, _ = _loss_gradient(OffsetScaleModel(b=(0.3, -0.2)), lam=0.0)
    assert torch.allclose(grad_b, torch.tensor([0.3, -0.2], dtype=torch.float64), atol=0.02)
    grad_a, _, _ = _loss_gradient(OffsetScaleModel(a=0.2), lam=0.0)
    assert abs(grad_a) > 0.3


def test_full_gradient_with_conditional_tangent_is_biased_and_model_tangent_is_not():
    # docs/design.md's warning, checked on the analytic case: with lam = 1 the noise of the conditional tangent
    # v = e - x enters the objective, so the exact model is no longer stationary in a parameter that changes
    # du/dt (the scale a). With the model's own instantaneous velocity as tangent it is.
    grad_a_conditional, grad_b, _ = _loss_gradient(OffsetScaleModel(), lam=1.0, tangent="conditional")
    assert grad_b.abs().max().item() < 0.02  # b does not enter du/dt
    # Over seeds: -0.083 +- 0.003 against Monte Carlo noise of ~0.004 for the unbiased cases.
    assert abs(grad_a_conditional) > 0.05
    grad_a_model, grad_b, _ = _loss_gradient(OffsetScaleModel(), lam=1.0, tangent="model")
    assert abs(grad_a_model) < 0.015 and grad_b.abs().max().item() < 0.015


@pytest.mark.parametrize("num_steps", [1, 2])
def test_scheduler_with_exact_u_moves_noise_to_data(num_steps):
    n = 100_000
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    scheduler = MMFScheduler()
    scheduler.set_timesteps(num_steps)
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].to(torch.float64).expand(n)
        r = scheduler.sigmas[i + 1].to(torch.float64).expand(n)
        z = scheduler.step(exact_average_velocity(z, r, t), timestep, z).prev_sample
    # Standard errors: mean s / sqrt(n) ~ 1.6e-3, variance s^2 sqrt(2 / n) ~ 1.1e-3.
    assert torch.allclose(z.mean(0), MU, atol=0.01)
    assert torch.allclose(z.var(0), torch.full((DIM,), S**2, dtype=torch.float64), atol=0.01)


# --- gradients against hand-written references ------------------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return TwoTimeMLP(dim=DIM, hidden=32, depth=3).double()


def _toy_batch(n=64, seed=0, neq_fraction=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    e = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    r = torch.where(torch.arange(n) < int(neq_fraction * n), r, t)
    return x, e, r, t


def _reference_dudt(model, z, r, t, v, create_graph):
    # Independent implementation: torch.autograd.functional.jvp (double-backward trick), not torch.func.
    _, dudt = torch.autograd.functional.jvp(
        lambda z_, t_: model(z_, r, t_), (z, t), (v, torch.ones_like(t)), create_graph=create_graph
    )
    return dudt


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _meanflow_reference_loss(model, x, e, r, t):
    """MeanFlow's stop-gradient loss || u - stopgrad(v - (t - r) du/dt) ||^2."""
    z = (1 - t)[:, None] * x + t[:, None] * e
    v = e - x
    dudt = _reference_dudt(model, z, r, t, v, create_graph=False).detach()
    target = (v - (t - r)[:, None] * dudt).detach()
    return (model(z, r, t) - target).pow(2).mean(1).mean()


def _full_gradient_reference_loss(model, x, e, r, t):
    """|| u + (t - r) du/dt - v ||^2 with gradients through du/dt."""
    z = (1 - t)[:, None] * x + t[:, None] * e
    v = e - x
    dudt = _reference_dudt(model, z, r, t, v, create_graph=True)
    return (model(z, r, t) + (t - r)[:, None] * dudt - v).pow(2).mean(1).mean()


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference"])
def test_gradients_match_references(derivative):
    model = _mlp()
    x, e, r, t = _toy_batch()
    # Finite differences have O(eps) error; in float64 a small eps is fine.
    loss_fn = ModularMeanFlowLoss(derivative=derivative, fd_eps=1e-6)
    tol = dict(rtol=1e-9, atol=1e-11) if derivative == "jvp" else dict(rtol=1e-4, atol=1e-6)

    g0 = _grads(model, loss_fn(model, x, 0.0, t=t, r=r, noise=e).loss)
    g1 = _grads(model, loss_fn(model, x, 1.0, t=t, r=r, noise=e).loss)
    ghalf = _grads(model, loss_fn(model, x, 0.5, t=t, r=r, noise=e).loss)
    ref0 = _grads(model, _meanflow_reference_loss(model, x, e, r, t))
    ref1 = _grads(model, _full_gradient_reference_loss(model, x, e, r, t))

    torch.testing.assert_close(g0, ref0, **tol)
    torch.testing.assert_close(g1, ref1, **tol)
    torch.testing.assert_close(ghalf, (g0 + g1) / 2, **tol)
    # lam really does something (ports that stop-gradient the whole target afterwards get g1 == g0).
    assert (g1 - g0).norm() > 0.05 * g0.norm()


def test_loss_value_does_not_depend_on_lam():
    model = _mlp()
    x, e, r, t = _toy_batch()
    values = [ModularMeanFlowLoss()(model, x, lam, t=t, r=r, noise=e).loss.item() for lam in (0.0, 0.3, 1.0)]
    assert values[0] == pytest.approx(values[1], rel=1e-12) and values[0] == pytest.approx(values[2], rel=1e-12)


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_r_equal_t_is_flow_matching(derivative, lam):
    model = _mlp()
    x, e, _, t = _toy_batch()
    out = ModularMeanFlowLoss(derivative=derivative)(model, x, lam, t=t, r=t.clone(), noise=e)
    z = (1 - t)[:, None] * x + t[:, None] * e
    fm = (model(z, t, t) - (e - x)).pow(2).mean(1).mean()
    torch.testing.assert_close(out.loss, fm, rtol=1e-12, atol=0)
    torch.testing.assert_close(_grads(model, out.loss), _grads(model, fm), rtol=1e-10, atol=1e-12)
    assert out.stats["frac_r_neq_t"] == 0 and out.stats["mean_abs_dudt"] == 0


def test_mixed_rows_equal_rowwise_losses():
    # Splitting the batch into r != t rows (derivative) and r = t rows must not mix them up.
    model = _mlp()
    x, e, r, t = _toy_batch(n=16, neq_fraction=0.5)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    x, e, r, t = x[perm], e[perm], r[perm], t[perm]
    for lam in (0.0, 1.0):
        out = ModularMeanFlowLoss()(model, x, lam, t=t, r=r, noise=e)
        single = torch.stack([
            ModularMeanFlowLoss()(model, x[i:i + 1], lam, t=t[i:i + 1], r=r[i:i + 1], noise=e[i:i + 1]).loss
            for i in range(16)
        ])
        torch.testing.assert_close(out.per_sample.detach(), single.detach(), rtol=1e-10, atol=1e-12)


def test_adaptive_weighting():
    model = _mlp()
    x, e, r, t = _toy_batch()
    plain = ModularMeanFlowLoss()(model, x, 0.0, t=t, r=r, noise=e)
    p, c = 0.75, 1e-2
    weighted = ModularMeanFlowLoss(adaptive_p=p, adaptive_c=c)(model, x, 0.0, t=t, r=r, noise=e)
    err = plain.per_sample.detach()
    torch.testing.assert_close(weighted.per_sample.detach(), err / (err + c) ** p)
    torch.testing.assert_close(weighted.loss.detach(), (err / (err + c) ** p).mean())
    # The weight is a constant: the gradient is that of sum_i w_i * err_i with w fixed.
    w = 1 / (err + c) ** p
    g = _grads(model, weighted.loss)
    out = ModularMeanFlowLoss()(model, x, 0.0, t=t, r=r, noise=e)
    g_ref = _grads(model, (w * out.per_sample).mean())
    torch.testing.assert_close(g, g_ref)


def test_stats():
    model = _mlp()
    x, e, r, t = _toy_batch(n=64, neq_fraction=0.25)
    out = ModularMeanFlowLoss()(model, x, 0.4, t=t, r=r, noise=e)
    assert out.per_sample.shape == (64,)
    assert out.stats["frac_r_neq_t"] == pytest.approx(0.25)
    assert out.stats["lam"] == 0.4
    assert out.stats["mse"] == pytest.approx(out.loss.item())
    assert out.stats["mean_abs_dudt"] > 0


def test_sg_lambda():
    a = torch.tensor([2.0, -1.0], requires_grad=True)
    assert not sg_lambda(a * 3, 0.0).requires_grad  # lam = 0: no gradient path at all
    for lam in (0.25, 1.0):
        y = sg_lambda(a * 3, lam)
        assert torch.equal(y, a.detach() * 3)
        (grad,) = torch.autograd.grad(y.sum(), a)
        torch.testing.assert_close(grad, torch.full_like(a, 3 * lam))


def test_loss_errors():
    model = _mlp()
    x, e, r, t = _toy_batch(n=8)
    loss_fn = ModularMeanFlowLoss()
    for lam in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="lam"):
            loss_fn(model, x, lam)
    with pytest.raises(ValueError, match="both"):
        loss_fn(model, x, 0.0, t=t)
    with pytest.raises(ValueError, match="r <= t"):
        loss_fn(model, x, 0.0, t=r, r=t + 0.01)
    with pytest.raises(ValueError, match="shape"):
        loss_fn(model, x, 0.0, t=t[:4], r=r[:4])
    with pytest.raises(ValueError, match="noise"):
        loss_fn(model, x, 0.0, noise=e[:3])
    with pytest.raises(ValueError, match="derivative"):
        ModularMeanFlowLoss(derivative="autodiff")
    with pytest.raises(ValueError, match="tangent"):
        ModularMeanFlowLoss(tangent="marginal")
    for kwargs in ({"fd_eps": 0}, {"adaptive_p": -1}, {"adaptive_c": 0}):
        with pytest.raises(ValueError):
            ModularMeanFlowLoss(**kwargs)


# --- time sampling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_time_sampler(distribution):
    sampler = TimeSampler(distribution=distribution, mean=-0.4, std=1.0, r_neq_t_fraction=0.25)
    t, r = sampler(10_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == r.shape == (10_000,) and t.dtype == torch.float32
    assert bool(((0 <= r) & (r <= t) & (t <= 1)).all())
    assert int((r < t).sum()) == 2500
    t2, r2 = sampler(10_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(r, r2)
    if distribution == "logit_normal":
        # Each of the two draws has median sigmoid(mean); t = max has P(t < m) = 1/4.
        m = 1 / (1 + math.exp(0.4))
        assert (t < m).float().mean().item() == pytest.approx(0.25, abs=0.02)
    else:
        # max of two uniforms: P(t < 1/2) = 1/4.
        assert (t < 0.5).float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_time_sampler_errors():
    with pytest.raises(ValueError, match="distribution"):
        TimeSampler(distribution="beta")
    with pytest.raises(ValueError, match="std"):
        TimeSampler(std=0)
    with pytest.raises(ValueError, match="r_neq_t_fraction"):
        TimeSampler(r_neq_t_fraction=1.5)
