"""Training-step cost of MMF against flow matching on a DiT, with fused (SDPA) and math attention, side by side.

One `MMFDiTTransformer2DModel` (default: 32x32x4 latents, the shape of ImageNet 256 through the Stable Diffusion
VAE, patch 2 so 256 tokens, 4 layers of 4 heads x 32 channels, batch 16) and one batch per step, shared by every
configuration. Each configuration owns a copy of the same initial model and its own Adam, and times a full optimiser
step (loss, backward, Adam):

* ``flow_matching``: the same loss with every row r = t (no derivative);
* ``default``: the training script's default loss when this was measured (finite differences, model tangent read
  off the paired r = t rows, adaptive weight p = 1, lam = 0; the default p is now 0.5, which costs the same);
* ``mmf_<estimator>_lam<lam>``: the loss with the conditional tangent, ``estimator`` in {finite_difference, jvp},
  lam in {0, 1} (jvp with lam = 1 takes gradients through the tangent);
* ``forward``: one forward without gradient (the attention kernel's share at inference).

Each runs with two attention set-ups: ``sdpa``, diffusers' SDPA dispatch (the fused CPU flash kernel) for every
plain forward and the math backend only inside ``torch.func.jvp`` (which has no forward-AD formula for the fused
kernel), and ``math``, the math backend for every call. LayerNorm follows `mmf_diffusers.dit.ForwardADLayerNorm` in
both (elementary ops only under a differentiable jvp).

Timing: the configurations take turns step by step (round-robin), so a change of load on the machine hits them all
alike, and each step's time is the process's CPU time (``--clock cpu``; with ``OMP_NUM_THREADS=1`` the work of one
core) or wall time. The table gives the median per configuration and the ratio to flow matching with the same
attention; the ratios are the figures to carry to other machines.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/dit_step_cost.py [--steps 8] [--json
benchmarks/results/dit_step_cost.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmf_diffusers import ModularMeanFlowLoss, TimeSampler, build_mmf_dit, dit_model_fn

ATTENTIONS = ("sdpa", "math")
LOSSES = ("forward", "flow_matching", "default", "mmf_finite_difference_lam0", "mmf_finite_difference_lam1",
          "mmf_jvp_lam0", "mmf_jvp_lam1")


class DispatchAttnProcessor(AttnProcessor2_0):
    """SDPA's own dispatch for plain forwards, the math backend (contiguous output) inside forward-mode AD; with
    ``always_math`` the math backend for every call."""

    def __init__(self, always_math: bool = False):
        super().__init__()
        self.always_math = always_math

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if not (self.always_math or torch.autograd.forward_ad._current_level >= 0):
            return super().__call__(attn, hidden_states, *args, **kwargs)
        with sdpa_kernel(SDPBackend.MATH):
            return super().__call__(attn, hidden_states, *args, **kwargs).contiguous()


def make_loss(name: str):
    """``(loss_fn, lam, every_row_r_eq_t)`` for a configuration name."""
    if name == "flow_matching":
        return ModularMeanFlowLoss(derivative="finite_difference"), 0.0, True
    if name == "default":
        sampler = TimeSampler(pair_rows=True)
        return ModularMeanFlowLoss(sampler, derivative="finite_difference", tangent="model", pair_rows=True,
                                   adaptive_p=1.0), 0.0, False
    derivative = "jvp" if name.startswith("mmf_jvp") else "finite_difference"
    lam = float(name.rsplit("_lam", 1)[1])
    return ModularMeanFlowLoss(derivative=derivative), lam, False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="Timed steps per configuration.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed steps per configuration first.")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sample_size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--patch_size", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--configs", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="Write the results here.")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 2:
        p.error("--steps must be >= 1, --warmup >= 0, --batch >= 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(args.seed)
    base = build_mmf_dit(sample_size=args.sample_size, in_channels=args.channels, patch_size=args.patch_size,
                         num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim)
    params = sum(p.numel() for p in base.parameters())
    runs = []
    for attention in args.attention:
        for name in args.configs:
            model = copy.deepcopy(base)
            for module in model.modules():
                if isinstance(module, Attention):
                    module.set_processor(DispatchAttnProcessor(always_math=attention == "math"))
            runs.append(dict(config=name, attention=attention, model=model, fn=dit_model_fn(model),
                             optimizer=torch.optim.Adam(model.parameters(), lr=1e-4), times=[]))
    shape = (args.batch, args.channels, args.sample_size, args.sample_size)

    for step in range(args.warmup + args.steps):
        g = torch.Generator().manual_seed(args.seed * 100_003 + step)
        x = torch.randn(shape, generator=g)
        for run in runs:
            name = run["config"]
            start = clock()
            if name == "forward":
                with torch.no_grad():
                    t = torch.rand(args.batch, generator=torch.Generator().manual_seed(step))
                    run["fn"](x, t, t)
            else:
                loss_fn, lam, fm = make_loss(name)
                gen = torch.Generator().manual_seed(step)
                t = r = None
                if fm:
                    t = torch.rand(args.batch, generator=gen)
                    r = t
                run["optimizer"].zero_grad(set_to_none=True)
                out = loss_fn(run["fn"], x, lam, t=t, r=r, generator=gen)
                out.loss.backward()
                run["optimizer"].step()
                if not torch.isfinite(out.loss):
                    raise RuntimeError(f"{name} ({run['attention']}): non-finite loss at step {step}")
            if step >= args.warmup:
                run["times"].append(clock() - start)

    rows = []
    for run in runs:
        median = statistics.median(run["times"])
        rows.append(dict(config=run["config"], attention=run["attention"], median_ms=round(1000 * median, 1),
                         min_ms=round(1000 * min(run["times"]), 1), steps=len(run["times"])))
    fm = {r["attention"]: r["median_ms"] for r in rows if r["config"] == "flow_matching"}
    sdpa = {r["config"]: r["median_ms"] for r in rows if r["attention"] == "sdpa"}
    for r in rows:
        if r["attention"] in fm:
            r["ratio_to_flow_matching"] = round(r["median_ms"] / fm[r["attention"]], 2)
        if r["config"] in sdpa:
            r["ratio_to_sdpa"] = round(r["median_ms"] / sdpa[r["config"]], 2)

    command = "python benchmarks/dit_step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = dict(
        command=command.strip(),
        clock=args.clock,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
        model=dict(sample_size=args.sample_size, channels=args.channels, patch_size=args.patch_size,
                   layers=args.layers, heads=args.heads, head_dim=args.head_dim, parameters=params,
                   tokens=(args.sample_size // args.patch_size) ** 2),
        batch=args.batch,
        rows=rows,
    )
    print(f"DiT: {params / 1e6:.2f}M parameters, {result['model']['tokens']} tokens, batch {args.batch}, "
          f"{args.clock} time, {result['threads']} thread(s), {args.steps} timed steps after {args.warmup}")
    print(f"| config | attention | median ms | x flow matching | x sdpa |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['attention']} | {r['median_ms']} | {r.get('ratio_to_flow_matching', '-')} | "
              f"{r.get('ratio_to_sdpa', '-')} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
