"""The MMF benchmark suite: every figure a ratio or a comparison measured side by side in one run.

Benchmarks (``--only`` picks some):

* ``training_cost``: `benchmarks/step_cost.py` (MMF training step against flow matching, UNet at MNIST size);
* ``sampling``: images/s of `MMFPipeline` against a bare UNet forward and Euler sampling (`sampling_speed.py`);
* ``quality``: checkerboard sliced Wasserstein against NFE, MMF against Euler, same training budget
  (`checkerboard.quality_vs_nfe`);
* ``curriculum``: lam constant 0 / constant 1 / linear / cosine warmup, conditional and model tangents, several seeds
  and learning rates (`checkerboard.curriculum`);
* ``low_data_shift``: MMF trained on 1%, 10% and 100% of MNIST and on a stroke-thickness split, quality and the
  train/test gap (`benchmarks/low_data.py`). Its full run took 36 minutes on one core; the four benchmarks above
  already take about 26 of this suite's 30 minutes, so the default suite runs ``low_data.py --quick`` (about a minute;
  tiny models, the numbers only show that the benchmark works) and ``--quick`` reads the committed
  ``results/low_data.json`` of the full run;
  ``--low_data quick|committed`` picks either. The output says which.

Writes ``<out>/suite.json`` (with the exact command) and ``<out>/<benchmark>.png`` (matplotlib, if installed), prints
a markdown table per benchmark. Runs on one thread per process (``torch.set_num_threads(1)``).

Run: ``python benchmarks/run.py [--quick] [--only NAME ...] [--out benchmarks/results]``
(``--quick``: a few minutes; default: under 30 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import fmt, pyplot, table  # noqa: E402  (benchmarks/ is on the path from here on)

BENCHMARKS = ("training_cost", "sampling", "quality", "curriculum", "low_data_shift")

# Sizes: (quick, full). Any explicit flag overrides both.
PRESETS = {
    "cost_steps": (2, 10), "cost_warmup": (1, 2),
    "cost_configs": (["flow_matching", "mmf_jvp_lam0", "mmf_jvp_lam1"], None),
    "sampling_rounds": (2, 5),
    "quality_steps": (1000, 4000),
    "curriculum_steps": (600, 1500), "seeds": (1, 3),
}


# ---------------------------------------------------------------- benchmarks

def bench_training_cost(args):
    """Calls step_cost.py (each configuration in its own subprocess) and reads back its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "step_cost.json")
        cmd = [sys.executable, os.path.join(HERE, "step_cost.py"), f"--steps={args.cost_steps}",
               f"--warmup={args.cost_warmup}", f"--batch={args.cost_batch}", "--threads=1", f"--json={path}",
               "--block_out_channels", *map(str, args.channels)]
        if args.cost_configs:
            cmd += ["--configs", *args.cost_configs]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(path) as fh:
            result = json.load(fh)
    result["command"] = " ".join(shlex.quote(c) for c in cmd[1:] if not c.startswith("--json"))
    for r in result["rows"]:
        r.pop("times_ms", None)
    text = table(["config", "median ms/step", "x flow matching", "peak RSS MiB"],
                 [[r["config"], r["median_ms"], r["ratio_to_flow_matching"], r["peak_rss_mib"]]
                  for r in result["rows"]])
    return result, text


def bench_sampling(args):
    from sampling_speed import sampling_speed

    result = sampling_speed(batch=args.sampling_batch, block_out_channels=args.channels, rounds=args.sampling_rounds,
                            euler_steps=args.sampling_euler_steps)
    text = table(["config", "NFE", "s/batch", "images/s", "x bare forward"],
                 [[r["config"], r["nfe"], r["median_s_per_batch"], r["images_per_s"], r["ratio_to_bare_forward"]]
                  for r in result["rows"]])
    text += (f"\nMMFPipeline 1-step overhead over a bare forward: {100 * result['pipeline_1step_overhead']:+.1f}% "
             f"(target <= 5%: {'met' if result['meets_target'] else 'NOT met'}); random weights.")
    return result, text


def bench_quality(args):
    from checkerboard import quality_vs_nfe

    result = quality_vs_nfe(steps=args.quality_steps, batch=args.toy_batch, lr=args.quality_lr, eval_n=args.eval_n,
                            euler_steps=args.quality_euler_steps)
    text = table(["sampler", "model", "NFE", "SW"], [[r["sampler"], r["model"], r["nfe"], r["sw"]]
                                                     for r in result["rows"]])
    best = result["best_multistep"]
    text += (f"\nnoise floor {fmt(result['noise_floor_sw'])}, Gaussian {fmt(result['gaussian_sw'])}. "
             f"MMF 1 step / best multi-step ({best and best['sampler']}, {best and best['model']}, NFE "
             f"{best and best['nfe']}): {fmt(result['ratio_1step_to_best_multistep'])} (target <= 1.3: "
             f"{'met' if result['meets_target'] else 'NOT met'}).")
    return result, text


def bench_curriculum(args):
    from checkerboard import curriculum

    result = curriculum(steps=args.curriculum_steps, batch=args.toy_batch, lrs=args.lrs, seeds=args.seeds,
                        eval_n=args.eval_n, workers=args.workers)

    def ms(d):
        return f"{fmt(d['mean'])} ± {fmt(d['std'], 2)}" if d["n"] else "-"

    text = table(["schedule", "tangent", "lr", "diverged", "SW 1 step, all runs", "SW 1 step", "SW 2 steps",
                  "SW Euler 64", "loss var (last 1/4)"],
                 [[s["schedule"], s["tangent"], s["lr"], f"{s['diverged']}/{s['runs']}",
                   ms(s["sw_1step_all_runs"]), ms(s["sw_1step"]),
                   ms(s["sw_2step"]), ms(s["sw_euler64"]), fmt(s["loss_var_last_quarter"]["mean"])]
                  for s in result["summary"]])
    text += (f"\nnoise floor {fmt(result['noise_floor_sw'])}, Gaussian {fmt(result['gaussian_sw'])}; mean ± std over "
             "seeds (from 'SW 1 step' on: the seeds that did not diverge).")
    return result, text


LOW_DATA_JSON = os.path.join(HERE, "results", "low_data.json")


def bench_low_data_shift(args):
    """Runs ``low_data.py --quick`` in a subprocess, or reads the committed results of its full run (see the module
    docstring for which, when)."""
    from low_data import tables

    mode = args.low_data or ("committed" if args.quick else "quick")
    if mode == "committed":
        if not os.path.isfile(LOW_DATA_JSON):
            result = {"status": "missing", "source": "committed results", "reason": f"{LOW_DATA_JSON} does not exist; "
                      "make it with `python benchmarks/low_data.py` (about 36 min on one core)"}
            return result, "not measured: " + result["reason"]
        with open(LOW_DATA_JSON) as fh:
            result = json.load(fh)
        result["source"] = ("read the committed benchmarks/results/low_data.json (its full run, "
                            f"`{result['command']}`, {result['wall_seconds'] / 60:.0f} min, started "
                            f"{result['started']}; plot benchmarks/results/low_data.png), not measured by this suite "
                            "run")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "low_data.json")
            cmd = [sys.executable, os.path.join(HERE, "low_data.py"), "--quick", "--no_plot", f"--json={path}"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(path) as fh:
                result = json.load(fh)
        result["source"] = ("ran `python benchmarks/low_data.py --quick` in this suite run (the full run, 36 min on "
                            "one core, would break the suite's 30-minute budget; its committed results are in "
                            "benchmarks/results/low_data.json). Quick sizes: tiny training, the numbers only show that "
                            "the benchmark works")
    result["status"] = "measured"
    return result, f"source: {result['source']}\n" + tables(result)


# ---------------------------------------------------------------- plots (matplotlib is optional)

def plot(name, result, out):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if name == "training_cost":
        rows = result["rows"]
        ax.bar([r["config"] for r in rows], [r["ratio_to_flow_matching"] for r in rows])
        ax.set_ylabel("step time / flow-matching step")
        ax.tick_params(axis="x", rotation=30)
    elif name == "sampling":
        for prefix, label in (("mmf_pipeline", "MMFPipeline"), ("euler", "Euler on u(z, t, t)")):
            rows = [r for r in result["rows"] if r["config"].startswith(prefix)]
            ax.plot([r["nfe"] for r in rows], [r["images_per_s"] for r in rows], "o-", label=label)
        bare = next(r for r in result["rows"] if r["config"] == "bare_unet_forward")
        ax.axhline(bare["images_per_s"], ls="--", c="k", label="bare UNet forward")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("images / s")
        ax.legend()
    elif name == "quality":
        for sampler, model, label in (("mmf_average_velocity", "mmf", "MMF, average velocity"),
                                      ("euler_instantaneous", "mmf", "Euler on MMF's u(z, t, t)"),
                                      ("euler_instantaneous", "flow_matching", "Euler, flow-matching model")):
            rows = [r for r in result["rows"] if r["sampler"] == sampler and r["model"] == model]
            ax.plot([r["nfe"] for r in rows], [r["sw"] for r in rows], "o-", label=label)
        ax.axhline(result["noise_floor_sw"], ls=":", c="gray", label="noise floor")
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("sliced W2 (lower is better)")
        ax.legend()
    elif name == "curriculum":
        summary = result["summary"]
        labels = [f"{s['schedule']}\n{s['tangent'][:4]} lr={s['lr']:g}" for s in summary]
        means = [s["sw_1step"]["mean"] for s in summary]
        stds = [s["sw_1step"]["std"] for s in summary]
        colors = ["C0" if s["tangent"] == "conditional" else "C1" for s in summary]
        ax.bar(range(len(summary)), means, yerr=stds, color=colors)
        for i, s in enumerate(summary):
            if s["diverged"]:
                ax.text(i, 0, f"{s['diverged']} div", ha="center", va="bottom", fontsize=6, color="r", rotation=90)
        ax.axhline(result["noise_floor_sw"], ls=":", c="gray")
        ax.set_xticks(range(len(summary)), labels, fontsize=5, rotation=90)
        ax.set_ylabel("one-step sliced W2 (non-diverged seeds)")
        ax.set_title("blue: conditional tangent, orange: model tangent", fontsize=8)
    else:
        plt.close(fig)
        return None
    fig.tight_layout()
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for suite.json and the plots")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64], help="UNet block_out_channels")
    p.add_argument("--cost_steps", type=int, help="timed steps per training-cost configuration")
    p.add_argument("--cost_warmup", type=int, help="untimed steps per training-cost configuration")
    p.add_argument("--cost_batch", type=int, default=64)
    p.add_argument("--cost_configs", nargs="+", help="step_cost.py configurations (default quick: 3, full: all)")
    p.add_argument("--sampling_batch", type=int, default=64)
    p.add_argument("--sampling_rounds", type=int, help="timed rounds per sampling entry")
    p.add_argument("--sampling_euler_steps", type=int, nargs="+", default=[2, 4, 8, 16, 50])
    p.add_argument("--toy_batch", type=int, default=1024, help="checkerboard training batch")
    p.add_argument("--eval_n", type=int, default=8192, help="checkerboard points scored per model")
    p.add_argument("--quality_steps", type=int, help="Adam steps per model in the quality benchmark")
    p.add_argument("--quality_lr", type=float, default=1e-3)
    p.add_argument("--quality_euler_steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 100])
    p.add_argument("--curriculum_steps", type=int, help="Adam steps per curriculum run")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="curriculum learning rates")
    p.add_argument("--seeds", type=int, help="curriculum seeds per configuration")
    p.add_argument("--workers", type=int, default=2, help="curriculum runs in parallel (one thread each)")
    p.add_argument("--low_data", choices=("quick", "committed"),
                   help="low_data_shift: run low_data.py --quick, or read the committed results/low_data.json "
                        "(default: quick in the default suite, committed with --quick)")
    args = p.parse_args(argv)
    for key, (quick, full) in PRESETS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv=None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    suite = {"command": command, "args": vars(args), "torch": torch.__version__, "threads": 1,
             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "benchmarks": {}}
    path = os.path.join(args.out, "suite.json")
    for name in [b for b in BENCHMARKS if b in args.only]:
        start = time.perf_counter()
        result, text = globals()[f"bench_{name}"](args)
        result["seconds"] = time.perf_counter() - start
        if not args.no_plots:
            png = plot(name, result, args.out)
            if png:
                result["plot"] = os.path.relpath(png, args.out)
        suite["benchmarks"][name] = result
        print(f"\n## {name} ({result['seconds']:.0f} s)\n{text}", flush=True)
        with open(path, "w") as fh:  # rewritten after every benchmark, so a long run keeps what it finished
            json.dump(suite, fh, indent=1, default=float)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
