"""Device placement in training/train_mmf.py, checked on a CPU-only machine, and the model_fn over wrapped modules.

A GPU run moves the modules in ``accelerator.prepare``; everything the loop makes itself must follow: the EMA, the
conditioner, the loss's noise (drawn per rank on the device), the VAE of latent training and the sample grid. These tests
stand in for the GPU with the ``meta`` device (tensors with a shape, a dtype and a device but no data): a fake
accelerator whose ``prepare`` moves the modules there, as the real one moves them to ``cuda``. On the old code (the
EMA built on the CPU and moved only on resume) the first EMA update fails here exactly as on a GPU:
``RuntimeError: Tensor on device meta is not on the expected device cpu!``.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import train_mmf  # noqa: E402

from mmf_diffusers import TimeSampler, build_mmf_unet  # noqa: E402


class MetaAccelerator:
    """What engine.prepare_for_training needs of an Accelerator, with ``device`` = meta."""

    device = torch.device("meta")

    def prepare(self, *objects):
        return tuple(o.to(self.device) if isinstance(o, torch.nn.Module) else o for o in objects)


def tiny_unet():
    return build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          norm_num_groups=8, attention_head_dim=8)


def test_the_ema_follows_the_model_to_the_accelerator_device():
    from diffusers.training_utils import EMAModel

    import engine as engine_lib

    def make_ema(parameters):
        return EMAModel(parameters, decay=0.9)

    # Built from the prepared module's parameters (DDP, FSDP2's shards), or (ZeRO-3) from the whole weights before
    # prepare and then moved: either way the shadow weights live where the parameters do.
    for ema_before in (False, True):
        unet = tiny_unet()
        optimizer = torch.optim.AdamW(unet.parameters())
        prepared, _, ema = engine_lib.prepare_for_training(MetaAccelerator(), unet, optimizer, make_ema, ema_before)
        assert {p.device.type for p in prepared.parameters()} == {"meta"}
        assert {p.device.type for p in ema.shadow_params} == {"meta"}
        ema.step(prepared.parameters())  # the first EMA update of the training loop
        assert {p.device.type for p in ema.shadow_params} == {"meta"}
    prepared, _, ema = engine_lib.prepare_for_training(MetaAccelerator(), tiny_unet(), optimizer, None)
    assert prepared.device.type == "meta" and ema is None


@pytest.mark.parametrize("dropout", [None, 0.5])
def test_loss_randomness_is_drawn_per_rank_on_the_device(dropout):
    sampler = TimeSampler("logit_normal", -0.4, 1.0, 0.5)
    rows = slice(4, 8)  # rank 1 of 2, batch 4 per rank
    t, r, noise, drop = train_mmf.draw_loss_randomness(sampler, torch.Generator().manual_seed(0), rows, (1, 8, 8),
                                                       "meta", torch.bfloat16, label_dropout=dropout)
    for tensor in (t, r, noise) + ((drop,) if dropout is not None else ()):
        assert tensor.device.type == "meta" and tensor.shape[0] == 4
    assert noise.dtype == torch.bfloat16 and noise.shape == (4, 1, 8, 8)
    assert (drop is None) == (dropout is None) and (drop is None or drop.dtype == torch.bool)

    # The values of a rank's rows are those rows of a one-process draw of the global batch (same generator state).
    whole = train_mmf.draw_loss_randomness(sampler, torch.Generator().manual_seed(0), slice(0, 8), (1, 8, 8), "cpu",
                                           torch.float32, label_dropout=dropout)
    for rank in (0, 1):
        part = train_mmf.draw_loss_randomness(sampler, torch.Generator().manual_seed(0), slice(4 * rank, 4 * rank + 4),
                                              (1, 8, 8), "cpu", torch.float32, label_dropout=dropout)
        for a, b in zip(part, whole):
            if a is not None:
                assert torch.equal(a, b[4 * rank: 4 * rank + 4])
    assert int((whole[0] > whole[1]).sum()) == 4  # round(0.5 * 8) rows with r != t, two on each rank
    # The next micro-batch (the generator moved on) draws other values.
    generator = torch.Generator().manual_seed(0)
    first = train_mmf.draw_loss_randomness(sampler, generator, rows, (1, 8, 8), "cpu", torch.float32)
    second = train_mmf.draw_loss_randomness(sampler, generator, rows, (1, 8, 8), "cpu", torch.float32)
    assert not torch.equal(first[2], second[2])


def test_a_conditioner_follows_the_model_to_the_accelerator_device():
    from mmf_diffusers import add_class_conditioning

    import engine as engine_lib

    unet, conditioner = add_class_conditioning(tiny_unet(), 3, label_init_std=1.0)
    model = engine_lib.combine(unet, conditioner, 1000.0, "h")  # one module for accelerate's engines
    optimizer = torch.optim.AdamW(model.parameters())
    prepared, _, _ = engine_lib.prepare_for_training(MetaAccelerator(), model, optimizer)
    assert [{p.device.type for p in m.parameters()} for m in engine_lib.split(prepared)] == [{"meta"}, {"meta"}]


def test_the_vae_and_the_sample_grid_live_on_the_training_device(tmp_path):
    """The script loads the VAE onto the training device (load_training_vae), so the cache is encoded there and the
    sample grids decode the device's latents: with the VAE left on the CPU the decode fails (``Tensor on device cpu is
    not on the expected device meta!``), as it did on a GPU."""
    import argparse

    from diffusers import AutoencoderKL

    from mmf_diffusers.pipeline_mmf import decode_latents

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=8).save_pretrained(tmp_path / "vae")
    args = argparse.Namespace(vae_name_or_path=str(tmp_path / "vae"), vae_subfolder=None)
    vae = train_mmf.load_training_vae(args, MetaAccelerator.device)
    assert {p.device.type for p in vae.parameters()} == {"meta"} and not vae.training
    # The sample grid's last step: the VAE decodes the device's latents (a meta tensor cannot go further, through
    # the pipeline's finiteness check).
    latents = torch.randn(2, 4, 4, 4, device="meta")
    images = decode_latents(vae, latents)
    assert images.device.type == "meta" and images.shape == (2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="device"):
        decode_latents(vae.to("cpu"), latents)


class Wrapper(torch.nn.Module):
    """Stands for DistributedDataParallel: the module is ``.module`` and its attributes are hidden."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_unet_model_fn_through_wrapped_modules_matches_the_plain_modules():
    """With finite differences the training script hands accelerate's wrappers to unet_model_fn; the "no label" id
    comes from the wrapped conditioner and the values are those of the plain modules."""
    from mmf_diffusers import add_class_conditioning, unet_model_fn

    torch.manual_seed(0)
    unet, conditioner = add_class_conditioning(tiny_unet(), 3, label_init_std=1.0)
    assert not hasattr(Wrapper(conditioner), "null_label")
    plain = unet_model_fn(unet, conditioner=conditioner)
    wrapped = unet_model_fn(Wrapper(unet), conditioner=Wrapper(conditioner))
    z, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    r = t * 0.5
    labels = torch.tensor([0, 1, 2, conditioner.null_label])
    with torch.no_grad():
        torch.testing.assert_close(wrapped(z, r, t, labels), plain(z, r, t, labels), rtol=0, atol=0)
        none = torch.full((4,), conditioner.null_label)
        torch.testing.assert_close(wrapped(z, r, t), plain(z, r, t, none), rtol=0, atol=0)
