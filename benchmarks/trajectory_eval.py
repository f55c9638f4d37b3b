#!/usr/bin/env python
"""One-step MMF against multi-step Euler on the same trajectory model, in and out of the training range.

    python benchmarks/trajectory_eval.py --pipeline pipelines/mmf-pendulum [--num 512] [--seed 0]

For a pipeline trained on a simulated system (``train_mmf.py --modality trajectory``), it draws held-out ground-truth
trajectories from the training range of initial states and from the out-of-range box (`mmf_diffusers.trajectories`)
and prints, per sampler:
    * SW: sliced Wasserstein-2 between generated and ground-truth trajectories (per-channel normalised with the
      pipeline's statistics, flattened; lower is better). "ground truth" rows give the floor: a second ground-truth
      set of the same size (finite-sample noise).
    * residual: mean `dynamics_residual` (the trapezoidal ODE residual, damping fitted per trajectory, in units of the
      typical |ds/dt|): how physical each trajectory is; ground truth ~0.002, white noise ~9.
Unconditional generation is compared with in-range trajectories; conditional generation ("from start") gets the
start states of the held-out sets (in range / out of range) and is compared with their true trajectories (whose
damping is random, so the future is a distribution).
Samplers: MMF with 1 and 2 steps (``u(z, r, t)``, the pipeline), Euler with N steps on the instantaneous velocity
``u(z, t, t)`` of the same network.
"""

from __future__ import annotations

import argparse
import time

import torch

from mmf_diffusers import MMFTrajectoryPipeline
from mmf_diffusers.trajectories import (
    derivative_scale,
    distribution_distance,
    dynamics_residual,
    get_system,
    make_trajectories,
)


@torch.no_grad()
def euler(pipe: MMFTrajectoryPipeline, num: int, steps: int, start=None, seed: int = 0) -> torch.Tensor:
    """Euler on ``dz/dt = u(z, t, t)`` from t = 1 to 0 in ``steps`` equal steps, with the pipeline's conditioning
    (known first state, zero velocity there). Returns physical units ``(num, C, L)``."""
    channels, length = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    z = torch.randn(num, channels, length, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(num, 1, length)
    if start is not None:
        mask[:, :, 0] = 1
        z[:, :, 0] = pipe.normalize(start.float())
    grid = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        t = grid[i].expand(num)
        z = z - (grid[i] - grid[i + 1]) * pipe.average_velocity(z, mask, t, t)
    x = pipe.denormalize(z)
    if start is not None:
        x[:, :, 0] = start.float()
    return x


def mmf(pipe, num, steps, start=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if start is not None:
        return pipe(start_state=start, num_inference_steps=steps, generator=generator, output_type="pt").trajectories
    return pipe(num_samples=num, num_inference_steps=steps, generator=generator, output_type="pt").trajectories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="pipelines/mmf-pendulum", help="An MMFTrajectoryPipeline folder.")
    parser.add_argument("--num", type=int, default=512, help="Trajectories per set.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the samplers' noise.")
    parser.add_argument("--euler_steps", type=int, nargs="+", default=[8, 64], help="Euler step counts.")
    args = parser.parse_args()

    torch.set_num_threads(1)
    pipe = MMFTrajectoryPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if pipe.config.system is None:
        raise SystemExit("This pipeline was not trained on a simulated system: no ground truth to compare with.")
    system = get_system(pipe.config.system)
    length = pipe.unet.config.sample_size
    mean = torch.tensor(pipe.config.channel_mean, dtype=torch.float64)
    std = torch.tensor(pipe.config.channel_std, dtype=torch.float64)
    scale = derivative_scale(system, length)
    # Held-out sets (seeds far from the training script's --seed).
    truth = {"in range": make_trajectories(system, args.num, length, "train", seed=10_001),
             "out of range": make_trajectories(system, args.num, length, "ood", seed=10_002)}
    floor = make_trajectories(system, args.num, length, "train", seed=10_003)
    floor_cond = {key: make_trajectories(system, args.num, length, seed=10_005, initial_states=truth[key][:, :, 0])
                  for key in truth}

    samplers = [("MMF 1 step", lambda s: mmf(pipe, args.num, 1, s, args.seed)),
                ("MMF 2 steps", lambda s: mmf(pipe, args.num, 2, s, args.seed))]
    samplers += [(f"Euler {n} steps on u(z,t,t)", (lambda n: lambda s: euler(pipe, args.num, n, s, args.seed))(n))
                 for n in args.euler_steps]

    def row(name, x, reference, seconds=None):
        sw = distribution_distance(x, reference, mean, std)
        res = dynamics_residual(system, x, scale).mean().item()
        timing = f" | {seconds:.2f}" if seconds is not None else " | -"
        print(f"| {name} | {sw:.3f} | {res:.4f}{timing} |")

    print(f"pipeline {args.pipeline}: {system.name}, {pipe.unet.config.in_channels} x {length}, "
          f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M parameters; {args.num} trajectories per set\n")
    print("Unconditional, against held-out in-range trajectories\n")
    print("| sampler | SW | residual | seconds |\n| --- | --- | --- | --- |")
    row("ground truth (floor)", floor, truth["in range"])
    for name, sample in samplers:
        start = time.perf_counter()
        x = sample(None)
        row(name, x, truth["in range"], time.perf_counter() - start)
    for key in truth:
        starts = truth[key][:, :, 0]
        print(f"\nFrom the start states of the held-out {key} set, against their true trajectories\n")
        print("| sampler | SW | residual | seconds |\n| --- | --- | --- | --- |")
        row("ground truth, other damping (floor)", floor_cond[key], truth[key])
        for name, sample in samplers:
            start = time.perf_counter()
            x = sample(starts)
            assert torch.equal(x[:, :, 0], starts.float())
            row(name, x, truth[key], time.perf_counter() - start)


if __name__ == "__main__":
    main()
