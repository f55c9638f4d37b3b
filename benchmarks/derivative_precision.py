"""How exact is du/dt, and one training step, in mixed precision?

Two tables, for one fresh UNet2DModel (default: 28x28x1, block_out_channels (32, 64, 64), attention at the lowest
level) and one batch with 25% of rows r != t, times from the training script's logit-normal(-0.4, 1):

1. **du/dt against the float32 jvp** (the exact total derivative along the model tangent ``u(z_t, t, t)``): the
   relative error ``mean |d - d_ref| / mean |d_ref|`` of

   * ``jvp`` and ``finite_difference`` as `ModularMeanFlowLoss` computes them under autocast: in float32 with
     autocast off, while the rest of the step runs in low precision;
   * the naive alternative, a finite difference whose two forwards run *inside* autocast (what the loss did
     before), at eps 1e-3 and 5e-2: the difference of two low-precision outputs is mostly rounding noise.

2. **One training step**: loss, mean |du/dt| and gradient norm under bf16 and fp16 autocast against float32 (same
   weights, data, times and noise), at lam = 0 and lam = 1, for both estimators.

Run: ``python benchmarks/derivative_precision.py [--device cpu|cuda] [--json out.json]``.
Conventions: ``t = 0`` data, ``t = 1`` noise, ``0 <= r <= t <= 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from mmf_diffusers import ModularMeanFlowLoss, TimeSampler, build_mmf_unet, unet_model_fn
from mmf_diffusers.derivatives import finite_difference_derivative, jvp_derivative

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return ((estimate.float() - reference).abs().mean() / reference.abs().mean()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=28)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("derivative_precision.py: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=args.resolution, in_channels=1,
                          block_out_channels=tuple(args.block_out_channels)).to(device)
    model_fn = unet_model_fn(unet)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.resolution, args.resolution)
    x = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    t, r = TimeSampler("logit_normal", -0.4, 1.0, r_neq_t_fraction=0.25)(args.batch, generator=g)
    t, r = t.to(device), r.to(device)
    results = {"args": vars(args), "dudt_error": [], "step": []}

    # 1. du/dt on the rows with r != t, along the model tangent, against the float32 jvp
    d = (t > r).nonzero().squeeze(1)
    tb = t.view(-1, 1, 1, 1)
    z = ((1 - tb) * x + tb * noise)[d]
    with torch.no_grad():
        tangent = model_fn(z, t[d], t[d])
    _, reference = jvp_derivative(model_fn, z, r[d], t[d], tangent, create_graph=False)
    rows = [("float32", "jvp (reference)", 0.0)]
    for precision, dtype in PRECISIONS.items():
        autocast = torch.autocast(device.type, dtype=dtype)
        for derivative in ("jvp", "finite_difference"):
            loss_fn = ModularMeanFlowLoss(derivative=derivative, tangent="model")
            with autocast, torch.no_grad():
                _, dudt = loss_fn._derivative(lambda z_, r_, t_, rows: model_fn(z_, r_, t_), z, r[d], t[d],
                                              tangent, None, 0.0, None)
            rows.append((precision, f"{derivative}, float32 outside autocast (the loss)",
                         relative_error(dudt, reference)))
        for eps in (1e-3, 5e-2):
            with autocast, torch.no_grad():
                _, dudt = finite_difference_derivative(model_fn, z, r[d], t[d], tangent, create_graph=False, eps=eps)
            rows.append((precision, f"finite difference inside autocast, eps {eps:g}", relative_error(dudt, reference)))
    print(f"du/dt against the float32 jvp: fresh UNet {tuple(args.block_out_channels)}, {args.resolution}x"
          f"{args.resolution}x1, {d.numel()} rows with r != t, model tangent, device {device}")
    print("| precision | estimator | relative error of du/dt |")
    print("| --- | --- | --- |")
    for precision, name, error in rows:
        print(f"| {precision} | {name} | {100 * error:.2f}% |")
        results["dudt_error"].append({"precision": precision, "estimator": name, "relative_error": error})

    # 2. one training step under autocast against float32
    def one_step(derivative, lam, dtype):
        loss_fn = ModularMeanFlowLoss(derivative=derivative, tangent="model")
        unet.zero_grad(set_to_none=True)
        context = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
        with context:
            out = loss_fn(model_fn, x, lam, t=t, r=r, noise=noise)
        out.loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in unet.parameters() if p.grad is not None))
        return {"loss": out.loss.item(), "mean_abs_dudt": out.stats["mean_abs_dudt"], "grad_norm": grad_norm.item()}

    print(f"\nOne training step under autocast against float32 (batch {args.batch}, same weights, data, times, noise)")
    print("| estimator | lam | precision | loss | mean abs du/dt | grad norm |")
    print("| --- | --- | --- | --- | --- | --- |")
    for derivative in ("finite_difference", "jvp"):
        for lam in (0.0, 1.0):
            base = one_step(derivative, lam, None)
            print(f"| {derivative} | {lam:g} | float32 | {base['loss']:.5g} | {base['mean_abs_dudt']:.5g} | "
                  f"{base['grad_norm']:.5g} |")
            for precision, dtype in PRECISIONS.items():
                try:
                    res = one_step(derivative, lam, dtype)
                except RuntimeError as error:  # e.g. a kernel without low-precision support on this device
                    print(f"| {derivative} | {lam:g} | {precision} | failed: {str(error).splitlines()[0][:80]} | | |")
                    continue
                rel = {k: (res[k] - base[k]) / base[k] for k in res}
                print(f"| {derivative} | {lam:g} | {precision} | "
                      + " | ".join(f"{res[k]:.5g} ({100 * rel[k]:+.2f}%)" for k in ("loss", "mean_abs_dudt", "grad_norm"))
                      + " |")
                results["step"].append({"derivative": derivative, "lam": lam, "precision": precision,
                                        "float32": base, "low": res, "relative": rel})
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
