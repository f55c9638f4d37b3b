#!/usr/bin/env python
"""Time and peak memory of one MMF training step (finite differences) with the UNet's default SDPA attention against
the math kernel, which every forward used while the forward-AD processor forced it.

    OMP_NUM_THREADS=1 python benchmarks/attention_kernels.py            (64x64x3, batch 8, UNet (32, 64, 64) with
                                                                          attention at 32x32 and 16x16)
    python benchmarks/attention_kernels.py --json benchmarks/results/attention_kernels.json

Each configuration runs in its own process (so one's allocations cannot hide another's peak): a fresh UNet (seed 0),
AdamW, `ModularMeanFlowLoss` (finite differences, model tangent, paired rows, 25% of rows r != t), ``--warmup`` steps
then ``--steps`` timed steps: wall and CPU time (on a machine shared with other jobs the process's CPU time is the
steadier figure). Memory is the rise of the process's peak resident set over its size before the first step
(on a GPU the figure to read would be ``torch.cuda.max_memory_allocated``). ``sdpa`` is
`mmf_diffusers.ForwardADAttnProcessor` outside forward AD, i.e. diffusers' AttnProcessor2_0 (PyTorch picks the fused
flash kernel on this CPU; flash / memory-efficient kernels on GPUs); ``math`` is `mmf_diffusers.unet.MathAttnProcessor`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KERNELS = ("sdpa", "math")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--attention_levels", type=int, nargs="+", default=[0, 1, 1])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=str, default=None, help="Also write the figures to this file.")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)  # "kernel:lam"
    return parser.parse_args(argv)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def worker(args) -> dict:
    import torch

    from mmf_diffusers import ModularMeanFlowLoss, TimeSampler, build_mmf_unet, enable_forward_ad, unet_model_fn
    from mmf_diffusers.unet import ForwardADAttnProcessor, MathAttnProcessor

    kernel, lam = args.worker.split(":")
    lam = float(lam)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=args.resolution, in_channels=args.channels,
                          block_out_channels=args.block_out_channels,
                          attention_levels=[bool(a) for a in args.attention_levels])
    enable_forward_ad(unet, MathAttnProcessor if kernel == "math" else ForwardADAttnProcessor)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    loss_fn = ModularMeanFlowLoss(TimeSampler(r_neq_t_fraction=0.25, pair_rows=True), derivative="finite_difference",
                                  tangent="model", pair_rows=True, adaptive_p=1.0)
    model_fn = unet_model_fn(unet)
    generator = torch.Generator().manual_seed(1)
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    rss_before = _rss_kib()
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        x = torch.rand(shape, generator=generator) * 2 - 1
        start, start_cpu = time.perf_counter(), time.process_time()
        out = loss_fn(model_fn, x, lam, generator=generator)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
    peak_rise_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return {"kernel": kernel, "lam": lam, "median_step_s": statistics.median(times), "step_s": times,
            "median_step_cpu_s": statistics.median(cpu_times),
            "peak_rss_rise_mib": peak_rise_mib, "loss_last": out.loss.item()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    base = [sys.executable, os.path.abspath(__file__), "--resolution", str(args.resolution), "--channels",
            str(args.channels), "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--threads", str(args.threads), "--block_out_channels", *map(str, args.block_out_channels),
            "--attention_levels", *map(str, args.attention_levels)]
    rows = []
    for lam in args.lams:
        for kernel in KERNELS:
            done = subprocess.run(base + ["--worker", f"{kernel}:{lam}"], env=env, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"measured {kernel} lam {lam:g}: {rows[-1]['median_step_s']:.3f} s per step "
                  f"({rows[-1]['median_step_cpu_s']:.3f} s CPU), peak RSS rise "
                  f"{rows[-1]['peak_rss_rise_mib']:.0f} MiB", flush=True)
    import torch

    size = f"{args.channels}x{args.resolution}x{args.resolution}"
    print(f"MMF training step (finite differences), {args.batch} x {size}, "
          f"UNet {tuple(args.block_out_channels)} attention levels {tuple(args.attention_levels)}, "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps after {args.warmup}")
    print(f"{'lam':>4} {'kernel':7} {'step s':>8} {'x sdpa':>7} {'CPU s':>8} {'x sdpa':>7} {'peak RSS rise MiB':>18} "
          f"{'x sdpa':>7}")
    for lam in args.lams:
        sdpa = next(r for r in rows if r["kernel"] == "sdpa" and r["lam"] == lam)
        for row in (r for r in rows if r["lam"] == lam):
            row["time_ratio_to_sdpa"] = row["median_step_s"] / sdpa["median_step_s"]
            row["cpu_ratio_to_sdpa"] = row["median_step_cpu_s"] / sdpa["median_step_cpu_s"]
            row["memory_ratio_to_sdpa"] = row["peak_rss_rise_mib"] / sdpa["peak_rss_rise_mib"]
            print(f"{lam:4g} {row['kernel']:7} {row['median_step_s']:8.3f} {row['time_ratio_to_sdpa']:7.2f} "
                  f"{row['median_step_cpu_s']:8.3f} {row['cpu_ratio_to_sdpa']:7.2f} "
                  f"{row['peak_rss_rise_mib']:18.0f} {row['memory_ratio_to_sdpa']:7.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
                       "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
