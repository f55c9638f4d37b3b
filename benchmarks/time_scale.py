"""Measure how the scale of the time inputs affects du/dt and finite differences at initialisation.

The UNet sees ``time_scale * t`` and ``time_scale * h``. For each scale this prints, on a freshly initialised
two-time UNet2DModel (28x28x1, block_out_channels (32, 64, 64), attention at the lowest level):

* ``|d_t u|``: mean magnitude of the partial time derivative (jvp with tangents (0, 1) for (z, t));
* ``|d_z u . v|``: mean magnitude of the spatial part (tangents (v, 0));
* the relative error of a forward finite difference (float32, eps in units of t) against the exact jvp.

Run: ``python benchmarks/time_scale.py [--seeds 3] [--batch 16] [--json out.json]``
"""

import argparse
import json

import torch

from mmf_diffusers import build_mmf_unet, jvp_derivative, finite_difference_derivative, unet_model_fn


def measure(scale: float, seed: int, batch: int) -> dict:
    torch.manual_seed(seed)
    unet = build_mmf_unet(sample_size=28, in_channels=1, block_out_channels=(32, 64, 64), norm_num_groups=8)
    f = unet_model_fn(unet, time_scale=scale)
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
    e = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.rand(batch, generator=g) * 0.9 + 0.05
    r = t * torch.rand(batch, generator=g)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    v = e - x
    with torch.no_grad():
        _, d_t = torch.func.jvp(lambda t_: f(z, r, t_), (t,), (torch.ones_like(t),))
        _, d_z = torch.func.jvp(lambda z_: f(z_, r, t), (z,), (v,))
        _, exact = jvp_derivative(f, z, r, t, v, create_graph=False)
        out = {"scale": scale, "seed": seed, "abs_dt_u": d_t.abs().mean().item(), "abs_dz_u_v": d_z.abs().mean().item()}
        for eps in (1e-2, 1e-3, 1e-4):
            _, fd = finite_difference_derivative(f, z, r, t, v, create_graph=False, eps=eps)
            out[f"fd_rel_err_eps{eps:g}"] = ((fd - exact).norm() / exact.norm()).item()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--seeds", type=int, default=3, help="number of random initialisations per scale")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [measure(s, seed, args.batch) for s in args.scales for seed in range(args.seeds)]
    keys = [k for k in rows[0] if k not in ("scale", "seed")]
    print("| time_scale | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (len(keys) + 1))
    for s in args.scales:
        sel = [row for row in rows if row["scale"] == s]
        means = [sum(row[k] for row in sel) / len(sel) for k in keys]
        print(f"| {s:g} | " + " | ".join(f"{m:.3g}" for m in means) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
