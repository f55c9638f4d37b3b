"""The loss under autocast: du/dt is computed in float32 outside autocast, so a bf16 / fp16 step trains on the same
derivative as a float32 step (loss, mean |du/dt| and gradient norm within 5%), while the main forward
really runs in low precision. Also: ``pair_rows`` equals the plain loss on the explicitly paired batch."""

import pytest
import torch

from mmf_diffusers import ModularMeanFlowLoss, TimeSampler, build_mmf_unet, unet_model_fn
from mmf_diffusers.derivatives import finite_difference_derivative, jvp_derivative


def tiny_unet():
    torch.manual_seed(0)
    return build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                          attention_head_dim=4)


def batch(n=16, seed=0, pair_rows=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    t, r = TimeSampler(r_neq_t_fraction=0.5, pair_rows=pair_rows)(n, generator=g)
    return x, noise, t, r


def one_step(unet, derivative, lam, dtype, **loss_kwargs):
    model_fn = unet_model_fn(unet)
    x, noise, t, r = batch()
    unet.zero_grad(set_to_none=True)
    loss_fn = ModularMeanFlowLoss(derivative=derivative, tangent="model", **loss_kwargs)
    context = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with context:
        out = loss_fn(model_fn, x, lam, t=t, r=r, noise=noise)
    out.loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in unet.parameters() if p.grad is not None)).item()
    return out.loss.item(), out.stats["mean_abs_dudt"], norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_a_low_precision_step_matches_float32(derivative, lam, dtype):
    unet = tiny_unet()
    ref = one_step(unet, derivative, lam, None)
    low = one_step(unet, derivative, lam, dtype)
    for name, a, b in zip(("loss", "mean |du/dt|", "grad norm"), low, ref):
        assert abs(a - b) / abs(b) < 0.05, (name, a, b)
    assert ref[1] > 0.01  # the derivative term is there


def test_the_main_forward_runs_in_low_precision_and_a_naive_difference_would_be_wrong():
    unet = tiny_unet()
    model_fn = unet_model_fn(unet)
    x, noise, t, r = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model_fn(x, r, t).dtype == torch.bfloat16
    d = (t > r).nonzero().squeeze(1)
    z = ((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise)[d]
    v = noise[d] - x[d]
    _, exact = jvp_derivative(model_fn, z, r[d], t[d], v, create_graph=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        _, naive = finite_difference_derivative(model_fn, z, r[d], t[d], v, create_graph=False)
    # What the loss avoids: the difference of two bf16 outputs at eps 1e-3 is far from the derivative.
    assert ((naive.float() - exact).abs().mean() / exact.abs().mean()).item() > 0.5


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_pair_rows_is_the_plain_loss_on_the_paired_batch(lam, derivative):
    unet = tiny_unet()
    model_fn = unet_model_fn(unet)
    x, noise, t, r = batch(pair_rows=True)
    d = (t > r).nonzero().squeeze(1)
    assert d.numel() == 8 and bool((d % 2 == 0).all())
    partners = d + 1
    paired = [a.index_copy(0, partners, a[d]) for a in (x, noise, t)]
    r_paired = r.index_copy(0, partners, t[d])
    grads = []
    for pair_rows, inputs in ((True, (x, noise, t, r)), (False, (*paired, r_paired))):
        unet.zero_grad(set_to_none=True)
        loss_fn = ModularMeanFlowLoss(derivative=derivative, tangent="model", pair_rows=pair_rows)
        xi, ni, ti, ri = inputs
        out = loss_fn(model_fn, xi, lam, t=ti, r=ri, noise=ni)
        out.loss.backward()
        grads.append((out.per_sample.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]))
    # The tangent comes from a batch of another size, so float32 rounding (the fused attention kernel's included)
    # differs by ~1e-7, and the finite difference's 1 / eps amplifies that: 1e-4 on the per-sample loss, and the
    # whole lam = 1 gradient compared relative to its norm.
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-6)
    g_pair, g_ref = (torch.cat([g.flatten() for g in gs[1]]) for gs in grads)
    assert ((g_pair - g_ref).norm() / g_ref.norm()).item() < 1e-4


def test_pair_rows_errors():
    with pytest.raises(ValueError, match="tangent='model'"):
        ModularMeanFlowLoss(tangent="conditional", pair_rows=True)
    with pytest.raises(ValueError, match="True or False"):
        ModularMeanFlowLoss(tangent="model", pair_rows=1)
    unet = tiny_unet()
    x, noise, t, r = batch()
    loss_fn = ModularMeanFlowLoss(tangent="model", pair_rows=True)
    with pytest.raises(ValueError, match="even index 2j"):
        loss_fn(unet_model_fn(unet), x, 0.0, t=t, r=torch.zeros_like(t), noise=noise)
    with pytest.raises(ValueError, match="r_neq_t_fraction <= 0.5"):
        TimeSampler(r_neq_t_fraction=0.75, pair_rows=True)
    with pytest.raises(ValueError, match="do not fit"):
        TimeSampler(r_neq_t_fraction=0.5, pair_rows=True)(3)
    t, r = TimeSampler(r_neq_t_fraction=0.5, pair_rows=True)(16, generator=torch.Generator().manual_seed(1))
    assert bool((t[1::2] == r[1::2]).all()) and int((t[0::2] > r[0::2]).sum()) == 8


def dropout_unet(p: float = 0.5):
    torch.manual_seed(0)
    return build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                          attention_head_dim=4, dropout=p)


def test_finite_differences_difference_one_dropout_mask():
    """In train mode with dropout, du/dt by finite differences is the derivative of the network with one dropout mask:
    both evaluations draw the same random numbers, even when the loss hands in ``u`` from its main forward (which
    drew another mask). Reference: a float64 central difference at eps 1e-6 with the mask fixed by seeding each
    evaluation alike."""
    unet = dropout_unet().double().train()
    model_fn = unet_model_fn(unet)
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.5, 0.8], dtype=torch.float64)
    r = t * 0.3

    def masked(z_, t_, seed=7):
        torch.manual_seed(seed)
        return model_fn(z_, r, t_)

    with torch.no_grad():
        h = 1e-6
        reference = (masked(z + h * v, t + h) - masked(z - h * v, t - h)) / (2 * h)
        u_other_mask = masked(z, t, seed=3)
        torch.manual_seed(7)
        _, dudt = finite_difference_derivative(model_fn, z, r, t, v, create_graph=False, u=u_other_mask, eps=1e-3)
        naive = (masked(z + 1e-3 * v, t + 1e-3) - u_other_mask) / 1e-3  # two masks: what the difference was
    error = ((dudt - reference).norm() / reference.norm()).item()
    assert error < 3e-2, error  # the forward difference's O(eps) error
    assert ((naive - reference).norm() / reference.norm()).item() > 10


def test_the_loss_with_dropout_in_train_mode_sees_the_derivative_of_eval_mode_size():
    unet = dropout_unet()
    x, noise, t, r = batch()
    loss_fn = ModularMeanFlowLoss(derivative="finite_difference", tangent="model")
    dudt = {}
    for mode in ("eval", "train"):
        getattr(unet, mode)()
        with torch.no_grad():
            dudt[mode] = loss_fn(unet_model_fn(unet), x, 0.0, t=t, r=r, noise=noise).stats["mean_abs_dudt"]
    # Two masks differenced over eps = 1e-3 gave a mean |du/dt| hundreds of times the eval-mode one.
    assert dudt["train"] < 3 * dudt["eval"], dudt
