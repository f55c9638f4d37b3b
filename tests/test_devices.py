"""Device placement in training/train_mmf.py, checked on a CPU-only machine, and the model_fn over wrapped modules.

A GPU run moves the modules in ``accelerator.prepare``; everything the loop makes itself must follow. These tests
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
    """What train_mmf.prepare_for_training needs of an Accelerator, with ``device`` = meta."""

    device = torch.device("meta")

    def prepare(self, *objects):
        return tuple(o.to(self.device) if isinstance(o, torch.nn.Module) else o for o in objects)


def tiny_unet():
    return build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                          norm_num_groups=8, attention_head_dim=8)


def test_the_ema_follows_the_model_to_the_accelerator_device():
    from diffusers.training_utils import EMAModel

    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), decay=0.9, model_cls=type(unet), model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters())
    assert {p.device.type for p in ema.shadow_params} == {"cpu"}  # built where the parameters were
    (prepared,), _ = train_mmf.prepare_for_training(MetaAccelerator(), [unet], optimizer, ema)
    assert {p.device.type for p in prepared.parameters()} == {"meta"}
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
    ema.step(prepared.parameters())  # the first EMA update of the training loop
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
    assert train_mmf.prepare_for_training(MetaAccelerator(), [tiny_unet()], optimizer, None)[0][0].device.type == "meta"


@pytest.mark.parametrize("dropout", [None, 0.5])
def test_loss_randomness_is_drawn_for_the_global_batch_and_lands_on_the_device(dropout):
    sampler = TimeSampler("logit_normal", -0.4, 1.0, 0.5)
    rows = slice(4, 8)  # rank 1 of 2, batch 4 per rank
    t, r, noise, drop = train_mmf.draw_loss_randomness(sampler, torch.Generator().manual_seed(0), 8, rows,
                                                       (1, 8, 8), "meta", torch.bfloat16, label_dropout=dropout)
    for tensor in (t, r, noise) + ((drop,) if dropout is not None else ()):
        assert tensor.device.type == "meta" and tensor.shape[0] == 4
    assert noise.dtype == torch.bfloat16 and noise.shape == (4, 1, 8, 8)
    assert (drop is None) == (dropout is None) and (drop is None or drop.dtype == torch.bool)

    # The values are this rank's rows of the one global draw, whatever the device: the same generator state on
    # every rank gives the same rows as a one-process run with the global batch.
    generator = torch.Generator().manual_seed(0)
    t_all, r_all = sampler(8, generator=generator)
    noise_all = torch.randn((8, 1, 8, 8), generator=generator)
    t_cpu, r_cpu, noise_cpu, drop_cpu = train_mmf.draw_loss_randomness(
        sampler, torch.Generator().manual_seed(0), 8, rows, (1, 8, 8), "cpu", torch.float32, label_dropout=dropout)
    torch.testing.assert_close(t_cpu, t_all[rows], rtol=0, atol=0)
    torch.testing.assert_close(r_cpu, r_all[rows], rtol=0, atol=0)
    torch.testing.assert_close(noise_cpu, noise_all[rows], rtol=0, atol=0)
    if dropout is not None:
        assert torch.equal(drop_cpu, torch.rand(8, generator=generator)[rows] < dropout)


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


def test_gpu_check_script_is_valid_bash_and_guards_the_precision_script():
    """benchmarks/gpu_check.sh parses (`bash -n`); its CPU dry run (GPU_CHECK_DRY_RUN=1, about 2 minutes) is run by
    hand, not here. The du/dt precision check is optional (guarded by a file test)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "if [ -f benchmarks/derivative_precision.py ]" in text and "GPU_CHECK_DRY_RUN" in text
