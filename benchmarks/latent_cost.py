"""Sampling and training cost of MMF pipelines side by side, e.g. a latent one against a pixel one.

    OMP_NUM_THREADS=1 python benchmarks/latent_cost.py --pipeline pipelines/mmf-mnist-latent pipelines/mmf-mnist \
        --train-log LATENT_RUN/logs/train_log.jsonl runs/mmf-mnist-cool/logs/train_log.jsonl.gz

(docs/latent.md has the commands that train the runs of its table; a log may be gzipped.)

For each pipeline: the one-step sampling time of ``--batch`` images split into the UNet call and the VAE decode (median
of ``--repeats`` timed calls after one warm-up, each part timed alone on the same inputs; the decode is 0 for a pixel
pipeline), parameters of UNet and VAE, and, from its training log (``logs/train_log.jsonl`` of train_mmf.py), the
median seconds per optimiser step, per training image (step time / batch) and the sum of the logged step times. The
thread count is printed with the table: a figure is only comparable to another taken at the same thread count on the
same machine.

With ``--quality N``: N samples at each of ``--steps`` (classes in turn for a class-conditional pipeline, seed 0, as
``mmf-evaluate`` draws them) scored with FD-MNISTCNN against the MNIST test set and class accuracy, all at
``--quality-size`` pixels. Samples of another size are first resized to it with PIL bilinear, the resize with which
`mmf-evaluate` brings the reference to the samples' size and training/data.py brings MNIST to ``--resolution``. At 32
(the default) every model is scored in the space the latent model was trained in (MNIST upsampled 28 -> 32; real
training images: 4.2); a 28x28 pixel model's samples get the same upsampling as the real images did. Scoring at 28
instead is not like for like: the classifier's features react strongly to the blur of a 32 -> 28 resize (real
training images upsampled to 32 and resized back score 64, against 9.9 untouched; benchmarks/vae_quality.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time

import torch

from mmf_diffusers import MMFPipeline
from mmf_diffusers.pipeline_mmf import decode_latents


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def sampling_cost(pipe: MMFPipeline, batch: int, repeats: int) -> dict:
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    z = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
    zeros, ones = torch.zeros(batch), torch.ones(batch)
    labels = None
    if pipe.is_class_conditional:
        labels = torch.arange(batch) % pipe.conditioner.config.num_classes
    unet_s = _median_seconds(lambda: pipe.average_velocity(z, zeros, ones, labels), repeats)
    decode_s = _median_seconds(lambda: decode_latents(pipe.vae, z), repeats) if pipe.is_latent else 0.0
    kwargs = {"class_labels": labels.tolist()} if labels is not None else {}
    pipeline_s = _median_seconds(lambda: pipe(num_images=batch, output_type="pt", **kwargs), repeats)
    return {"unet_ms_per_image": 1e3 * unet_s / batch, "decode_ms_per_image": 1e3 * decode_s / batch,
            "pipeline_ms_per_image": 1e3 * pipeline_s / batch,
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()) if pipe.is_latent else 0,
            "image_size": pipe.image_size, "unet_input": [channels, size, size]}


def training_cost(log_path: str, batch: int) -> dict:
    times = []
    # the logs committed under runs/ are gzipped
    opener = gzip.open if log_path.endswith(".gz") else open
    with opener(log_path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "step_time_s" in record:
                times.append(record["step_time_s"])
    median = statistics.median(times)
    return {"steps_logged": len(times), "median_s_per_step": median, "ms_per_training_image": 1e3 * median / batch,
            "sum_of_step_times_min": sum(times) / 60}


def quality(pipe: MMFPipeline, num_images: int, steps: int, size: int, evaluator) -> dict:
    from mmf_diffusers.evaluation import generate, quantize_to_uint8, resize_reference
    from mmf_diffusers.generate import cycled_labels

    labels = digits = None
    if pipe.is_class_conditional:
        labels = cycled_labels(num_images, len(pipe.class_names))
        digits = [int(pipe.class_names[i]) for i in labels]
    images = generate(pipe, num_images, steps, seed=0, batch_size=250, class_labels=labels)
    if images.shape[-1] != size:
        pixels = quantize_to_uint8(images)[:, 0].numpy().astype("uint8")
        images = torch.from_numpy(resize_reference(pixels, size)).float()[:, None] / 127.5 - 1
    scores = evaluator.score(images, digits)
    return {"fd_mnistcnn": scores["fd-mnistcnn"], "class_accuracy": scores.get("class-accuracy")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", nargs="+", required=True, help="pipeline folders")
    parser.add_argument("--train-log", nargs="*", default=[], help="one train_log.jsonl per pipeline (or none)")
    parser.add_argument("--train-batch", type=int, default=64, help="training batch size of the logged runs")
    parser.add_argument("--batch", type=int, default=100, help="images per timed sampling call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure")
    parser.add_argument("--quality", type=int, default=0, help="samples per FD-MNISTCNN figure (0: no quality)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="sampling steps scored by --quality")
    parser.add_argument("--quality-size", type=int, default=32, help="size at which every pipeline is scored")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.train_log and len(args.train_log) != len(args.pipeline):
        parser.error("give one --train-log per --pipeline, or none")
    results = {"threads": torch.get_num_threads(), "batch": args.batch, "pipelines": {}}
    evaluator = None
    if args.quality:
        from mmf_diffusers.evaluation import Evaluator

        evaluator = Evaluator(["fd-mnistcnn", "class-accuracy"], "mnist-test", args.quality_size)
    for i, folder in enumerate(args.pipeline):
        pipe = MMFPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        row = sampling_cost(pipe, args.batch, args.repeats)
        if args.train_log and os.path.isfile(args.train_log[i]):
            row.update(training_cost(args.train_log[i], args.train_batch))
        for steps in args.steps if evaluator is not None else []:
            row[f"quality_{steps}_step"] = quality(pipe, args.quality, steps, args.quality_size, evaluator)
        results["pipelines"][folder] = row
        print(folder, json.dumps(row), flush=True)
    print(f"\n{results['threads']} thread(s), sampling batch {args.batch}:")
    print("| pipeline | UNet input | UNet ms/image | decode ms/image | 1-step pipeline ms/image | s/train step | "
          "ms/train image |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for folder, row in results["pipelines"].items():
        train = (f"{row['median_s_per_step']:.3f} | {row['ms_per_training_image']:.1f}" if "median_s_per_step" in row
                 else "- | -")
        print(f"| {folder} | {'x'.join(map(str, row['unet_input']))} | {row['unet_ms_per_image']:.2f} | "
              f"{row['decode_ms_per_image']:.2f} | {row['pipeline_ms_per_image']:.2f} | {train} |")
    if evaluator is not None:
        print(f"\nFD-MNISTCNN / class accuracy, {args.quality} samples at {args.quality_size} px against the MNIST "
              "test set:")
        print("| pipeline | " + " | ".join(f"{k} step" for k in args.steps) + " |")
        print("| --- |" + " --- |" * len(args.steps))
        for folder, row in results["pipelines"].items():
            cells = []
            for k in args.steps:
                q = row[f"quality_{k}_step"]
                acc = "" if q["class_accuracy"] is None else f" / {100 * q['class_accuracy']:.1f}%"
                cells.append(f"{q['fd_mnistcnn']:.1f}{acc}")
            print(f"| {folder} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
