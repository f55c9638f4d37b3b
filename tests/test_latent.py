"""Latent-space MMF: `MMFPipeline` with a ``vae`` component, and training on cached VAE latents (training/latents.py).

Everything uses a tiny random `AutoencoderKL` (1 channel, ``block_out_channels=(8, 8)``: factor 2, 4 latent channels)
on CPU in float32. What is checked: the pipeline's recipe (one UNet call and one decode per step, the config's scale
and shift applied and undone exactly), save/load and Hub push/pull with identical images (also with diffusers alone,
``trust_remote_code=True``, in a subprocess that cannot import mmf_diffusers), the latent scaling measured on data, the
cache (reuse, and a new encoding for every change of VAE, scaling, pixels, resolution or flips), flips (encoded, not
applied to latents, with the draw `data.ImageDataset` makes), the bad-input errors, and an end-to-end `accelerate
launch` run on latents that is then resumed without encoding again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DModel, VQModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from mmf_diffusers import MMFPipeline, MMFScheduler, add_class_conditioning, build_mmf_unet
from mmf_diffusers.hub import push_pipeline_folder
from mmf_diffusers.pipeline_mmf import PACKAGE_LAYOUT_KEY, decode_latents, encode_images, vae_scale_factor

from hub_server import HubServer
from test_hub import BLOCK_MMF_DIFFUSERS, TOKEN, USER, hub_env, same_images
from test_hub import run_script as run_hub_script
from test_training import TINY, accelerate_launch, check, run_script, script_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import data as data_lib  # noqa: E402
import latents as latent_lib  # noqa: E402



def tiny_vae(seed: int = 0, scaling_factor: float = 1.7, shift_factor=0.1, in_channels: int = 1) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=scaling_factor,
                        shift_factor=shift_factor)
    return vae.eval()


def plain_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=8, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",), norm_num_groups=4)


def default_processors(module):
    for m in module.modules():  # the processor a loaded model gets (build_mmf_unet installs a forward-AD one)
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    return module


def latent_pipeline(seed: int = 0, conditional: bool = False) -> MMFPipeline:
    vae = tiny_vae(seed)
    torch.manual_seed(seed + 1)
    unet = build_mmf_unet(sample_size=4, in_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
    conditioner = None
    if conditional:
        unet, conditioner = add_class_conditioning(unet, 3, ["a", "b", "c"], 0.5)
    pipe = MMFPipeline(default_processors(unet).eval(), MMFScheduler(), conditioner=conditioner, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def digits(n: int = 64) -> np.ndarray:
    """``n`` real 8x8 digits (scikit-learn) as float32 ``(n, 1, 8, 8)`` in [-1, 1]."""
    from mmf_diffusers.offline_data import load_sklearn_digits

    images, _ = load_sklearn_digits()
    return images[:n, None].astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------- pipeline
def test_one_step_is_one_unet_call_and_one_decode_of_the_scaled_latent():
    pipe = latent_pipeline()
    calls = {"unet": 0, "decode": 0}
    pipe.unet.register_forward_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1))
    decode = pipe.vae.decode

    def counting_decode(z, *args, **kwargs):
        calls["decode"] += 1
        return decode(z, *args, **kwargs)

    pipe.vae.decode = counting_decode
    z1 = torch.randn(3, 4, 4, 4, generator=seeded(0))
    images = pipe(num_images=3, latents=z1, output_type="pt").images
    assert calls == {"unet": 1, "decode": 1}
    assert images.shape == (3, 1, 8, 8) and pipe.image_size == 8 and vae_scale_factor(pipe.vae) == 2
    # By hand: x = z_1 - u(z_1, 0, 1) in the scaled space, then D(x / 1.7 + 0.1).
    with torch.no_grad():
        u = pipe.average_velocity(z1, torch.zeros(3), torch.ones(3))
        expected = (decode(((z1 - u) / 1.7 + 0.1)).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    calls.update(unet=0, decode=0)
    pipe(num_images=2, num_inference_steps=3, output_type="np")
    assert calls == {"unet": 3, "decode": 1}


def test_encode_decode_undo_the_scaling_exactly():
    """With any scale and shift, decode(encode(x)) is the VAE's own reconstruction D(E[z|x]): the scaling adds no
    error of its own."""
    x = torch.from_numpy(digits(16))
    for scale, shift in ((1.0, None), (0.18215, None), (2.5, -0.3)):
        vae = tiny_vae(scaling_factor=scale, shift_factor=shift)
        with torch.no_grad():
            own = vae.decode(vae.encode(x).latent_dist.mean).sample
            z = encode_images(vae, x)
            torch.testing.assert_close(z, (vae.encode(x).latent_dist.mean - (shift or 0.0)) * scale)
            torch.testing.assert_close(decode_latents(vae, z), own, rtol=1e-5, atol=1e-5)


def test_scaling_factor_from_data_gives_unit_variance_latents():
    """As train_vae.py sets them: shift = mean and scaling = 1 / std of the posterior means of the training images.
    The UNet then sees latents of mean 0 and std 1 on those images, and close to it on held-out ones."""
    x = torch.from_numpy(digits(400))
    train, held_out = x[:200], x[200:]
    vae = tiny_vae(scaling_factor=1.0, shift_factor=None)
    with torch.no_grad():
        raw = vae.encode(train).latent_dist.mean
    assert abs(raw.std().item() - 1.0) > 0.2  # a random VAE's latents are not unit variance to begin with
    vae.register_to_config(scaling_factor=1.0 / raw.std().item(), shift_factor=raw.mean().item())
    z = encode_images(vae, train)
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1.0) < 1e-4
    z = encode_images(vae, held_out)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1.0) < 0.1


def test_save_load_conditional_guidance_steps_and_bf16(tmp_path):
    pipe = latent_pipeline(conditional=True)
    folder = str(tmp_path / "pipe")
    pipe.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "model_index.json")) as f:
        assert json.load(f)["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = MMFPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae) is AutoencoderKL and loaded.vae.config.shift_factor == 0.1
    for kwargs in ({}, {"num_inference_steps": 2}, {"class_labels": ["a", "c", "b"]},
                   {"class_labels": [0, 1, 2], "guidance_scale": 2.0}):
        a = pipe(num_images=3, generator=seeded(0), output_type="np", **kwargs).images
        b = loaded(num_images=3, generator=seeded(0), output_type="np", **kwargs).images
        assert a.shape == (3, 8, 8, 1) and np.array_equal(a, b), kwargs
    labelled = pipe(num_images=3, generator=seeded(0), output_type="np", class_labels=[0, 0, 0]).images
    assert not np.array_equal(labelled, pipe(num_images=3, generator=seeded(0), output_type="np",
                                             class_labels=[2, 2, 2]).images)
    pil = loaded(num_images=2, generator=seeded(0)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    half = MMFPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.vae.dtype == torch.bfloat16
    low = half(num_images=3, generator=seeded(0), output_type="np", class_labels=[0, 1, 2]).images
    full = pipe(num_images=3, generator=seeded(0), output_type="np", class_labels=[0, 1, 2]).images
    assert np.isfinite(low).all() and np.abs(low - full).max() < 0.1


def test_without_vae_nothing_changes():
    torch.manual_seed(0)
    unet = default_processors(build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16),
                                             norm_num_groups=4)).eval()
    pipe = MMFPipeline(unet, MMFScheduler())
    pipe.set_progress_bar_config(disable=True)
    z1 = torch.randn(2, 1, 8, 8, generator=seeded(0))
    with torch.no_grad():
        expected = ((z1 - pipe.average_velocity(z1, torch.zeros(2), torch.ones(2))) / 2 + 0.5).clamp(0, 1)
    assert not pipe.is_latent and pipe.image_size == 8
    torch.testing.assert_close(pipe(latents=z1, output_type="pt").images, expected, rtol=0, atol=0)


def test_pipeline_rejects_a_vae_of_the_wrong_class_or_channels():
    unet = build_mmf_unet(sample_size=4, in_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="vae must be one of AutoencoderKL, AutoencoderTiny, VQModel.*UNet2DModel"):
        MMFPipeline(unet, MMFScheduler(), vae=plain_unet())
    three = build_mmf_unet(sample_size=4, in_channels=3, block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="latents have 4 channels but the UNet takes 3"):
        MMFPipeline(three, MMFScheduler(), vae=tiny_vae())


def test_tiny_and_vq_autoencoders_work_too():
    tiny = AutoencoderTiny(in_channels=1, out_channels=1, encoder_block_out_channels=(8, 8),
                           decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                           latent_channels=4)
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                 norm_num_groups=4, num_vq_embeddings=16)
    for vae in (tiny, vq):
        unet = build_mmf_unet(sample_size=4, in_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
        pipe = MMFPipeline(unet, MMFScheduler(), vae=vae.eval())
        pipe.set_progress_bar_config(disable=True)
        images = pipe(num_images=2, output_type="np").images
        assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all(), type(vae).__name__


# ---------------------------------------------------------------------------------------------------- Hub
@pytest.mark.slow
def test_hub_push_and_pull_both_ways_give_identical_images(tmp_path):
    """Pushed from this process (push_pipeline_folder) and with push_to_hub from a subprocess; pulled with the package
    and, in a subprocess that cannot import mmf_diffusers, with DiffusionPipeline(..., trust_remote_code=True)."""
    pipe = latent_pipeline(conditional=True)
    reference = pipe(num_images=3, generator=seeded(0), output_type="np", class_labels=[0, 1, 2]).images
    work = str(tmp_path)
    folder = os.path.join(work, "pipeline")
    pipe.save_pretrained(folder)
    repos = [f"{USER}/latent", f"{USER}/latent-push-to-hub"]
    sample = textwrap.dedent("""
        import json, sys
        import numpy as np
        import torch

        def images(pipe):
            pipe.set_progress_bar_config(disable=True)
            return pipe(num_images=3, generator=torch.Generator().manual_seed(0), output_type="np",
                        class_labels=[0, 1, 2]).images
    """)
    with HubServer({TOKEN: USER}) as hub:
        push_pipeline_folder(folder, repos[0], token=TOKEN, endpoint=hub.url)
        run_hub_script(sample + textwrap.dedent(f"""
            from mmf_diffusers import MMFPipeline
            pipe = MMFPipeline.from_pretrained({repos[0]!r})
            np.save("package.npy", images(pipe))
            json.dump([type(pipe.vae).__name__, pipe.vae.config.scaling_factor], open("package.json", "w"))
            pipe.push_to_hub({repos[1]!r}, token={TOKEN!r})
            """), hub_env(hub, work, token=None, pythonpath=str(REPO / "src")), work)
        run_hub_script(BLOCK_MMF_DIFFUSERS + sample + textwrap.dedent(f"""
            from diffusers import DiffusionPipeline
            for i, repo in enumerate({repos!r}):
                pipe = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
                np.save(f"remote_{{i}}.npy", images(pipe))
            assert not any(m.split(".")[0] == "mmf_diffusers" for m in sys.modules)
            """), hub_env(hub, work, pythonpath=None), work)
        files = [hub.files(repo) for repo in repos]
        assert hub.unknown_requests == []
    assert same_images(np.load(os.path.join(work, "package.npy")), reference)
    for i in range(2):
        assert same_images(np.load(os.path.join(work, f"remote_{i}.npy")), reference), repos[i]
    with open(os.path.join(work, "package.json")) as f:
        assert json.load(f) == ["AutoencoderKL", 1.7]
    for repo_files in files:
        assert {"vae/config.json", "vae/diffusion_pytorch_model.safetensors", "pipeline.py",
                "conditioner/conditioning_mmf.py"} <= set(repo_files)
        index = json.loads(repo_files["model_index.json"])
        assert index["vae"] == ["diffusers", "AutoencoderKL"] and "vae" not in index[PACKAGE_LAYOUT_KEY]
        with open(os.path.join(REPO, "src", "mmf_diffusers", "pipeline_mmf.py"), "rb") as f:
            assert repo_files["pipeline.py"] == f.read()


# ---------------------------------------------------------------------------------------------------- the cache
def image_dataset(pixels: np.ndarray, resolution: int = 8, random_flip: bool = False, seed: int = 0):
    source = data_lib.ArraySource(pixels, "test-images")
    return data_lib.ImageDataset(source, range(len(pixels)), resolution, 1, center_crop=True,
                                 random_flip=random_flip, seed=seed)


def uint8_digits(n: int = 40) -> np.ndarray:
    from mmf_diffusers.offline_data import load_sklearn_digits

    return load_sklearn_digits()[0][:n].copy()


class EncodeCounter:
    def __init__(self, vae):
        self.images = 0
        vae.encoder.register_forward_hook(lambda module, args, out: self.add(args[0].shape[0]))

    def add(self, n):
        self.images += n


def test_cache_is_reused_and_invalidated_by_every_change(tmp_path):
    cache = str(tmp_path / "cache")
    pixels = uint8_digits()
    vae = tiny_vae()
    counter = EncodeCounter(vae)
    logs = []
    first, flipped = latent_lib.cached_latents(vae, image_dataset(pixels), cache, log=logs.append)
    assert counter.images == 40 and flipped is None and first.shape == (40, 4, 4, 4)
    expected = encode_images(vae, torch.from_numpy(np.stack([image_dataset(pixels)[i] for i in range(40)])))
    np.testing.assert_array_equal(first, expected.numpy())
    counter.images = 0
    again, _ = latent_lib.cached_latents(vae, image_dataset(pixels), cache, log=logs.append)
    # Reused after verification: only the spot check's few images are encoded again.
    assert counter.images == latent_lib.SPOT_CHECK_IMAGES and np.array_equal(again, first) and "reusing" in logs[-1]
    assert len(os.listdir(cache)) == 1

    def changed(name, vae, dataset):
        before, seen = len(os.listdir(cache)), len(logs)
        latents, _ = latent_lib.cached_latents(vae, dataset, cache, log=logs.append)
        assert "Latent cache: encoding" in logs[seen] and len(os.listdir(cache)) == before + 1, name
        return latents

    perturbed = tiny_vae()
    with torch.no_grad():
        perturbed.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    changed("weights", perturbed, image_dataset(pixels))
    rescaled = changed("scaling_factor", tiny_vae(scaling_factor=3.4), image_dataset(pixels))
    np.testing.assert_allclose((rescaled / 3.4 + 0.1), (first / 1.7 + 0.1), rtol=1e-5, atol=1e-6)
    changed("shift_factor", tiny_vae(shift_factor=0.0), image_dataset(pixels))
    edited = pixels.copy()
    edited[7, 3, 3] ^= 0xFF
    changed("one pixel", vae, image_dataset(edited))
    changed("one image fewer", vae, image_dataset(pixels[:-1]))
    changed("resolution", tiny_vae(), image_dataset(pixels, resolution=16))
    seen = len(logs)
    _, flipped = latent_lib.cached_latents(vae, image_dataset(pixels, random_flip=True), cache, log=logs.append)
    assert flipped is not None and "in both orientations" in logs[seen] and "80 encodings" in logs[-1]
    assert not any(name.endswith(".tmp") or ".tmp-" in name for name in os.listdir(cache))


def test_flips_are_encoded_and_drawn_like_the_image_dataset(tmp_path):
    pixels = uint8_digits(24)
    vae = tiny_vae()
    images = image_dataset(pixels, random_flip=True, seed=5)
    latents, flipped = latent_lib.cached_latents(vae, images, str(tmp_path), log=lambda m: None)
    dataset = latent_lib.LatentDataset(latents, flipped, seed=5)
    # Flipping latents is not flipping images for a VAE: that is why both orientations are encoded.
    assert np.abs(flipped - latents[..., ::-1]).max() > 1e-2
    seen_flipped = 0
    for epoch in range(3):
        for index in range(24):
            expected = encode_images(vae, torch.from_numpy(images[(index, epoch)][None]))[0].numpy()
            np.testing.assert_allclose(dataset[(index, epoch)], expected, rtol=1e-5, atol=1e-6)
            seen_flipped += int(np.array_equal(dataset[(index, epoch)], flipped[index]))
    assert 10 < seen_flipped < 62  # both orientations occur (72 draws)


# ---------------------------------------------------------------------------------------------------- errors
def test_latent_space_checks():
    vae = tiny_vae()
    with pytest.raises(latent_lib.LatentError, match="--resolution 9 is not divisible by the VAE's factor 2"):
        latent_lib.LatentSpace(vae, 9, 1)
    with pytest.raises(latent_lib.LatentError, match="latent is 4x4 .* UNet with 4 levels cannot take"):
        latent_lib.LatentSpace(vae, 8, 1, unet_levels=4)
    with pytest.raises(latent_lib.LatentError, match="VAE encodes 1-channel images but the data has 3"):
        latent_lib.LatentSpace(vae, 8, 3)
    space = latent_lib.LatentSpace(vae, 8, 1, unet_levels=3)
    assert (space.size, space.channels, space.factor) == (4, 4, 2)
    with pytest.raises(latent_lib.LatentError, match="UNet takes 1 channels but the VAE's latents have 4"):
        space.check_unet(2, in_channels=1)
    with pytest.raises(latent_lib.LatentError, match="vae must be one of .* got UNet2DModel"):
        latent_lib.LatentSpace(plain_unet(), 8, 1)


@pytest.mark.slow
def test_training_script_rejects_bad_latent_input(tmp_path, capsys):
    """One-line errors, exit status 2, no traceback; each before any image is encoded."""
    vae_dir, unet_dir = tmp_path / "vae", tmp_path / "unet"
    tiny_vae().save_pretrained(vae_dir)
    plain_unet().save_pretrained(unet_dir)
    base = ["--dataset_name", "sklearn-digits", "--center_crop", "--max_train_steps", "1", "--logger", "none",
            "--output_dir", str(tmp_path / "out"), *TINY]
    cases = [  # (added flags, removed flags, message)
        (["--vae_name_or_path", str(vae_dir)], ["--center_crop"], "--vae_name_or_path needs --center_crop"),
        (["--vae_name_or_path", str(unet_dir)], [], "holds a UNet2DModel, not a VAE"),
        (["--vae_name_or_path", str(tmp_path / "missing")], [], "Could not read a model config"),
        (["--vae_name_or_path", str(vae_dir), "--resolution", "9", "--block_out_channels", "8"], [],
         "--resolution 9 is not divisible by the VAE's factor 2"),
        (["--vae_name_or_path", str(vae_dir), "--block_out_channels", "8", "8", "8", "8"], [],
         "UNet with 4 levels cannot take"),
        (["--vae_name_or_path", str(vae_dir), "--num_channels", "3"], [], "data has 3 channels"),
        (["--vae_subfolder", "vae"], [], "--vae_subfolder only applies with --vae_name_or_path"),
    ]
    import train_mmf

    for extra, removed, message in cases:  # in this process: a subprocess per case costs seconds of imports each
        args = [a for a in base if a not in removed] + extra
        with pytest.raises(SystemExit) if "only applies" in message or "needs --center_crop" in message else \
                contextlib.nullcontext():
            assert train_mmf.main(args) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 or "usage:" in err, (message, err[-2000:])
        assert "Traceback" not in err, (message, err[-2000:])
        assert not (tmp_path / "out" / "latent_cache").exists(), message
    # The command line itself, once: a one-line error and exit status 2 (another --output_dir: this process holds the
    # lock of the first one, as a training run would).
    other = [a if a != str(tmp_path / "out") else str(tmp_path / "out2") for a in base]
    result = run_script(tmp_path, other + ["--vae_name_or_path", str(unet_dir)])
    assert result.returncode == 2 and "holds a UNet2DModel, not a VAE" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_accelerate_launch_on_latents_then_resume_without_encoding(tmp_path):
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    out = tmp_path / "run"

    def args(steps):
        return ["--dataset_name", "sklearn-digits", "--center_crop", "--random_flip", "--vae_name_or_path", vae_dir,
                "--class_conditional", "--train_batch_size", "16", "--max_train_steps", steps,
                "--checkpointing_steps", "2", "--lam_warmup_steps", "0", "--logger", "none", "--output_dir", out,
                *TINY]

    first = run_script(tmp_path, args(2), launcher=accelerate_launch(1, 0))
    check(first)
    assert "Latent cache: encoding 1797 images in both orientations" in first.stdout
    assert "the UNet works on 4x4x4 latents" in first.stdout
    for path in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "conditioner/config.json", "checkpoint-2"):
        assert (out / path).exists(), path
    (cache_file,) = (out / "latent_cache").iterdir()
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == 4 and unet_config["sample_size"] == 4
    # The VAE is frozen: the saved one is the given one, bit for bit.
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (vae_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    pipe = MMFPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_images=2, class_labels=[3, 4], output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()

    resumed = run_script(tmp_path, args(3) + ["--resume_from_checkpoint", "latest"])
    check(resumed)
    assert "Latent cache: reusing" in resumed.stdout and "Resuming from" in resumed.stdout
    assert list((out / "latent_cache").iterdir()) == [cache_file]
