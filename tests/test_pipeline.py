"""Tests for `MMFPipeline`.

Everything runs on the CPU in float32 (unless a test is about another dtype) with tiny two-time UNets
(`build_mmf_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)`, about 46k parameters, attention
on the lower level) and seeded generators. At initialisation UNet2DModel's output layer is not zero, so the
average velocity `u` is a non-trivial function of `(z, r, t)` and the images are not constant.

Time convention: t = 0 is data, t = 1 is noise; one step is `x = z_1 - u(z_1, 0, 1)`, then the image is
`clip(x / 2 + 0.5, 0, 1)`.
"""

import ast
import contextlib
import doctest
import inspect
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler, ImagePipelineOutput, UNet2DModel

from mmf_diffusers import (
    MMFPipeline,
    MMFScheduler,
    add_class_conditioning,
    build_mmf_unet,
    enable_forward_ad,
    unet_average_velocity,
)

SIZE = 8


def tiny_unet(in_channels: int = 1, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return build_mmf_unet(sample_size=SIZE, in_channels=in_channels, block_out_channels=(8, 16), norm_num_groups=4)


def make_pipeline(in_channels: int = 1, scheduler=None, **config) -> MMFPipeline:
    pipe = MMFPipeline(tiny_unet(in_channels), scheduler if scheduler is not None else MMFScheduler(), **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def one_thread():
    """Bit-exact comparisons of a model with its reloaded copy run on one thread: with several, a CPU kernel's path
    (and its last-bit rounding) can depend on the weights' memory alignment, which safetensors' loading changes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def noise(batch: int = 2, channels: int = 1, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_sampler(pipe: MMFPipeline, latents: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """The sampler written out: z <- z - (s_i - s_{i+1}) * u(z, s_{i+1}, s_i) over the scheduler's grid."""
    pipe.scheduler.set_timesteps(num_inference_steps)
    sigmas = pipe.scheduler.sigmas.to(torch.float32)
    # The grid is 1 = s_0 > ... > s_N = 0, evenly spaced (no shift configured in these tests).
    torch.testing.assert_close(sigmas, torch.linspace(1, 0, num_inference_steps + 1), atol=1e-6, rtol=0)
    batch = latents.shape[0]
    z = latents.clone()
    with torch.no_grad():
        for i in range(num_inference_steps):
            t = sigmas[i].expand(batch)
            r = sigmas[i + 1].expand(batch)
            u = unet_average_velocity(
                pipe.unet, z, r, t, time_scale=pipe.config.time_scale, second_time=pipe.config.second_time
            )
            z = z - (sigmas[i] - sigmas[i + 1]) * u
    return (z / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels, mode", [(1, "L"), (3, "RGB")])
def test_output_type_pil(in_channels, mode):
    output = make_pipeline(in_channels)(num_images=3, generator=seeded())
    assert isinstance(output, ImagePipelineOutput)
    assert isinstance(output.images, list) and len(output.images) == 3
    for image in output.images:
        assert isinstance(image, PIL.Image.Image)
        assert image.size == (SIZE, SIZE) and image.mode == mode


@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_type_np(in_channels):
    images = make_pipeline(in_channels)(num_images=2, generator=seeded(), output_type="np").images
    assert isinstance(images, np.ndarray)
    assert images.shape == (2, SIZE, SIZE, in_channels)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    # Not degenerate: a real fraction of the pixels lies strictly inside (0, 1), so the exact-value tests below
    # compare unclipped numbers.
    assert ((images > 0) & (images < 1)).mean() > 0.3


@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_type_pt(in_channels):
    images = make_pipeline(in_channels)(num_images=2, generator=seeded(), output_type="pt").images
    assert torch.is_tensor(images)
    assert images.shape == (2, in_channels, SIZE, SIZE)
    assert images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_output_types_agree():
    pipe = make_pipeline(3)
    as_pt = pipe(num_images=2, generator=seeded(), output_type="pt").images
    as_np = pipe(num_images=2, generator=seeded(), output_type="np").images
    as_pil = pipe(num_images=2, generator=seeded(), output_type="pil").images
    np.testing.assert_array_equal(as_np, as_pt.permute(0, 2, 3, 1).numpy())
    # PIL images are the np images rounded to uint8 (diffusers' numpy_to_pil).
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in as_pil]), (as_np * 255).round().astype("uint8"))


def test_return_dict_false_gives_a_one_tuple():
    pipe = make_pipeline()
    result = pipe(num_images=2, generator=seeded(), output_type="np", return_dict=False)
    assert isinstance(result, tuple) and len(result) == 1
    np.testing.assert_array_equal(result[0], pipe(num_images=2, generator=seeded(), output_type="np").images)


def test_batch_size_is_a_synonym_of_num_images():
    pipe = make_pipeline()
    by_num_images = pipe(num_images=3, generator=seeded(), output_type="pt").images
    by_batch_size = pipe(batch_size=3, generator=seeded(), output_type="pt").images
    both_equal = pipe(num_images=3, batch_size=3, generator=seeded(), output_type="pt").images
    assert by_num_images.shape[0] == 3
    torch.testing.assert_close(by_batch_size, by_num_images, atol=0, rtol=0)
    torch.testing.assert_close(both_equal, by_num_images, atol=0, rtol=0)
    with pytest.raises(ValueError, match="batch_size"):
        pipe(num_images=2, batch_size=3)


def test_number_of_images_defaults_to_one_or_to_the_latents():
    pipe = make_pipeline()
    assert pipe(generator=seeded(), output_type="pt").images.shape[0] == 1
    assert pipe(latents=noise(batch=4), output_type="pt").images.shape[0] == 4


# ----------------------------------------------------------------------------------------------------------------
# The sampler against the formula
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_scale, second_time", [(1.0, "h"), (10.0, "h"), (1000.0, "r")])
def test_one_step_is_z1_minus_u_of_z1_0_1(time_scale, second_time):
    pipe = make_pipeline(time_scale=time_scale, second_time=second_time)
    z_1 = noise(batch=3)
    with torch.no_grad():
        u = unet_average_velocity(pipe.unet, z_1, torch.zeros(3), torch.ones(3), time_scale, second_time)
    expected = ((z_1 - u) / 2 + 0.5).clamp(0, 1)
    images = pipe(latents=z_1, output_type="pt").images
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(images, hand_sampler(pipe, z_1, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_inference_steps", [2, 4])
@pytest.mark.parametrize("second_time", ["h", "r"])
def test_few_steps_follow_the_scheduler_grid(num_inference_steps, second_time):
    pipe = make_pipeline(time_scale=10.0, second_time=second_time)
    z_1 = noise(batch=2)
    images = pipe(latents=z_1, num_inference_steps=num_inference_steps, output_type="pt").images
    torch.testing.assert_close(images, hand_sampler(pipe, z_1, num_inference_steps), atol=1e-6, rtol=1e-6)
    # More steps is a different computation, not the one-step answer again.
    one_step = pipe(latents=z_1, output_type="pt").images
    assert (images - one_step).abs().max() > 1e-3


def test_given_latents_are_not_modified():
    pipe = make_pipeline()
    z_1 = noise()
    copy = z_1.clone()
    pipe(latents=z_1, num_inference_steps=2, output_type="pt")
    assert torch.equal(z_1, copy)


# ----------------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------------


def test_seeded_runs_are_bit_identical():
    pipe = make_pipeline()
    first = pipe(num_images=2, num_inference_steps=2, generator=seeded(7), output_type="np").images
    second = pipe(num_images=2, num_inference_steps=2, generator=seeded(7), output_type="np").images
    np.testing.assert_array_equal(first, second)
    other = pipe(num_images=2, num_inference_steps=2, generator=seeded(8), output_type="np").images
    assert np.abs(first - other).max() > 0.1


def test_list_of_generators_gives_per_image_reproducibility():
    pipe = make_pipeline(3)
    seeds = [3, 5, 7]
    batch = pipe(num_images=3, generator=[seeded(s) for s in seeds], output_type="pt").images
    for i, s in enumerate(seeds):
        single = pipe(num_images=1, generator=seeded(s), output_type="pt").images[0]
        # The noise is identical; the network runs on a batch of 3 against a batch of 1, so allow float rounding.
        torch.testing.assert_close(batch[i], single, atol=1e-6, rtol=1e-6)
    assert (batch[0] - batch[1]).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    pipe = make_pipeline(3, time_scale=250.0, second_time="r")
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "model_index.json").is_file()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()

    loaded = MMFPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, MMFPipeline)
    assert isinstance(loaded.scheduler, MMFScheduler)
    assert loaded.config.time_scale == 250.0 and loaded.config.second_time == "r"
    original_state, loaded_state = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)

    z_1 = noise(channels=3)
    expected = pipe(latents=z_1, num_inference_steps=2, output_type="pt").images
    # Attention processors are not saved: the reloaded UNet uses diffusers' default (fused SDPA) processor rather
    # than ForwardADAttnProcessor (math backend), which rounds differently in the last bits.
    torch.testing.assert_close(
        loaded(latents=z_1, num_inference_steps=2, output_type="pt").images, expected, atol=1e-6, rtol=1e-6
    )
    # With the same attention processor, the round trip is bit-exact.
    enable_forward_ad(loaded.unet)
    with one_thread():
        expected = pipe(latents=z_1, num_inference_steps=2, output_type="pt").images
        assert torch.equal(loaded(latents=z_1, num_inference_steps=2, output_type="pt").images, expected)


def test_saved_time_mapping_is_used_by_the_loaded_pipeline(tmp_path):
    # If the loaded pipeline fell back to the default time_scale, its images would differ from the original's.
    pipe = make_pipeline(time_scale=3.0)
    assert pipe.config.time_scale != MMFPipeline(tiny_unet(), MMFScheduler()).config.time_scale
    pipe.save_pretrained(tmp_path)
    loaded = MMFPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    enable_forward_ad(loaded.unet)
    z_1 = noise()
    with one_thread():
        assert torch.equal(loaded(latents=z_1, output_type="pt").images, pipe(latents=z_1, output_type="pt").images)


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
@pytest.mark.parametrize("dtype_argument", ["dtype", "torch_dtype"])
def test_from_pretrained_in_bfloat16_runs(tmp_path, dtype_argument):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = MMFPipeline.from_pretrained(tmp_path, **{dtype_argument: torch.bfloat16})
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.dtype == torch.bfloat16
    z_1 = noise()
    images = loaded(latents=z_1, num_inference_steps=2, output_type="pt").images
    assert torch.isfinite(images).all()
    expected = pipe(latents=z_1, num_inference_steps=2, output_type="pt").images
    torch.testing.assert_close(images, expected, atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_inference_steps", [1, 2, 4])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_map_scheduler_can_replace_mmf_scheduler(num_inference_steps, shift):
    mmf = make_pipeline(time_scale=10.0, scheduler=MMFScheduler(shift=shift))
    flow_map = MMFPipeline(
        mmf.unet, FlowMapEulerDiscreteScheduler.from_config(mmf.scheduler.config), time_scale=10.0
    )
    flow_map.set_progress_bar_config(disable=True)
    assert isinstance(flow_map.scheduler, FlowMapEulerDiscreteScheduler)
    assert flow_map.scheduler.config.shift == shift
    z_1 = noise(batch=2)
    expected = mmf(latents=z_1, num_inference_steps=num_inference_steps, output_type="pt").images
    images = flow_map(latents=z_1, num_inference_steps=num_inference_steps, output_type="pt").images
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=1e-6)


def test_pipeline_takes_the_scheduler_grid_with_shift():
    # With shift, the grid is no longer linspace: the sampler must read the scheduler's sigmas, not rebuild them.
    pipe = make_pipeline(time_scale=10.0, scheduler=MMFScheduler(shift=3.0))
    z_1 = noise()
    images = pipe(latents=z_1, num_inference_steps=2, output_type="pt").images
    sigmas = pipe.scheduler.sigmas
    assert not torch.allclose(sigmas, torch.linspace(1, 0, 3))
    z = z_1.clone()
    with torch.no_grad():
        for i in range(2):
            u = pipe.average_velocity(z, sigmas[i + 1].expand(2), sigmas[i].expand(2))
            z = z - (sigmas[i] - sigmas[i + 1]) * u
    torch.testing.assert_close(images, (z / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Refused input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_images", [0, -1, 2.5, True, "3"])
def test_bad_num_images(num_images):
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="num_images"):
        pipe(num_images=num_images)
    with pytest.raises(ValueError, match="num_images"):
        pipe(batch_size=num_images)


@pytest.mark.parametrize("num_inference_steps", [0, -2, 1.5, True, None])
def test_bad_num_inference_steps(num_inference_steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_pipeline()(num_inference_steps=num_inference_steps)


@pytest.mark.parametrize("output_type", ["latents", "PIL", None])
def test_unknown_output_type(output_type):
    with pytest.raises(ValueError, match="output_type"):
        make_pipeline()(output_type=output_type)


@pytest.mark.parametrize(
    "latents, num_images",
    [
        (noise(batch=2), 3),  # wrong batch size for num_images
        (torch.randn(2, 3, SIZE, SIZE), None),  # wrong channels
        (torch.randn(2, 1, 4, 4), None),  # wrong resolution
        (torch.randn(1, SIZE, SIZE), None),  # missing batch dimension
        (noise(batch=2).numpy(), None),  # not a tensor
        ([[0.0]], None),  # not a tensor, not even an array
    ],
)
def test_bad_latents(latents, num_images):
    with pytest.raises(ValueError, match="latents"):
        make_pipeline()(latents=latents, num_images=num_images)


@pytest.mark.parametrize("count", [1, 3])
def test_list_of_generators_of_the_wrong_length(count):
    with pytest.raises(ValueError, match="generator"):
        make_pipeline()(num_images=2, generator=[seeded(i) for i in range(count)])


def test_unet_without_a_second_time_is_refused():
    torch.manual_seed(0)
    one_time = UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    with pytest.raises(ValueError, match="class_embed_type"):
        MMFPipeline(one_time, MMFScheduler())


@pytest.mark.parametrize("second_time", ["t", "H", None, 1])
def test_bad_second_time(second_time):
    with pytest.raises(ValueError, match="second_time"):
        MMFPipeline(tiny_unet(), MMFScheduler(), second_time=second_time)
    with pytest.raises(ValueError, match="second_time"):
        unet_average_velocity(tiny_unet(), noise(), torch.zeros(2), torch.ones(2), second_time=second_time)


@pytest.mark.parametrize("time_scale", [0, -1.0, "10", None, True, math.nan, math.inf])
def test_bad_time_scale(time_scale):
    with pytest.raises(ValueError, match="time_scale"):
        MMFPipeline(tiny_unet(), MMFScheduler(), time_scale=time_scale)


def test_refused_input_does_no_work():
    # Validation happens before the noise is drawn: a bad call leaves the generator untouched.
    generator = seeded(0)
    with pytest.raises(ValueError):
        make_pipeline()(num_images=2, output_type="jpeg", generator=generator)
    assert torch.equal(generator.get_state(), seeded(0).get_state())


# ----------------------------------------------------------------------------------------------------------------
# Other dtypes
# ----------------------------------------------------------------------------------------------------------------


def remove_class_embedding_cast(unet: UNet2DModel) -> None:
    unet.class_embedding._mmf_cast_hook.remove()
    unet.class_embedding._mmf_cast_hook = None


def test_bfloat16_pipeline_runs_close_to_float32():
    pipe = make_pipeline(3)
    z_1 = noise(channels=3)
    expected = {n: pipe(latents=z_1, num_inference_steps=n, output_type="pt").images for n in (1, 2)}
    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    for n in (1, 2):
        images = pipe(latents=z_1, num_inference_steps=n, output_type="pt").images
        assert images.dtype == torch.float32  # post-processing is in float32 whatever the model dtype
        assert torch.isfinite(images).all()
        torch.testing.assert_close(images, expected[n], atol=0.05, rtol=0)
    # Seeded sampling draws the noise in the model dtype and also works.
    images = pipe(num_images=2, generator=seeded(), output_type="np").images
    assert np.isfinite(images).all()


def test_bfloat16_needs_the_class_embedding_cast():
    # UNet2DModel casts the timestep sinusoid to the model dtype but not the class-label one: a stock two-time
    # UNet2DModel in bfloat16 fails in its class-embedding MLP ...
    torch.manual_seed(0)
    stock = UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        class_embed_type="timestep",
    ).to(torch.bfloat16)
    z_1 = noise().to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"), torch.no_grad():
        stock(z_1, torch.ones(2), class_labels=torch.zeros(2))

    # ... and so does the pipeline once its hook is removed, while the same pipeline with the hook runs.
    pipe = make_pipeline()
    pipe.to(torch.bfloat16)
    assert torch.isfinite(pipe(latents=z_1, output_type="pt").images).all()
    remove_class_embedding_cast(pipe.unet)
    with pytest.raises(RuntimeError, match="dtype"):
        pipe(latents=z_1, output_type="pt")

    # The pipeline installs the hook on a UNet that lacks it.
    MMFPipeline(stock, MMFScheduler())
    with torch.no_grad():
        assert torch.isfinite(stock(z_1, torch.ones(2), class_labels=torch.zeros(2)).sample).all()


def test_float16_on_cpu():
    pipe = make_pipeline()
    z_1 = noise()
    expected = pipe(latents=z_1, output_type="pt").images
    pipe.to(torch.float16)
    try:
        images = pipe(latents=z_1, output_type="pt").images
    except RuntimeError as error:
        if "Half" in str(error) and "not implemented" in str(error):
            pytest.skip(f"this torch build has no float16 CPU kernel for an op of the UNet: {error}")
        raise
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images, expected, atol=0.01, rtol=0)


def test_float64_pipeline_matches_float32():
    pipe = make_pipeline()
    z_1 = noise()
    expected = pipe(latents=z_1, num_inference_steps=2, output_type="pt").images
    pipe.to(torch.float64)
    images = pipe(latents=z_1, num_inference_steps=2, output_type="pt").images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# diffusers conventions
# ----------------------------------------------------------------------------------------------------------------


def test_progress_bar_can_be_disabled(capsys):
    pipe = MMFPipeline(tiny_unet(), MMFScheduler())
    pipe(num_images=1, num_inference_steps=3, generator=seeded())
    shown = capsys.readouterr().err
    assert "3/3" in shown
    pipe.set_progress_bar_config(disable=True)
    pipe(num_images=1, num_inference_steps=3, generator=seeded())
    assert "3/3" not in capsys.readouterr().err


def docstring_example(pipeline_class) -> str:
    """The `>>>` lines of the pipeline's `Examples:` section (in `__call__`'s docstring or the class docstring)."""
    for doc in (pipeline_class.__call__.__doc__, pipeline_class.__doc__):
        if doc and "Examples:" in doc:
            examples = doctest.DocTestParser().get_examples(doc.split("Examples:", 1)[1])
            return "".join(example.source for example in examples)
    raise AssertionError("MMFPipeline has no `Examples:` section")


def test_docstring_example_runs(tmp_path):
    source = docstring_example(MMFPipeline)
    # The example loads a pipeline from a local folder; point it at a tiny saved one.
    paths = re.findall(r"from_pretrained\(\"([^\"]+)\"\)", source)
    assert len(paths) == 1, source
    # The example's model is class-conditional (digits 0-9): a tiny one with ten classes.
    unet, conditioner = add_class_conditioning(tiny_unet(), 10)
    MMFPipeline(unet, MMFScheduler(), conditioner=conditioner).save_pretrained(tmp_path)
    source = source.replace(paths[0], str(tmp_path))
    namespace = {}
    exec(compile(source, "<MMFPipeline example>", "exec"), namespace)  # no names other than the example's own
    images = namespace["images"]
    assert isinstance(images, list) and all(isinstance(image, PIL.Image.Image) for image in images)
    assert isinstance(namespace["pipe"], MMFPipeline)


def test_docstring_example_uses_only_call_arguments():
    parameters = set(inspect.signature(MMFPipeline.__call__).parameters)
    calls = [
        node
        for node in ast.walk(ast.parse(docstring_example(MMFPipeline)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe"
    ]
    assert calls, "the example calls the pipeline"
    for call in calls:
        assert not call.args, "the example passes arguments by name"
        assert {keyword.arg for keyword in call.keywords} <= parameters


def test_pipeline_rejects_fourier_time_features():
    from diffusers import UNet2DModel

    from mmf_diffusers import MMFPipeline, MMFScheduler

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, time_embedding_type="fourier", class_embed_type="timestep")
    with pytest.raises(ValueError, match="positional"):
        MMFPipeline(unet, MMFScheduler())
