"""Tests for the DiT backbone of MMF (`mmf_diffusers.dit`, `mmf_diffusers.transformer_mmf`).

`MMFDiTTransformer2DModel` is diffusers' `DiTTransformer2DModel` whose per-block label tables take a vector instead:
the second time (``class_embed_type="timestep"``, embedded by a zero-initialised MLP) or an `MMFConditioner`'s
output (``"identity"``). `dit_model_fn` maps ``(z, r, t)`` to ``timestep = time_scale * t`` and second time
``time_scale * h`` (``h = t - r``), as for the UNet. Maths is checked in float64 against references: the stock DiT's
own function, reverse-mode AD (the double-backward trick), and the jvp estimator against finite differences.
The float64 finite differences have a floor of about 1e-6 relative: diffusers' sinusoidal time features are
computed in float32 whatever the model's dtype.

Time convention: t = 0 is data, t = 1 is noise, 0 <= r <= t <= 1. Tiny models: 2 layers, 2 heads x 8 channels,
patch 2, 8x8 inputs.
"""

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from mmf_diffusers import (
    ForwardADAttnProcessor,
    MMFConditioner,
    MMFDiTTransformer2DModel,
    ModularMeanFlowLoss,
    add_dit_class_conditioning,
    build_mmf_dit,
    convert_stock_dit,
    convert_stock_dit_class_conditional,
    dit_model_fn,
)
from mmf_diffusers.derivatives import finite_difference_derivative, jvp_derivative
from mmf_diffusers.dit import ForwardADLayerNorm

SIZE = 8
TINY = dict(sample_size=SIZE, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=8)


def tiny_dit(in_channels: int = 1, seed: int = 0, dtype=torch.float32, second_time_std: float = 0.0):
    """A tiny MMF DiT; ``second_time_std > 0`` replaces the zero output layer of the second-time MLP by random
    weights (as after training), so that the second time matters."""
    torch.manual_seed(seed)
    model = build_mmf_dit(in_channels=in_channels, **TINY)
    if second_time_std:
        with torch.no_grad():
            model.class_embedding.linear_2.weight.normal_(0.0, second_time_std)
    return model if dtype == torch.float32 else model.to(dtype)


def tiny_stock_dit(num_classes: int = 5, seed: int = 0, tied: bool = True) -> DiTTransformer2DModel:
    """A stock diffusers DiT; ``tied``: the same label table in every block, as in converted DiT checkpoints."""
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(in_channels=1, num_embeds_ada_norm=num_classes, **TINY).eval()
    if tied:
        with torch.no_grad():
            first = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
            for block in dit.transformer_blocks[1:]:
                block.norm1.emb.class_embedder.embedding_table.weight.copy_(first)
    return dit


def inputs(batch: int = 4, channels: int = 1, dtype=torch.float32, seed: int = 0):
    """``(z, v, r, t)``: ``0 <= r <= t <= 1``, with the one-step pair ``(0, 1)`` and an ``r = t`` row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, channels, SIZE, SIZE, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, channels, SIZE, SIZE, generator=g, dtype=torch.float64).to(dtype)
    t = torch.tensor([1.0, 0.7, 0.4, 0.9][:batch], dtype=dtype)
    r = torch.tensor([0.0, 0.2, 0.4, 0.1][:batch], dtype=dtype)
    return z, v, r, t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- construction -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 4])  # pixels (1 channel) and latents (4 channels): only the shapes differ
def test_build_mmf_dit_configuration_and_shapes(in_channels):
    model = tiny_dit(in_channels=in_channels)
    assert isinstance(model, DiTTransformer2DModel)  # a stock DiT in every other respect
    assert model.config.class_embed_type == "timestep" and model.config.out_channels == in_channels
    processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert len(processors) == 2 and all(isinstance(p, ForwardADAttnProcessor) for p in processors)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(isinstance(m, ForwardADLayerNorm) for m in norms)  # 2 per block + the output
    # No label tables left; the second time has its own MLP with a zero output layer.
    assert not any("class_embedder" in name for name in model.state_dict())
    assert model.class_embedding.linear_2.weight.abs().max() == 0
    z, _, r, t = inputs(channels=in_channels)
    u = dit_model_fn(model)(z, r, t)
    assert u.shape == z.shape and torch.isfinite(u).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sample_size=9), "divisible by patch_size"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(class_embed_type="identity"), "add_dit_class_conditioning"),
        (dict(num_embeds_ada_norm=1000), "MMFConditioner"),
        (dict(norm_type="ada_norm"), "ada_norm_zero"),
    ],
)
def test_build_mmf_dit_rejects_bad_arguments(kwargs, message):
    args = {**TINY, "in_channels": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_mmf_dit(**args)


def test_forward_rejects_bad_inputs():
    model = tiny_dit()
    z, _, r, t = inputs()
    with pytest.raises(ValueError, match="float tensor, not label ids"):
        model(z, t, class_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="needs `class_labels"):
        model(z, t)
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(4, 1, 8, 6), t, class_labels=t)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model(z, t[:3], class_labels=t)
    conditional, _ = add_dit_class_conditioning(model, num_classes=3)
    with pytest.raises(ValueError, match="MMFConditioner"):
        conditional(z, t, class_labels=t)


def test_python_float_times_are_not_truncated():
    model = tiny_dit(second_time_std=0.5)
    z, _, _, _ = inputs(batch=2)
    with torch.no_grad():
        as_float = model(z, 3.7, class_labels=1.3).sample
        as_tensor = model(z, torch.full((2,), 3.7), class_labels=torch.full((2,), 1.3)).sample
        truncated = model(z, torch.full((2,), 3.0), class_labels=torch.full((2,), 1.0)).sample
    torch.testing.assert_close(as_float, as_tensor)
    assert (as_float - truncated).abs().max() > 1e-3


def test_training_mode_is_deterministic_unlike_the_stock_dit():
    # The stock DiT drops 10% of the labels at random in every block in training mode: two forwards of one input
    # differ, which would make a finite difference noise. The MMF DiT has no label dropout inside the model.
    z, _, _, t = inputs()
    stock = tiny_stock_dit().train()
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    outputs = [stock(z, t, class_labels=labels).sample for _ in range(8)]
    assert max((o - outputs[0]).abs().max().item() for o in outputs) > 1e-3
    model = tiny_dit(second_time_std=0.5).train()
    assert torch.equal(model(z, t, class_labels=t).sample, model(z, t, class_labels=t).sample)


def test_dit_initialisation_starts_at_zero_and_trains():
    torch.manual_seed(0)
    model = build_mmf_dit(in_channels=1, dit_init=True, **TINY)
    fn = dit_model_fn(model)
    z, _, r, t = inputs()
    with torch.no_grad():
        assert fn(z, r, t).abs().max() == 0  # zero adaLN modulations and output layer: u = 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # step 1 reaches only the output layer, step 2 the rest
        optimizer.zero_grad()
        ModularMeanFlowLoss(derivative="finite_difference")(fn, z, 0.0, t=t, r=r).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert fn(z, r, t).abs().max() > 1e-3
    assert model.transformer_blocks[0].norm1.linear.weight.abs().max() > 0
    with pytest.raises(ValueError, match="dit_init"):
        build_mmf_dit(in_channels=1, dit_init=1, **TINY)


# --- starting as the stock function ---------------------------------------------------------------------------------


def test_zero_initialised_second_time_is_ignored_at_init():
    model = tiny_dit()
    fn = dit_model_fn(model)
    z, _, _, t = inputs()
    with torch.no_grad():
        u_r0 = fn(z, torch.zeros_like(t), t)
        u_rt = fn(z, t, t)
        u_other_t = fn(z, torch.zeros_like(t), t * 0.5)
    torch.testing.assert_close(u_r0, u_rt, rtol=0, atol=0)
    assert (u_r0 - u_other_t).abs().max() > 1e-3  # but t matters


@pytest.mark.parametrize("label", [None, 0, 3])
def test_convert_stock_dit_starts_as_the_stock_function_float64(label):
    stock = tiny_stock_dit(tied=False).to(torch.float64)  # the unconditional conversion works per block
    model = convert_stock_dit(stock, label=label)
    fn = dit_model_fn(model, time_scale=10.0)
    z, _, r, t = inputs(dtype=torch.float64)
    ids = torch.full((4,), stock.config.num_embeds_ada_norm if label is None else label)
    with torch.no_grad():
        expected = stock(z, 10.0 * t, class_labels=ids).sample
        for r_ in (r, torch.zeros_like(t), t):
            torch.testing.assert_close(fn(z, r_, t), expected, rtol=1e-12, atol=1e-12)


def test_convert_stock_dit_class_conditional_starts_as_the_stock_function_float64():
    stock = tiny_stock_dit(num_classes=5).to(torch.float64)
    model, conditioner = convert_stock_dit_class_conditional(stock, class_names=list("abcde"))
    assert conditioner.null_label == 5 and conditioner.class_names == list("abcde")
    fn = dit_model_fn(model, conditioner=conditioner)
    z, _, r, t = inputs(dtype=torch.float64)
    labels = torch.tensor([0, 4, 5, 2])  # 5: the stock "no label" row is the conditioner's "no label" token
    with torch.no_grad():
        expected = stock(z, 10.0 * t, class_labels=labels).sample
        torch.testing.assert_close(fn(z, r, t, labels), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fn(z, r, t), stock(z, 10.0 * t, class_labels=torch.full((4,), 5)).sample,
                                   rtol=1e-12, atol=1e-12)


def test_convert_stock_dit_rejects_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="different label tables"):
        convert_stock_dit_class_conditional(tiny_stock_dit(tied=False))
    with pytest.raises(ValueError, match="label must be an int id"):
        convert_stock_dit(tiny_stock_dit(num_classes=5), label=6)
    with pytest.raises(ValueError, match="stock diffusers DiTTransformer2DModel"):
        convert_stock_dit(tiny_dit())


def test_add_dit_class_conditioning_keeps_the_function_then_labels_matter():
    model = tiny_dit(second_time_std=0.5)
    fn = dit_model_fn(model)
    z, _, r, t = inputs()
    conditional, conditioner = add_dit_class_conditioning(model, num_classes=3, class_names=["x", "y", "z"])
    assert conditional.config.class_embed_type == "identity" and isinstance(conditioner, MMFConditioner)
    cond_fn = dit_model_fn(conditional, conditioner=conditioner)
    with torch.no_grad():
        expected = fn(z, r, t)
        for labels in (None, torch.tensor([0, 1, 2, 3])):
            torch.testing.assert_close(cond_fn(z, r, t, labels), expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    _, fresh = add_dit_class_conditioning(model, num_classes=3, label_init_std=1.0)
    fresh_fn = dit_model_fn(conditional, conditioner=fresh)
    with torch.no_grad():
        a = fresh_fn(z, r, t, torch.zeros(4, dtype=torch.long))
        b = fresh_fn(z, r, t, torch.ones(4, dtype=torch.long))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs its conditioner"):
        dit_model_fn(conditional)
    with pytest.raises(ValueError, match="takes none"):
        dit_model_fn(model, conditioner=conditioner)
    with pytest.raises(ValueError, match="MMFDiTTransformer2DModel"):
        dit_model_fn(tiny_stock_dit())


# --- save / load ---------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = tiny_dit(second_time_std=0.5)
    conditional, conditioner = add_dit_class_conditioning(model, num_classes=3, label_init_std=1.0)
    z, _, r, t = inputs()
    labels = torch.tensor([0, 1, 2, 3])
    model.save_pretrained(tmp_path / "uncond")
    conditional.save_pretrained(tmp_path / "transformer")
    conditioner.save_pretrained(tmp_path / "conditioner")
    loaded = MMFDiTTransformer2DModel.from_pretrained(tmp_path / "uncond")
    loaded_cond = MMFDiTTransformer2DModel.from_pretrained(tmp_path / "transformer")
    loaded_conditioner = MMFConditioner.from_pretrained(tmp_path / "conditioner")
    assert loaded.config.class_embed_type == "timestep" and loaded_cond.config.class_embed_type == "identity"
    with torch.no_grad():
        torch.testing.assert_close(dit_model_fn(loaded)(z, r, t), dit_model_fn(model)(z, r, t), rtol=0, atol=0)
        torch.testing.assert_close(
            dit_model_fn(loaded_cond, conditioner=loaded_conditioner)(z, r, t, labels),
            dit_model_fn(conditional, conditioner=conditioner)(z, r, t, labels), rtol=0, atol=0,
        )


def test_model_file_runs_as_remote_code(tmp_path):
    # transformer_mmf.py imports only torch and diffusers: copied into a pipeline folder (diffusers' remote-code
    # layout, transformer/transformer_mmf.py) and imported from there, it loads the saved model with the same outputs.
    import importlib.util
    import shutil

    import mmf_diffusers.transformer_mmf as module
    from mmf_diffusers.hub import _check_self_contained

    _check_self_contained(module.__file__)
    model = tiny_dit(second_time_std=0.5)
    model.save_pretrained(tmp_path / "transformer")
    copy = tmp_path / "transformer" / "transformer_mmf.py"
    shutil.copyfile(module.__file__, copy)
    spec = importlib.util.spec_from_file_location("remote_transformer_mmf", copy)
    remote = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remote)
    loaded = remote.MMFDiTTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert type(loaded) is not MMFDiTTransformer2DModel  # the copy's class, not the package's
    z, _, r, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, 10 * t, class_labels=10 * (t - r)).sample,
                                   model(z, 10 * t, class_labels=10 * (t - r)).sample, rtol=0, atol=0)


# --- derivatives ---------------------------------------------------------------------------------------------------


def test_jvp_needs_the_math_attention_backend_on_cpu():
    # torch 2.13, CPU: diffusers' default SDPA processor dispatches to a fused kernel without a forward-AD formula.
    model = tiny_dit(second_time_std=0.5)
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())
    fn = dit_model_fn(model)
    z, v, r, t = inputs()
    with pytest.raises(NotImplementedError, match="forward AD"):
        jvp_derivative(fn, z, r, t, v, create_graph=False)
    # A plain forward (what finite differences need) works with it.
    _, dudt = finite_difference_derivative(fn, z, r, t, v, create_graph=False)
    assert torch.isfinite(dudt).all()


def test_jvp_matches_reverse_mode_reference_float64():
    model = tiny_dit(dtype=torch.float64, second_time_std=0.5)
    fn = dit_model_fn(model)
    z, v, r, t = inputs(dtype=torch.float64)
    u, dudt = jvp_derivative(fn, z, r, t, v, create_graph=False)
    u_ref, dudt_ref = torch.autograd.functional.jvp(lambda z_, t_: fn(z_, r, t_), (z, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dudt, dudt_ref, rtol=1e-9, atol=1e-11)
    assert dudt.abs().mean() > 1e-2


def test_jvp_parameter_gradients_match_finite_differences_float64():
    # lam > 0 needs d(du/dt)/d(theta): reverse-over-forward through torch.func.jvp, against the gradient of a central
    # finite difference (first-order backprop only, O(eps^2)).
    model = tiny_dit(dtype=torch.float64, second_time_std=0.5)
    fn = dit_model_fn(model)
    z, v, r, t = inputs(dtype=torch.float64)
    weights = torch.randn_like(z)
    params = list(model.parameters())
    grads = {}
    for name, estimator, kwargs in (("jvp", jvp_derivative, {}),
                                    ("fd", finite_difference_derivative, dict(eps=1e-3, central=True))):
        _, dudt = estimator(fn, z, r, t, v, create_graph=True, **kwargs)
        g = torch.autograd.grad((weights * dudt).sum(), params, allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)])
    assert rel(grads["jvp"], grads["fd"]) < 1e-4, rel(grads["jvp"], grads["fd"])


def test_forward_ad_layer_norm_gives_the_right_gradient_of_a_tangent():
    # The gradient of a jvp tangent with respect to the primal, through LayerNorm, in float64, against elementary ops
    # (whose higher derivatives are right) and a finite difference. torch 2.13's F.layer_norm gets it wrong
    # (pytorch/pytorch#196700); if the last assertion fails, torch has fixed it and ForwardADLayerNorm can go.
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    u, w = torch.randn_like(h), torch.randn_like(h)
    fused = torch.nn.LayerNorm(8, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        fused.weight.normal_()
        fused.bias.normal_()
    composite = ForwardADLayerNorm(8, eps=1e-6, dtype=torch.float64)
    composite.load_state_dict(fused.state_dict())

    def tangent_gradient(norm):
        _, tangent = torch.func.jvp(norm, (h,), (u,))
        return torch.autograd.grad((w * tangent).sum(), h)[0]

    def tangent_fd(h_, eps=1e-5):
        return (fused(h_ + eps * u) - fused(h_ - eps * u)) / (2 * eps)

    reference = torch.autograd.grad((w * tangent_fd(h)).sum(), h)[0]
    assert rel(tangent_gradient(composite), reference) < 1e-6
    with torch.no_grad():  # outside a differentiable jvp it is the fused kernel, the same numbers
        torch.testing.assert_close(composite(h), fused(h), rtol=0, atol=0)
    assert rel(tangent_gradient(fused), reference) > 0.1


@pytest.mark.parametrize(
    "dtype, eps, central, tolerance",
    [
        (torch.float32, 1e-3, False, 5e-3),  # measured 1.2e-3 at time_scale 10
        (torch.float32, 1e-3, True, 1e-3),  # 1.3e-4
        (torch.float64, 1e-4, False, 1e-3),  # 1.4e-4: O(eps)
        (torch.float64, 1e-3, True, 1e-4),  # 3.6e-6: O(eps^2) down to the float32 time features
    ],
)
def test_finite_difference_matches_jvp(dtype, eps, central, tolerance):
    model = tiny_dit(dtype=dtype, second_time_std=0.5)
    fn = dit_model_fn(model)
    z, v, r, t = inputs(dtype=dtype)
    _, exact = jvp_derivative(fn, z, r, t, v, create_graph=False)
    _, fd = finite_difference_derivative(fn, z, r, t, v, create_graph=False, eps=eps, central=central)
    assert rel(fd, exact) < tolerance, rel(fd, exact)


def _loss_and_grads(fn, params, x, noise, r, t, derivative, lam, fd_eps, **call):
    out = ModularMeanFlowLoss(derivative=derivative, fd_eps=fd_eps)(fn, x, lam, t=t, r=r, noise=noise, **call)
    grads = torch.autograd.grad(out.loss, params)
    return out.loss.detach(), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_mmf_loss_with_finite_differences_matches_jvp_float64(lam, conditional):
    # The loss and its gradient with respect to every parameter, fd (eps = 1e-4, O(eps)) against jvp (exact).
    model = tiny_dit(dtype=torch.float64, second_time_std=0.5)
    call, conditioner = {}, None
    if conditional:
        torch.manual_seed(0)
        model, conditioner = add_dit_class_conditioning(model, num_classes=3, label_init_std=1.0)
        call = dict(class_labels=torch.tensor([0, 1, 3, 2]), null_label=conditioner.null_label)
    fn = dit_model_fn(model, conditioner=conditioner)
    params = list(model.parameters()) + (list(conditioner.parameters()) if conditioner is not None else [])
    x, noise, r, t = inputs(dtype=torch.float64, seed=1)
    loss_jvp, grad_jvp = _loss_and_grads(fn, params, x, noise, r, t, "jvp", lam, 1e-3, **call)
    loss_fd, grad_fd = _loss_and_grads(fn, params, x, noise, r, t, "finite_difference", lam, 1e-4, **call)
    # Measured: loss 1e-5, gradient 2e-4 (lam = 0) / 3e-4 (lam = 1); with F.layer_norm under the jvp instead of
    # ForwardADLayerNorm the lam = 1 gradient was off by 5%.
    assert abs(loss_fd - loss_jvp) / loss_jvp < 1e-4, (loss_fd, loss_jvp)
    assert rel(grad_fd, grad_jvp) < 2e-3, rel(grad_fd, grad_jvp)
    # The derivative term counts: the same loss without it (every row flow matching) is clearly different.
    loss_fm, _ = _loss_and_grads(fn, params, x, noise, t, t, "jvp", lam, 1e-3, **call)
    assert abs(loss_fm - loss_jvp) / loss_jvp > 1e-2


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_training_step_makes_the_second_time_matter(derivative, lam):
    # From the zero-initialised second time, one optimiser step of the MMF loss makes u depend on r.
    model = tiny_dit()
    fn = dit_model_fn(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, SIZE, SIZE, generator=g)
    loss_fn = ModularMeanFlowLoss(derivative=derivative)
    out = loss_fn(fn, x, lam, t=torch.full((8,), 0.8), r=torch.tensor([0.0, 0.2, 0.4, 0.8] * 2), generator=g)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.class_embedding.linear_2.weight.grad.abs().max() > 0
    optimizer.step()
    z, _, _, t = inputs()
    with torch.no_grad():
        difference = (fn(z, torch.zeros_like(t), t) - fn(z, t, t)).abs().max()
    assert difference > 1e-4


def test_gradient_checkpointing_works_with_finite_differences_not_with_a_differentiable_jvp():
    # Activation checkpointing (what large DiTs train with) recomputes each block in the backward pass. Finite
    # differences are plain forwards: the same loss and gradients with it. A jvp with gradients through the tangent
    # (lam > 0) saves different tensors under forward AD than in the recomputation, and torch refuses.
    x, noise, r, t = inputs(seed=1)
    grads = {}
    for checkpointing in (False, True):
        model = tiny_dit(second_time_std=0.5).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        fn = dit_model_fn(model)
        out = ModularMeanFlowLoss(derivative="finite_difference")(fn, x, 1.0, t=t, r=r, noise=noise)
        grads[checkpointing] = torch.autograd.grad(out.loss, list(model.parameters()))
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        ModularMeanFlowLoss(derivative="jvp")(fn, x, 1.0, t=t, r=r, noise=noise).loss.backward()


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_bf16_autocast_loss_matches_float32(derivative):
    # Mixed precision: the main forward under CPU bfloat16 autocast, du/dt in float32 (the loss turns autocast off
    # for it). Measured: loss within 2e-4, gradient within 0.6% of float32.
    x, noise, r, t = inputs(seed=1)
    results = []
    for autocast in (False, True):
        model = tiny_dit(second_time_std=0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ModularMeanFlowLoss(derivative=derivative)(dit_model_fn(model), x, 1.0, t=t, r=r, noise=noise)
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        results.append((out.loss.item(), torch.cat([g.reshape(-1) for g in grads if g is not None])))
    (loss32, grad32), (loss16, grad16) = results
    assert abs(loss16 - loss32) / loss32 < 5e-3
    assert rel(grad16, grad32) < 0.03
    # bfloat16 weights: both time embeddings follow the weights' dtype.
    model = tiny_dit(second_time_std=0.5).to(torch.bfloat16)
    u = dit_model_fn(model)(x.bfloat16(), r.bfloat16(), t.bfloat16())
    assert u.dtype == torch.bfloat16 and torch.isfinite(u).all()


# --- the cost benchmark ---------------------------------------------------------------------------------------------


def test_dit_step_cost_benchmark_smoke(tmp_path):
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "dit_step_cost.py")
    spec = importlib.util.spec_from_file_location("dit_step_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cost.json"
    result = bench.main(["--steps", "1", "--warmup", "0", "--batch", "4", "--sample_size", "8", "--channels", "1",
                         "--layers", "1", "--heads", "2", "--head_dim", "8", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {(r["config"], r["attention"]): r for r in result["rows"]}
    assert set(rows) == {(c, a) for c in bench.LOSSES for a in bench.ATTENTIONS}
    assert rows[("flow_matching", "sdpa")]["ratio_to_flow_matching"] == 1.0
    assert all(r["median_ms"] > 0 for r in rows.values())
