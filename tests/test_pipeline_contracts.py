"""The contract MMF pipelines share with diffusers' own pipelines (as its ``PipelineTesterMixin`` checks them).

* Loading: every shipped folder in ``pipelines/`` loads with the package's class and with
  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (diffusers' remote-code layout), with the same
  samples; crafted ``model_index.json`` files (the other pipeline's folder, components named with path parts) are
  refused in one line.
* Callbacks: ``callback_on_step_end`` / ``callback_on_step_end_tensor_inputs`` / ``num_timesteps`` / ``interrupt`` /
  ``guidance_scale`` behave as in diffusers' current pipelines.
* ``output_type="latent"`` is the UNet's output space, before any decoding or post-processing.
* Class-conditional batching is DiT's: the batch follows ``class_labels``, one label broadcasts, per-image generators.
* ``enable_layerwise_casting`` (float8 storage) works on every MMF backbone and computes exactly what a model with
  float8-rounded weights computes in the compute dtype.
* Non-finite outputs from finite inputs are an error; ``height`` / ``width`` are accepted or refused in one line.

Tiny models on the CPU in float32; t = 0 is data, t = 1 noise, one step is ``x = z_1 - u(z_1, 0, 1)``.
"""

import copy
import inspect
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.callbacks import PipelineCallback

from mmf_diffusers import (
    MMFPipeline,
    MMFScheduler,
    MMFTrajectoryPipeline,
    add_class_conditioning,
    build_mmf_unet,
    pipeline_mmf,
    pipeline_mmf_trajectory,
)
from mmf_diffusers.pipeline_mmf import decode_latents
from mmf_diffusers.unet1d import build_mmf_unet1d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(os.listdir(os.path.join(ROOT, "pipelines")))
PACKAGE_CLASSES = {"MMFPipeline": MMFPipeline, "MMFTrajectoryPipeline": MMFTrajectoryPipeline}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unconditional(seed: int = 0) -> MMFPipeline:
    torch.manual_seed(seed)
    unet = build_mmf_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)
    return quiet(MMFPipeline(unet, MMFScheduler()))


def conditional(seed: int = 0) -> MMFPipeline:
    torch.manual_seed(seed)
    unet = build_mmf_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)
    unet, conditioner = add_class_conditioning(unet, 3, ["a", "b", "c"], label_init_std=1.0)
    return quiet(MMFPipeline(unet, MMFScheduler(), conditioner=conditioner))


def latent(seed: int = 0) -> MMFPipeline:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=8, scaling_factor=1.7, shift_factor=0.1).eval()
    unet = build_mmf_unet(sample_size=4, in_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
    return quiet(MMFPipeline(unet, MMFScheduler(), vae=vae))


def trajectory(seed: int = 0) -> MMFTrajectoryPipeline:
    torch.manual_seed(seed)
    unet = build_mmf_unet1d(2, 16, block_out_channels=(8, 16))
    return quiet(MMFTrajectoryPipeline(unet, MMFScheduler(), channel_mean=[0.1, -0.2], channel_std=[0.5, 2.0]))


BUILDERS = {"unconditional": unconditional, "conditional": conditional, "latent": latent, "trajectory": trajectory}


def call(pipe, **kwargs):
    """One call with the pipeline's own batch argument, returning the output array/tensor."""
    output = pipe(**kwargs)
    return output.trajectories if hasattr(output, "trajectories") else output.images


def latent_shape(pipe, batch: int = 1):
    if isinstance(pipe, MMFTrajectoryPipeline):
        return (batch, pipe.unet.config.in_channels, pipe.unet.config.sample_size)
    size = pipe.unet.config.sample_size
    return (batch, pipe.unet.config.in_channels, size, size)


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_folder_carries_the_current_remote_code(folder):
    """The copies in the folder are the package's modules byte for byte, and model_index.json names them."""
    path = os.path.join(ROOT, "pipelines", folder)
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    layout = index["_mmf_package_layout"]
    cls = PACKAGE_CLASSES[layout["_class_name"]]
    assert index["_class_name"] == ["pipeline", cls.__name__]
    copies = {"pipeline.py": inspect.getsourcefile(cls)}
    for name, entry in layout.items():
        if name == "_class_name":
            continue
        library, class_name = entry
        module = inspect.getsourcefile(getattr(__import__(library, fromlist=[class_name]), class_name))
        copies[f"{name}/{os.path.basename(module)}"] = module
        assert index[name] == [os.path.basename(module)[:-3], class_name]
    refresh = ("refresh with: python -c \"import glob; from mmf_diffusers.hub import add_remote_code; "
               "[add_remote_code(f) for f in glob.glob('pipelines/*')]\"")
    for copy_name, source in copies.items():
        with open(os.path.join(path, copy_name), "rb") as f, open(source, "rb") as g:
            assert f.read() == g.read(), f"pipelines/{folder}/{copy_name} is stale; {refresh}"


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies remote code into its modules cache before running it: use a private one, so that the test
    neither writes into the user's cache nor races another process loading a different ``pipeline.py`` there."""
    import diffusers.utils.dynamic_modules_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.split(".")[0] == "diffusers_modules"]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path / "modules"


@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_folder_loads_both_ways_with_the_same_samples(folder, modules_cache):
    path = os.path.join(ROOT, "pipelines", folder)
    with open(os.path.join(path, "model_index.json")) as f:
        cls = PACKAGE_CLASSES[json.load(f)["_mmf_package_layout"]["_class_name"]]
    package = quiet(cls.from_pretrained(path))
    remote = quiet(DiffusionPipeline.from_pretrained(path, trust_remote_code=True))
    assert type(package) is cls
    # diffusers ran the folder's own copies, not the installed package
    assert type(remote).__module__.startswith("diffusers_modules") and type(remote).__name__ == cls.__name__
    assert type(remote.scheduler).__module__.startswith("diffusers_modules")
    assert (modules_cache / "diffusers_modules" / "local" / "pipeline.py").is_file()
    outputs = [call(pipe, generator=seeded(0), output_type="pt") for pipe in (package, remote)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_generic_loading_without_trust_remote_code_says_how(tmp_path):
    """diffusers refuses to run the folder's code unasked; its message names ``trust_remote_code=True``."""
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(os.path.join(ROOT, "pipelines", SHIPPED[0]))


@pytest.mark.parametrize("loader, folder, holds", [
    (MMFTrajectoryPipeline, "mmf-mnist", "MMFPipeline"),
    (MMFPipeline, "mmf-pendulum", "MMFTrajectoryPipeline"),
])
def test_the_other_pipelines_folder_is_refused_in_one_line(loader, folder, holds):
    with pytest.raises(ValueError) as error:
        loader.from_pretrained(os.path.join(ROOT, "pipelines", folder))
    message = str(error.value)
    assert "\n" not in message and f"holds an {holds}" in message and f"{holds}.from_pretrained" in message


def test_unet_of_the_wrong_kind_is_refused():
    with pytest.raises(ValueError, match="needs a UNet1DModel"):
        MMFTrajectoryPipeline(unconditional().unet, MMFScheduler())


@pytest.mark.parametrize("edit, match", [
    (lambda index: index.__setitem__("../unet", index.pop("unet")), "'../unet'"),
    (lambda index: index.__setitem__("unet/../unet", ["diffusers", "UNet2DModel"]), "not a Python identifier"),
    (lambda index: index.__setitem__("scheduler", ["../../scheduling_mmf", "MMFScheduler"]),
     "not a \\[module, class\\]"),
    (lambda index: index.__setitem__("_mmf_package_layout", {"../unet": ["diffusers", "UNet2DModel"]}), "'../unet'"),
    (lambda index: index.__setitem__("_mmf_package_layout", {"unet": "diffusers"}), "_mmf_package_layout"),
])
def test_component_names_that_leave_the_folder_are_refused(tmp_path, edit, match):
    folder = tmp_path / "pipe"
    unconditional().save_pretrained(folder)
    # The component's folder also exists where the crafted name points, so only the check can stop the load.
    shutil.copytree(folder / "unet", tmp_path / "unet")
    index = json.loads((folder / "model_index.json").read_text())
    edit(index)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=match) as error:
        MMFPipeline.from_pretrained(folder)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------- callbacks
@pytest.mark.parametrize("kind", ["unconditional", "trajectory"])
def test_callback_sees_every_step_after_it_and_num_timesteps(kind):
    pipe = BUILDERS[kind]()
    seen = []

    def record(pipe_, i, timestep, callback_kwargs):
        assert pipe_ is pipe and set(callback_kwargs) == {"latents"}
        seen.append((i, float(timestep), callback_kwargs["latents"].clone(), pipe_.num_timesteps))
        return callback_kwargs

    out = call(pipe, num_inference_steps=3, generator=seeded(0), output_type="latent", callback_on_step_end=record)
    assert pipe.num_timesteps == 3
    assert [s[0] for s in seen] == [0, 1, 2] and [s[3] for s in seen] == [3, 3, 3]
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()  # the time each step started from
    torch.testing.assert_close(seen[-1][2], out, atol=0, rtol=0)  # after the last step: the result
    # after step i: what a call with i + 1 of the same steps gives, continued by hand (the grid 1, 2/3, 1/3, 0)
    first = call(pipe, num_inference_steps=3, generator=seeded(0), output_type="latent",
                 callback_on_step_end=lambda p, i, t, kw: (setattr(p, "_interrupt", True), kw)[1])
    torch.testing.assert_close(seen[0][2], first, atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_latents_returned_by_the_callback_replace_the_sample(kind):
    """diffusers' test: zeroing the latents after the last step gives an all-zero latent output."""
    pipe = BUILDERS[kind]()

    def zero_last(pipe_, i, timestep, callback_kwargs):
        if i == pipe_.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    out = call(pipe, num_inference_steps=2, generator=seeded(0), output_type="latent", callback_on_step_end=zero_last,
               callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    assert out.abs().sum() == 0
    # replaced after step 0: step 1 starts from it, so the result is one step of u from the replacement
    start = torch.randn(latent_shape(pipe), generator=seeded(5))

    def replace_first(pipe_, i, timestep, callback_kwargs):
        return {"latents": start.clone()} if i == 0 else callback_kwargs

    labels = {"class_labels": [1]} if kind == "conditional" else {}
    out = call(pipe, num_inference_steps=2, generator=seeded(0), output_type="latent",
               callback_on_step_end=replace_first, **labels)
    sigmas = pipe.scheduler.sigmas
    t, r = sigmas[1].expand(1), sigmas[2].expand(1)
    with torch.no_grad():
        if kind == "trajectory":
            u = pipe.average_velocity(start, None, r, t)
        else:
            u = pipe.average_velocity(start, r, t, torch.tensor([1]) if labels else None)
    torch.testing.assert_close(out, start - (sigmas[1] - sigmas[2]) * u, atol=1e-6, rtol=0)


def test_callback_cannot_move_known_entries_of_a_trajectory():
    pipe = trajectory()
    state = torch.tensor([0.3, -1.0])
    out = pipe(start_state=state, num_inference_steps=2, generator=seeded(0), output_type="pt",
               callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] + 5.0}).trajectories
    assert torch.equal(out[:, :, 0], state.expand(1, 2))


def test_interrupt_returns_the_sample_as_it_stands():
    pipe = unconditional()
    steps = []

    def stop_after_first(pipe_, i, timestep, callback_kwargs):
        steps.append(i)
        pipe_._interrupt = True
        return callback_kwargs

    out = pipe(num_inference_steps=4, generator=seeded(0), output_type="latent", callback_on_step_end=stop_after_first)
    assert steps == [0] and pipe.interrupt
    z1 = torch.randn(latent_shape(pipe), generator=seeded(0))
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        expected = z1 - (sigmas[0] - sigmas[1]) * pipe.average_velocity(z1, sigmas[1].expand(1), sigmas[0].expand(1))
    torch.testing.assert_close(out.images, expected, atol=1e-6, rtol=0)
    pipe(output_type="latent")  # the next call starts afresh
    assert not pipe.interrupt


def test_callback_may_change_the_guidance_scale_per_step():
    """diffusers' test_callback_cfg: the pipeline reads ``_guidance_scale`` at every step."""
    pipe = conditional()
    scales = []

    def bump(pipe_, i, timestep, callback_kwargs):
        scales.append(pipe_.guidance_scale)
        pipe_._guidance_scale += 1.0
        return callback_kwargs

    pipe(class_labels=[0], guidance_scale=2.0, num_inference_steps=3, output_type="latent", callback_on_step_end=bump)
    assert scales == [2.0, 3.0, 4.0] and pipe.guidance_scale == 2.0 + pipe.num_timesteps


class Zeroing(PipelineCallback):
    """A diffusers PipelineCallback: its own ``tensor_inputs`` decide what it gets."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}


def test_pipeline_callback_objects_work():
    out = unconditional()(output_type="latent", callback_on_step_end=Zeroing()).images
    assert out.abs().sum() == 0


@pytest.mark.parametrize("kind", ["unconditional", "trajectory"])
@pytest.mark.parametrize("kwargs, match", [
    ({"callback_on_step_end": lambda p, i, t, kw: kw, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]},
     r"names from \['latents'\], got \['prompt_embeds'\]"),
    ({"callback_on_step_end": lambda p, i, t, kw: kw, "callback_on_step_end_tensor_inputs": "latents"},
     "must be a list of names"),
    ({"callback_on_step_end": "print"}, "must be callable"),
    ({"callback_on_step_end": lambda p, i, t, kw: None}, "must return a dict"),
    ({"callback_on_step_end": lambda p, i, t, kw: {"latents": kw["latents"][..., :1]}}, "must keep the shape"),
    ({"callback_on_step_end": lambda p, i, t, kw: {"latents": 0.0}}, "must keep the shape"),
])
def test_bad_callbacks_are_refused_in_one_line(kind, kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        BUILDERS[kind]()(**kwargs)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------- latent output
def test_latent_output_is_the_sample_before_post_processing():
    pipe = unconditional()
    sample = pipe(num_inference_steps=2, generator=seeded(0), output_type="latent").images
    images = pipe(num_inference_steps=2, generator=seeded(0), output_type="pt").images
    assert sample.dtype == pipe.unet.dtype and sample.shape == (1, 1, 8, 8)
    assert sample.min() < 0  # not rescaled to [0, 1]
    torch.testing.assert_close(images, (sample / 2 + 0.5).clamp(0, 1), atol=0, rtol=0)


def test_latent_output_of_a_latent_model_is_before_the_vae():
    pipe = latent()
    sample = pipe(generator=seeded(0), output_type="latent").images
    images = pipe(generator=seeded(0), output_type="pt").images
    assert sample.shape == (1, 4, 4, 4) and images.shape == (1, 1, 8, 8)
    with torch.no_grad():
        decoded = decode_latents(pipe.vae, sample)
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_latent_output_of_a_trajectory_is_in_normalised_units():
    pipe = trajectory()
    state = torch.tensor([0.3, -1.0])
    sample = pipe(start_state=state, generator=seeded(0), output_type="latent").trajectories
    physical = pipe(start_state=state, generator=seeded(0), output_type="pt").trajectories
    assert torch.is_tensor(sample) and sample.shape == (1, 2, 16)
    torch.testing.assert_close(sample[:, :, 0], pipe.normalize(state[None]), atol=1e-6, rtol=0)
    torch.testing.assert_close(physical, pipe.denormalize(sample), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("class_labels, num_images, expected", [
    ([0, 1, 2], None, [0, 1, 2]),  # the batch follows the labels (DiT)
    ([[0], [1], [2]], None, [0, 1, 2]),  # a column, as diffusers' batch tests make from [label]
    (torch.tensor([2, 0]), None, [2, 0]),
    (torch.tensor([[2], [0]]), None, [2, 0]),
    (np.array([1, 2]), None, [1, 2]),
    ([1], 3, [1, 1, 1]),  # one label for all
    ("b", 2, [1, 1]),
    (2, None, [2]),
])
def test_batch_follows_the_class_labels(class_labels, num_images, expected):
    pipe = conditional()
    batch = pipe(class_labels=class_labels, num_images=num_images, generator=seeded(0), output_type="latent").images
    reference = pipe(class_labels=expected, num_images=len(expected), generator=seeded(0), output_type="latent").images
    assert batch.shape[0] == len(expected)
    torch.testing.assert_close(batch, reference, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["unconditional", "conditional", "trajectory"])
def test_per_image_generators_make_each_image_as_alone(kind):
    """diffusers' test_inference_batch_single_identical: image i of a batch with generators [g_0, g_1, ...] is the image
    of a single call with g_i (for a conditional model, with its label, or its label drawn by g_i)."""
    pipe = BUILDERS[kind]()
    generators = [seeded(i) for i in range(3)]
    extra = {"class_labels": [2, 0, 1]} if kind == "conditional" else {"batch_size": 3}
    batch = call(pipe, generator=generators, num_inference_steps=2, output_type="pt", **extra)
    for i in range(3):
        alone = {"class_labels": [extra["class_labels"][i]]} if kind == "conditional" else {}
        single = call(pipe, generator=seeded(i), num_inference_steps=2, output_type="pt", **alone)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=0)
    if kind == "conditional":  # labels drawn from the prior, per generator
        drawn = call(pipe, generator=[seeded(i) for i in range(3)], num_images=3, output_type="pt")
        torch.testing.assert_close(drawn[1:2], call(pipe, generator=seeded(1), output_type="pt"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"class_labels": [0, 1, 2], "num_images": 2}, r"Got 3 class labels for 2 images \(num_images=2\)"),
    ({"class_labels": [0, 1, 2], "generator": [seeded(0), seeded(1)]},
     r"Got a list of 2 generators for 3 images \(one per class label, 3 given\)"),
    ({"class_labels": [0, 1], "latents": torch.zeros(3, 1, 8, 8)},
     r"`latents` must be a tensor of shape \(2, 1, 8, 8\) \(2 images: one per class label, 2 given\)"),
    ({"class_labels": [[0, 1], [1, 2]]}, "A class label must be an int id or a name, got \\[0, 1\\]"),
    ({"class_labels": torch.tensor([[0, 1]])}, r"\(B, 1\) column"),
    ({"class_labels": [0, 1], "batch_size": 3}, r"Got 2 class labels for 3 images \(batch_size=3\)"),
    ({"class_labels": []}, "`class_labels` is empty"),
])
def test_batching_errors_say_what_was_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        conditional()(**kwargs)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------- layerwise casting
def _float8_rounded_reference(pipe):
    """A copy of ``pipe`` with layerwise casting on its UNet (and conditioner), and a copy whose weights that layerwise
    casting stores in float8 are rounded through float8 and kept in float32: the first must compute exactly what the
    second computes."""
    reference = copy.deepcopy(pipe)
    cast = copy.deepcopy(pipe)
    names = [name for name in ("unet", "conditioner") if getattr(pipe, name, None) is not None]
    rounded = 0
    for name in names:
        getattr(cast, name).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        stored = dict(getattr(cast, name).named_parameters())
        with torch.no_grad():
            for key, parameter in getattr(reference, name).named_parameters():
                if stored[key].dtype == torch.float8_e4m3fn:
                    parameter.copy_(parameter.to(torch.float8_e4m3fn).float())
                    rounded += 1
    assert rounded > 10
    return cast, reference


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layerwise_casting_computes_with_float8_rounded_weights(kind):
    cast, reference = _float8_rounded_reference(BUILDERS[kind]())
    assert cast.unet.dtype == torch.float32  # diffusers reports the compute dtype
    extra = {"class_labels": [0, 2]} if kind == "conditional" else {"batch_size": 2}
    got = call(cast, generator=seeded(0), num_inference_steps=2, output_type="latent", **extra)
    expected = call(reference, generator=seeded(0), num_inference_steps=2, output_type="latent", **extra)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layerwise_casting_in_bfloat16_runs(kind):
    """diffusers' test_layerwise_casting_inference: the pipeline in bfloat16, the backbone stored in float8."""
    pipe = BUILDERS[kind]().to(dtype=torch.bfloat16)
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    out = call(pipe, generator=seeded(0), output_type="pt")
    assert torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------------------------------------- other edges
@pytest.mark.parametrize("kind", ["unconditional", "trajectory"])
def test_non_finite_output_from_finite_input_is_an_error(kind):
    pipe = BUILDERS[kind]()
    huge = torch.full(latent_shape(pipe), 1e30)
    with pytest.raises(ValueError, match="non-finite values") as error:
        call(pipe, latents=huge)
    assert "\n" not in str(error.value)


def test_non_finite_output_of_the_vae_is_an_error():
    pipe = latent()
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite values .* the VAE's decoding"):
        pipe(output_type="np")
    assert torch.isfinite(pipe(output_type="latent").images).all()  # the sample itself is fine


def test_height_and_width_are_accepted_like_diffusers_pipelines():
    pipe = unconditional()
    assert pipe(height=16, width=8, output_type="np").images.shape == (1, 16, 8, 1)
    latents = torch.randn(2, 1, 4, 12, generator=seeded(0))
    assert pipe(height=4, width=12, latents=latents, output_type="pt").images.shape == (2, 1, 4, 12)
    assert latent()(height=16, width=16, output_type="latent").images.shape == (1, 4, 8, 8)


def test_a_sample_size_the_unet_cannot_run_is_refused_in_one_line(tmp_path):
    unconditional().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["sample_size"] = 9
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sample_size makes 9x9 images, which its 2 levels cannot run on") as error:
        MMFPipeline.from_pretrained(tmp_path)(output_type="np")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"height": 7}, "`height` must be a multiple of 2 for this model"),
    ({"width": 0}, "`width` must be a positive integer"),
    ({"height": 8.0}, "`height` must be a positive integer"),
    ({"width": True}, "`width` must be a positive integer"),
])
def test_bad_height_or_width_is_refused_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        unconditional()(**kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["check_model_index", "_check_callback", "_callback_latents", "_check_finite"])
def test_helpers_copied_into_both_pipeline_files_agree(name):
    """Each pipeline file ships alone as a Hub repository's pipeline.py, so the helpers are copies: they must agree."""
    assert inspect.getsource(getattr(pipeline_mmf, name)) == inspect.getsource(getattr(pipeline_mmf_trajectory, name))
    assert pipeline_mmf.MMF_PIPELINES == pipeline_mmf_trajectory.MMF_PIPELINES
