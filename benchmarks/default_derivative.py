"""Which derivative should the training script use by default? One-step quality on the 2-D checkerboard.

The budget of docs/design.md's table (a 4-layer MLP, batch 4096, Adam 3e-4, 6000 iterations, 25% of rows r != t,
logit-normal(-0.4, 1) times, lam rising linearly from 0 to 1 over the first third, model tangent) for each
configuration and seed; the score is the one-step sliced Wasserstein-2 distance (lower is better) on 20k points, with
the noise floor (a second exact sample) and a Gaussian beside it. CPU seconds per step are process time, so they
hold on a loaded machine.

Configurations: ``jvp`` (the previous default: exact du/dt, model tangent from an extra no-grad forward),
``fd`` (finite difference, eps 1e-3, same tangent), ``fd_paired`` (finite difference with ``pair_rows``: the model
tangent is read off flow-matching rows that share the derivative rows' x, e, t), ``fd_paired_lam0`` (the same at
lam = 0 throughout, MeanFlow's stop-gradient loss).

Run: ``OMP_NUM_THREADS=1 python benchmarks/default_derivative.py [--steps 6000] [--seeds 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkerboard import Evaluator, train  # noqa: E402

CONFIGS = {
    "jvp": dict(schedule="linear_0to1", derivative="jvp", pair_rows=False),
    "fd": dict(schedule="linear_0to1", derivative="finite_difference", pair_rows=False),
    "fd_paired": dict(schedule="linear_0to1", derivative="finite_difference", pair_rows=True),
    "fd_paired_lam0": dict(schedule="lam0", derivative="finite_difference", pair_rows=True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval_n", type=int, default=20000)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ev = Evaluator(args.eval_n)
    rows = []
    for name in args.configs:
        for seed in range(args.seeds):
            start = time.process_time()
            run = train(tangent="model", lr=args.lr, seed=seed, steps=args.steps, batch=args.batch, **CONFIGS[name])
            cpu_ms = 1000 * (time.process_time() - start) / max(1, len(run["losses"]))
            rows.append({"config": name, "seed": seed, "sw_1step": ev.mmf(run["model"], 1),
                         "sw_2step": ev.mmf(run["model"], 2), "cpu_ms_per_step": cpu_ms, "finite": run["finite"]})
            print(f"  {name} seed {seed}: 1 step {rows[-1]['sw_1step']:.4f}, 2 steps {rows[-1]['sw_2step']:.4f}, "
                  f"{cpu_ms:.1f} CPU ms/step", file=sys.stderr, flush=True)
    print(f"checkerboard, {args.steps} steps, batch {args.batch}, Adam {args.lr:g}, {args.seeds} seeds; "
          f"noise floor {ev.floor:.4f}, Gaussian {ev.gaussian:.4f}")
    print("| configuration | 1 step SW2 (mean ± std) | 2 steps | CPU ms / step |")
    print("| --- | --- | --- | --- |")
    summary = {}
    for name in args.configs:
        mine = [r for r in rows if r["config"] == name]
        one = [r["sw_1step"] for r in mine]
        two = [r["sw_2step"] for r in mine]
        ms = statistics.median(r["cpu_ms_per_step"] for r in mine)
        std = statistics.stdev(one) if len(one) > 1 else 0.0
        summary[name] = {"sw_1step_mean": statistics.mean(one), "sw_1step_std": std,
                         "sw_2step_mean": statistics.mean(two), "cpu_ms_per_step": ms}
        print(f"| {name} | {statistics.mean(one):.4f} ± {std:.4f} | {statistics.mean(two):.4f} | {ms:.1f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "noise_floor": ev.floor, "gaussian": ev.gaussian, "rows": rows,
                       "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
