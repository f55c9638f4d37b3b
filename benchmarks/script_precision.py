#!/usr/bin/env python
"""Step 1 of training/train_mmf.py in bf16 and fp16 against float32: loss, mean |du/dt| and gradient norm, read from
logs/train_log.jsonl of runs with the same seed (same images, times and noise).

    OMP_NUM_THREADS=1 python benchmarks/script_precision.py [--resolution 16 --channels 16 32] [--json FILE]

Each run is the script's ``main`` in this process (accelerate's state reset between runs): UNet (16, 32) at 16x16 on
scikit-learn's digits, batch 16, 25% of rows with r != t, the model tangent; paired and unpaired rows, both
estimators, lam 0 and 1. accelerate has no fp16 autocast on a CPU (the script says so and runs float32); on a CPU
this benchmark gives the Accelerator what accelerate gives a GPU under fp16 (autocast in fp16 and a GradScaler) so
that the fp16 row measures fp16. CPU fp16 kernels are slow: expect minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "training"))

KEYS = ("loss", "mean_abs_dudt", "grad_norm")


def give_cpu_fp16_autocast():
    import torch
    from accelerate import Accelerator

    original = Accelerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu")

    Accelerator.__init__ = init


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)

    import train_mmf
    from accelerate.state import AcceleratorState

    give_cpu_fp16_autocast()
    common = ["--dataset_name", "sklearn-digits", "--resolution", str(args.resolution), "--block_out_channels",
              *map(str, args.channels), "--train_batch_size", str(args.batch), "--max_train_steps", "1",
              "--lr_warmup_steps", "0", "--seed", "0", "--logger", "none", "--num_sample_images", "4"]
    cases = [(d, pair, lam) for d in ("finite_difference", "jvp") for pair in (1, 0) for lam in (0, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for derivative, pair, lam in cases:
            flags = ["--derivative", derivative, "--pair_rows", str(pair), "--lam_end", str(lam)]
            figures = {}
            for precision in ["no", *args.precisions]:
                out = os.path.join(work, f"{derivative}-{pair}-{lam}-{precision}")
                AcceleratorState._reset_state(True)
                code = train_mmf.main([*common, *flags, "--mixed_precision", precision, "--output_dir", out])
                if code:
                    return code
                with open(os.path.join(out, "logs", "train_log.jsonl")) as f:
                    record = next(json.loads(line) for line in f if '"step"' in line)
                figures[precision] = {k: record[k] for k in KEYS}
            for precision in args.precisions:
                rel = {k: figures[precision][k] / figures["no"][k] - 1 for k in KEYS}
                rows.append({"derivative": derivative, "pair_rows": pair, "lam": lam, "precision": precision,
                             "float32": figures["no"], "low": figures[precision], "relative": rel})
    print(f"\nStep 1 of train_mmf.py, UNet {tuple(args.channels)} at {args.resolution}x{args.resolution}, batch "
          f"{args.batch}: low precision (float32) and the relative difference")
    print(f"{'derivative':18} {'pair':>4} {'lam':>3} {'prec':5} {'loss':>22} {'mean |du/dt|':>24} {'grad norm':>22}")
    for row in rows:
        cells = [f"{row['low'][k]:.4f} ({row['float32'][k]:.4f}) {row['relative'][k]:+.2%}" for k in KEYS]
        print(f"{row['derivative']:18} {row['pair_rows']:4d} {row['lam']:3d} {row['precision']:5} " + " ".join(
            f"{c:>22}" for c in cells))
    worst = max(abs(v) for row in rows for v in row["relative"].values())
    print(f"Largest relative difference: {worst:.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
