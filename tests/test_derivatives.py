"""The du/dt estimators through a real UNet2DModel with attention.

``jvp`` (torch.func) is checked against an independent implementation (``torch.autograd.functional.jvp``, the
double-backward trick) in float64, including the gradients of du/dt with respect to the parameters;
``finite_difference`` is checked against ``jvp`` in float32 at the default time scale.
"""

import pytest
import torch

from mmf_diffusers import build_mmf_unet, unet_model_fn
from mmf_diffusers.derivatives import finite_difference_derivative, jvp_derivative


def _unet(dtype=torch.float32):
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    return unet.to(dtype)


def _inputs(dtype, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 1, 8, 8, generator=g).to(dtype)
    v = torch.randn(b, 1, 8, 8, generator=g).to(dtype)
    t = (torch.rand(b, generator=g) * 0.8 + 0.1).to(dtype)
    r = t * torch.rand(b, generator=g).to(dtype)
    return z, v, r, t


def test_jvp_matches_autograd_reference_float64():
    unet = _unet(torch.float64)
    f = unet_model_fn(unet)
    z, v, r, t = _inputs(torch.float64)
    u, dudt = jvp_derivative(f, z, r, t, v, create_graph=False)
    u_ref, dudt_ref = torch.autograd.functional.jvp(lambda z_, t_: f(z_, r, t_), (z, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dudt, dudt_ref, rtol=1e-9, atol=1e-11)
    assert dudt.abs().mean() > 1e-3
    assert not dudt.requires_grad  # create_graph=False: a constant target


def test_jvp_parameter_gradients_match_reference_float64():
    # lam > 0 needs d(du/dt)/d(theta): reverse-over-forward through torch.func.jvp against the double-backward trick.
    unet = _unet(torch.float64)
    f = unet_model_fn(unet)
    z, v, r, t = _inputs(torch.float64)
    weights = torch.randn_like(z)
    params = [p for p in unet.parameters() if p.requires_grad]

    _, dudt = jvp_derivative(f, z, r, t, v, create_graph=True)
    grads = torch.autograd.grad((weights * dudt).sum(), params, allow_unused=True)
    _, dudt_ref = torch.autograd.functional.jvp(
        lambda z_, t_: f(z_, r, t_), (z, t), (v, torch.ones_like(t)), create_graph=True
    )
    grads_ref = torch.autograd.grad((weights * dudt_ref).sum(), params, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:
            assert g is None or g.abs().max() == 0
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("central", [False, True])
def test_finite_difference_matches_jvp_float32(central):
    unet = _unet()
    f = unet_model_fn(unet)
    z, v, r, t = _inputs(torch.float32, b=4)
    _, exact = jvp_derivative(f, z, r, t, v, create_graph=False)
    u, fd = finite_difference_derivative(f, z, r, t, v, create_graph=False, eps=1e-3, central=central)
    rel = ((fd - exact).norm() / exact.norm()).item()
    assert rel < (0.02 if not central else 0.01), rel
    torch.testing.assert_close(u, f(z, r, t))


def test_finite_difference_reuses_given_u_and_carries_gradients():
    unet = _unet()
    f = unet_model_fn(unet)
    z, v, r, t = _inputs(torch.float32, b=2)
    u = f(z, r, t)
    u_out, dudt = finite_difference_derivative(f, z, r, t, v, create_graph=True, u=u)
    assert u_out is u and dudt.requires_grad
    _, dudt_const = finite_difference_derivative(f, z, r, t, v, create_graph=False, u=u)
    assert not dudt_const.requires_grad
    torch.testing.assert_close(dudt.detach(), dudt_const)
    with pytest.raises(ValueError, match="eps"):
        finite_difference_derivative(f, z, r, t, v, create_graph=False, eps=0.0)
