"""Tests for `MMFPipeline` with a DiT backbone (the ``transformer`` component, `MMFDiTTransformer2DModel`).

The DiT takes the UNet's place: the same calls (`unet_average_velocity` maps ``(z, r, t)`` to ``timestep =
time_scale * t`` and second time ``time_scale * h``), the same conditioner and VAE, the same saving, loading and
remote-code layout. Everything runs on the CPU in float32 with tiny DiTs (2 layers, 2 heads x 8 channels, patch 2,
8x8 inputs) and seeded noise.

Time convention: t = 0 is data, t = 1 is noise; one step is ``x = z_1 - u(z_1, 0, 1)``.
"""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from mmf_diffusers import (
    MMFDiTTransformer2DModel,
    MMFPipeline,
    MMFScheduler,
    add_dit_class_conditioning,
    build_mmf_dit,
    build_mmf_unet,
    unet_average_velocity,
)
from mmf_diffusers.hub import add_remote_code

SIZE = 8
TINY = dict(sample_size=SIZE, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=8)


def tiny_dit(in_channels: int = 1, seed: int = 0, sample_size: int = SIZE) -> MMFDiTTransformer2DModel:
    """A tiny unconditional DiT whose second time matters (its zero-initialised output layer is made random)."""
    torch.manual_seed(seed)
    model = build_mmf_dit(in_channels=in_channels, **{**TINY, "sample_size": sample_size})
    with torch.no_grad():
        model.class_embedding.linear_2.weight.normal_(0.0, 0.5)
    return model.eval()


def conditional_dit(num_classes: int = 3, seed: int = 0):
    transformer, conditioner = add_dit_class_conditioning(tiny_dit(seed=seed), num_classes, label_init_std=1.0)
    return transformer.eval(), conditioner.eval()


def pipeline(**components) -> MMFPipeline:
    components.setdefault("scheduler", MMFScheduler())
    pipe = MMFPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(batch: int = 2, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_one_and_two_steps_follow_the_average_velocity_of_the_dit():
    pipe = pipeline(transformer=tiny_dit())
    assert pipe.backbone is pipe.transformer and pipe.unet is None and pipe.image_size == SIZE
    z_1 = noise()
    ones, zeros, halves = torch.ones(2), torch.zeros(2), torch.full((2,), 0.5)
    with torch.no_grad():
        one = z_1 - unet_average_velocity(pipe.transformer, z_1, zeros, ones, time_scale=pipe.config.time_scale)
        z_half = z_1 - 0.5 * unet_average_velocity(pipe.transformer, z_1, halves, ones,
                                                   time_scale=pipe.config.time_scale)
        two = z_half - 0.5 * unet_average_velocity(pipe.transformer, z_half, zeros, halves,
                                                   time_scale=pipe.config.time_scale)
    torch.testing.assert_close(pipe(latents=z_1, output_type="latent").images, one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pipe(latents=z_1, num_inference_steps=2, output_type="latent").images, two,
                               atol=1e-6, rtol=1e-6)
    assert not torch.allclose(one, two, atol=1e-3)  # the second time matters: two steps differ from one
    images = pipe(num_images=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (3, SIZE, SIZE, 1) and np.isfinite(images).all()


def test_class_conditional_dit_with_guidance():
    transformer, conditioner = conditional_dit()
    pipe = pipeline(transformer=transformer, conditioner=conditioner)
    assert pipe.is_class_conditional
    z_1 = noise(3)
    labelled = pipe(latents=z_1, class_labels=[0, 1, 2], output_type="latent").images
    same = pipe(latents=z_1, class_labels=[0, 0, 0], output_type="latent").images
    assert not torch.allclose(labelled[1:], same[1:], atol=1e-3)  # labels matter
    torch.testing.assert_close(labelled[:1], same[:1])
    guided = pipe(latents=z_1, class_labels=[0, 1, 2], guidance_scale=2.0, output_type="latent").images
    unguided = pipe(latents=z_1, class_labels="none", output_type="latent").images  # the "no label" token
    # u_none + 2 (u_c - u_none), one step: x_guided = 2 x_c - x_none.
    torch.testing.assert_close(guided, 2 * labelled - unguided, atol=1e-5, rtol=1e-5)


def test_latent_dit_with_a_tiny_autoencoder():
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=8).eval()
    pipe = pipeline(transformer=tiny_dit(in_channels=4, sample_size=4), vae=vae)
    assert pipe.is_latent and pipe.image_size == 8
    out = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    latent = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latent.shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="VAE's latents have 4 channels but the DiT takes 1"):
        MMFPipeline(transformer=tiny_dit(in_channels=1, sample_size=4), scheduler=MMFScheduler(), vae=vae)


def test_bad_pipelines_and_sizes_are_refused_in_one_line():
    unet = build_mmf_unet(sample_size=SIZE, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    dit = tiny_dit()
    cases = [
        (dict(unet=unet, transformer=dit, scheduler=MMFScheduler()), "exactly one backbone.*both"),
        (dict(scheduler=MMFScheduler()), "exactly one backbone.*neither"),
        (dict(transformer=dit), "needs a scheduler"),
        (dict(transformer=unet, scheduler=MMFScheduler()), "must be an MMFDiTTransformer2DModel"),
        (dict(transformer=dit, scheduler=MMFScheduler(), conditioner=conditional_dit()[1]),
         "conditioner feeds a DiT built with class_embed_type='identity'"),
        (dict(transformer=conditional_dit()[0], scheduler=MMFScheduler()), "class-conditional DiT.*needs its"),
    ]
    wide, _ = add_dit_class_conditioning(build_mmf_dit(in_channels=1, **{**TINY, "attention_head_dim": 4}), 3)
    cases.append((dict(transformer=wide, scheduler=MMFScheduler(), conditioner=conditional_dit()[1]),
                  "16-dim embeddings but the DiT's time embedding has 8"))
    for components, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            MMFPipeline(**components)
        assert "\n" not in str(error.value)
    pipe = pipeline(transformer=dit)
    for size in dict(height=16), dict(width=4), dict(height=8, width=16):
        with pytest.raises(ValueError, match="must be 8 for this DiT model"):
            pipe(num_images=1, **size)
    assert pipe(num_images=1, height=8, width=8, output_type="latent").images.shape == (1, 1, 8, 8)


def same_images(pipe: MMFPipeline, loaded: DiffusionPipeline, **kwargs) -> None:
    loaded.set_progress_bar_config(disable=True)
    z_1 = noise(3)
    expected = pipe(latents=z_1, num_inference_steps=2, output_type="latent", **kwargs).images
    got = loaded(latents=z_1, num_inference_steps=2, output_type="latent", **kwargs).images
    # Attention processors are not saved (the reloaded DiT uses diffusers' fused SDPA): last-bit differences.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conditional", [False, True])
def test_save_load_and_remote_code_round_trip(tmp_path, conditional):
    if conditional:
        transformer, conditioner = conditional_dit()
        pipe = pipeline(transformer=transformer, conditioner=conditioner, time_scale=25.0, second_time="r")
        kwargs = dict(class_labels=[2, 0, 1])
    else:
        pipe, kwargs = pipeline(transformer=tiny_dit(), time_scale=25.0, second_time="r"), {}
    folder = str(tmp_path / "pipe")
    pipe.save_pretrained(folder)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["transformer"] == ["mmf_diffusers.transformer_mmf", "MMFDiTTransformer2DModel"]
    assert index.get("unet") in (None, [None, None])
    assert os.path.isfile(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    loaded = MMFPipeline.from_pretrained(folder)
    assert type(loaded.transformer) is MMFDiTTransformer2DModel and loaded.unet is None
    assert loaded.config.time_scale == 25.0 and loaded.config.second_time == "r"
    same_images(pipe, loaded, **kwargs)

    index = add_remote_code(folder)
    assert index["transformer"] == ["transformer_mmf", "MMFDiTTransformer2DModel"]
    assert os.path.isfile(os.path.join(folder, "transformer", "transformer_mmf.py"))
    for loaded in (MMFPipeline.from_pretrained(folder),
                   DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
        assert type(loaded).__name__ == "MMFPipeline"
        assert type(loaded.transformer).__name__ == "MMFDiTTransformer2DModel" and loaded.backbone is loaded.transformer
        same_images(pipe, loaded, **kwargs)


def test_mmf_generate_on_a_dit_folder(tmp_path, capsys):
    from PIL import Image

    from mmf_diffusers.generate import main

    folder = tmp_path / "pipe"
    pipeline(transformer=tiny_dit()).save_pretrained(folder)
    out = tmp_path / "grid.png"
    assert main(["--pipeline", str(folder), "--num-images", "4", "--steps", "2", "--output", str(out), "--nrow", "2",
                 "--upscale", "2"]) == 0
    # 2 x 2 tiles of 16 px (the DiT's 8 px upscaled twice) with 2 px padding.
    assert Image.open(out).size == (2 * 18 + 2, 2 * 18 + 2)
    assert str(out) in capsys.readouterr().out


@pytest.mark.slow
def test_dit_pipeline_pushed_to_a_hub_loads_with_the_package_and_with_diffusers_alone(tmp_path):
    """Pushed with push_pipeline_folder to the local Hub look-alike; loaded from the repository with MMFPipeline, and
    in a subprocess where mmf_diffusers cannot be imported, with DiffusionPipeline(trust_remote_code=True)."""
    from test_hub import BLOCK_MMF_DIFFUSERS, TOKEN, USER, hub_env, run_script

    from hub_server import HubServer
    from mmf_diffusers.hub import push_pipeline_folder

    transformer, conditioner = conditional_dit()
    pipe = pipeline(transformer=transformer, conditioner=conditioner)
    folder, repo = str(tmp_path / "pipe"), f"{USER}/mmf-tiny-dit"
    pipe.save_pretrained(folder)
    z_1 = noise(3)
    np.save(tmp_path / "z_1.npy", z_1.numpy())
    expected = pipe(latents=z_1, class_labels=[2, 0, 1], output_type="latent").images
    with HubServer({TOKEN: USER}) as hub:
        push_pipeline_folder(folder, repo, token=TOKEN, endpoint=hub.url)
        run_script(f"""
            import numpy as np, torch
            from mmf_diffusers import MMFPipeline
            pipe = MMFPipeline.from_pretrained({repo!r})
            z_1 = torch.from_numpy(np.load("z_1.npy"))
            np.save("package.npy", pipe(latents=z_1, class_labels=[2, 0, 1], output_type="latent").images.numpy())
            """, hub_env(hub, str(tmp_path)), str(tmp_path))
        run_script(BLOCK_MMF_DIFFUSERS + f"""
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({repo!r}, trust_remote_code=True)
assert type(pipe.transformer).__module__.endswith(".transformer_mmf"), type(pipe.transformer).__module__
z_1 = torch.from_numpy(np.load("z_1.npy"))
np.save("remote_code.npy", pipe(latents=z_1, class_labels=[2, 0, 1], output_type="latent").images.numpy())
""", hub_env(hub, str(tmp_path), pythonpath=None), str(tmp_path))
    for name in ("package", "remote_code"):
        # the loaded DiT uses diffusers' fused SDPA attention: last-bit differences
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / f"{name}.npy")), expected, atol=1e-5,
                                   rtol=1e-5)


def test_the_demo_generates_from_a_dit_pipeline():
    from mmf_diffusers.demo import EACH_CLASS, ImageDemo

    transformer, conditioner = conditional_dit()
    demo = ImageDemo(pipeline(transformer=transformer, conditioner=conditioner))
    assert demo.label_choices[0] == EACH_CLASS and demo.class_names == ["0", "1", "2"]
    grid, info = demo.generate(EACH_CLASS, 3, 1, 0)
    assert grid.size[0] > 3 * SIZE and "3 images, 1 step" in info and "each class in turn" in info
