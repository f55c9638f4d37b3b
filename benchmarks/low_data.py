"""Low data and distribution shift: one MMF recipe trained on 1%, 10% and 100% of MNIST and on a
stroke-thickness split, scored for quality and for the train/test gap, every figure measured side by side in one run.

Conventions: ``t = 0`` data, ``t = 1`` noise, ``z_t = (1 - t) x + t e``; the UNet predicts the average velocity
``u(z_t, r, t)`` and one step is ``x = z_1 - u(z_1, 0, 1)`` (`MMFPipeline`, 1 and 2 steps).

Models (one recipe, one seed, the same number of optimiser steps and batch size for all, so a small training set is
seen many more times: that is the point):

* ``mnist_1pct`` / ``mnist_10pct`` / ``mnist_100pct``: a fixed random 500 / 5000 / 50000 images of the MNIST "train"
  split (50k; `offline_data.load_mnist`). The subsets are nested (the 500 are the first 500 of the 5000), drawn by
  ``default_rng(seed)``.
* ``thin_half``: the thin-stroke half of MNIST train (the shifted split, below).

Recipe: ``build_mmf_unet(block_out_channels=(16, 32, 32))`` (attention on the 7x7 level, 285k parameters), batch 32,
1600 steps per model (the full run: four models at about 0.32 s/step on one core of this machine, 36 minutes in
all; at equal compute, a pilot on all of MNIST scored one-step FD-MNISTCNN 289 with batch 32 x 800 steps against 333
with batch 64 x 400 steps, hence batch 32), learning rate 1e-3, `ModularMeanFlowLoss` with
``derivative="finite_difference"`` (cheaper than jvp on this CPU: both are timed at the start of every run,
``derivative_cost`` in the JSON), ``tangent="model"``, logit-normal(-0.4, 1) times with 25% of rows ``r != t``; lam
linear 0 -> 1 over the first third (`LambdaSchedule`); AdamW (betas 0.95/0.999, weight decay 1e-6, as
training/train_mmf.py) with a linear learning-rate warmup over the first 5% of steps, gradient norm clipped at 1; the
models are scored with EMA weights (diffusers' `EMAModel`, warmup decay ``1 - (1 + step)^-3/4`` capped at 0.999, as
training/train_mmf.py's ``--use_ema``). Every model draws the same times and noise at the same step (one generator
seed), and every model is sampled from the same initial noise.

The shifted split (stroke thickness). Within each digit class, an MNIST image's mean intensity ("ink") measures mostly
how thick its strokes are (the strokes of one digit have about the same length; the digits are size-normalised to a
20x20 box). Thresholds are the per-class medians of ink over MNIST train; an image is *thin* when its ink is below
its class's threshold, *thick* otherwise, in every split (train, validation, test) with the same thresholds. Ranking
within a class rather than over all of MNIST keeps the class proportions of both halves the same (a global ink
ranking would put most 1s in the thin half and turn the split into a change of digit frequencies); what moves is a
nuisance attribute, stroke width, which is the covariate shift a generative model meets when the writers or the pen
change. ``thin_half`` trains on the thin half of train; it is scored against thin test images (in distribution) and
thick test images (shifted), next to ``mnist_100pct`` scored the same way, and next to real images (thin train, all
train) scored the same way, which shows how far apart the two halves are for a perfect model.

Metrics (lower FD is better; images quantised to 8 bits like a saved PNG, `evaluation.quantize_to_uint8`):

* **FD-MNISTCNN**: the Frechet distance on the 128 penultimate features of the package's MNIST classifier
  (`evaluation.MNISTCNNFeatures`, the features `mmf-evaluate --metric fd-mnistcnn` uses; 99.12% test accuracy).
  Quality: ``num_gen`` samples against ``num_gen`` MNIST test images. Small sets bias FD upwards, so only numbers with
  the same set sizes are compared, and the **noise floor** (FD between two disjoint random sets of real test images,
  same sizes) is reported beside them.
* **Train/test gap** (``gap_n`` vs ``gap_n``; 500 vs 500 by default, because the 1% model has only 500 training
  images): ``FD(train) - FD(test)`` where FD(train) compares the first ``gap_n`` samples with ``gap_n`` of the model's
  own training images (for 1%: all of them) and FD(test) with ``gap_n`` held-out test images of the same distribution
  (for ``thin_half``: thin test images). A model that generalises has a gap near 0 (real held-out validation images
  give the reference, ``gap_heldout_real``); a model that reproduces its training images has FD(train) -> 0, i.e. a gap
  down to ``-FD(training images, test images)`` (``gap_memoriser``). MNIST's train and test images come from disjoint
  sets of writers, while the validation split (the last 10k of the original 60k training images) shares the training
  writers: held-out validation images are what "a new image from the training distribution" looks like, and they are
  the baseline for the gap and for the nearest-neighbour check below, not 0 and 0.5.
* **Control for the gap**: FD(train) and FD(test) depend on the two reference sets as much as on the samples (their
  spread enters the distance directly), so every model is also scored against the *same* reference pairs: the
  training images of the 1%, 10% and 100% models with the same test images (``cross`` in each row, gap and
  nearest-neighbour fraction). The 500 images of the 1% set were seen about 100 times by the 1% model, 10 times by
  the 10% model and once by the 100% model (the subsets are nested): a gap caused by memorisation grows with that
  count, a gap caused by the references is the same for every model.
* **Nearest neighbours** (the direct memorisation check): for each sample, the L2 distance in pixel space (values
  in [0, 1], 784 pixels) to its nearest image in a reference set of the model's training images and in one of
  held-out test images of the *same size* (``min(training set, test pool, nn_cap)``; nearest-neighbour distances
  shrink with the reference size). Reported: mean distances and the fraction of samples nearer to the training set
  than to the test set (about 0.5 for real held-out images, ``nn_heldout_real``; 1 for a copy machine).
* **Loss gap**: the MMF loss (unweighted, lam-independent value) on ``loss_n`` training vs ``loss_n`` held-out images,
  same times and noise for both.
* Digit classes of the samples (the classifier's predictions: entropy of the histogram, ``ln 10 = 2.303`` is
  balanced) and the mean ink of the samples against the thin/thick means.

Run (repository root): ``python benchmarks/low_data.py`` (default, 36 min on one core; writes
``benchmarks/results/low_data.json`` and ``.png``), ``--quick`` (about 2 minutes, tiny sizes, writes to the temp
folder unless ``--json`` is given). One thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from report import fmt, pyplot, table  # standard library only; run.py imports this module, not the reverse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(HERE, "results", "low_data.json")

MODELS = ("mnist_1pct", "mnist_10pct", "mnist_100pct", "thin_half")
FRACTIONS = {"mnist_1pct": 0.01, "mnist_10pct": 0.10, "mnist_100pct": 1.0}

# Sizes: (quick, full). Any explicit flag overrides both.
PRESETS = {
    "steps": (30, 1600),
    "batch": (32, 32),
    "num_gen": (200, 1000),
    "gap_n": (100, 500),
    "shift_n": (200, 1000),
    "nn_cap": (1000, 10000),
    "loss_n": (100, 500),
    "timing_steps": (1, 3),
}


# ---------------------------------------------------------------- data and the shifted split

def ink(images_u8: np.ndarray) -> np.ndarray:
    """Mean intensity in [0, 1] of uint8 images ``(N, 28, 28)``."""
    return images_u8.reshape(len(images_u8), -1).mean(1) / 255.0


def load_data(seed: int) -> Dict:
    from mmf_diffusers.offline_data import load_mnist

    d = {}
    for split in ("train", "validation", "test"):
        d[split] = load_mnist(split)
    train_x, train_y = d["train"]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train_x))
    pools = {name: np.sort(perm[:int(round(frac * len(train_x)))]) for name, frac in FRACTIONS.items()}
    # Stroke thickness: per-class median ink of MNIST train, the same thresholds for every split.
    train_ink = ink(train_x)
    thresholds = np.array([np.median(train_ink[train_y == c]) for c in range(10)])

    def thin_mask(split):
        x, y = d[split]
        return ink(x) < thresholds[y]

    masks = {split: thin_mask(split) for split in d}
    pools["thin_half"] = np.nonzero(masks["train"])[0]
    test_n = len(d["test"][0])
    data = {
        "train": d["train"], "validation": d["validation"], "test": d["test"], "pools": pools,
        "test_pools": {"all": np.arange(test_n), "thin": np.nonzero(masks["test"])[0],
                       "thick": np.nonzero(~masks["test"])[0]},
        "validation_pools": {"all": np.arange(len(d["validation"][0])), "thin": np.nonzero(masks["validation"])[0]},
        "thresholds": thresholds,
    }
    summary = {"ink_threshold_per_class": [round(float(t), 4) for t in thresholds]}
    for split in ("train", "test"):
        x, y = d[split]
        for part, mask in (("thin", masks[split]), ("thick", ~masks[split])):
            summary[f"{split}_{part}"] = {"n": int(mask.sum()), "mean_ink": float(ink(x[mask]).mean()),
                                          "class_counts": np.bincount(y[mask], minlength=10).tolist()}
    summary["train_all"] = {"n": int(len(train_x)), "mean_ink": float(train_ink.mean())}
    summary["train_subsets"] = {name: int(len(p)) for name, p in pools.items()}
    data["summary"] = summary
    return data


def subset(pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices of ``pool``, a fixed random subset (all of them, in order, when ``n >= len(pool)``)."""
    if n >= len(pool):
        return pool
    return np.sort(pool[np.random.default_rng(seed).permutation(len(pool))[:n]])


def split_two(pool: np.ndarray, n: int, seed: int):
    """Two disjoint random sets of ``n`` indices of ``pool``."""
    if 2 * n > len(pool):
        raise ValueError(f"need {2 * n} images, the pool has {len(pool)}")
    p = pool[np.random.default_rng(seed).permutation(len(pool))]
    return np.sort(p[:n]), np.sort(p[n:2 * n])


# ---------------------------------------------------------------- training

def make_loss():
    from mmf_diffusers import ModularMeanFlowLoss, TimeSampler

    return lambda derivative: ModularMeanFlowLoss(
        TimeSampler("logit_normal", -0.4, 1.0, r_neq_t_fraction=0.25), derivative=derivative, tangent="model")


def build_unet(channels, seed):
    import torch

    from mmf_diffusers import build_mmf_unet

    torch.manual_seed(seed)
    return build_mmf_unet(block_out_channels=tuple(channels))


def derivative_cost(args) -> Dict:
    """Seconds per optimiser step (loss, backward, AdamW) at lam = 1 of the training configuration, for each
    derivative estimator, after one untimed step; median of ``timing_steps``."""
    import statistics

    import torch

    from mmf_diffusers import unet_model_fn

    out = {}
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    for derivative in ("jvp", "finite_difference"):
        unet = build_unet(args.channels, args.seed)
        fn = unet_model_fn(unet)
        opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
        loss_fn = make_loss()(derivative)
        g = torch.Generator().manual_seed(1)
        times = []
        for i in range(args.timing_steps + 1):
            start = time.perf_counter()
            out_ = loss_fn(fn, x, 1.0, generator=g)
            opt.zero_grad(set_to_none=True)
            out_.loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - start)
        out[derivative] = statistics.median(times)
    out["jvp_over_finite_difference"] = out["jvp"] / out["finite_difference"]
    return out


def train_model(images_u8: np.ndarray, args, log) -> Dict:
    """Train one model on ``images_u8`` with the shared recipe; returns the EMA-weighted UNet and training stats."""
    import torch
    from diffusers.training_utils import EMAModel

    from mmf_diffusers import LambdaSchedule, unet_model_fn
    from mmf_diffusers.mnist_classifier import uint8_to_model_range

    unet = build_unet(args.channels, args.seed)
    unet.train()
    model_fn = unet_model_fn(unet)
    data = uint8_to_model_range(images_u8)
    loss_fn = make_loss()(args.derivative)
    schedule = LambdaSchedule("linear", lam_start=0.0, lam_end=1.0, warmup_steps=max(1, args.steps // 3))
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    warmup = max(1, args.steps // 20)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    g = torch.Generator().manual_seed(args.seed + 1)  # times and noise: the same draws for every model
    order = np.random.default_rng(args.seed + 2)  # data order: shuffled epochs
    queue: List[int] = []
    losses: List[float] = []
    finite = True
    start = time.perf_counter()
    for step in range(args.steps):
        while len(queue) < args.batch:
            queue.extend(order.permutation(len(data)).tolist())
        idx, queue = queue[:args.batch], queue[args.batch:]
        out = loss_fn(model_fn, data[idx], schedule(), generator=g)
        value = out.loss.item()
        if not math.isfinite(value):
            finite = False
            log(f"  non-finite loss at step {step}; stopping")
            break
        losses.append(value)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        schedule.step()
        ema.step(params)
        if (step + 1) % max(1, args.steps // 10) == 0:
            elapsed = time.perf_counter() - start
            log(f"  step {step + 1}/{args.steps}: loss {np.mean(losses[-50:]):.4f}, lam {schedule():.2f}, "
                f"{elapsed / (step + 1):.3f} s/step")
    seconds = time.perf_counter() - start
    ema.copy_to(params)
    unet.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"unet": unet, "finite": finite, "steps_done": len(losses), "train_seconds": seconds,
            "seconds_per_step": seconds / max(1, len(losses)), "loss_last_10pct": float(np.mean(tail)),
            "loss_curve": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
            "epochs": len(losses) * args.batch / len(images_u8)}


# ---------------------------------------------------------------- scoring

class Scorer:
    """Features, FD, nearest neighbours, with reference features cached by name."""

    def __init__(self):
        from mmf_diffusers.evaluation import MNISTCNNFeatures

        self.features = MNISTCNNFeatures()
        self._cache: Dict[str, object] = {}

    def real(self, images_u8: np.ndarray):
        from mmf_diffusers.mnist_classifier import uint8_to_model_range

        return uint8_to_model_range(images_u8)

    def feats(self, images, key: Optional[str] = None):
        if key is not None and key in self._cache:
            return self._cache[key]
        f = self.features(images)
        if key is not None:
            self._cache[key] = f
        return f

    def real_feats(self, images_u8: np.ndarray, key: str):
        if key in self._cache:
            return self._cache[key]
        return self.feats(self.real(images_u8), key)

    @staticmethod
    def fd(fa, fb) -> float:
        from mmf_diffusers.metrics import frechet_distance, gaussian_statistics

        return frechet_distance(*gaussian_statistics(fa), *gaussian_statistics(fb))

    @staticmethod
    def pixels(images):
        """``(N, 1, 28, 28)`` in [-1, 1] -> ``(N, 784)`` float32 in [0, 1] after 8-bit quantisation."""
        from mmf_diffusers.evaluation import quantize_to_uint8

        return (quantize_to_uint8(images) / 255.0).flatten(1).float()

    @staticmethod
    def nearest(samples_px, ref_px):
        """Distance to, and index of, the nearest row of ``ref_px`` for every row of ``samples_px``."""
        import torch

        ref_sq = ref_px.pow(2).sum(1)
        dists, index = [], []
        for chunk in samples_px.split(250):
            d2 = chunk.pow(2).sum(1, keepdim=True) + ref_sq[None] - 2 * chunk @ ref_px.T
            m = d2.min(1)
            dists.append(m.values.clamp_min(0).sqrt())
            index.append(m.indices)
        return torch.cat(dists), torch.cat(index)

    def nn_stats(self, samples_px, train_px, test_px) -> Dict:
        d_train, _ = self.nearest(samples_px, train_px)
        d_test, _ = self.nearest(samples_px, test_px)
        return {"mean_nn_train": float(d_train.mean()), "mean_nn_test": float(d_test.mean()),
                "ratio_train_over_test": float(d_train.mean() / d_test.mean()),
                "frac_nearer_train": float((d_train < d_test).double().mean()),
                "reference_size": int(len(train_px))}


def loss_value(unet, images_u8: np.ndarray, seed: int, repeats: int = 2) -> float:
    """Mean MMF loss (its value does not depend on lam) on ``images_u8``, times and noise from ``seed``."""
    import torch

    from mmf_diffusers import unet_model_fn
    from mmf_diffusers.mnist_classifier import uint8_to_model_range

    fn = unet_model_fn(unet)
    loss_fn = make_loss()("finite_difference")
    g = torch.Generator().manual_seed(seed)
    x = uint8_to_model_range(images_u8)
    values = []
    with torch.no_grad():
        for _ in range(repeats):
            for chunk in x.split(250):
                values.append(loss_fn(fn, chunk, 0.0, generator=g).per_sample)
    return float(torch.cat(values).mean())


def references(data, scorer: Scorer, args) -> Dict:
    """Real-image reference sets and their FDs (noise floors, and what perfect models would score)."""
    test_x = data["test"][0]
    train_x = data["train"][0]
    s = args.seed
    refs = {}
    # Quality: num_gen samples against the first set; the second, disjoint, gives the noise floor.
    q_a, q_b = split_two(data["test_pools"]["all"], args.num_gen, s + 3)
    refs["quality"] = q_a
    fq = scorer.real_feats(test_x[q_a], "test_quality")
    floor_quality = scorer.fd(scorer.real_feats(test_x[q_b], "test_quality_b"), fq)
    # Gap: gap_n vs gap_n.
    g_a, g_b = split_two(data["test_pools"]["all"], args.gap_n, s + 4)
    floor_gap = scorer.fd(scorer.real_feats(test_x[g_b], "test_gap_b"), scorer.real_feats(test_x[g_a], "test_gap_all"))
    # Shift: shift_n vs shift_n, thin test and thick test.
    th_a, th_b = split_two(data["test_pools"]["thin"], args.shift_n, s + 5)
    tk_a, tk_b = split_two(data["test_pools"]["thick"], args.shift_n, s + 6)
    refs["thin"], refs["thick"] = th_a, tk_a
    f_thin = scorer.real_feats(test_x[th_a], "test_thin")
    f_thick = scorer.real_feats(test_x[tk_a], "test_thick")
    real_shift = {}
    for name, pool in (("thin_train", data["pools"]["thin_half"]), ("all_train", data["pools"]["mnist_100pct"])):
        f = scorer.real_feats(train_x[subset(pool, args.shift_n, s + 7)], f"shift_{name}")
        fd_thin, fd_thick = scorer.fd(f, f_thin), scorer.fd(f, f_thick)
        real_shift[name] = {"fd_thin_test": fd_thin, "fd_thick_test": fd_thick,
                            "ratio_thick_over_thin": fd_thick / fd_thin}
    real_shift["floor_thin"] = scorer.fd(scorer.real_feats(test_x[th_b], "test_thin_b"), f_thin)
    real_shift["floor_thick"] = scorer.fd(scorer.real_feats(test_x[tk_b], "test_thick_b"), f_thick)
    refs["test_gap"] = {"all": g_a, "thin": split_two(data["test_pools"]["thin"], args.gap_n, s + 4)[0]}
    # The control: every model is also scored against the training-image references of each fraction model (with
    # the same test references), so a gap can be compared across models trained on those images 100x, 10x, 1x.
    refs["cross"], cross_summary = {}, {}
    val_x = data["validation"][0]
    f_test_gap = scorer.real_feats(test_x[g_a], "test_gap_all")
    heldout = subset(data["validation_pools"]["all"], args.num_gen, s + 13)
    f_heldout = scorer.real_feats(val_x[heldout], "validation_all")[:args.gap_n]
    heldout_px = scorer.pixels(scorer.real(val_x[heldout]))
    for name in FRACTIONS:
        pool = data["pools"][name]
        f_train = scorer.real_feats(train_x[subset(pool, args.gap_n, s + 10)], f"{name}_train_gap")
        nn_n = min(len(pool), len(data["test_pools"]["all"]), args.nn_cap)
        train_px = scorer.pixels(scorer.real(train_x[subset(pool, nn_n, s + 11)]))
        test_px = scorer.pixels(scorer.real(test_x[subset(data["test_pools"]["all"], nn_n, s + 12)]))
        refs["cross"][name] = {"f_train": f_train, "f_test": f_test_gap, "train_px": train_px, "test_px": test_px}
        cross_summary[name] = {
            "gap_heldout_real": scorer.fd(f_heldout, f_train) - scorer.fd(f_heldout, f_test_gap),
            "gap_memoriser": -scorer.fd(f_train, f_test_gap),
            "nn_heldout_real": scorer.nn_stats(heldout_px, train_px, test_px),
        }
    summary = {
        "cross": cross_summary,
        "floor_quality": {"n": args.num_gen, "fd": floor_quality,
                          "what": f"FD-MNISTCNN, {args.num_gen} test images vs {args.num_gen} other test images"},
        "floor_gap": {"n": args.gap_n, "fd": floor_gap,
                      "what": f"FD-MNISTCNN, {args.gap_n} test images vs {args.gap_n} other test images"},
        "shift_real": real_shift,
    }
    return refs, summary


def evaluate(name: str, unet, data, refs, scorer: Scorer, args, log) -> Dict:
    import torch

    from mmf_diffusers import MMFPipeline, MMFScheduler
    from mmf_diffusers.evaluation import generate

    train_x, _ = data["train"]
    test_x, _ = data["test"]
    val_x, _ = data["validation"]
    pool = data["pools"][name]
    dist = "thin" if name == "thin_half" else "all"  # the model's own distribution
    test_pool = data["test_pools"][dist]
    s = args.seed

    # Fixed reference sets for this model.
    train_gap = subset(pool, args.gap_n, s + 10)
    test_gap = refs["test_gap"][dist]
    f_train_gap = scorer.real_feats(train_x[train_gap], f"{name}_train_gap")
    f_test_gap = scorer.real_feats(test_x[test_gap], f"test_gap_{dist}")
    nn_n = min(len(pool), len(test_pool), args.nn_cap)
    train_nn_idx = subset(pool, nn_n, s + 11)
    test_nn_idx = subset(test_pool, nn_n, s + 12)
    if name in refs["cross"]:
        train_px, test_px = refs["cross"][name]["train_px"], refs["cross"][name]["test_px"]
    else:
        train_px = scorer.pixels(scorer.real(train_x[train_nn_idx]))
        test_px = scorer.pixels(scorer.real(test_x[test_nn_idx]))
    val_pool = data["validation_pools"][dist]
    heldout = subset(val_pool, args.num_gen, s + 13)
    f_heldout = scorer.real_feats(val_x[heldout], f"validation_{dist}")

    result = {"train_images": int(len(pool)), "distribution": dist, "nn_reference_size": int(nn_n),
              "gap_reference_size": int(min(args.gap_n, len(train_gap)))}
    # What real held-out images and a copy of the training set would score (same reference sets).
    f_h = f_heldout[:args.gap_n]
    result["gap_heldout_real"] = scorer.fd(f_h, f_train_gap) - scorer.fd(f_h, f_test_gap)
    result["gap_memoriser"] = -scorer.fd(f_train_gap, f_test_gap)
    result["nn_heldout_real"] = scorer.nn_stats(scorer.pixels(scorer.real(val_x[heldout])), train_px, test_px)
    loss_n = min(args.loss_n, len(pool))
    result["loss_train"] = loss_value(unet, train_x[subset(pool, loss_n, s + 14)], s + 15)
    result["loss_test"] = loss_value(unet, test_x[subset(test_pool, loss_n, s + 16)], s + 15)
    result["loss_test_over_train"] = result["loss_test"] / result["loss_train"]

    pipe = MMFPipeline(unet=unet, scheduler=MMFScheduler())
    pipe.set_progress_bar_config(disable=True)
    f_quality = scorer._cache["test_quality"]
    f_thin, f_thick = scorer._cache["test_thin"], scorer._cache["test_thick"]
    result["sampling"] = {}
    samples_1step = None
    for steps in args.sample_steps:
        start = time.perf_counter()
        with torch.no_grad():
            images = generate(pipe, args.num_gen, steps, seed=args.sample_seed, batch_size=250)
        sampling_seconds = time.perf_counter() - start
        if not torch.isfinite(images).all():
            result["sampling"][str(steps)] = {"finite": False}
            continue
        f = scorer.feats(images)
        px = scorer.pixels(images)
        fd_train, fd_test = scorer.fd(f[:args.gap_n], f_train_gap), scorer.fd(f[:args.gap_n], f_test_gap)
        probs = scorer.features.probabilities(images)
        counts = np.bincount(probs.argmax(1).numpy(), minlength=10)
        p = counts / counts.sum()
        fd_thin = scorer.fd(f[:args.shift_n], f_thin)
        fd_thick = scorer.fd(f[:args.shift_n], f_thick)
        row = {
            "finite": True,
            "sampling_seconds": sampling_seconds,
            "fd_test": scorer.fd(f, f_quality),
            "fd_train_gap": fd_train, "fd_test_gap": fd_test, "gap": fd_train - fd_test,
            "nn": scorer.nn_stats(px, train_px, test_px),
            "fd_thin_test": fd_thin, "fd_thick_test": fd_thick, "shift_ratio_thick_over_thin": fd_thick / fd_thin,
            "mean_ink": float(px.mean()),
            "class_entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
            "class_counts": counts.tolist(),
            "mean_top_probability": float(probs.max(1).values.mean()),
            "cross": {},
        }
        for ref_name, ref in refs["cross"].items():
            a, b = scorer.fd(f[:args.gap_n], ref["f_train"]), scorer.fd(f[:args.gap_n], ref["f_test"])
            nn = scorer.nn_stats(px, ref["train_px"], ref["test_px"])
            row["cross"][ref_name] = {"fd_train_gap": a, "fd_test_gap": b, "gap": a - b,
                                      "frac_nearer_train": nn["frac_nearer_train"],
                                      "ratio_nn_train_over_test": nn["ratio_train_over_test"]}
        result["sampling"][str(steps)] = row
        if steps == 1:
            samples_1step = images
        log(f"  {steps} step(s): FD test {row['fd_test']:.2f}, FD train/test ({args.gap_n}) {fd_train:.2f}/"
            f"{fd_test:.2f}, nearer train {row['nn']['frac_nearer_train']:.2f}, thin/thick {fd_thin:.2f}/"
            f"{fd_thick:.2f}")
    if samples_1step is not None:
        # For the plot: the first 8 one-step samples and their nearest training images.
        first = samples_1step[:8]
        _, idx = scorer.nearest(scorer.pixels(first), train_px)
        result["_grid"] = (scorer.pixels(first).view(-1, 28, 28).numpy(), train_px[idx].view(-1, 28, 28).numpy())
    return result


# ---------------------------------------------------------------- report

def tables(result) -> str:
    models = result["models"]
    refs = result["references"]
    gap_n = result["config"]["gap_n"]
    num_gen = result["config"]["num_gen"]
    shift_n = result["config"]["shift_n"]
    rows = []
    for name, m in models.items():
        for steps, s in m["sampling"].items():
            if not s.get("finite"):
                rows.append([name, m["train_images"], fmt(m["epochs"]), steps, "non-finite"] + ["-"] * 11)
                continue
            rows.append([name, m["train_images"], fmt(m["epochs"]), steps, s["fd_test"], s["fd_train_gap"],
                         s["fd_test_gap"], s["gap"], m["gap_heldout_real"], m["gap_memoriser"],
                         s["nn"]["mean_nn_train"], s["nn"]["mean_nn_test"], s["nn"]["frac_nearer_train"],
                         m["nn_heldout_real"]["frac_nearer_train"], m["loss_test_over_train"], s["class_entropy"]])
    text = table(["model", "train imgs", "epochs", "steps", f"FD test {num_gen}v{num_gen}",
                  f"FD train {gap_n}v{gap_n}", f"FD test {gap_n}v{gap_n}", "gap", "gap real held-out",
                  "gap memoriser", "NN train", "NN test", "nearer train", "nearer train (real held-out)",
                  "loss test/train", "class entropy"], rows)
    fq, fg = refs["floor_quality"], refs["floor_gap"]
    text += (f"\nnoise floors (real vs real, disjoint test sets): FD {fq['fd']:.3g} at {fq['n']}v{fq['n']}, "
             f"{fg['fd']:.3g} at {fg['n']}v{fg['n']}. gap = FD(train) - FD(test); NN: mean L2 (pixels in [0, 1]) "
             "to the nearest training / test image, equal-size reference sets.")
    cross = refs["cross"]
    rows = []
    for name, m in models.items():
        for steps, srow in m["sampling"].items():
            if srow.get("finite"):
                rows.append([f"{name} samples, {steps} step"]
                            + [srow["cross"][f]["gap"] for f in cross]
                            + [srow["cross"][f]["frac_nearer_train"] for f in cross])
    rows.append(["real held-out (validation) images"] + [cross[f]["gap_heldout_real"] for f in cross]
                + [cross[f]["nn_heldout_real"]["frac_nearer_train"] for f in cross])
    rows.append(["the training images themselves"] + [cross[f]["gap_memoriser"] for f in cross] + [1.0] * len(cross))
    text += ("\n\nControl: every model against the same reference pairs (the training images of the 1% / 10% / 100% "
             f"models, {gap_n} of them, and {gap_n} test images; NN references of equal size)\n")
    text += table(["scored set"] + [f"gap on {f} refs" for f in cross] + [f"nearer train, {f} refs" for f in cross],
                  rows)
    rows = []
    for name in ("thin_half", "mnist_100pct"):
        if name in models and models[name]["sampling"].get("1", {}).get("finite"):
            for steps, s in models[name]["sampling"].items():
                rows.append([f"{name} (samples, {steps} step)", s["fd_thin_test"], s["fd_thick_test"],
                             s["shift_ratio_thick_over_thin"], s["mean_ink"]])
    sr = refs["shift_real"]
    for name, ink_key in (("thin_train", "train_thin"), ("all_train", "train_all")):
        rows.append([f"real {name} images", sr[name]["fd_thin_test"], sr[name]["fd_thick_test"],
                     sr[name]["ratio_thick_over_thin"], result["data"][ink_key]["mean_ink"]])
    text += "\n\n" + table([f"set ({shift_n} images)", "FD thin test", "FD thick test", "thick / thin",
                            "mean ink"], rows)
    d = result["data"]
    text += (f"\nnoise floors: thin {sr['floor_thin']:.3g}, thick {sr['floor_thick']:.3g}. Mean ink: thin test "
             f"{d['test_thin']['mean_ink']:.3f}, thick test {d['test_thick']['mean_ink']:.3f}.")
    return text


def plot(result, grids, path) -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    models = result["models"]
    refs = result["references"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    fr = [n for n in ("mnist_1pct", "mnist_10pct", "mnist_100pct") if n in models]
    x = [100 * FRACTIONS[n] for n in fr]
    num_gen, gap_n = result["config"]["num_gen"], result["config"]["gap_n"]
    for (key, label, marker), color in zip(
            (("fd_test", f"vs test ({num_gen} v {num_gen})", "o"),
             ("fd_train_gap", f"vs own training images ({gap_n} v {gap_n})", "s"),
             ("fd_test_gap", f"vs test ({gap_n} v {gap_n})", "^")), ("C0", "C1", "C2")):
        for steps, linestyle in (("1", "-"), ("2", "--")):
            ys = [models[n]["sampling"].get(steps, {}).get(key, float("nan")) for n in fr]
            ax.plot(x, ys, marker=marker, linestyle=linestyle, color=color, label=f"{label}, {steps} step",
                    alpha=1 if steps == "1" else 0.6)
    ax.axhline(refs["floor_quality"]["fd"], ls=":", c="gray", label="noise floor (real vs real)")
    ax.axhline(refs["floor_gap"]["fd"], ls="-.", c="gray", label="noise floor, gap size")
    ax.set_xscale("log")
    ax.set_xlabel("% of MNIST train used (same number of steps)")
    ax.set_ylabel("FD-MNISTCNN (lower is better)")
    ax.legend(fontsize=6)
    ax.set_title("quality and train/test FD")

    ax = axes[0, 1]
    names = [n for n in MODELS if n in models and models[n]["sampling"].get("1", {}).get("finite")]
    pos = np.arange(len(names))
    ax.bar(pos - 0.27, [models[n]["sampling"]["1"]["nn"]["frac_nearer_train"] for n in names], 0.27,
           label="samples (1 step), own training images")
    ax.bar(pos, [models[n]["nn_heldout_real"]["frac_nearer_train"] for n in names], 0.27,
           label="real held-out images, same references")
    ax.bar(pos + 0.27, [models[n]["sampling"]["1"]["cross"]["mnist_1pct"]["frac_nearer_train"] for n in names], 0.27,
           label="samples (1 step), the 1% model's 500 images")
    ax.axhline(0.5, ls=":", c="gray")
    ax.set_xticks(pos, names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction nearer a training image than a test image")
    ax.legend(fontsize=7)
    ax.set_title("memorisation check (nearest neighbour, equal-size references)")

    ax = axes[1, 0]
    groups = []
    for n in ("thin_half", "mnist_100pct"):
        if n in models and models[n]["sampling"].get("1", {}).get("finite"):
            s = models[n]["sampling"]["1"]
            groups.append((f"{n}\n(samples)", s["fd_thin_test"], s["fd_thick_test"]))
    sr = refs["shift_real"]
    groups += [("real thin\ntrain", sr["thin_train"]["fd_thin_test"], sr["thin_train"]["fd_thick_test"]),
               ("real all\ntrain", sr["all_train"]["fd_thin_test"], sr["all_train"]["fd_thick_test"])]
    pos = np.arange(len(groups))
    ax.bar(pos - 0.2, [g[1] for g in groups], 0.4, label="vs thin test (in distribution for thin)")
    ax.bar(pos + 0.2, [g[2] for g in groups], 0.4, label="vs thick test (shifted for thin)")
    ax.axhline(sr["floor_thin"], ls=":", c="gray", label="noise floor")
    ax.set_xticks(pos, [g[0] for g in groups], fontsize=8)
    ax.set_ylabel("FD-MNISTCNN")
    ax.legend(fontsize=7)
    ax.set_title("stroke-thickness shift")

    ax = axes[1, 1]
    rows, labels = [], []
    for n in names:
        if n in grids:
            samples, nearest = grids[n]
            rows.append(np.concatenate(list(samples), axis=1))
            labels.append(n)
            if n == "mnist_1pct":
                rows.append(np.concatenate(list(nearest), axis=1))
                labels.append("nearest train")
    if rows:
        ax.imshow(np.concatenate(rows, axis=0), cmap="gray", vmin=0, vmax=1)
        ax.set_yticks([14 + 28 * i for i in range(len(labels))], labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title("one-step samples (same noise for every model)")
    fig.suptitle(f"MMF on little data and under a stroke-thickness shift ({result['config']['steps']} steps, batch "
                 f"{result['config']['batch']}, one CPU thread)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, about 2 minutes")
    p.add_argument("--json", help=f"output JSON (default: {os.path.relpath(DEFAULT_JSON, ROOT)}; --quick: the temp "
                                  "folder)")
    p.add_argument("--png", help="output plot (default: the JSON path with .png)")
    p.add_argument("--no_plot", action="store_true")
    p.add_argument("--save_models", help="folder to save each model's EMA UNet in (diffusers format); default: none")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--steps", type=int, help="optimiser steps per model (quick 30, full 1600)")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32], help="UNet block_out_channels")
    p.add_argument("--derivative", choices=("jvp", "finite_difference"), default="finite_difference")
    p.add_argument("--num_gen", type=int, help="samples per model and step count (quality FD vs as many test images)")
    p.add_argument("--gap_n", type=int, help="images per side for the train/test gap (default 500: the 1%% set)")
    p.add_argument("--shift_n", type=int, help="images per side for the shift FDs")
    p.add_argument("--nn_cap", type=int, help="largest nearest-neighbour reference set")
    p.add_argument("--loss_n", type=int, help="images per side for the loss gap")
    p.add_argument("--timing_steps", type=int, help="timed steps per derivative estimator")
    p.add_argument("--sample_steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample_seed", type=int, default=1234)
    args = p.parse_args(argv)
    for key, (quick, full) in PRESETS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.json is None:
        args.json = os.path.join(tempfile.gettempdir(), "low_data_quick.json") if args.quick else DEFAULT_JSON
    if args.png is None:
        args.png = os.path.splitext(args.json)[0] + ".png"
    return args


def main(argv=None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args = parse_args(argv)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    command = "python benchmarks/low_data.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    config = {k: v for k, v in vars(args).items() if k not in ("json", "png", "no_plot", "save_models")}
    config.update({
        "unet": f"build_mmf_unet(block_out_channels={tuple(args.channels)}), attention on the lowest level",
        "loss": f"ModularMeanFlowLoss(TimeSampler('logit_normal', -0.4, 1.0, r_neq_t_fraction=0.25), "
                f"derivative={args.derivative!r}, tangent='model')",
        "lam": f"linear 0 -> 1 over the first {max(1, args.steps // 3)} steps",
        "optimiser": f"AdamW(lr={args.lr}, betas=(0.95, 0.999), weight_decay=1e-6), linear lr warmup "
                     f"{max(1, args.steps // 20)} steps, grad norm clip 1.0",
        "ema": "diffusers EMAModel(decay=0.999, use_ema_warmup=True, inv_gamma=1, power=0.75); scored with EMA weights",
        "pixels": "uint8 / 127.5 - 1 (training/data.py); samples quantised to 8 bits before every metric",
        "gap_definition": "FD(first gap_n samples, gap_n own training images) - FD(same samples, gap_n held-out test "
                          "images of the model's distribution)",
    })
    result = {
        "benchmark": "low_data_shift", "command": command, "quick": args.quick, "config": config,
        "machine": {"os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "nice": os.nice(0) if hasattr(os, "nice") else None},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shift_split": {
            "name": "stroke thickness (ink within class)",
            "definition": "ink = mean pixel intensity; per digit class, threshold = median ink of that class over "
                          "MNIST train; thin = ink < threshold of its class, thick otherwise; same thresholds for "
                          "train, validation and test",
            "why": "within one class, ink measures stroke width (same digit, similar stroke length, size-normalised "
                   "digits); splitting per class keeps class proportions equal in both halves, so the shift is a pure "
                   "covariate (style) shift, not a change of digit frequencies as a global ink ranking would give",
            "train_model_on": "thin half of MNIST train", "in_distribution_test": "thin half of MNIST test",
            "shifted_test": "thick half of MNIST test",
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)

    def save():
        result["wall_seconds"] = time.perf_counter() - t0
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=float)

    log(f"{command}\nloading MNIST ...")
    data = load_data(args.seed)
    result["data"] = data["summary"]
    scorer = Scorer()
    refs, ref_summary = references(data, scorer, args)
    result["references"] = ref_summary
    log(f"noise floor FD {ref_summary['floor_quality']['fd']:.3f} ({args.num_gen}v{args.num_gen}), "
        f"{ref_summary['floor_gap']['fd']:.3f} ({args.gap_n}v{args.gap_n})")
    log("timing the derivative estimators ...")
    result["derivative_cost"] = derivative_cost(args)
    log(f"s/step at lam 1, batch {args.batch}: jvp {result['derivative_cost']['jvp']:.3f}, finite difference "
        f"{result['derivative_cost']['finite_difference']:.3f}; training uses {args.derivative}")
    result["models"] = {}
    grids = {}
    train_x = data["train"][0]
    for name in args.models:
        pool = data["pools"][name]
        log(f"training {name} on {len(pool)} images, {args.steps} steps of {args.batch} ...")
        run = train_model(train_x[pool], args, log)
        entry = {k: v for k, v in run.items() if k != "unet"}
        if args.save_models:
            run["unet"].save_pretrained(os.path.join(args.save_models, name))
        if run["finite"]:
            start = time.perf_counter()
            scores = evaluate(name, run["unet"], data, refs, scorer, args, log)
            grid = scores.pop("_grid", None)
            if grid is not None:
                grids[name] = grid
            entry.update(scores)
            entry["eval_seconds"] = time.perf_counter() - start
        else:
            entry.update({"train_images": int(len(pool)), "sampling": {}})
        result["models"][name] = entry
        save()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    text = tables(result)
    print("\n" + text, flush=True)
    if not args.no_plot:
        png = plot(result, grids, args.png)
        if png:
            result["plot"] = os.path.relpath(png, os.path.dirname(os.path.abspath(args.json)))
    save()
    print(f"\nwrote {args.json}" + (f" and {result['plot']}" if result.get("plot") else "")
          + f" in {result['wall_seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
