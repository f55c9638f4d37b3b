"""Class-conditional generation (`MMFConditioner`, `add_class_conditioning`, `MMFPipeline(class_labels=...,
guidance_scale=...)`, training-time guidance in `ModularMeanFlowLoss`), tested against maths.

Everything runs on the CPU in float32 (float64 for derivative and gradient references, other dtypes where a test is
about them) with tiny two-time UNets: `build_mmf_unet(sample_size=8, block_out_channels=(16, 16))`, attention on the
lower level (so forward-mode AD goes through attention), turned class-conditional with `add_class_conditioning` and
given a random label embedding (it starts at zero, where every label gives the unconditional output).

Conventions: t = 0 data, t = 1 noise, 0 <= r <= t <= 1; z_t = (1 - t) x + t e; the network predicts the average
velocity u(z_t, r, t | c); one step is x = z_1 - u(z_1, 0, 1 | c) and the image is clip(x / 2 + 0.5, 0, 1).
Guidance: sampling time u_none + s (u_c - u_none); training time v_tilde = w v + kappa sg(u(z, t, t | c))
+ (1 - w - kappa) sg(u(z, t, t | none)) on labelled rows, v on rows whose label was dropped.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from mmf_diffusers import (
    MMFConditioner,
    MMFPipeline,
    MMFScheduler,
    ModularMeanFlowLoss,
    add_class_conditioning,
    build_mmf_unet,
    enable_forward_ad,
    unet_average_velocity,
    unet_model_fn,
)
from mmf_diffusers.derivatives import jvp_derivative

SIZE = 8
NAMES = ["cat", "dog", "fox"]
NULL = len(NAMES)  # the "no label" id


def same_images(a, b) -> bool:
    """Equal up to float32 rounding: with several threads the fused CPU attention kernel may round differently in two
    module instances (with one thread the images are bit-identical); a wrong load or label path differs far more."""
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5, atol=1e-5))


def same_tensors(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`same_images` for tensors."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5))


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return build_mmf_unet(sample_size=SIZE, in_channels=1, block_out_channels=(16, 16))


def randomise_labels(conditioner: MMFConditioner, seed: int = 1, scale: float = 1.0) -> MMFConditioner:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = conditioner.label_embedding.weight
        weight.copy_(scale * torch.randn(weight.shape, generator=generator, dtype=torch.float64).to(weight.dtype))
    return conditioner


def conditional_parts(seed: int = 0, names=NAMES, random_labels: bool = True):
    """``(unconditional unet, conditional unet, conditioner)``."""
    original = tiny_unet(seed)
    unet, conditioner = add_class_conditioning(original, len(names), class_names=names)
    if random_labels:
        randomise_labels(conditioner)
    return original, unet, conditioner


def conditional_pipeline(seed: int = 0, names=NAMES, **config) -> MMFPipeline:
    _, unet, conditioner = conditional_parts(seed, names)
    pipe = MMFPipeline(unet, MMFScheduler(), conditioner=conditioner, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(batch: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one_step(batch: int):
    return torch.zeros(batch), torch.ones(batch)


def to_image(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


def labels(*ids) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# 1. The label changes the output
# ----------------------------------------------------------------------------------------------------------------


def test_the_label_changes_the_output():
    pipe = conditional_pipeline()
    z = noise(batch=2)
    r, t = torch.tensor([0.0, 0.3]), torch.tensor([1.0, 0.8])
    with torch.no_grad():
        u = {c: pipe.average_velocity(z, r, t, labels(c, c)) for c in range(NULL + 1)}
        again = pipe.average_velocity(z, r, t, labels(1, 1))
    assert torch.equal(again, u[1])  # the same label: bit-identical
    for a in range(NULL + 1):
        for b in range(a + 1, NULL + 1):
            assert (u[a] - u[b]).abs().max() > 1e-2, (a, b)

    by_label = {c: pipe(latents=z, class_labels=c, output_type="pt").images for c in range(NULL)}
    for a in range(NULL):
        for b in range(a + 1, NULL):
            assert (by_label[a] - by_label[b]).abs().max() > 1e-2, (a, b)
    # The same label, by id, by name, one for all or one per image, as a list or a tensor: bit-identical images.
    for same in ("dog", ["dog", "dog"], [1, "dog"], torch.tensor([1, 1]), torch.tensor(1), (1, 1)):
        assert torch.equal(pipe(latents=z, class_labels=same, output_type="pt").images, by_label[1]), same
    # One label per image: each row is the image its own label gives.
    mixed = pipe(latents=z, class_labels=["fox", 0], output_type="pt").images
    torch.testing.assert_close(mixed[0], by_label[2][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], by_label[0][1], atol=1e-6, rtol=0)
    # Seeded generation is reproducible too.
    first = pipe(num_images=2, class_labels="fox", generator=seeded(3), output_type="np").images
    assert np.array_equal(first, pipe(num_images=2, class_labels="fox", generator=seeded(3), output_type="np").images)


def test_label_embedding_reaches_the_unet_as_an_additive_embedding():
    # The conditioner's output is MLP(sinusoid(h)) + E[c]: swapping E changes u exactly as adding E[c] does.
    _, unet, conditioner = conditional_parts()
    scaled_h = torch.tensor([3.0, 0.0, 10.0])
    c = labels(0, 2, 3)
    with torch.no_grad():
        embedding = conditioner(scaled_h, c)
        mlp = conditioner.time_embedding(conditioner.time_proj(scaled_h))
        torch.testing.assert_close(embedding, mlp + conditioner.label_embedding.weight[c], atol=0, rtol=0)
    assert embedding.shape == (3, 4 * unet.config.block_out_channels[0])


# ----------------------------------------------------------------------------------------------------------------
# 2. "No label" is the unconditional branch; unconditional pipelines are unchanged
# ----------------------------------------------------------------------------------------------------------------


def test_add_class_conditioning_starts_as_the_unconditional_model():
    original, unet, conditioner = conditional_parts(random_labels=False)
    assert unet.config.class_embed_type == "identity" and original.config.class_embed_type == "timestep"
    assert conditioner.null_label == NULL and conditioner.class_names == NAMES
    assert torch.count_nonzero(conditioner.label_embedding.weight) == 0
    z = noise(batch=4)
    r, t = torch.tensor([0.0, 0.2, 0.5, 0.9]), torch.tensor([1.0, 0.7, 0.5, 0.95])
    with torch.no_grad():
        expected = unet_average_velocity(original, z, r, t)
        # The stock two-time call, written out: timestep 10 t, second time 10 (t - r).
        assert torch.equal(expected, original(z, 10 * t, class_labels=10 * (t - r)).sample)
        for c in range(NULL + 1):
            u = unet_average_velocity(unet, z, r, t, conditioner=conditioner, class_labels=labels(*[c] * 4))
            assert torch.equal(u, expected), c
        assert torch.equal(unet_average_velocity(unet, z, r, t, conditioner=conditioner), expected)
    # The carried-over weights are the original's, not copies that merely happen to agree at this input.
    state = original.state_dict()
    for key, value in unet.state_dict().items():
        assert torch.equal(value, state[key]), key
    for key, value in conditioner.time_embedding.state_dict().items():
        assert torch.equal(value, state["class_embedding." + key]), key


def test_none_is_the_null_label():
    pipe = conditional_pipeline()
    z = noise()
    r, t = one_step(3)
    with torch.no_grad():
        u_null = pipe.average_velocity(z, r, t, torch.full((3,), NULL))
        assert torch.equal(pipe.average_velocity(z, r, t), u_null)
        u_label = pipe.average_velocity(z, r, t, labels(0, 0, 0))
    images = pipe(latents=z, class_labels="none", output_type="pt").images
    assert torch.equal(images, pipe(latents=z, class_labels=["none"] * 3, output_type="pt").images)
    torch.testing.assert_close(images, to_image(z - u_null), atol=1e-6, rtol=0)
    # Not trivially so: with a label the image differs (the label embedding is random, and pixels are unclamped).
    assert (u_label - u_null).abs().max() > 1e-2
    assert ((images > 0) & (images < 1)).float().mean() > 0.3
    assert (pipe(latents=z, class_labels=0, output_type="pt").images - images).abs().max() > 1e-2


def test_no_class_labels_draws_the_classes_from_the_prior_after_the_noise():
    pipe = conditional_pipeline()
    n = 64
    shape = (n, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    g = seeded(3)
    z = torch.randn(shape, generator=g)
    drawn = torch.multinomial(torch.full((len(NAMES),), 1.0 / len(NAMES)), n, replacement=True, generator=g)
    assert len(set(drawn.tolist())) == len(NAMES)  # every class, none of them the null token
    images = pipe(num_images=n, generator=seeded(3), output_type="pt").images
    torch.testing.assert_close(images, pipe(latents=z, class_labels=drawn, output_type="pt").images, atol=1e-6, rtol=0)
    # a prior with all its weight on one class gives that class only
    pipe.conditioner.register_to_config(class_prior=[0.0, 0.0, 1.0])
    torch.testing.assert_close(pipe(latents=z[:4], output_type="pt").images,
                               pipe(latents=z[:4], class_labels=2, output_type="pt").images, atol=1e-6, rtol=0)
    # one generator per image: one label per generator
    gens = [seeded(i) for i in range(2)]
    assert pipe(num_images=2, generator=gens, output_type="pt").images.shape[0] == 2


@pytest.mark.parametrize("prior", [[1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]])
def test_bad_class_prior(prior):
    with pytest.raises(ValueError, match="class_prior"):
        MMFConditioner(num_classes=3, time_embed_dim=16, projection_dim=8, class_prior=prior)


def test_unconditional_pipeline_folder_loads_and_generates_unchanged():
    pipe = MMFPipeline.from_pretrained("pipelines/mmf-digits")  # saved before conditioners existed
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.is_class_conditional and pipe.class_names is None and pipe.conditioner is None
    z = noise(batch=2)
    with torch.no_grad():
        # The sampler written out with the stock UNet call: two steps 1 -> 0.5 -> 0.
        step1 = z - 0.5 * pipe.unet(z, torch.full((2,), 10.0), class_labels=torch.full((2,), 5.0)).sample
        x = step1 - 0.5 * pipe.unet(step1, torch.full((2,), 5.0), class_labels=torch.full((2,), 5.0)).sample
        x1 = z - pipe.unet(z, torch.full((2,), 10.0), class_labels=torch.full((2,), 10.0)).sample
    torch.testing.assert_close(pipe(latents=z, output_type="pt").images, to_image(x1), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        pipe(latents=z, num_inference_steps=2, output_type="pt").images, to_image(x), atol=1e-6, rtol=0
    )
    for kwargs in ({"class_labels": [0, 1]}, {"class_labels": "3"}, {"guidance_scale": 2.0},
                   {"class_labels": 1, "guidance_scale": 1.0}):
        with pytest.raises(ValueError, match="unconditional"):
            pipe(latents=z, output_type="pt", **kwargs)
    with pytest.raises(ValueError, match="unconditional"):
        pipe.average_velocity(z, *one_step(2), class_labels=labels(0, 1))

    # The trained model made class-conditional (zero label embedding) still gives its images for every label.
    unet, conditioner = add_class_conditioning(pipe.unet, 10)
    assert conditioner.class_names == [str(i) for i in range(10)] and conditioner.null_label == 10
    conditional = MMFPipeline(unet, pipe.scheduler, conditioner=conditioner)
    conditional.set_progress_bar_config(disable=True)
    enable_forward_ad(pipe.unet)  # the attention processor add_class_conditioning installs: bit-exact comparison
    expected = pipe(latents=z, output_type="pt").images
    for class_labels in (None, 7, [3, "9"]):
        assert same_tensors(conditional(latents=z, class_labels=class_labels, output_type="pt").images, expected)


def test_unconditional_save_load_has_no_conditioner(tmp_path):
    pipe = MMFPipeline(tiny_unet(), MMFScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "conditioner").exists()
    loaded = MMFPipeline.from_pretrained(tmp_path)
    assert not loaded.is_class_conditional
    enable_forward_ad(loaded.unet)
    z = noise()
    assert same_tensors(loaded(latents=z, output_type="pt").images, pipe(latents=z, output_type="pt").images)


# ----------------------------------------------------------------------------------------------------------------
# 3. The training target and gradients on a toy model (float64)
# ----------------------------------------------------------------------------------------------------------------

DIM, K = 3, 3  # data dimension, number of classes (label K is "no label")
W, KAPPA = 1.5, 0.2  # 1 - w - kappa = -0.7: all three terms matter


class ToyConditionalMLP(torch.nn.Module):
    """u(z, r, t | c): an MLP on [z, t, t - r] plus a label embedding; a plain 4-argument callable."""

    def __init__(self, seed: int = 0, hidden: int = 24):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(DIM + 2, hidden)
        self.emb = torch.nn.Embedding(K + 1, hidden)
        self.mid = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, DIM)
        self.double()

    def forward(self, z, r, t, class_labels):
        x = torch.cat([z, t[:, None], (t - r)[:, None]], dim=1)
        h = torch.tanh(self.inp(x) + self.emb(class_labels))
        return self.out(torch.tanh(self.mid(h)) * (1 + t[:, None] ** 2))


def toy_batch(n: int = 12, neq: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    e = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    if neq:  # every other row r = t
        r = torch.where(torch.arange(n) % 2 == 0, r, t)
    else:
        r = t.clone()
    c = torch.tensor([0, 1, K, 2, K, 0, 1, 2, 2, K, 1, 0][:n])  # mixed labelled and null rows
    return x, e, r, t, c


def hand_target(model, x, e, t, c, w=W, kappa=KAPPA, detach=True):
    """v_tilde on labelled rows, v on null rows, each model term evaluated on its own."""
    z = (1 - t)[:, None] * x + t[:, None] * e
    v = e - x
    u_c = model(z, t, t, c)
    u_none = model(z, t, t, torch.full_like(c, K))
    if detach:
        u_c, u_none = u_c.detach(), u_none.detach()
    guided = w * v + kappa * u_c + (1 - w - kappa) * u_none
    return z, v, torch.where((c != K)[:, None], guided, v)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_guided_target_is_the_formula():
    model = ToyConditionalMLP()
    x, e, _, t, c = toy_batch()
    z, v, expected = hand_target(model, x, e, t, c)
    loss_fn = ModularMeanFlowLoss(guidance_w=W, guidance_kappa=KAPPA)
    assert loss_fn.guided and loss_fn.effective_guidance_scale == pytest.approx(W / (1 - KAPPA))
    target = loss_fn.guided_target(model, z, t, v, c, K)
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-12)
    assert not target.requires_grad  # the model terms carry no gradient
    assert torch.equal(target[c == K], v[c == K])  # dropped labels keep v exactly
    assert (target[c != K] - v[c != K]).abs().max() > 0.1  # and guidance moves the others
    # No guidance (w = 1, kappa = 0) or no labelled row: v itself.
    assert torch.equal(ModularMeanFlowLoss().guided_target(model, z, t, v, c, K), v)
    assert torch.equal(loss_fn.guided_target(model, z, t, v, torch.full_like(c, K), K), v)
    # kappa = 0, w = s: the classic v_tilde = s v + (1 - s) u_none.
    _, _, classic = hand_target(model, x, e, t, c, w=2.0, kappa=0.0)
    torch.testing.assert_close(
        ModularMeanFlowLoss(guidance_w=2.0).guided_target(model, z, t, v, c, K), classic, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_r_equal_t_loss_and_gradient_flow_only_through_the_main_branch(lam):
    model = ToyConditionalMLP()
    x, e, r, t, c = toy_batch(neq=False)
    out = ModularMeanFlowLoss(guidance_w=W, guidance_kappa=KAPPA)(
        model, x, lam, t=t, r=r, noise=e, class_labels=c, null_label=K
    )
    z, v, v_tilde = hand_target(model, x, e, t, c)
    per_row = (model(z, r, t, c) - v_tilde).pow(2).mean(1)
    torch.testing.assert_close(out.per_sample, per_row, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, per_row.mean(), rtol=1e-12, atol=1e-14)
    # Null rows regress on v, labelled rows on v_tilde.
    null_rows = c == K
    torch.testing.assert_close(out.per_sample[null_rows], (model(z, r, t, c) - v).pow(2).mean(1)[null_rows])

    g = grads(model, out.loss)
    g_detached = grads(model, per_row.mean())
    torch.testing.assert_close(g, g_detached, rtol=1e-10, atol=1e-12)
    # With live model terms in the target the gradient is another one: the test can tell them apart.
    _, _, live = hand_target(model, x, e, t, c, detach=False)
    g_live = grads(model, (model(z, r, t, c) - live).pow(2).mean(1).mean())
    assert (g_live - g).norm() > 0.05 * g.norm()


def reference_dudt(model, z, r, t, c, tangent, create_graph):
    """du/dt = d_z u . tangent + d_t u by torch.autograd.functional.jvp (double-backward), not torch.func."""
    _, dudt = torch.autograd.functional.jvp(
        lambda z_, t_: model(z_, r, t_, c), (z, t), (tangent, torch.ones_like(t)), create_graph=create_graph
    )
    return dudt


def reference_loss(model, x, e, r, t, c, lam, tangent_kind="conditional", guided_tangent=True):
    z, v, v_tilde = hand_target(model, x, e, t, c)
    if tangent_kind == "model":
        tangent = model(z, t, t, c).detach()
    else:
        tangent = v_tilde if guided_tangent else v
    h = (t - r)[:, None]
    u = model(z, r, t, c)
    if lam == 0.0:
        dudt = reference_dudt(model, z, r, t, c, tangent, create_graph=False).detach()
        return (u - (v_tilde - h * dudt).detach()).pow(2).mean(1)
    dudt = reference_dudt(model, z, r, t, c, tangent, create_graph=True)
    return (u + h * dudt - v_tilde).pow(2).mean(1)


@pytest.mark.parametrize("tangent", ["conditional", "model"])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_loss_with_derivative_rows_matches_reverse_mode_reference(lam, tangent):
    model = ToyConditionalMLP()
    x, e, r, t, c = toy_batch(neq=True)
    assert (r < t).sum() == 6 and ((c == K) & (r < t)).any() and ((c != K) & (r < t)).any()
    out = ModularMeanFlowLoss(guidance_w=W, guidance_kappa=KAPPA, tangent=tangent)(
        model, x, lam, t=t, r=r, noise=e, class_labels=c, null_label=K
    )
    reference = reference_loss(model, x, e, r, t, c, lam, tangent)
    torch.testing.assert_close(out.per_sample, reference, rtol=1e-10, atol=1e-12)
    g = grads(model, out.loss)
    g_ref = grads(model, reference.mean())
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)
    if tangent == "conditional":
        # The guided target is the tangent: with v as tangent instead, value and gradient differ.
        other = reference_loss(model, x, e, r, t, c, lam, guided_tangent=False)
        assert (other - reference).abs().max() > 1e-3
        assert (grads(model, other.mean()) - g).norm() > 1e-3 * g.norm()


def test_loss_through_conditioner_and_unet_trains_the_labels_it_sees():
    # End to end with the real model_fn: lam = 1 (gradient through the jvp), guidance on; the label embedding gets
    # gradient on the rows of the labels in the batch and none elsewhere.
    _, unet, conditioner = conditional_parts()
    model_fn = unet_model_fn(unet, conditioner=conditioner)
    x = noise(batch=4, seed=1)
    t, r = torch.tensor([0.9, 0.6, 0.5, 0.3]), torch.tensor([0.2, 0.6, 0.1, 0.3])
    c = labels(0, NULL, 2, 0)
    out = ModularMeanFlowLoss(guidance_w=W, guidance_kappa=KAPPA)(
        model_fn, x, 1.0, t=t, r=r, noise=noise(batch=4, seed=2), class_labels=c, null_label=NULL
    )
    assert torch.isfinite(out.loss) and out.stats["frac_r_neq_t"] == 0.5
    out.loss.backward()
    grad = conditioner.label_embedding.weight.grad
    row_norms = grad.norm(dim=1)
    assert row_norms[0] > 0 and row_norms[2] > 0 and row_norms[NULL] > 0
    assert row_norms[1] == 0  # "dog" is not in the batch (the guidance target's "none" term carries no gradient)
    assert conditioner.time_embedding.linear_1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# 4. Sampling-time classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0, 0.5, -1.0])
def test_sampling_time_guidance_is_the_formula(scale):
    pipe = conditional_pipeline()
    z = noise()
    r, t = one_step(3)
    c = labels(2, 0, 1)
    with torch.no_grad():
        u_c = unet_average_velocity(pipe.unet, z, r, t, conditioner=pipe.conditioner, class_labels=c)
        u_none = unet_average_velocity(pipe.unet, z, r, t, conditioner=pipe.conditioner)
        guided = pipe.guided_average_velocity(z, r, t, c, scale)
    expected_u = u_none + scale * (u_c - u_none)
    # One batch of 2B against two batches of B: float rounding, amplified by |scale|.
    torch.testing.assert_close(guided, expected_u, atol=1e-5, rtol=0)
    assert (guided - u_c).abs().max() > 1e-2  # guidance does something
    images = pipe(latents=z, class_labels=["fox", "cat", "dog"], guidance_scale=scale, output_type="pt").images
    expected = to_image(z - expected_u)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    # Compared on unclamped numbers: a good share of the pixels lies strictly inside (0, 1).
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.3


def test_guidance_over_two_steps_follows_the_grid():
    pipe = conditional_pipeline()
    z = noise(batch=2)
    c, s = labels(1, 2), 1.5
    x = z.clone()
    with torch.no_grad():
        for t_val, r_val in ((1.0, 0.5), (0.5, 0.0)):
            r, t = torch.full((2,), r_val), torch.full((2,), t_val)
            u_c = unet_average_velocity(pipe.unet, x, r, t, conditioner=pipe.conditioner, class_labels=c)
            u_none = unet_average_velocity(pipe.unet, x, r, t, conditioner=pipe.conditioner)
            x = x - (t_val - r_val) * (u_none + s * (u_c - u_none))
    images = pipe(latents=z, class_labels=[1, 2], guidance_scale=s, num_inference_steps=2, output_type="pt").images
    torch.testing.assert_close(images, to_image(x), atol=1e-6, rtol=0)


def test_guidance_scale_one_and_zero():
    pipe = conditional_pipeline()
    z = noise()
    conditional = pipe(latents=z, class_labels=["dog", "cat", "fox"], output_type="pt").images
    unconditional = pipe(latents=z, class_labels="none", output_type="pt").images
    assert (conditional - unconditional).abs().max() > 1e-2
    torch.testing.assert_close(
        pipe(latents=z, class_labels=["dog", "cat", "fox"], guidance_scale=1, output_type="pt").images,
        conditional, atol=1e-5, rtol=0,
    )
    torch.testing.assert_close(
        pipe(latents=z, class_labels=["dog", "cat", "fox"], guidance_scale=0.0, output_type="pt").images,
        unconditional, atol=1e-5, rtol=0,
    )
    # guided_average_velocity on rows that already have no label gives their unconditional velocity (up to the
    # rounding of a 2B batch against a B batch, times the scale: ~2e-6 with 2 threads).
    r, t = one_step(3)
    with torch.no_grad():
        u = pipe.guided_average_velocity(z, r, t, labels(NULL, 1, NULL), 3.0)
        u_none = pipe.average_velocity(z, r, t)
    torch.testing.assert_close(u[[0, 2]], u_none[[0, 2]], atol=1e-5, rtol=0)
    assert (u[1] - u_none[1]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# 5. Save and load
# ----------------------------------------------------------------------------------------------------------------


def test_save_and_load_keep_labels_names_and_guidance(tmp_path):
    pipe = conditional_pipeline(time_scale=7.0)
    pipe.conditioner.register_to_config(guidance_w=2.5, guidance_kappa=0.4)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "conditioner" / "config.json").is_file()
    assert (tmp_path / "conditioner" / "diffusion_pytorch_model.safetensors").is_file()

    loaded = MMFPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.conditioner, MMFConditioner) and loaded.is_class_conditional
    assert loaded.class_names == NAMES and loaded.conditioner.null_label == NULL
    assert loaded.conditioner.config.guidance_w == 2.5 and loaded.conditioner.config.guidance_kappa == 0.4
    assert loaded.config.time_scale == 7.0
    for original, reloaded in ((pipe.unet, loaded.unet), (pipe.conditioner, loaded.conditioner)):
        a, b = original.state_dict(), reloaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    enable_forward_ad(loaded.unet)  # the attention processor the original has (processors are not saved)
    for kwargs in ({"class_labels": ["fox", "cat", "dog"]}, {"class_labels": "dog", "num_inference_steps": 2},
                   {"class_labels": ["cat", 2, "cat"], "guidance_scale": 3.0}, {}):
        expected = pipe(num_images=3, generator=seeded(5), output_type="np", **kwargs).images
        assert same_images(loaded(num_images=3, generator=seeded(5), output_type="np", **kwargs).images, expected)
    # The names come from the saved config: an unknown one is still refused after loading.
    with pytest.raises(ValueError, match="Unknown class name"):
        loaded(num_images=1, class_labels="0")


def test_default_class_names_are_the_ids(tmp_path):
    unet, conditioner = add_class_conditioning(tiny_unet(), 4)
    assert conditioner.class_names == ["0", "1", "2", "3"]
    pipe = MMFPipeline(unet, MMFScheduler(), conditioner=randomise_labels(conditioner))
    pipe.set_progress_bar_config(disable=True)
    z = noise(batch=2)
    assert torch.equal(pipe(latents=z, class_labels=["3", "1"], output_type="pt").images,
                       pipe(latents=z, class_labels=[3, 1], output_type="pt").images)
    pipe.save_pretrained(tmp_path)
    assert MMFPipeline.from_pretrained(tmp_path).class_names == ["0", "1", "2", "3"]


# ----------------------------------------------------------------------------------------------------------------
# 6. Errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_labels, num_images, match",
    [
        ("zebra", 2, "Unknown class name 'zebra'"),
        (["cat", "Cat"], 2, "Unknown class name"),
        (3, 2, "out of range"),  # the "no label" id is not a class
        ([0, -1], 2, "out of range"),
        (torch.tensor([0, 7]), 2, "out of range"),
        ([0, 1], 3, "one per image"),
        (torch.tensor([0, 1, 2]), 2, "one per image"),
        (torch.tensor([0.0, 1.0]), 2, "integer ids"),
        (torch.tensor([True, False]), 2, "integer ids"),
        (torch.tensor([[0, 1]]), 2, "1-D"),
        ([0, 1.0], 2, "int id or a name"),
        (True, 2, "int id or a name"),
        ({"cat": 1}, 2, "class_labels"),
    ],
)
def test_bad_class_labels(class_labels, num_images, match):
    generator = seeded(0)
    with pytest.raises(ValueError, match=match):
        conditional_pipeline()(num_images=num_images, class_labels=class_labels, generator=generator)
    assert torch.equal(generator.get_state(), seeded(0).get_state())  # refused before any work


@pytest.mark.parametrize("guidance_scale", [math.nan, math.inf, -math.inf, "2", True, None])
def test_bad_guidance_scale(guidance_scale):
    pipe = conditional_pipeline()
    if guidance_scale is None:  # guidance of the "no label" token only
        with pytest.raises(ValueError, match="needs class labels"):
            pipe(num_images=2, class_labels="none", guidance_scale=2.0)
        return
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(num_images=2, class_labels="cat", guidance_scale=guidance_scale)


def test_bad_pipeline_components():
    original, unet, conditioner = conditional_parts()
    with pytest.raises(ValueError, match="identity"):
        MMFPipeline(original, MMFScheduler(), conditioner=conditioner)  # a "timestep" UNet with a conditioner
    with pytest.raises(ValueError, match="conditioner"):
        MMFPipeline(unet, MMFScheduler())  # an "identity" UNet without one
    narrow = MMFConditioner(num_classes=3, time_embed_dim=32, projection_dim=16)
    with pytest.raises(ValueError, match="32-dim"):
        MMFPipeline(unet, MMFScheduler(), conditioner=narrow)
    with pytest.raises(ValueError, match="MMFConditioner"):
        MMFPipeline(unet, MMFScheduler(), conditioner=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="timestep"):
        add_class_conditioning(unet, 3)  # already class-conditional
    with pytest.raises(ValueError, match="unconditional"):
        unet_average_velocity(original, noise(), *one_step(3), class_labels=labels(0, 1, 2))


def test_conditioner_width_follows_the_unets_time_embedding_dim():
    # UNet2DModel's time-embedding width is time_embedding_dim when set, 4 * block_out_channels[0] otherwise.
    torch.manual_seed(0)
    original = build_mmf_unet(sample_size=SIZE, in_channels=1, block_out_channels=(16, 16), time_embedding_dim=32)
    unet, conditioner = add_class_conditioning(original, 2)
    assert conditioner.config.time_embed_dim == 32
    pipe = MMFPipeline(unet, MMFScheduler(), conditioner=conditioner)
    pipe.set_progress_bar_config(disable=True)
    z = noise(batch=2)
    with torch.no_grad():
        expected = unet_average_velocity(original, z, *one_step(2))
    torch.testing.assert_close(pipe(latents=z, class_labels=[0, 1], output_type="pt").images, to_image(z - expected),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="64-dim"):
        MMFPipeline(unet, MMFScheduler(), conditioner=MMFConditioner(num_classes=2, time_embed_dim=64,
                                                                     projection_dim=16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"time_embed_dim": -4}, "time_embed_dim"),
        ({"class_names": ["a", "b"]}, "2 class_names"),
        ({"class_names": ["a", "b", "a"]}, "distinct"),
    ],
)
def test_bad_conditioner_arguments(kwargs, match):
    arguments = dict(num_classes=3, time_embed_dim=64, projection_dim=16)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MMFConditioner(**arguments)


def test_loss_errors():
    model = ToyConditionalMLP()
    x, e, r, t, c = toy_batch()
    loss_fn = ModularMeanFlowLoss(guidance_w=W, guidance_kappa=KAPPA)
    call = dict(t=t, r=r, noise=e, null_label=K)
    for bad in (c.int(), c.double(), c[:-1], c[:, None], c.tolist()):
        with pytest.raises(ValueError, match="class_labels"):
            loss_fn(model, x, 0.0, class_labels=bad, **call)
    for bad in (torch.where(c == K, K + 1, c), torch.where(c == 0, -1, c)):
        with pytest.raises(ValueError, match=r"\[0, 3\]"):
            loss_fn(model, x, 0.0, class_labels=bad, **call)
    for null_label in (None, 3.0, True):
        with pytest.raises(ValueError, match="null_label"):
            loss_fn(model, x, 0.0, t=t, r=r, noise=e, class_labels=c, null_label=null_label)
    with pytest.raises(ValueError, match="needs class_labels"):
        loss_fn(model, x, 0.0, t=t, r=r, noise=e)
    for kappa in (1.0, 1.5, -0.1, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match="guidance_kappa"):
            ModularMeanFlowLoss(guidance_kappa=kappa)
    for w in (0.0, -1.0, math.nan, math.inf, True, "2"):
        with pytest.raises(ValueError, match="guidance_w"):
            ModularMeanFlowLoss(guidance_w=w)


# ----------------------------------------------------------------------------------------------------------------
# 7. Forward-mode AD through conditioner and UNet
# ----------------------------------------------------------------------------------------------------------------


def test_jvp_through_conditioner_and_unet_matches_reverse_mode_reference():
    _, unet, conditioner = conditional_parts()
    assert any(isinstance(m, Attention) for m in unet.modules())
    unet.double()
    conditioner.double()
    model_fn = unet_model_fn(unet, conditioner=conditioner)
    z = noise(batch=3, dtype=torch.float64)
    tangent_z = noise(batch=3, seed=1, dtype=torch.float64)
    r = torch.tensor([0.0, 0.3, 0.5], dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.5], dtype=torch.float64)
    c = labels(2, NULL, 0)

    def f(z_, r_, t_):
        return model_fn(z_, r_, t_, c)

    primals = (z, r, t)
    tangents = (tangent_z, torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    output, derivative = torch.func.jvp(f, primals, tangents)
    reference_output, reference_derivative = torch.autograd.functional.jvp(f, primals, tangents)
    torch.testing.assert_close(output, reference_output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(derivative, reference_derivative, rtol=1e-9, atol=1e-10)
    # The loss's estimator (tangents (v, 0, 1)) agrees too, and the label changes the derivative.
    _, dudt = jvp_derivative(f, z, r, t, tangent_z, create_graph=False)
    _, reference_dudt = torch.autograd.functional.jvp(
        lambda z_, t_: f(z_, r, t_), (z, t), (tangent_z, torch.ones(3, dtype=torch.float64))
    )
    torch.testing.assert_close(dudt, reference_dudt, rtol=1e-9, atol=1e-10)
    _, other = torch.func.jvp(lambda z_, r_, t_: model_fn(z_, r_, t_, labels(1, 1, 1)), primals, tangents)
    assert (other - derivative).abs().max() > 1e-3
    # The time part goes through the conditioner's sinusoid (h = t - r): not zero.
    _, d_time = torch.func.jvp(f, primals, (torch.zeros_like(z), tangents[1], tangents[2]))
    assert d_time.abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# 8. Other dtypes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-5), (torch.bfloat16, 0.05)])
def test_other_dtypes_with_a_conditioner(dtype, atol):
    pipe = conditional_pipeline()
    z = noise()
    calls = ({"class_labels": ["fox", "cat", "dog"]}, {"class_labels": 1, "guidance_scale": 2.0},
             {"class_labels": "none"},
             {"class_labels": [0, 1, 2], "num_inference_steps": 2})
    expected = [pipe(latents=z, output_type="pt", **kwargs).images for kwargs in calls]
    pipe.to(dtype)
    assert pipe.unet.dtype == dtype and pipe.conditioner.dtype == dtype
    for kwargs, reference in zip(calls, expected):
        images = pipe(latents=z, output_type="pt", **kwargs).images
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
        torch.testing.assert_close(images, reference, atol=atol, rtol=0)
    assert np.isfinite(pipe(num_images=2, class_labels="dog", generator=seeded(), output_type="np").images).all()


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
def test_from_pretrained_in_bfloat16_with_a_conditioner(tmp_path):
    pipe = conditional_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = MMFPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.conditioner.dtype == torch.bfloat16
    z = noise()
    images = loaded(latents=z, class_labels=["dog", "fox", "cat"], output_type="pt").images
    expected = pipe(latents=z, class_labels=["dog", "fox", "cat"], output_type="pt").images
    torch.testing.assert_close(images, expected, atol=0.05, rtol=0)


def test_add_class_conditioning_keeps_dtype():
    unet = tiny_unet().to(torch.float64)
    new, conditioner = add_class_conditioning(unet, 2)
    assert new.dtype == torch.float64 and conditioner.dtype == torch.float64
    z = noise(batch=2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(
            unet_average_velocity(new, z, *[a.double() for a in one_step(2)], conditioner=conditioner,
                                  class_labels=labels(0, 2)),
            unet_average_velocity(unet, z, *[a.double() for a in one_step(2)]),
        )


def test_numpy_labels_are_ids():
    pipe = conditional_pipeline()
    names = pipe.class_names
    from_numpy = pipe(num_images=3, class_labels=np.array([2, 0, 1]), generator=seeded(0), output_type="pt").images
    from_names = pipe(num_images=3, class_labels=[names[2], names[0], names[1]], generator=seeded(0),
                      output_type="pt").images
    assert torch.equal(from_numpy, from_names)
    with pytest.raises(ValueError, match="integer ids"):
        pipe(num_images=2, class_labels=np.array([0.0, 1.0]))


def test_label_init_std_gives_distinct_codes_and_keeps_everything_else():
    original, _, _ = conditional_parts()
    torch.manual_seed(1)
    unet, conditioner = add_class_conditioning(original, 50, label_init_std=0.3)
    weight = conditioner.label_embedding.weight
    assert 0.27 < weight.std().item() < 0.33 and weight.shape[0] == 51
    # the UNet and the second-time MLP are carried over exactly as with a zero start
    for name, value in conditioner.time_embedding.state_dict().items():
        assert torch.equal(value, original.class_embedding.state_dict()[name])
    for name, value in unet.state_dict().items():
        assert torch.equal(value, original.state_dict()[name])
    for bad in (-0.1, math.nan, "1"):
        with pytest.raises(ValueError, match="label_init_std"):
            add_class_conditioning(original, 3, label_init_std=bad)
