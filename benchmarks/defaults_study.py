"""Which training defaults hold across data sets: one study, rows = (dataset, configuration, seed).

Every row trains one model from scratch at its dataset's fixed budget (same steps, batch, learning rate and seeds for
every configuration of that dataset), scores it, and is appended at once to a JSON file (default
``benchmarks/results/defaults_study.json``); rows already there are skipped, so an interrupted study resumes where it
stopped. Each row records the machine, the number of threads, its wall and CPU time and the command that made it.

Configurations (``CONFIGS``) vary four factors of the MMF loss, all else fixed (finite-difference du/dt, the model's
own velocity as tangent, 25% of the rows with r != t, logit-normal(-0.4, 1.0) times):

* lam: 0 throughout (MeanFlow's stop-gradient loss), a warm-up from 0 to 1 over the first third of the steps (linear
  or cosine, the paper's curriculum), or 1 throughout;
* adaptive weight ``w = 1 / sg(err + c)^p``, ``c = 1e-3``, ``p`` in {0, 0.5, 1}, with ``err`` the per-sample squared
  error averaged over the sample's values (``mean``, the loss's default) or summed (``sum``, MeanFlow's definition);
* paired rows (the model tangent read off an ``r = t`` row on the same image) or unpaired (an extra no-grad forward).

Not the full cross product: a one-factor-at-a-time design around two centres, the training script's current defaults
(``current``: lam 0, p = 1 on the mean, paired) and its previous ones (``previous``: linear warm-up to lam 1, p = 0,
paired); each other configuration changes one factor of one centre. 16 configurations, 2 seeds each.

Datasets and scores (lower is better):

* ``checkerboard``: the 2-D checkerboard at the public MeanFlow example's budget (a ``TwoTimeMLP`` 4 x 256, batch
  4096, Adam 3e-4, 6000 steps), trained in-process with the library's loss; sliced Wasserstein-2 distance of 8192
  samples to 8192 exact points (``benchmarks/checkerboard.Evaluator``: one fixed reference set, noise and projections
  for every row; 0.032 is the noise floor of two exact samples, 0.254 a standard Gaussian) at 1 and 2 steps and for
  64 Euler steps on ``u(z, t, t)``; the one-step figure is also taken every 1500 steps (``sw_1step_curve``) to show
  whether it still falls.
* ``digits``: the 1797 8x8 sklearn digits, unconditional, through ``training/train_mmf.py --dataset_name
  sklearn-digits``; ``mmf-evaluate`` on 1797 samples against the 1797 digits (the training set itself: there is no
  other split): FD-MNISTCNN (the Frechet distance on the shipped MNIST classifier's features, images upscaled to
  28x28) and SWD-pixels (sliced W2 on the 64 pixel values), at 1 and 2 steps.
* ``mnist``: class-conditional MNIST through ``benchmarks/mnist_defaults.py``'s command and scoring (FD-MNISTCNN of
  1000 samples against the 10k test images, digits asked for in turn, at 1 and 2 steps, and the classifier's accuracy
  on them).
* ``latent-mnist``: the same in the latent space of the shipped ``pipelines/mmf-mnist-latent`` VAE (frozen), 32x32
  images, class-conditional, scored like ``mnist``.

Run in the background at low priority (the rows of one dataset take minutes to an hour each on one thread):

    OMP_NUM_THREADS=1 nice -n 19 nohup python benchmarks/defaults_study.py --datasets checkerboard digits mnist \\
        --workdir /work/study > /work/study/study.log 2>&1 &

``--table`` prints the table of the rows in the JSON file and trains nothing; ``--plan`` lists the rows and which are
done. Two processes may run at once on one JSON file: a row being trained is claimed (a file in ``--workdir``), the
file is rewritten under a lock.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(HERE, "results", "defaults_study.json")

LAMS = ("lam0", "linear", "cosine", "lam1")


def _config(lam: str, p: float, reduction: str = "mean", paired: bool = True) -> Dict:
    return {"lam": lam, "adaptive_p": p, "adaptive_reduction": reduction if p > 0 else "mean", "paired": paired}


# name -> factors. "current" and "previous" are the centres; each other row changes one factor of one of them. The
# order is the order of the runs (most informative first): both centres, then the adaptive weight, then lam, then
# pairing. "previous, lam0" is "current, p=0" and "previous, p=1" is "current, linear": not repeated.
CONFIGS: Dict[str, Dict] = {
    "current": _config("lam0", 1.0),
    "previous": _config("linear", 0.0),
    "current, p=0": _config("lam0", 0.0),
    "current, p=1 sum": _config("lam0", 1.0, "sum"),
    "current, p=0.5": _config("lam0", 0.5),
    "current, p=0.5 sum": _config("lam0", 0.5, "sum"),
    "current, linear": _config("linear", 1.0),
    "current, cosine": _config("cosine", 1.0),
    "current, lam1": _config("lam1", 1.0),
    "previous, p=0.5": _config("linear", 0.5),
    "previous, p=1 sum": _config("linear", 1.0, "sum"),
    "previous, p=0.5 sum": _config("linear", 0.5, "sum"),
    "previous, cosine": _config("cosine", 0.0),
    "previous, lam1": _config("lam1", 0.0),
    "current, unpaired": _config("lam0", 1.0, paired=False),
    "previous, unpaired": _config("linear", 0.0, paired=False),
}

# Budgets per dataset (the same for every configuration and seed of that dataset). A row's key includes the budget,
# so rows of another budget (a test's tiny one) never count as done.
BUDGETS = {
    "checkerboard": {"steps": 6000, "batch": 4096, "lr": 3e-4, "hidden": 256, "depth": 4, "eval_n": 8192,
                     "curve_every": 1500},
    "digits": {"steps": 3000, "batch": 64, "lr": 1e-3, "block_out_channels": [16, 32], "num_images": 1797},
    "mnist": {"steps": 4000, "batch": 32, "lr": 1e-3, "block_out_channels": [16, 32, 32], "num_images": 1000},
    "latent-mnist": {"steps": 4000, "batch": 32, "lr": 1e-3, "block_out_channels": [32, 64, 64], "num_images": 1000},
}
DATASETS = tuple(BUDGETS)


def config_flags(config: Dict) -> List[str]:
    """The ``training/train_mmf.py`` flags of a configuration (every factor spelled out, so the row means the same
    whatever the script's defaults)."""
    lam = config["lam"]
    if lam in ("lam0", "lam1"):
        flags = ["--lam_schedule", "constant", "--lam_end", "0" if lam == "lam0" else "1"]
    else:
        flags = ["--lam_schedule", lam, "--lam_start", "0", "--lam_end", "1"]
    return flags + ["--adaptive_p", str(config["adaptive_p"]), "--adaptive_c", "1e-3",
                    "--adaptive_reduction", config["adaptive_reduction"],
                    "--pair_rows", "1" if config["paired"] else "0",
                    "--derivative", "finite_difference", "--tangent", "model", "--r_neq_t_fraction", "0.25",
                    "--time_distribution", "logit_normal", "--time_mean", "-0.4", "--time_std", "1.0"]


def budget_tag(budget: Dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(budget.items()))


def row_key(dataset: str, config: str, seed: int, budget: Dict) -> str:
    return f"{dataset} | {config} | seed {seed} | {budget_tag(budget)}"


# -- the JSON file: read, append under a lock ---------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: str):
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_rows(path: str) -> List[Dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)["rows"]


def append_row(path: str, row: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _locked(path):
        rows = [r for r in load_rows(path) if r["key"] != row["key"]] + [row]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"description": "benchmarks/defaults_study.py: one row per (dataset, configuration, seed); "
                                      "lower scores are better", "configs": CONFIGS, "rows": rows}, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)


@contextlib.contextmanager
def claim(workdir: str, key: str):
    """Yields True if this process may run the row ``key`` (no live process claimed it), False otherwise."""
    folder = os.path.join(workdir, "claims")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, key.replace(" ", "").replace("|", "__").replace("/", "-").replace(",", "_") + ".pid")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                os.kill(int(f.read().strip()), 0)  # raises if that process is gone
            yield False
            return
        except (OSError, ValueError):
            os.remove(path)  # stale: its process died
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        yield False
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def machine() -> Dict:
    return {"node": platform.node(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_at_start": os.getloadavg()[0],
            "nice": os.nice(0)}


# -- checkerboard: in-process ---------------------------------------------------------------------------------------

def run_checkerboard(config: Dict, seed: int, budget: Dict) -> Dict:
    import torch

    from checkerboard import Evaluator, train  # benchmarks/ is on sys.path when this file runs as a script
    from mmf_diffusers import LambdaSchedule

    torch.set_num_threads(1)
    steps = budget["steps"]
    ev = Evaluator(budget["eval_n"])
    lam = config["lam"]
    schedule = (LambdaSchedule.constant(0.0 if lam == "lam0" else 1.0) if lam in ("lam0", "lam1") else
                LambdaSchedule(lam, lam_start=0.0, lam_end=1.0, warmup_steps=max(1, steps // 3)))
    curve = []

    def score_on_the_way(step: int, model) -> None:
        if step % budget["curve_every"] == 0 or step == steps:
            curve.append([step, ev.mmf(model, 1)])

    run = train(schedule, "model", budget["lr"], seed, steps, budget["batch"], r_neq_t_fraction=0.25,
                hidden=budget["hidden"], depth=budget["depth"], derivative="finite_difference",
                pair_rows=config["paired"], adaptive_p=config["adaptive_p"],
                adaptive_reduction=config["adaptive_reduction"], on_step=score_on_the_way)
    model, losses, finite = run["model"], run["losses"], run["finite"]
    metrics = {"finite": finite, "sw_1step_curve": curve, "noise_floor": ev.floor, "gaussian": ev.gaussian,
               "loss_mean_last_tenth": statistics.fmean(losses[-max(1, len(losses) // 10):]) if finite else None}
    if finite:
        metrics.update(sw_1step=ev.mmf(model, 1), sw_2step=ev.mmf(model, 2), sw_euler64=ev.euler(model, 64))
    else:
        metrics.update(sw_1step=float("nan"), sw_2step=float("nan"), sw_euler64=float("nan"))
    return metrics


# -- image datasets: training/train_mmf.py and mmf-evaluate as subprocesses ------------------------------------------

def image_train_command(dataset: str, config: Dict, seed: int, budget: Dict, out: str, workdir: str) -> List[str]:
    common = ["--train_batch_size", str(budget["batch"]), "--max_train_steps", str(budget["steps"]),
              "--learning_rate", str(budget["lr"]), "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps",
              "50", "--use_ema", "--ema_max_decay", "0.999", "--checkpointing_steps", str(10 * budget["steps"]),
              "--save_images_steps", str(10 * budget["steps"]), "--num_sample_images", "10", "--logger", "none",
              "--seed", str(seed), "--output_dir", out,
              "--block_out_channels", *map(str, budget["block_out_channels"])]
    script = [sys.executable, os.path.join(ROOT, "training", "train_mmf.py")]
    if dataset == "digits":
        data = ["--dataset_name", "sklearn-digits", "--resolution", "8"]
    elif dataset == "mnist":
        data = ["--dataset_name", "mnist-offline", "--resolution", "28", "--class_conditional",
                "--label_dropout", "0.1"]
    elif dataset == "latent-mnist":
        data = ["--dataset_name", "mnist-offline", "--resolution", "32", "--center_crop", "--class_conditional",
                "--label_dropout", "0.1", "--vae_name_or_path", os.path.join(ROOT, "pipelines", "mmf-mnist-latent"),
                "--vae_subfolder", "vae", "--latent_cache_dir", os.path.join(workdir, "latent-cache")]
    else:
        raise ValueError(f"not an image dataset: {dataset!r}")
    return script + data + common + config_flags(config)


def _evaluate(out: str, name: str, extra: List[str], env) -> Dict:
    path = os.path.join(out, f"evaluation-{name}.json")
    cmd = [sys.executable, "-m", "mmf_diffusers.evaluation", "--pipeline", out, "--output", path, *extra]
    with open(os.path.join(out, f"evaluation-{name}.log"), "w", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=log)
    with open(path, encoding="utf-8") as f:
        return {row["steps"]: row for row in json.load(f)["rows"]}


def run_image(dataset: str, config: Dict, seed: int, budget: Dict, out: str, workdir: str) -> Dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = image_train_command(dataset, config, seed, budget, out, workdir)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.isdir(out):  # a row that died half-way (no JSON row): start it again from scratch
        shutil.rmtree(out)
    with open(out + ".log", "w", encoding="utf-8") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=log)
    n = str(budget["num_images"])
    if dataset == "digits":
        rows = _evaluate(out, "digits", ["--metric", "fd-mnistcnn", "swd-pixels", "--reference", "sklearn-digits",
                                         "--num-images", n, "--steps", "1", "2"], env)
        metrics = {"fd_1step": rows[1]["fd-mnistcnn"], "fd_2step": rows[2]["fd-mnistcnn"],
                   "swd_1step": rows[1]["swd-pixels"], "swd_2step": rows[2]["swd-pixels"]}
    else:
        rows = _evaluate(out, "cycle", ["--metric", "fd-mnistcnn", "class-accuracy", "--reference", "mnist-test",
                                        "--num-images", n, "--steps", "1", "2", "--class-labels", "cycle"], env)
        metrics = {"fd_1step": rows[1]["fd-mnistcnn"], "fd_2step": rows[2]["fd-mnistcnn"],
                   "accuracy_1step": rows[1]["class-accuracy"]}
    steps_cpu = []
    with open(os.path.join(out, "logs", "train_log.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "step" in record and "step_cpu_s" in record:
                steps_cpu.append(record["step_cpu_s"])
    metrics["median_step_cpu_s"] = statistics.median(steps_cpu[5:] or steps_cpu) if steps_cpu else None
    metrics["train_command"] = " ".join(cmd)
    return metrics


# -- the study --------------------------------------------------------------------------------------------------------

def plan(datasets, configs, seeds) -> List[tuple]:
    """Seed-major within each dataset: a study stopped early still has every configuration's first seed."""
    return [(d, c, s) for d in datasets for s in seeds for c in configs]


def run_row(dataset: str, name: str, seed: int, budget: Dict, workdir: str, json_path: str) -> Optional[Dict]:
    key = row_key(dataset, name, seed, budget)
    with claim(workdir, key) as mine:
        if not mine or key in {r["key"] for r in load_rows(json_path)}:
            return None
        config = CONFIGS[name]
        slug = f"{dataset}-{name}".replace(", ", "-").replace(" ", "_").replace("=", "")
        out = os.path.join(workdir, "runs", f"{slug}-seed{seed}")
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info = machine()
        wall, cpu = time.time(), time.process_time()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        if dataset == "checkerboard":
            metrics = run_checkerboard(config, seed, budget)
        else:
            metrics = run_image(dataset, config, seed, budget, out, workdir)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        row = {"key": key, "dataset": dataset, "config": name, "factors": config, "seed": seed, "budget": budget,
               "metrics": metrics, "machine": info, "threads": 1, "started": started,
               "wall_s": round(time.time() - wall, 1), "cpu_s": round(time.process_time() - cpu + child_cpu, 1),
               "flags": config_flags(config)}
        append_row(json_path, row)
        return row


def adaptive_check(pipeline: str, reference: str, n: int = 512, seed: int = 0) -> Dict:
    """How far apart the two definitions of the adaptive weight are on a trained model's own errors.

    Draws ``n`` images of ``reference`` (with their labels if the pipeline is class-conditional), times as in
    training (logit-normal(-0.4, 1), 25% r != t) and noise, and takes each sample's summed squared error ``S`` of the
    MMF loss (lam 0, model tangent, finite differences). Returns ``D``, quantiles of ``S`` and, for p = 0.5 and 1,
    the largest relative difference between the per-sample weights ``1 / (S + c)^p`` (sum) and ``1 / (S + c D)^p``
    (the mean's weight, rescaled by ``D^p``), each normalised to batch mean 1: 0 means the two weight the samples alike
    (the losses then differ by a constant factor ``D^(1 - p)`` alone)."""
    import numpy as np
    import torch

    from mmf_diffusers import ModularMeanFlowLoss, TimeSampler
    from mmf_diffusers.offline_data import load_reference
    from mmf_diffusers.pipeline_mmf import MMFPipeline
    from mmf_diffusers.unet import unet_model_fn

    torch.set_num_threads(1)
    pipe = MMFPipeline.from_pretrained(pipeline)
    if getattr(pipe, "vae", None) is not None:
        raise ValueError("--adaptive-check takes a pixel-space pipeline")
    images, labels = load_reference(reference)
    g = np.random.default_rng(seed)
    pick = g.choice(len(images), size=n, replace=False)
    size = pipe.unet.config.sample_size
    x = torch.from_numpy(images[pick]).float().div(127.5).sub(1.0)[:, None]
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    conditioner = getattr(pipe, "conditioner", None)
    fn = unet_model_fn(pipe.unet, pipe.config.time_scale, pipe.config.second_time, conditioner=conditioner)
    kwargs = {}
    if conditioner is not None:
        kwargs = {"class_labels": torch.from_numpy(labels[pick]), "null_label": conditioner.null_label}
    loss_fn = ModularMeanFlowLoss(TimeSampler("logit_normal", -0.4, 1.0, 0.25), derivative="finite_difference",
                                  tangent="model", adaptive_p=0.0, adaptive_reduction="sum")
    with torch.no_grad():
        total = loss_fn(fn, x, 0.0, generator=torch.Generator().manual_seed(seed), **kwargs).per_sample.double()
    dim, c = x[0].numel(), 1e-3
    out = {"pipeline": pipeline, "reference": reference, "n": n, "D": dim,
           "S_quantiles": {q: float(total.quantile(q)) for q in (0.0, 0.01, 0.1, 0.5, 0.9)},
           "c": c, "c_times_D": c * dim}
    for p in (0.5, 1.0):
        w_sum, w_mean = 1 / (total + c) ** p, 1 / (total + c * dim) ** p
        w_sum, w_mean = w_sum / w_sum.mean(), w_mean / w_mean.mean()
        out[f"max_rel_weight_difference_p{p:g}"] = float(((w_mean - w_sum).abs() / w_sum).max())
    return out


HEADLINE = {"checkerboard": ("sw_1step", "sw_2step"), "digits": ("fd_1step", "fd_2step"),
            "mnist": ("fd_1step", "fd_2step"), "latent-mnist": ("fd_1step", "fd_2step")}


def table(rows: List[Dict]) -> str:
    """One markdown table per dataset: a configuration's seeds side by side, then their mean."""
    lines = []
    for dataset in DATASETS:
        mine = [r for r in rows if r["dataset"] == dataset]
        if not mine:
            continue
        one, two = HEADLINE[dataset]
        lines += [f"\n{dataset} ({budget_tag(mine[0]['budget'])}); {one} / {two} per seed, then the mean of 1 step",
                  f"| configuration | lam | p | reduction | paired | {one} per seed | mean | {two} per seed | wall s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name in CONFIGS:
            sel = sorted((r for r in mine if r["config"] == name), key=lambda r: r["seed"])
            if not sel:
                continue
            f = CONFIGS[name]
            a = [r["metrics"][one] for r in sel]
            b = [r["metrics"][two] for r in sel]
            finite = [x for x in a if x is not None and math.isfinite(x)]
            mean = f"{statistics.fmean(finite):.3f}" if finite else "nan"
            lines.append(f"| {name} | {f['lam']} | {f['adaptive_p']:g} | {f['adaptive_reduction']} | "
                         f"{'yes' if f['paired'] else 'no'} | {' / '.join(f'{x:.3f}' for x in a)} | {mean} | "
                         f"{' / '.join(f'{x:.3f}' for x in b)} | {' / '.join(str(round(r['wall_s'])) for r in sel)} |")
    return "\n".join(lines + worst_case(rows))


def worst_case(rows: List[Dict]) -> List[str]:
    """The defaults rule: each configuration's one-step score (mean over its seeds) divided by the best
    configuration's on the same dataset, and the largest of these ratios over the datasets it was measured on (its
    worst case; 1.00 = the best everywhere). Lower is better; only configurations measured on two or more datasets."""
    means: Dict[str, Dict[str, float]] = {}
    for dataset in DATASETS:
        one = HEADLINE[dataset][0]
        for name in CONFIGS:
            values = [r["metrics"][one] for r in rows if r["dataset"] == dataset and r["config"] == name]
            values = [x for x in values if x is not None and math.isfinite(x)]
            if values:
                means.setdefault(dataset, {})[name] = statistics.fmean(values)
    ratios = {name: {d: m[name] / min(m.values()) for d, m in means.items() if name in m} for name in CONFIGS}
    ratios = {name: r for name, r in ratios.items() if len(r) >= 2}
    if not ratios:
        return []
    datasets = [d for d in DATASETS if d in means]
    lines = ["\nworst case: one-step score / the best configuration's on that dataset (seed means), lower is better",
             f"| configuration | {' | '.join(datasets)} | worst |", "| --- |" + " --- |" * (len(datasets) + 1)]
    for name, r in sorted(ratios.items(), key=lambda item: max(item[1].values())):
        cells = [f"{r[d]:.2f}" if d in r else "-" for d in datasets]
        lines.append(f"| {name} | {' | '.join(cells)} | {max(r.values()):.2f} |")
    return lines


#: The curriculum verdict's runs (runs/curriculum-mnist-common/README.md): arm x seed, each with a curve.jsonl.
CURRICULUM_RUNS = os.path.join(ROOT, "runs", "curriculum-mnist-{arm}-seed{seed}", "curve.jsonl")
#: A curve counts as flat when the mean of its last two one-step figures is less than this fraction below the mean of
#: the two before them. Means of two points, because one point's score moves by about 6% with the sampling seed alone.
FLAT_FRACTION = 0.05


def load_curves(pattern: str = CURRICULUM_RUNS) -> Dict[tuple, List[Dict]]:
    """The scored points of each curriculum run, ``{(arm, seed): [point, ...]}`` ordered by step (a step scored twice,
    after a resumed chunk, keeps its last score)."""
    curves = {}
    for arm in ("warmup", "lam0"):
        for seed in (0, 1):
            path = pattern.format(arm=arm, seed=seed)
            if os.path.exists(path):
                with open(path) as f:
                    points = {p["step"]: p for p in map(json.loads, filter(str.strip, f))}
                if points:
                    curves[(arm, seed)] = [points[k] for k in sorted(points)]
    return curves


def curve_trend(points: List[Dict]) -> str:
    """Whether a curve's one-step figure has flattened: the relative fall from the mean of points -4, -3 to the mean of
    points -2, -1 (a rise counts as flat), or 'too short' with fewer than four points."""
    if len(points) < 4:
        return "too short"
    earlier, later = points[-4:-2], points[-2:]
    before = sum(p["fd_1step"] for p in earlier) / 2
    last = sum(p["fd_1step"] for p in later) / 2
    fall = (before - last) / before
    verdict = "flat" if fall < FLAT_FRACTION else "still falling"
    steps = [f"{a['step']}-{b['step']}" for a, b in (earlier, later)]
    return f"{verdict} ({-100 * fall:+.0f}% from steps {steps[0]} to {steps[1]})"


def curriculum_table(curves: Dict[tuple, List[Dict]]) -> str:
    """The curriculum runs side by side: FD-MNISTCNN at 1 / 2 steps per scored step, then each run's trend."""
    if not curves:
        return "no curriculum curve points yet"
    runs = sorted(curves, key=lambda k: (k[1], k[0] != "warmup"))
    names = [f"{arm}, seed {seed}" for arm, seed in runs]
    steps = sorted({p["step"] for pts in curves.values() for p in pts})
    by_step = {k: {p["step"]: p for p in curves[k]} for k in runs}
    lines = ["curriculum on MNIST: FD-MNISTCNN at 1 / 2 steps (1000 samples) by training step; warmup = lam 0 -> 1 "
             "over the first 2000 steps, lam0 = lam 0 throughout; both p = 0.5",
             f"| step | {' | '.join(names)} |", "| --- |" + " --- |" * len(runs)]
    for step in steps:
        cells = []
        for k in runs:
            p = by_step[k].get(step)
            cells.append(f"{p['fd_1step']:.1f} / {p['fd_2step']:.1f}" if p else "-")
        lines.append(f"| {step} | {' | '.join(cells)} |")
    lines.append("| trend of 1 step | " + " | ".join(curve_trend(curves[k]) for k in runs) + " |")
    return "\n".join(lines)


def fill_docs(path: str, blocks: Dict[str, str]) -> None:
    """Replace each ``<!-- NAME: ... -->`` ... ``<!-- /NAME -->`` block of a markdown file with a table (its lines
    that are not table rows become bold headings). A block missing from the file is an error, not skipped."""
    with open(path) as f:
        text = f.read()
    for name, body in blocks.items():
        md = []
        for line in filter(str.strip, body.strip().splitlines()):
            md += [line] if line.startswith("|") else ["", f"**{line.strip()}**", ""]
        pattern = re.compile(rf"(<!-- {re.escape(name)}:[^\n]*-->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path} has no '<!-- {name}: ... -->' ... '<!-- /{name} -->' block")
        text = pattern.sub(lambda m: m.group(1) + "\n".join(md).strip() + "\n" + m.group(2), text)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=["checkerboard"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                        help="configurations to run, in this order (default: all 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", default=DEFAULT_JSON, help="the result file (rows already there are skipped)")
    parser.add_argument("--workdir", default="/work/study",
                        help="run folders, checkpoints, latent cache and row claims (keep it outside the repository)")
    parser.add_argument("--budget", action="append", default=[], metavar="DATASET.KEY=VALUE",
                        help="override a budget entry, e.g. checkerboard.steps=20 (tests); such rows get their own key")
    parser.add_argument("--table", action="store_true", help="print the table of the rows in --json, train nothing")
    parser.add_argument("--curriculum", action="store_true",
                        help="print the curriculum runs' curves (runs/curriculum-mnist-*/curve.jsonl), train nothing")
    parser.add_argument("--fill-docs", metavar="MARKDOWN", default=None,
                        help="train nothing: write the study table and the curriculum table into the file's "
                        "'study-table' and 'curriculum-table' blocks (docs/defaults.md)")
    parser.add_argument("--plan", action="store_true", help="list the rows and which are done, train nothing")
    parser.add_argument("--adaptive-check", nargs=2, metavar=("PIPELINE", "REFERENCE"), default=None,
                        help="train nothing: how far the 'mean' and 'sum' adaptive weights differ on a trained "
                        "pixel-space pipeline's own per-sample errors (REFERENCE: mnist-test, sklearn-digits, ...)")
    args = parser.parse_args(argv)
    budgets = {k: dict(v) for k, v in BUDGETS.items()}
    for item in args.budget:
        try:
            name, value = item.split("=", 1)
            dataset, key = name.split(".", 1)
            old = budgets[dataset][key]
        except (ValueError, KeyError):
            parser.error(f"--budget {item!r}: expected DATASET.KEY=VALUE with a known dataset and key")
        try:
            budgets[dataset][key] = [int(x) for x in value.split()] if isinstance(old, list) else type(old)(value)
        except ValueError:
            parser.error(f"--budget {item!r}: {value!r} is not a valid {type(old).__name__}")
    if args.adaptive_check:
        print(json.dumps(adaptive_check(*args.adaptive_check), indent=1))
        return 0
    if args.table:
        print(table(load_rows(args.json)))
        return 0
    if args.curriculum:
        print(curriculum_table(load_curves()))
        return 0
    if args.fill_docs:
        fill_docs(args.fill_docs, {"study-table": table(load_rows(args.json)),
                                   "curriculum-table": curriculum_table(load_curves())})
        return 0
    rows = plan(args.datasets, args.configs, args.seeds)
    if args.plan:
        done = {r["key"] for r in load_rows(args.json)}
        for d, c, s in rows:
            print(("done  " if row_key(d, c, s, budgets[d]) in done else "todo  ") + f"{d} | {c} | seed {s}")
        return 0
    sys.path.insert(0, HERE)
    for d, c, s in rows:
        row = run_row(d, c, s, budgets[d], args.workdir, args.json)
        if row is not None:
            m = row["metrics"]
            one, two = HEADLINE[d]
            print(f"{time.strftime('%H:%M:%S')} {d} | {c} | seed {s}: {one} {m[one]:.4f}, {two} {m[two]:.4f}, "
                  f"wall {row['wall_s']:.0f} s, cpu {row['cpu_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
