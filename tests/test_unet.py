"""Tests for the two-time UNet2DModel helpers in `mmf_diffusers.unet`.

A stock `UNet2DModel` with `class_embed_type="timestep"` carries a second time through its `class_labels` input;
`unet_average_velocity` maps `(z, r, t)` to `timestep = time_scale * t` and `class_labels = time_scale * h`
(`h = t - r`) or `time_scale * r`. Forward-mode AD (`torch.func.jvp`) through the UNet's attention needs
`ForwardADAttnProcessor` on CPU in torch 2.13; the derivative tests run in float64 against
`torch.autograd.functional.jvp` (reverse mode, double-backward trick) as the reference.

Time convention: t = 0 is data, t = 1 is noise, 0 <= r <= t <= 1.
"""

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmf_diffusers import (
    ForwardADAttnProcessor,
    add_second_time_embedding,
    build_mmf_unet,
    enable_forward_ad,
    prepare_unet_for_mmf,
    unet_average_velocity,
    unet_model_fn,
)

SIZE = 8


def tiny_unet(in_channels: int = 1, seed: int = 0, **kwargs) -> UNet2DModel:
    torch.manual_seed(seed)
    return build_mmf_unet(
        sample_size=SIZE, in_channels=in_channels, block_out_channels=(8, 16), norm_num_groups=4, **kwargs
    )


def stock_unet(seed: int = 0, **kwargs) -> UNet2DModel:
    """A plain UNet2DModel of the same size, attention on the lower level, default processors."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    config.update(kwargs)
    return UNet2DModel(**config)


def inputs(batch: int = 2, channels: int = 1, dtype=torch.float32, seed: int = 0):
    """``(z, r, t)`` with ``0 <= r <= t <= 1``, including the one-step pair ``(0, 1)`` and an ``r = t`` row."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, channels, SIZE, SIZE, generator=generator, dtype=torch.float64).to(dtype)
    t = torch.tensor([1.0, 0.7, 0.4, 0.9][:batch], dtype=dtype)
    r = torch.tensor([0.0, 0.2, 0.4, 0.1][:batch], dtype=dtype)
    return z, r, t


def attention_modules(unet: torch.nn.Module):
    return [module for module in unet.modules() if isinstance(module, Attention)]


def set_processor(unet: torch.nn.Module, processor_class) -> None:
    for module in attention_modules(unet):
        module.set_processor(processor_class())


# ----------------------------------------------------------------------------------------------------------------
# build_mmf_unet
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
def test_build_mmf_unet_configuration(in_channels):
    unet = tiny_unet(in_channels)
    config = unet.config
    assert config.class_embed_type == "timestep"
    assert config.time_embedding_type == "positional"
    assert config.num_class_embeds is None
    assert config.in_channels == config.out_channels == in_channels
    assert config.sample_size == SIZE
    # Attention on the lowest-resolution level only, by default.
    assert config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert config.up_block_types == ("AttnUpBlock2D", "UpBlock2D")
    attention = attention_modules(unet)
    assert attention, "the default tiny UNet has attention"
    assert all(isinstance(module.processor, ForwardADAttnProcessor) for module in attention)
    # The class-embedding dtype cast is installed too.
    assert unet.class_embedding._mmf_cast_hook is not None
    z, r, t = inputs(channels=in_channels)
    with torch.no_grad():
        assert unet_average_velocity(unet, z, r, t).shape == z.shape


def test_build_mmf_unet_attention_levels_and_extra_arguments():
    unet = tiny_unet(attention_levels=[True, True], out_channels=2, layers_per_block=2)
    assert unet.config.down_block_types == ("AttnDownBlock2D", "AttnDownBlock2D")
    assert unet.config.out_channels == 2 and unet.config.layers_per_block == 2
    assert all(isinstance(module.processor, ForwardADAttnProcessor) for module in attention_modules(unet))
    assert len(attention_modules(unet)) > len(attention_modules(tiny_unet()))
    # UNet2DModel's mid block keeps its attention whatever attention_levels says; it gets the processor too.
    no_level_attention = tiny_unet(attention_levels=[False, False])
    assert no_level_attention.config.down_block_types == ("DownBlock2D", "DownBlock2D")
    assert [m for m in no_level_attention.modules() if isinstance(m, Attention)] == attention_modules(
        no_level_attention.mid_block
    )
    assert all(isinstance(module.processor, ForwardADAttnProcessor) for module in attention_modules(no_level_attention))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sample_size=10, block_out_channels=(8, 16, 16), norm_num_groups=4), "sample_size"),
        (dict(sample_size=7, block_out_channels=(8, 16), norm_num_groups=4), "sample_size"),
        (dict(sample_size=8, block_out_channels=(8, 12), norm_num_groups=8), "norm_num_groups"),
        (dict(sample_size=8, block_out_channels=(6, 16), norm_num_groups=4), "norm_num_groups"),
        (dict(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_levels=[True]), "attention_levels"),
        (
            dict(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_levels=[True, False, True]),
            "attention_levels",
        ),
    ],
)
def test_build_mmf_unet_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_mmf_unet(in_channels=1, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The two times
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("second_time", ["h", "r"])
def test_second_time_and_t_change_the_output(second_time):
    unet = tiny_unet()
    z, _, _ = inputs(batch=2)
    t = torch.full((2,), 0.8)

    def u(r, t_):
        with torch.no_grad():
            return unet_average_velocity(unet, z, r, t_, time_scale=10.0, second_time=second_time)

    base = u(torch.full((2,), 0.1), t)
    other_r = u(torch.full((2,), 0.5), t)
    other_t = u(torch.full((2,), 0.1), torch.full((2,), 0.6))
    scale = base.abs().mean()
    assert (other_r - base).abs().mean() > 1e-3 * scale
    assert (other_t - base).abs().mean() > 1e-3 * scale
    # And evaluation is deterministic, so the differences above are not noise.
    assert torch.equal(u(torch.full((2,), 0.1), t), base)


def capture_unet_inputs(unet: UNet2DModel) -> dict:
    """Record the `timestep` and `class_labels` of the next forward call of `unet`."""
    seen = {}

    def hook(module, args, kwargs):
        seen["timestep"] = args[1] if len(args) > 1 else kwargs["timestep"]
        seen["class_labels"] = kwargs.get("class_labels", args[2] if len(args) > 2 else None)

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("time_scale", [1.0, 10.0, 1000.0])
def test_second_time_mapping(time_scale):
    unet = tiny_unet()
    seen = capture_unet_inputs(unet)
    z, r, t = inputs(batch=3)

    with torch.no_grad():
        unet_average_velocity(unet, z, r, t, time_scale=time_scale, second_time="h")
    assert seen["timestep"].dtype == torch.float32 and seen["class_labels"].dtype == torch.float32
    torch.testing.assert_close(seen["timestep"], time_scale * t)
    torch.testing.assert_close(seen["class_labels"], time_scale * (t - r))

    with torch.no_grad():
        unet_average_velocity(unet, z, r, t, time_scale=time_scale, second_time="r")
    torch.testing.assert_close(seen["timestep"], time_scale * t)
    torch.testing.assert_close(seen["class_labels"], time_scale * r)

    # unet_model_fn (what the loss calls) uses the same mapping.
    with torch.no_grad():
        unet_model_fn(unet, time_scale=time_scale, second_time="h")(z, r, t)
    torch.testing.assert_close(seen["class_labels"], time_scale * (t - r))


def test_h_and_r_mappings_agree_where_they_should():
    # With second_time="h" the UNet sees (t, t - r); with "r" it sees (t, r). The same UNet called as
    # u_h(z, r, t) equals u_r(z, t - r, t).
    unet = tiny_unet()
    z, r, t = inputs(batch=3)
    with torch.no_grad():
        as_h = unet_average_velocity(unet, z, r, t, time_scale=10.0, second_time="h")
        as_r = unet_average_velocity(unet, z, t - r, t, time_scale=10.0, second_time="r")
    assert torch.equal(as_h, as_r)


def test_unet_average_velocity_rejects_unknown_second_time():
    z, r, t = inputs()
    with pytest.raises(ValueError, match="second_time"):
        unet_average_velocity(tiny_unet(), z, r, t, second_time="t")


# ----------------------------------------------------------------------------------------------------------------
# Forward-mode AD
# ----------------------------------------------------------------------------------------------------------------


def total_derivative_problem(unet: UNet2DModel):
    """``f(z, t) = u(z, r, t)`` at fixed ``r`` in float64 and the MeanFlow tangents ``(v, 1)``."""
    z, r, t = inputs(batch=2, dtype=torch.float64)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def f(z_, t_):
        return unet_average_velocity(unet, z_, r, t_, time_scale=10.0)

    return f, (z, t), (v, torch.ones_like(t))


def test_torch_func_jvp_through_attention_matches_reverse_mode_reference():
    unet = tiny_unet().double().requires_grad_(False)
    assert attention_modules(unet) and all(
        isinstance(module.processor, ForwardADAttnProcessor) for module in attention_modules(unet)
    )
    f, primals, tangents = total_derivative_problem(unet)
    output, derivative = torch.func.jvp(f, primals, tangents)
    reference_output, reference_derivative = torch.autograd.functional.jvp(f, primals, tangents)
    assert output.dtype == derivative.dtype == torch.float64
    torch.testing.assert_close(output, reference_output, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(derivative, reference_derivative, atol=1e-10, rtol=1e-8)
    assert derivative.abs().max() > 1e-3  # a real derivative, not zero
    # Both parts of the tangent matter: d_z u . v and d_t u.
    _, spatial = torch.func.jvp(f, primals, (tangents[0], torch.zeros_like(tangents[1])))
    _, temporal = torch.func.jvp(f, primals, (torch.zeros_like(tangents[0]), tangents[1]))
    torch.testing.assert_close(spatial + temporal, derivative, atol=1e-10, rtol=1e-8)
    assert temporal.abs().max() > 1e-6 and spatial.abs().max() > 1e-3


def test_torch_func_jvp_needs_forward_ad_processor_on_cpu():
    # Documents why ForwardADAttnProcessor exists. In torch 2.13 on CPU, forward-mode AD through diffusers'
    # default AttnProcessor2_0 fails twice over: (1) the fused SDPA CPU kernel has no forward-AD formula;
    # (2) with the math backend forced, group_norm's forward-AD rule fails on the non-contiguous attention output.
    # If a torch build no longer fails, nothing is asserted about it.
    class MathBackendOnly(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            with sdpa_kernel(SDPBackend.MATH):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    failures = {}
    for name, processor_class in [("stock", AttnProcessor2_0), ("math backend only", MathBackendOnly)]:
        unet = tiny_unet().double().requires_grad_(False)
        set_processor(unet, processor_class)
        f, primals, tangents = total_derivative_problem(unet)
        try:
            torch.func.jvp(f, primals, tangents)
        except (NotImplementedError, RuntimeError) as error:
            failures[name] = str(error)
    if not failures:
        pytest.skip(f"torch {torch.__version__} supports forward-mode AD through the stock attention processor")
    if "stock" in failures:
        assert "forward AD" in failures["stock"] or "forward-mode" in failures["stock"], failures["stock"]
    # The fix works in the same torch build.
    unet = tiny_unet().double().requires_grad_(False)
    enable_forward_ad(unet)
    f, primals, tangents = total_derivative_problem(unet)
    torch.func.jvp(f, primals, tangents)


def test_jvp_with_differentiable_tangent_output():
    # For lam > 0 the derivative must carry gradients to the parameters.
    unet = tiny_unet().double()
    f, primals, tangents = total_derivative_problem(unet)
    _, derivative = torch.func.jvp(f, primals, tangents)
    derivative.square().sum().backward()
    grad = unet.class_embedding.linear_2.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_forward_ad_processor_matches_default_processor(dtype, tolerance):
    unet = tiny_unet(3).to(dtype)
    z, r, t = inputs(batch=3, channels=3, dtype=dtype)
    with torch.no_grad():
        with_processor = unet_average_velocity(unet, z, r, t, time_scale=10.0)
        set_processor(unet, AttnProcessor2_0)
        default = unet_average_velocity(unet, z, r, t, time_scale=10.0)
    assert with_processor.is_contiguous()
    torch.testing.assert_close(with_processor, default, atol=tolerance, rtol=tolerance)


def test_enable_forward_ad_counts_attention_modules():
    unet = stock_unet()
    assert not any(isinstance(module.processor, ForwardADAttnProcessor) for module in attention_modules(unet))
    assert enable_forward_ad(unet) == len(attention_modules(unet)) > 0
    assert all(isinstance(module.processor, ForwardADAttnProcessor) for module in attention_modules(unet))


# ----------------------------------------------------------------------------------------------------------------
# Converting and checking existing UNets
# ----------------------------------------------------------------------------------------------------------------


def test_add_second_time_embedding_starts_as_the_original_model():
    original = stock_unet(seed=3)
    assert original.config.class_embed_type is None
    new = add_second_time_embedding(original)
    assert new is not original and isinstance(new, UNet2DModel)
    assert new.config.class_embed_type == "timestep"
    assert original.config.class_embed_type is None  # the original is left as it was
    assert all(isinstance(module.processor, ForwardADAttnProcessor) for module in attention_modules(new))

    # Every original weight is carried over unchanged.
    new_state = new.state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(new_state[key], value), key
    assert torch.count_nonzero(new.class_embedding.linear_2.weight) == 0
    assert torch.count_nonzero(new.class_embedding.linear_2.bias) == 0
    assert torch.count_nonzero(new.class_embedding.linear_1.weight) > 0  # the hidden layer can still learn

    # Same attention kernel on both sides, so the comparison can be exact.
    enable_forward_ad(original)
    z, _, _ = inputs(batch=2)
    for t in (torch.tensor([1.0, 0.3]), torch.tensor([500.0, 0.0])):
        with torch.no_grad():
            expected = original(z, t).sample
            for h in (torch.zeros(2), torch.tensor([0.3, 7.0]), t):
                assert torch.equal(new(z, t, class_labels=h).sample, expected)


def test_add_second_time_embedding_output_layer_is_trainable():
    new = add_second_time_embedding(stock_unet())
    z, r, t = inputs(batch=2)
    unet_average_velocity(new, z, r, t, time_scale=10.0).square().sum().backward()
    assert new.class_embedding.linear_2.weight.grad.abs().sum() > 0
    # After any update of the zero layer, the second time is no longer ignored.
    with torch.no_grad():
        new.class_embedding.linear_2.weight.normal_(std=0.1)
        first = unet_average_velocity(new, z, torch.zeros(2), t, time_scale=10.0)
        second = unet_average_velocity(new, z, torch.full((2,), 0.2), t, time_scale=10.0)
    assert not torch.equal(first, second)


def test_add_second_time_embedding_on_a_two_time_unet_returns_it():
    unet = tiny_unet()
    assert add_second_time_embedding(unet) is unet


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_class_embeds=10), dict(class_embed_type="identity")],
    ids=["num_class_embeds", "identity"],
)
def test_add_second_time_embedding_rejects_a_taken_class_slot(kwargs):
    with pytest.raises(ValueError, match="class"):
        add_second_time_embedding(stock_unet(**kwargs))


def test_prepare_unet_for_mmf_rejects_fourier_time_features():
    fourier = stock_unet(time_embedding_type="fourier", class_embed_type="timestep")
    with pytest.raises(ValueError, match="fourier"):
        prepare_unet_for_mmf(fourier)


def test_prepare_unet_for_mmf_rejects_a_unet_without_the_second_time_slot():
    with pytest.raises(ValueError, match="class_embed_type"):
        prepare_unet_for_mmf(stock_unet())
    with pytest.raises(ValueError, match="class_embed_type"):
        prepare_unet_for_mmf(stock_unet(num_class_embeds=10))


def test_prepare_unet_for_mmf_on_a_stock_two_time_unet():
    unet = stock_unet(class_embed_type="timestep")
    assert prepare_unet_for_mmf(unet) is unet
    assert all(isinstance(module.processor, ForwardADAttnProcessor) for module in attention_modules(unet))
    # The dtype cast makes float64 work (the stock class-embedding path would fail).
    unet.double()
    z, r, t = inputs(dtype=torch.float64)
    with torch.no_grad():
        assert unet_average_velocity(unet, z, r, t).dtype == torch.float64
