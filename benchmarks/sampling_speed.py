"""Sampling throughput of `MMFPipeline` against a bare UNet forward and against multi-step Euler sampling.

One two-time UNet2DModel the size of the MNIST one (28x28x1, block_out_channels (32, 64, 64), attention on the
lowest level, `build_mmf_unet`), with **random weights** (throughput does not depend on them), one batch of noise.
Timed side by side, interleaved round by round so that load from other processes hits every entry alike:

* ``bare_unet_forward``: ``unet(z, time_scale * t, class_labels=time_scale * h)`` once, under no_grad;
* ``mmf_pipeline_<n>step``: ``MMFPipeline(num_inference_steps=n, latents=z, output_type="pt")`` (scheduler, time
  mapping and post-processing included; progress bar off);
* ``euler_<n>step``: ``n`` Euler steps of the instantaneous velocity ``u(z, t, t)`` through the same UNet.

Reported: median seconds per batch, images/s, and the ratio to the bare forward (the pipeline's overhead target at one
step is at most 5%).
"""

from __future__ import annotations

import statistics
import time
from typing import Dict, Sequence

import torch

from mmf_diffusers import MMFPipeline, MMFScheduler, build_mmf_unet


def sampling_speed(batch: int = 64, resolution: int = 28, block_out_channels: Sequence[int] = (32, 64, 64),
                   rounds: int = 5, pipeline_steps: Sequence[int] = (1, 2, 4),
                   euler_steps: Sequence[int] = (2, 4, 8, 16, 50)) -> Dict:
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=resolution, in_channels=1, block_out_channels=tuple(block_out_channels)).eval()
    pipe = MMFPipeline(unet=unet, scheduler=MMFScheduler())
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.config.time_scale
    z = torch.randn(batch, 1, resolution, resolution, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(batch)

    def bare():
        return unet(z, ones * scale, class_labels=ones * scale).sample

    def pipeline(n):
        return lambda: pipe(num_inference_steps=n, latents=z, output_type="pt").images

    def euler(n):
        def run():
            grid = torch.linspace(1.0, 0.0, n + 1)
            x = z
            for t, r in zip(grid[:-1], grid[1:]):
                tt = t.expand(batch)
                x = x - (t - r) * pipe.average_velocity(x, tt, tt)
            return x
        return run

    entries = {"bare_unet_forward": (bare, 1)}
    entries.update({f"mmf_pipeline_{n}step": (pipeline(n), n) for n in pipeline_steps})
    entries.update({f"euler_{n}step": (euler(n), n) for n in euler_steps})
    times = {name: [] for name in entries}
    with torch.no_grad():
        for fn, _ in entries.values():  # warm-up
            fn()
        for _ in range(rounds):
            for name, (fn, _) in entries.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["bare_unet_forward"])
    rows = []
    for name, (_, nfe) in entries.items():
        med = statistics.median(times[name])
        rows.append({"config": name, "nfe": nfe, "median_s_per_batch": med, "images_per_s": batch / med,
                     "ratio_to_bare_forward": med / base, "times_s": times[name]})
    overhead = next(r for r in rows if r["config"] == "mmf_pipeline_1step")["ratio_to_bare_forward"] - 1
    return {
        "config": {"batch": batch, "resolution": resolution, "channels": 1,
                   "block_out_channels": list(block_out_channels), "rounds": rounds,
                   "weights": "random (throughput does not depend on the weights)",
                   "threads": torch.get_num_threads(), "time_scale": scale},
        "rows": rows,
        "pipeline_1step_overhead": overhead,
        "overhead_target": 0.05,
        "meets_target": bool(overhead <= 0.05),
    }
