#!/usr/bin/env python
"""Train a small diffusers `AutoencoderKL` for latent-space MMF (``train_mmf.py --vae_name_or_path``).

    OMP_NUM_THREADS=1 python training/train_vae.py --dataset_name mnist-offline --resolution 32 \
        --block_out_channels 32 64 64 --latent_channels 4 --max_train_steps 1500 --output_dir runs/vae-mnist

Images are prepared exactly as ``train_mmf.py`` prepares them (``training/data.py``: grayscale or RGB, the shorter side
resized to ``--resolution``, centre crop, ``[-1, 1]``), so the latents the MMF model is trained on come from the same
pixels the VAE saw. MNIST's 28x28 digits become 32x32 by bilinear resizing (not padding): `mmf-evaluate` resizes its
reference images to the samples' size the same way, so FD-MNISTCNN compares like with like.

Loss per batch: ``mean |x_hat - x|^2 + beta * KL / (pixels per image)``, where ``x_hat`` decodes a *sample* of the
posterior (the reparameterisation trick) and KL is the closed-form ``KL(q(z|x) || N(0, I))`` summed over the latent
(diffusers' ``DiagonalGaussianDistribution.kl``). A small ``beta`` keeps the reconstruction sharp; the KL term keeps
the latent smooth enough for a generator to model. There is no perceptual or adversarial term (no pretrained network
works offline here).

The saved VAE's ``shift_factor`` is the mean and its ``scaling_factor`` ``1 / std`` of the posterior means of
``--scale_images`` training images (all latent elements pooled; Stable Diffusion's 0.18215 was found the same way, and
FLUX's VAE has a shift too): the MMF pipeline feeds the UNet ``(E[z|x] - shift_factor) * scaling_factor``, of zero mean
and unit variance on the training data like the noise ``N(0, I)`` it starts from (measured and printed here). Output: ``<output_dir>/`` with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (load with
``AutoencoderKL.from_pretrained(output_dir)``), and ``vae_report.json`` with the measured figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import data as data_lib  # noqa: E402  (numpy + PIL only)
from output_dir import output_dir_problem  # noqa: E402  (standard library only)

#: Upper bounds: beyond them the run asks for absurd memory or time up front (as train_mmf.py's FLAG_LIMITS).
LIMITS = {"resolution": 4096, "layers_per_block": 16, "latent_channels": 1024, "norm_num_groups": 1024,
          "train_batch_size": 65536, "max_train_steps": 10**9, "scale_images": 10**7}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_vae.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset_name", default=None, help="As in train_mmf.py (e.g. mnist-offline, sklearn-digits).")
    parser.add_argument("--train_data_dir", default=None, help="A local image folder (as in train_mmf.py).")
    parser.add_argument("--resolution", type=int, default=32, help="Image size; divisible by the VAE's factor.")
    parser.add_argument("--num_channels", type=int, choices=(1, 3), default=None, help="Default: from the data.")
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64],
                        help="Encoder/decoder widths; L levels downsample by 2**(L - 1).")
    parser.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per encoder block.")
    parser.add_argument("--latent_channels", type=int, default=4, help="Channels of the latent.")
    parser.add_argument("--norm_num_groups", type=int, default=16, help="GroupNorm groups (divides every width).")
    parser.add_argument("--kl_weight", type=float, default=1e-3, help="beta of the loss (per pixel).")
    parser.add_argument("--train_batch_size", type=int, default=64, help="Batch size.")
    parser.add_argument("--max_train_steps", type=int, default=1500, help="Optimiser steps.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate (cosine decay).")
    parser.add_argument("--max_images", type=int, default=None, help="Use only the first N images (default: all).")
    parser.add_argument("--scale_images", type=int, default=2048, help="Images whose latents set scaling_factor.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the init, data order and posterior samples.")
    parser.add_argument("--output_dir", default="vae",
                        help="Where the AutoencoderKL is saved. A folder that already holds one is refused unless "
                        "--overwrite_output_dir is given.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace the VAE (config.json, weights, vae_report.json) in --output_dir.")
    return parser


def validate(args) -> None:
    data_lib.check_data_source(args.dataset_name, args.train_data_dir)
    factor = 2 ** (len(args.block_out_channels) - 1)
    for name in ("resolution", "layers_per_block", "latent_channels", "norm_num_groups", "train_batch_size",
                 "max_train_steps", "scale_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be divisible by the VAE's factor {factor}")
    bad = [c for c in args.block_out_channels if c < 1 or c % args.norm_num_groups]
    if bad:
        raise ValueError(f"--block_out_channels {bad} not divisible by --norm_num_groups {args.norm_num_groups}")
    if not (args.kl_weight >= 0 and math.isfinite(args.kl_weight)):
        raise ValueError(f"--kl_weight must be >= 0, got {args.kl_weight}")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise ValueError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    for name, limit in LIMITS.items():
        if getattr(args, name) > limit:
            raise ValueError(f"--{name} must be <= {limit:g}, got {getattr(args, name)}")
    if len(args.block_out_channels) > 8 or max(args.block_out_channels) > 4096:
        raise ValueError(f"--block_out_channels: at most 8 levels of at most 4096 channels, got {args.block_out_channels}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images must be a positive integer, got {args.max_images}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    problem = output_dir_problem(args.output_dir)
    if problem:
        raise ValueError(problem)
    if os.path.isfile(os.path.join(args.output_dir, "config.json")) and not args.overwrite_output_dir:
        raise ValueError(f"--output_dir {args.output_dir} already holds a model (config.json): pass "
                         "--overwrite_output_dir to replace it, or choose another --output_dir")


def load_images(args):
    """All images, prepared as train_mmf.py prepares them, as one float32 array ``(N, C, R, R)`` in [-1, 1]."""
    import numpy as np

    source = data_lib.load_source(args.dataset_name, args.train_data_dir)
    valid, channels = data_lib.scan_images(source, log=lambda message: None)
    if args.max_images is not None:
        valid = valid[: args.max_images]
    dataset = data_lib.ImageDataset(source, valid, args.resolution, args.num_channels or channels, center_crop=True)
    return np.stack([dataset[i] for i in range(len(dataset))])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        return train(args)
    except data_lib.DataError as error:
        print(f"train_vae.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the VAE is written only at the end: nothing half-written, nothing to resume
        print(f"\ntrain_vae.py: interrupted: nothing was saved to {args.output_dir}", file=sys.stderr)
        return 130


def train(args) -> int:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    start = time.time()
    images = torch.from_numpy(load_images(args))
    n, channels = images.shape[0], images.shape[1]
    print(f"{n} images {tuple(images.shape[1:])} prepared in {time.time() - start:.1f} s")
    levels = len(args.block_out_channels)
    vae = AutoencoderKL(
        in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block, latent_channels=args.latent_channels,
        norm_num_groups=args.norm_num_groups, sample_size=args.resolution, scaling_factor=1.0,
    )
    print(f"AutoencoderKL with {sum(p.numel() for p in vae.parameters()) / 1e6:.3f}M parameters; latent "
          f"{args.latent_channels}x{args.resolution // 2 ** (levels - 1)}x{args.resolution // 2 ** (levels - 1)}")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.max_train_steps)))
    rng = np.random.default_rng(args.seed)
    pixels = images[0].numel()
    vae.train()
    step_times = []
    for step in range(args.max_train_steps):
        t0 = time.time()
        x = images[torch.from_numpy(rng.integers(0, n, args.train_batch_size))]
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample()).sample
        mse = torch.mean((x_hat - x) ** 2)
        kl = posterior.kl().mean() / pixels
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step_times.append(time.time() - t0)
        if step % 100 == 0 or step == args.max_train_steps - 1:
            print(f"step {step}: mse {mse.item():.5f} kl/pixel {kl.item():.4f} ({np.median(step_times):.3f} s/step)",
                  flush=True)

    # Scaling factor: 1 / std of the posterior means (the latents train_mmf.py caches), pooled over all elements.
    vae.eval()
    with torch.no_grad():
        subset = images[: args.scale_images]
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in subset.split(256)])
        shift, std = means.mean().item(), means.std().item()
        scale = 1.0 / std
        recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in subset[:1024].split(256)])
        recon_mse = torch.mean((recon.clamp(-1, 1) - subset[:1024]) ** 2).item()
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    vae.save_pretrained(args.output_dir)
    report = {"num_images": n, "steps": args.max_train_steps, "median_step_s": float(np.median(step_times)),
              "wall_time_s": time.time() - start, "latent_mean_before_scaling": shift, "latent_std_before_scaling": std,
              "shift_factor": shift, "scaling_factor": scale,
              "scaled_latent_mean": float(((means - shift) * scale).mean()),
              "scaled_latent_std": float(((means - shift) * scale).std()),
              "reconstruction_mse_posterior_mean_[-1,1]": recon_mse,
              "latent_shape": list(means.shape[1:]), "config": vars(args), "torch_threads": torch.get_num_threads()}
    with open(os.path.join(args.output_dir, "vae_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
