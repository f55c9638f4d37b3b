"""Training-step cost of MMF against plain flow matching, measured side by side in one run.

For one UNet2DModel and batch (default: 28x28x1, block_out_channels (32, 64, 64), attention at the lowest
level, batch 64) this times a full optimiser step (loss, backward, Adam) for:

* ``flow_matching``: the same loss with every row r = t (no derivative);
* ``meanflow_published``: MeanFlow as published: du/dt by jvp under no_grad over the *whole* batch, then a
  separate forward + backward (``r_neq_t_fraction`` rows have r != t, the rest r = t, as in the paper);
* ``mmf_<estimator>_lam<lam>``: our loss, which takes the derivative on the r != t rows only, for
  ``estimator`` in {jvp, finite_difference} and lam in {0, 1};
* ``default``: the training script's default loss after its lam warm-up, if any (read from ``train_mmf.py``'s
  parser: derivative, tangent, ``--pair_rows``, adaptive weight, lam = ``--lam_end``);
* ``mmf_<estimator>_lam<lam>_model[_paired]``: with the model tangent ``u(z, t, t)`` from an extra no-grad forward,
  or read off the flow-matching rows (``pair_rows``);
* ``mmf_jvp_lam0_labels``: the same UNet made class-conditional (`add_class_conditioning`, 10 classes, 10% of labels
  dropped), no guidance; ``mmf_jvp_lam0_cfg``: plus MeanFlow's training-time guidance (``w = 1, kappa = 0.5``):
  two more no-grad forwards, ``u(z, t, t | c)`` and ``u(z, t, t | none)``, on the labelled rows;
* ``mnist_cond_mmf`` / ``mnist_cond_flow_matching``: the losses of the two MNIST runs of the flow-matching comparison
  (runs/mmf-mnist-cond and runs/fm-mnist-cond: labels, guidance w = 1 / kappa = 0.5, finite differences, model
  tangent, rows not paired, lam = 1; flow matching with every row r = t).

Each configuration runs in its own subprocess (so that peak memory, the max RSS, is its own), after warm-up
steps, and the table gives the median step time, the ratio to flow matching, and the peak RSS. Step time is the
process's CPU time by default (``--clock cpu``: other jobs on the machine barely change it, so ratios measured one
after the other stay side by side; with ``--threads 1`` it is the work of one core) or wall time (``--clock wall``).

Run: ``python benchmarks/step_cost.py [--steps 10] [--batch 64] [--json benchmarks/results/step_cost.json]``
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

CONFIGS = [
    "flow_matching",
    "default",
    "meanflow_published",
    "mmf_jvp_lam0",
    "mmf_jvp_lam1",
    "mmf_finite_difference_lam0",
    "mmf_finite_difference_lam1",
    "mmf_jvp_lam1_model",
    "mmf_finite_difference_lam1_model",
    "mmf_finite_difference_lam0_model",
    "mmf_finite_difference_lam1_model_paired",
    "mmf_finite_difference_lam0_model_paired",
    "mmf_jvp_lam0_labels",
    "mmf_jvp_lam0_cfg",
    "mnist_cond_flow_matching",
    "mnist_cond_mmf",
]


def training_defaults():
    """The training script's default configuration (its parser's defaults)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "training"))
    import train_mmf

    return train_mmf.parse_args(["--dataset_name", "sklearn-digits"])


def run_one(name: str, args) -> dict:
    import torch

    from mmf_diffusers import ModularMeanFlowLoss, TimeSampler, add_class_conditioning, build_mmf_unet, unet_model_fn
    from mmf_diffusers.derivatives import jvp_derivative

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_mmf_unet(
        sample_size=args.resolution, in_channels=1, block_out_channels=tuple(args.block_out_channels)
    )
    params = list(unet.parameters())
    conditional = name.endswith(("_labels", "_cfg")) or name.startswith("mnist_cond_")
    if conditional:
        unet, conditioner = add_class_conditioning(unet, 10)
        params = list(unet.parameters()) + list(conditioner.parameters())
        model_fn = unet_model_fn(unet, conditioner=conditioner)
    else:
        model_fn = unet_model_fn(unet)
    optimizer = torch.optim.Adam(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    fraction = 0.0 if name in ("flow_matching", "mnist_cond_flow_matching") else args.r_neq_t_fraction
    sampler = TimeSampler("logit_normal", -0.4, 1.0, r_neq_t_fraction=fraction)

    if conditional:
        if name.startswith("mnist_cond_"):
            # the two MNIST runs of the flow-matching comparison (runs/fm-mnist-cond, runs/mmf-mnist-cond): guidance
            # built in, finite differences, model tangent, rows not paired, lam = 1 (flow matching: every row r = t)
            loss_fn = ModularMeanFlowLoss(sampler, derivative="finite_difference", tangent="model", guidance_w=1.0,
                                          guidance_kappa=0.5)
            lam = 1.0
        else:
            loss_fn = ModularMeanFlowLoss(sampler, guidance_w=1.0,
                                          guidance_kappa=0.5 if name.endswith("_cfg") else 0.0)
            lam = 0.0

        def step(x):
            labels = torch.randint(0, 10, (x.shape[0],), generator=g)
            labels = labels.masked_fill(torch.rand(x.shape[0], generator=g) < 0.1, 10)
            return loss_fn(model_fn, x, lam, generator=g, class_labels=labels, null_label=10).loss

    elif name == "default":
        defaults = training_defaults()
        sampler = TimeSampler("logit_normal", defaults.time_mean, defaults.time_std,
                              r_neq_t_fraction=defaults.r_neq_t_fraction, pair_rows=bool(defaults.pair_rows))
        loss_fn = ModularMeanFlowLoss(sampler, derivative=defaults.derivative, fd_eps=defaults.fd_eps,
                                      tangent=defaults.tangent, pair_rows=bool(defaults.pair_rows),
                                      adaptive_p=defaults.adaptive_p, adaptive_c=defaults.adaptive_c)
        lam = defaults.lam_end

        def step(x):
            return loss_fn(model_fn, x, lam, generator=g).loss

    elif name.startswith("mmf_"):
        estimator, rest = name[4:].split("_lam", 1)
        lam, *options = rest.split("_")
        sampler = TimeSampler("logit_normal", -0.4, 1.0, r_neq_t_fraction=fraction, pair_rows="paired" in options)
        loss_fn = ModularMeanFlowLoss(sampler, derivative=estimator,
                                      tangent="model" if "model" in options else "conditional",
                                      pair_rows="paired" in options)
        lam = float(lam)

        def step(x):
            return loss_fn(model_fn, x, lam, generator=g).loss

    elif name == "flow_matching":
        loss_fn = ModularMeanFlowLoss(sampler)

        def step(x):
            return loss_fn(model_fn, x, 0.0, generator=g).loss

    else:  # meanflow_published: derivative on every row, then a separate forward for the gradient

        def step(x):
            t, r = sampler(x.shape[0], generator=g)
            e = torch.randn(x.shape, generator=g)
            tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
            z = (1 - tb) * x + tb * e
            v = e - x
            _, dudt = jvp_derivative(model_fn, z, r, t, v, create_graph=False)
            target = v - (tb - rb) * dudt
            return (model_fn(z, r, t) - target).pow(2).mean()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = []
    for i in range(args.warmup + args.steps):
        x = torch.rand(args.batch, 1, args.resolution, args.resolution, generator=g) * 2 - 1
        start = clock()
        loss = step(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= args.warmup:
            times.append(clock() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": name, "median_ms": 1000 * statistics.median(times), "times_ms": [1000 * s for s in times],
            "peak_rss_mib": peak_kib / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=28)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--r_neq_t_fraction", type=float, default=0.25, help="rows with r != t (paper: 0.25)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the process's CPU time (robust to other jobs); wall: elapsed time")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._one:
        print(json.dumps(run_one(args._one, args)))
        return

    # Every flag but --json and --configs goes to the per-configuration subprocesses.
    passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}",
                   f"--resolution={args.resolution}", f"--r_neq_t_fraction={args.r_neq_t_fraction}",
                   f"--threads={args.threads}", f"--clock={args.clock}", "--block_out_channels", *map(str, args.block_out_channels)]
    rows = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--_one", name] + passthrough
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]['median_ms']:.0f} ms", file=sys.stderr)
    base = next((r["median_ms"] for r in rows if r["config"] == "flow_matching"), None)
    print(f"batch {args.batch}, {args.resolution}x{args.resolution}x1, UNet {tuple(args.block_out_channels)}, "
          f"r != t on {args.r_neq_t_fraction:.0%} of rows, {args.threads} threads, {args.steps} timed steps, "
          f"{args.clock} time")
    print("| config | median ms/step | x flow matching | peak RSS MiB |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['median_ms'] / base:.2f}" if base else "-"
        r["ratio_to_flow_matching"] = r["median_ms"] / base if base else None
        print(f"| {r['config']} | {r['median_ms']:.0f} | {ratio} | {r['peak_rss_mib']:.0f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
