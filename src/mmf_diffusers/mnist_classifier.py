r"""A small MNIST digit classifier whose penultimate features give the FD-MNISTCNN metric, and whose predictions
check the digit classes of samples.

Network (``MNISTClassifier``, 98k parameters, float32 weights ~390 KB in
``mmf_diffusers/assets/mnist_classifier.safetensors``): three 3x3 conv + ReLU + 2x2 max-pool blocks (1 -> 16 -> 32 ->
64 channels, 28 -> 14 -> 7 -> 3), flatten (576), linear 576 -> 128 + ReLU (the **features**, ``(N, 128)``), linear
128 -> 10 (logits).

Input: ``(N, 1, H, W)`` float in ``[-1, 1]`` (the pipelines' range; background -1, ink +1). ``to_classifier_input``
maps any size to the 28x28 MNIST layout: 28x28 images pass unchanged; any other size is taken as a digit that fills
its frame (like scikit-learn's 8x8 digits), resized to 20x20 (bilinear, antialiased) and padded by 4 pixels of
background on each side, as MNIST centres a 20x20 digit in 28x28.

Training: the shipped weights were made with exactly this command (repository root, this project's 2-core CPU,
about 3.5 minutes; it needs the MNIST file, see `mmf_diffusers.offline_data`):

    OMP_NUM_THREADS=1 python -m mmf_diffusers.mnist_classifier \
        --output src/mmf_diffusers/assets/mnist_classifier.safetensors

Adam (lr 1e-3, cosine to 0), batch 128, 8 epochs, seed 0, on the 50k MNIST train images plus 1000 of scikit-learn's
1797 8x8 digits (a seeded split, `split_sklearn_digits`; each repeated 5 times per epoch, through
`to_classifier_input`). Each image is moved by a random shift of up to 2 pixels, and 30% of the MNIST images are
replaced by a low-resolution copy (the digit's bounding box, squared, shrunk to 8x8 with a box filter and brought
back through `to_classifier_input`), so that 8x8 samples are read well too.
Measured accuracy of the shipped weights (training took 198 s): MNIST test split **99.12%** (10k images), MNIST
validation split 98.98%, the 797 held-out scikit-learn digits 98.62%; the command and these numbers are stored in
the file's metadata (``load_mnist_classifier(return_metadata=True)``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "mnist_classifier.safetensors")
FEATURE_DIM = 128


class MNISTClassifier(nn.Module):
    """Small CNN on ``(N, 1, 28, 28)`` images in ``[-1, 1]``: ``features(x)`` ``(N, 128)``, ``forward(x)`` logits
    ``(N, 10)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 3 * 3, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"MNISTClassifier takes (N, 1, 28, 28) images, got {tuple(x.shape)}; "
                             "use to_classifier_input first")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` in ``[-1, 1]`` -> ``(N, 1, 28, 28)`` in the MNIST layout (see the module docstring)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grayscale images (N, 1, H, W), got {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] == (28, 28):
        return images
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False, antialias=True)
    return F.pad(images, (4, 4, 4, 4), value=-1.0)


def load_mnist_classifier(path: Optional[str] = None, return_metadata: bool = False):
    """The classifier in eval mode from a safetensors file (default: the weights shipped with the package)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = path or DEFAULT_WEIGHTS
    model = MNISTClassifier()
    model.load_state_dict(load_file(path))
    model.eval().requires_grad_(False)
    if return_metadata:
        with safe_open(path, framework="pt") as f:
            return model, dict(f.metadata() or {})
    return model


@torch.no_grad()
def classify(model: MNISTClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted digit ``(N,)`` of images ``(N, 1, H, W)`` in ``[-1, 1]`` (any size, see `to_classifier_input`)."""
    return torch.cat([model(to_classifier_input(chunk)).argmax(1) for chunk in images.split(batch_size)])


def uint8_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` (0..255) -> float ``(N, 1, H, W)`` in ``[-1, 1]``, the same scaling as training/data.py."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Training


def _low_resolution_copies(images: np.ndarray) -> torch.Tensor:
    """Each 28x28 uint8 digit as an 8x8 "frame-filling" digit brought back to 28x28 by `to_classifier_input`."""
    from PIL import Image

    small = np.empty((len(images), 8, 8), dtype=np.float32)
    for i, image in enumerate(images):
        rows, cols = np.nonzero(image)
        if len(rows) == 0:
            crop = image
        else:
            top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            side = max(bottom - top, right - left)
            crop = np.zeros((side, side), dtype=np.uint8)
            oy, ox = (side - (bottom - top)) // 2, (side - (right - left)) // 2
            crop[oy:oy + bottom - top, ox:ox + right - left] = image[top:bottom, left:right]
        small[i] = np.asarray(Image.fromarray(crop).resize((8, 8), Image.BOX), dtype=np.float32)
    return to_classifier_input(torch.from_numpy(small / 127.5 - 1.0)[:, None])


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(model: MNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (classify(model, images) == labels).double().mean().item()


def split_sklearn_digits(num_train: int = 1000, seed: int = 0):
    """scikit-learn's digits cut into a training part (``num_train`` images) and a held-out part, by a seeded
    permutation: ``((train_images, train_labels), (held_out_images, held_out_labels))``, uint8 ``(N, 8, 8)``."""
    from .offline_data import load_sklearn_digits

    images, labels = load_sklearn_digits()
    order = np.random.default_rng(seed).permutation(len(images))
    return ((images[order[:num_train]], labels[order[:num_train]]),
            (images[order[num_train:]], labels[order[num_train:]]))


def train(epochs: int = 8, batch_size: int = 128, lr: float = 1e-3, low_res_fraction: float = 0.3,
          digits_train: int = 1000, digits_repeat: int = 5, seed: int = 0, log=print) -> Dict[str, object]:
    """Train on the MNIST train split (+ part of scikit-learn's digits); returns ``{"model", "accuracy": {set:
    value}}`` with accuracies on held-out sets (see the module docstring)."""
    from .offline_data import load_mnist

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = load_mnist("train")
    (digit_images, digit_labels), (held_images, held_labels) = split_sklearn_digits(digits_train, seed)
    digits = to_classifier_input(uint8_to_model_range(digit_images)).repeat(digits_repeat, 1, 1, 1)
    x = torch.cat([uint8_to_model_range(train_images), digits])
    x_low = torch.cat([_low_resolution_copies(train_images), digits])
    y = torch.cat([torch.from_numpy(train_labels), torch.from_numpy(digit_labels).repeat(digits_repeat)])
    model = MNISTClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start, step = time.time(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for b in range(len(x) // batch_size):
            index = order[b * batch_size:(b + 1) * batch_size]
            low = torch.rand(len(index), generator=generator) < low_res_fraction
            batch = torch.where(low[:, None, None, None], x_low[index], x[index])
            batch = _random_shift(batch, generator)
            loss = F.cross_entropy(model(batch), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 500 == 0:
                log(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.eval()
    results = {}
    for name in ("validation", "test"):
        images, labels = load_mnist(name)
        results[f"mnist-{name}"] = accuracy(model, uint8_to_model_range(images), torch.from_numpy(labels))
    results["sklearn-digits-held-out"] = accuracy(model, uint8_to_model_range(held_images),
                                                  torch.from_numpy(held_labels))
    log(f"trained in {time.time() - start:.0f} s; accuracy: "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in results.items()))
    return {"model": model.requires_grad_(False), "accuracy": results}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train the small MNIST classifier behind FD-MNISTCNN.")
    parser.add_argument("--output", required=True, help="where to write the safetensors weights")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training images (default 8)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed to 0 (default 1e-3)")
    parser.add_argument("--low-res-fraction", type=float, default=0.3,
                        help="fraction of images replaced by an 8x8 copy brought back to 28x28 (default 0.3)")
    parser.add_argument("--digits-train", type=int, default=1000,
                        help="scikit-learn digits used for training; the other 797 are held out (default 1000)")
    parser.add_argument("--digits-repeat", type=int, default=5,
                        help="how often each of those digits appears per epoch (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    result = train(args.epochs, args.batch_size, args.lr, args.low_res_fraction, args.digits_train,
                   args.digits_repeat, args.seed)
    command = "python -m mmf_diffusers.mnist_classifier " + " ".join(argv if argv is not None else sys.argv[1:])
    metadata = {"command": command, **{f"accuracy/{k}": f"{v:.4f}" for k, v in result["accuracy"].items()}}
    state = {k: v.contiguous() for k, v in result["model"].state_dict().items()}
    save_file(state, args.output, metadata=metadata)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
