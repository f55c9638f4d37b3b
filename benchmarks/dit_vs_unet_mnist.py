"""A small DiT against the UNet of a similar parameter count on class-conditional MNIST, at equal CPU time.

Both backbones train through ``training/train_mmf.py`` with the MMF loss that was the script's default when the
rows were measured (finite-difference du/dt, lam 0, adaptive weight p = 1, paired rows; p is spelled out), the same data, batch, EMA and seed; only the backbone and its size flags differ
(``MODELS``). Equal compute means equal *training CPU time*: each model first trains a short probe run whose median
CPU seconds per step set its step count (``--cpu_seconds`` / seconds per step), so the faster model takes more steps.
Each trained EMA pipeline is scored by ``mmf-evaluate`` like the shipped MNIST pipelines: FD-MNISTCNN of 1000 samples
(digits asked for in turn) against the 10k test images at 1 and 2 steps, and the MNIST classifier's accuracy on the
one-step samples (does the sample show the digit asked for).

Rows are appended to ``--json`` (default ``benchmarks/results/dit_vs_unet_mnist.json``) as they finish; a row already
there is skipped. ``--table`` prints the table and trains nothing. Needs real MNIST (``MMF_MNIST_PATH``, see README).

    OMP_NUM_THREADS=1 nice -n 19 nohup python benchmarks/dit_vs_unet_mnist.py --workdir /work/dit-vs-unet \\
        > /work/dit-vs-unet.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "dit_vs_unet_mnist.json")

#: Backbone flags. The UNet is the one of the MNIST defaults study (16, 32, 32); the DiT is sized to about the same
#: number of parameters (width 64 = 4 heads x 16, 3 blocks, 2x2 patches: 196 tokens at 28x28).
MODELS: Dict[str, List[str]] = {
    "unet": ["--block_out_channels", "16", "32", "32"],
    "dit": ["--backbone", "dit", "--dit_layers", "3", "--dit_heads", "4", "--dit_head_dim", "16", "--patch_size", "2"],
    "dit, lr 3e-4": ["--backbone", "dit", "--dit_layers", "3", "--dit_heads", "4", "--dit_head_dim", "16",
                     "--patch_size", "2", "--learning_rate", "3e-4"],
    # 4x4 patches: 49 tokens, so a step costs less and the same CPU time buys more of them
    "dit, patch 4": ["--backbone", "dit", "--dit_layers", "3", "--dit_heads", "4", "--dit_head_dim", "16",
                     "--patch_size", "4"],
}
COMMON = ["--dataset_name", "mnist-offline", "--resolution", "28", "--class_conditional", "--label_dropout", "0.1",
          "--train_batch_size", "32", "--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup",
          "--lr_warmup_steps", "50", "--use_ema", "--ema_max_decay", "0.999", "--num_sample_images", "10",
          "--logger", "none", "--adaptive_p", "1"]
PROBE_STEPS = 40


def parameter_count(pipeline: str) -> int:
    from mmf_diffusers import MMFPipeline

    pipe = MMFPipeline.from_pretrained(pipeline)
    modules = [pipe.backbone] + ([pipe.conditioner] if getattr(pipe, "conditioner", None) is not None else [])
    return sum(p.numel() for m in modules for p in m.parameters())


def train(flags: List[str], out: str, steps: int, seed: int, env) -> List[float]:
    """Train to ``out`` (from scratch); returns the CPU seconds of each step from the run's log."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    cmd = [sys.executable, os.path.join(ROOT, "training", "train_mmf.py"), *COMMON, *flags,
           "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps), "--save_images_steps",
           str(10 * steps), "--seed", str(seed), "--output_dir", out]
    with open(out + ".log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=log)
    with open(os.path.join(out, "logs", "train_log.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [r["step_cpu_s"] for r in records if "step_cpu_s" in r]


def evaluate(out: str, env) -> Dict:
    path = os.path.join(out, "evaluation.json")
    cmd = [sys.executable, "-m", "mmf_diffusers.evaluation", "--pipeline", out, "--output", path, "--metric",
           "fd-mnistcnn", "class-accuracy", "--reference", "mnist-test", "--num-images", "1000", "--steps", "1", "2",
           "--class-labels", "cycle"]
    with open(out + "-evaluation.log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=log)
    with open(path, encoding="utf-8") as f:
        rows = {row["steps"]: row for row in json.load(f)["rows"]}
    return {"fd_1step": rows[1]["fd-mnistcnn"], "fd_2step": rows[2]["fd-mnistcnn"],
            "accuracy_1step": rows[1]["class-accuracy"], "accuracy_2step": rows[2]["class-accuracy"]}


def load(path: str) -> Dict:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {"rows": []}


def table(result: Dict) -> str:
    lines = ["| model | parameters | steps | train CPU s | CPU s/step | FD 1 step | FD 2 steps | accuracy 1 step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} (seed {r['seed']}) | {r['parameters'] / 1e3:.0f}k | {r['steps']} | "
                     f"{r['train_cpu_s']:.0f} | {r['median_step_cpu_s']:.3f} | {r['fd_1step']:.1f} | "
                     f"{r['fd_2step']:.1f} | {r['accuracy_1step']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cpu_seconds", type=float, default=600.0, help="training CPU time of every model")
    parser.add_argument("--workdir", default="/tmp/dit-vs-unet", help="run folders (keep it outside the repository)")
    parser.add_argument("--json", default=DEFAULT_JSON)
    parser.add_argument("--table", action="store_true", help="print the table of --json and train nothing")
    args = parser.parse_args(argv)
    result = load(args.json)
    if args.table:
        print(table(result))
        return
    if not os.environ.get("MMF_MNIST_PATH"):
        parser.error("set MMF_MNIST_PATH to the real MNIST (see README)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    os.makedirs(args.workdir, exist_ok=True)
    for seed in args.seeds:
        for name in args.models:
            if any(r["model"] == name and r["seed"] == seed and r["cpu_seconds"] == args.cpu_seconds
                   for r in result["rows"]):
                continue
            slug = name.replace(", ", "-").replace(" ", "")
            probe = train(MODELS[name], os.path.join(args.workdir, f"probe-{slug}"), PROBE_STEPS, seed, env)
            per_step = statistics.median(probe[10:])
            steps = max(100, int(args.cpu_seconds / per_step))
            out = os.path.join(args.workdir, f"{slug}-seed{seed}")
            start = time.time()
            cpu = train(MODELS[name], out, steps, seed, env)
            row = {"model": name, "seed": seed, "cpu_seconds": args.cpu_seconds, "flags": " ".join(MODELS[name]),
                   "parameters": parameter_count(out), "probe_step_cpu_s": per_step, "steps": steps,
                   "train_cpu_s": sum(cpu), "median_step_cpu_s": statistics.median(cpu[10:] or cpu),
                   "train_wall_s": round(time.time() - start, 1), **evaluate(out, env),
                   "machine": platform.processor() or platform.machine(), "threads": 1,
                   "command": " ".join(["python", "benchmarks/dit_vs_unet_mnist.py", *(argv or sys.argv[1:])])}
            result = load(args.json)
            result["rows"].append(row)
            result["common_flags"] = " ".join(COMMON)
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
            print(table(result), flush=True)


if __name__ == "__main__":
    main()
