#!/usr/bin/env python
"""Cost of one MMF training step (loss + backward) with the UNet eager, ``torch.compile``'d, or in ``channels_last``,
interleaved in one process so that the machine's load falls alike on each (the training script's ``--torch_compile``).

    OMP_NUM_THREADS=1 python benchmarks/engine_flags.py [--steps 30] [--resolution 8] [--channels 16 32]

Prints, per derivative estimator (lam = 1, model tangent, 25% of rows with r != t), the median step time of each
variant and its ratio to eager. The first calls of the compiled UNet compile it (minutes on a CPU with a cold
inductor cache); they are left out with the warm-up steps. ``channels_last`` is not measured with jvp: its forward-mode
AD fails there (group_norm, torch 2.13).
"""

import argparse
import statistics
import time

import torch

from mmf_diffusers import ModularMeanFlowLoss, TimeSampler, build_mmf_unet, unet_model_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per variant (after 3 warm-up steps).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32], help="UNet block_out_channels.")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch_size must be positive")

    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=args.resolution, in_channels=1, block_out_channels=args.channels,
                          layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
    compiled = torch.compile(unet)
    x = torch.randn(args.batch_size, 1, args.resolution, args.resolution)
    for derivative in ("finite_difference", "jvp"):
        loss_fn = ModularMeanFlowLoss(TimeSampler("logit_normal", -0.4, 1.0, 0.25), derivative=derivative,
                                      tangent="model")
        # (model_fn, memory format of the weights and of x)
        variants = {"eager": (unet_model_fn(unet), torch.contiguous_format),
                    "torch.compile": (unet_model_fn(compiled), torch.contiguous_format),
                    "channels_last": (unet_model_fn(unet), torch.channels_last)}
        if derivative == "jvp":
            # torch 2.13: group_norm's forward-AD rule fails on a channels_last input ("view size is not compatible
            # with input tensor's size and stride"), as on the non-contiguous attention output (see unet.py).
            del variants["channels_last"]
        times = {name: [] for name in variants}
        generator = torch.Generator().manual_seed(0)
        for step in range(args.steps + 3):
            t, r = loss_fn.time_sampler(args.batch_size, generator=generator)
            noise = torch.randn(x.shape, generator=generator)
            for name, (model_fn, memory_format) in variants.items():
                unet.to(memory_format=memory_format)
                start = time.perf_counter()
                out = loss_fn(model_fn, x.contiguous(memory_format=memory_format), 1.0, t=t, r=r,
                              noise=noise.contiguous(memory_format=memory_format))
                out.loss.backward()
                unet.zero_grad(set_to_none=True)
                if step >= 3:
                    times[name].append(time.perf_counter() - start)
        eager = statistics.median(times["eager"])
        print(f"{derivative}: " + ", ".join(
            f"{name} {statistics.median(v) * 1000:.1f} ms ({statistics.median(v) / eager:.2f}x)"
            for name, v in times.items()) + f"  [median of {args.steps} steps, batch {args.batch_size}, "
            f"{args.resolution}x{args.resolution}, UNet {tuple(args.channels)}, lam 1, {torch.get_num_threads()} "
            "thread(s)]", flush=True)


if __name__ == "__main__":
    main()
