"""What a VAE does to held-out images, and the facts behind training/latents.py's choices.

    OMP_NUM_THREADS=1 python benchmarks/vae_quality.py --vae pipelines/mmf-mnist-latent --subfolder vae --num 2000

On ``--num`` MNIST test images prepared as training/data.py prepares them (``--resolution``, centre crop): the
reconstruction error of ``decode(encode(x))`` with the posterior mean (MSE on [-1, 1] and PSNR on [0, 1]); the scaled
latents' mean and std (the UNet's inputs; about 0 and 1 when the VAE's shift and scaling factors fit the data); the
posterior's mean std against the spread of the posterior means (why the cache holds the mean); and how far
``E(flip(x))`` is from ``flip(E(x))`` relative to the latents' std (why flips are encoded, not applied to latents).
With ``--fd N``: FD-MNISTCNN against the whole MNIST test set of N real training images and of their reconstructions
(the floor a latent model with this VAE can reach), scored at ``--fd-size`` pixels (default ``--resolution``; images of
another size are resized with PIL bilinear first, as benchmarks/latent_cost.py does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))

from data import preprocess  # noqa: E402
from mmf_diffusers.offline_data import load_mnist  # noqa: E402
from mmf_diffusers.pipeline_mmf import decode_latents, encode_images  # noqa: E402


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", required=True, help="AutoencoderKL folder (or a pipeline folder with --subfolder vae)")
    parser.add_argument("--subfolder", default=None)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num", type=int, default=2000, help="MNIST test images")
    parser.add_argument("--fd", type=int, default=0, help="also FD-MNISTCNN of N training images and reconstructions")
    parser.add_argument("--fd-size", type=int, default=None, help="score --fd at this size (default --resolution)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.subfolder).eval()
    images, _ = load_mnist("test")
    x = torch.from_numpy(np.stack([preprocess(Image.fromarray(im), args.resolution, 1) for im in images[:args.num]]))
    z = torch.cat([encode_images(vae, c) for c in x.split(250)])
    recon = torch.cat([decode_latents(vae, c) for c in z.split(250)]).clamp(-1, 1)
    mse = torch.mean((recon - x) ** 2).item()
    posterior_std = torch.cat([vae.encode(c).latent_dist.std for c in x.split(250)])
    scale = float(vae.config.scaling_factor)
    flipped = torch.cat([encode_images(vae, c.flip(-1)) for c in x.split(250)])
    report = {
        "num_test_images": len(x), "resolution": args.resolution, "latent_shape": list(z.shape[1:]),
        "reconstruction_mse_[-1,1]": mse, "psnr_db_[0,1]": 10 * math.log10(4.0 / mse),
        "scaled_latent_mean": z.mean().item(), "scaled_latent_std": z.std().item(),
        "posterior_std_mean_scaled": (posterior_std * scale).mean().item(),
        "flip_equivariance_error_rms_over_latent_std": ((flipped - z.flip(-1)).pow(2).mean().sqrt() / z.std()).item(),
    }
    if args.fd:
        from mmf_diffusers.evaluation import Evaluator

        train, _ = load_mnist("train")
        real = torch.from_numpy(np.stack([preprocess(Image.fromarray(im), args.resolution, 1) for im in train[:args.fd]]))
        rebuilt = torch.cat([decode_latents(vae, encode_images(vae, c)) for c in real.split(250)]).clamp(-1, 1)
        from mmf_diffusers.evaluation import quantize_to_uint8, resize_reference

        size = args.fd_size or args.resolution

        def at_size(images):
            if images.shape[-1] == size:
                return images
            pixels = quantize_to_uint8(images)[:, 0].numpy().astype("uint8")
            return torch.from_numpy(resize_reference(pixels, size)).float()[:, None] / 127.5 - 1

        evaluator = Evaluator(["fd-mnistcnn"], "mnist-test", size, log=lambda m: None)
        real28 = torch.from_numpy(train[:args.fd, None].astype(np.float32) / 127.5 - 1)
        report["fd_size"] = size
        report[f"fd_mnistcnn_{args.fd}_real_train_images_28px_source"] = evaluator.score(at_size(real28))["fd-mnistcnn"]
        report[f"fd_mnistcnn_{args.fd}_real_train_images_prepared"] = evaluator.score(at_size(real))["fd-mnistcnn"]
        report[f"fd_mnistcnn_{args.fd}_reconstructions"] = evaluator.score(at_size(rebuilt))["fd-mnistcnn"]
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
