"""Class-conditional training through training/train_mmf.py and training/data.py: labels from image-folder
class names, from a label column and from the offline digits; an end-to-end run with training-time guidance whose
pipeline keeps the class names; SIGKILL + resume reproduces the run bit for bit (label dropout included); bad input.
CPU only, tiny UNets, the script in subprocesses with OMP_NUM_THREADS=1.
"""

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_training import REPO, check, parse_error, read_log, run_script, script_env

sys.path.insert(0, str(REPO / "training"))

import data as data_lib  # noqa: E402
from data import DataError  # noqa: E402

CLASSES = ("cat", "dog", "fox")
TINY = ["--resolution", "8", "--block_out_channels", "8", "16", "--num_sample_images", "6", "--lr_warmup_steps", "0",
        "--seed", "0", "--logger", "none"]


def write_class_folder(root: Path, per_class: int = 6) -> Path:
    """Gray PNGs in one subfolder per class; class k is brighter than class k - 1, so the labels mean something."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 70 * k, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------------------
# data


def test_image_folder_class_names_become_labels(tmp_path):
    folder = write_class_folder(tmp_path / "images")
    source = data_lib.load_source(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"), require_labels=True)
    assert source.class_names == list(CLASSES)
    valid, channels = data_lib.scan_images(source, log=lambda m: None)
    dataset = data_lib.ImageDataset(source, valid, 8, channels, with_labels=True)
    images, labels = data_lib.collate([dataset[(i, 0)] for i in range(len(dataset))])
    assert tuple(images.shape) == (18, 1, 8, 8) and labels.dtype.is_floating_point is False
    assert sorted(labels.tolist()) == sorted([0] * 6 + [1] * 6 + [2] * 6)
    # each label is the folder the image came from: brightness rises with the class id
    means = [images[labels == k].mean().item() for k in range(3)]
    assert means[0] < means[1] < means[2]
    # without labels the items are arrays, as before
    assert isinstance(data_lib.ImageDataset(source, valid, 8, channels)[0], np.ndarray)


def test_a_label_column_of_strings_is_mapped_in_sorted_order(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L") for _ in range(5)]
    kinds = ["zebra", "ant", "zebra", "moth", "ant"]
    ds = datasets.Dataset.from_dict({"image": images, "kind": kinds}).cast_column("image", datasets.Image())
    folder = tmp_path / "ds"
    ds.save_to_disk(str(folder))
    labels, names = data_lib._read_labels(datasets.load_from_disk(str(folder)), "kind", required=True)
    assert names == ["ant", "moth", "zebra"] and labels.tolist() == [2, 0, 2, 1, 0]
    with pytest.raises(DataError, match="--label_column 'species' is not a column"):
        data_lib._read_labels(ds, "species", required=True)
    assert data_lib._read_labels(ds, None, required=False) == (None, None)


def test_offline_digits_carry_their_labels():
    from mmf_diffusers.offline_data import load_sklearn_digits

    source = data_lib.load_source(dataset_name="sklearn-digits")
    images, labels = load_sklearn_digits()
    assert source.class_names == [str(i) for i in range(10)]
    assert np.array_equal(source.labels, labels) and np.bincount(source.labels).min() > 170
    with pytest.raises(DataError, match="does not apply"):
        data_lib.load_source(dataset_name="sklearn-digits", label_column="label")


def test_a_folder_without_class_subfolders_has_no_labels(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 50 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    source = data_lib.load_source(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert source.labels is None
    with pytest.raises(DataError, match="class-conditional training needs labels"):
        data_lib.load_source(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"), require_labels=True)
    with pytest.raises(DataError, match="has no labels"):
        data_lib.ImageDataset(source, [0, 1, 2], 8, 1, with_labels=True)


# ---------------------------------------------------------------------------------------------------------------
# training script


def conditional_args(data: Path, out: Path, steps: int) -> list:
    return ["--train_data_dir", data, "--output_dir", out, *TINY, "--train_batch_size", "6", "--max_train_steps",
            steps, "--checkpointing_steps", "2", "--class_conditional", "--label_dropout", "0.3", "--cfg_w", "0.75",
            "--cfg_kappa", "0.5", "--lam_schedule", "linear", "--lam_warmup_steps", "4", "--lr_scheduler", "constant",
            "--use_ema", "--cache_dir", out.parent / "cache"]


@pytest.mark.slow
def test_class_conditional_run_end_to_end_then_kill_and_resume_reproduces_it(tmp_path):
    import torch
    from safetensors.torch import load_file

    from mmf_diffusers import MMFPipeline

    data = write_class_folder(tmp_path / "images")
    reference = tmp_path / "reference"
    check(run_script(tmp_path, conditional_args(data, reference, 6)))

    # the pipeline folder: a conditioner component with the class names and the guidance record
    conditioner_config = json.loads((reference / "conditioner" / "config.json").read_text())
    assert conditioner_config["class_names"] == list(CLASSES) and conditioner_config["num_classes"] == 3
    assert conditioner_config["guidance_w"] == 0.75 and conditioner_config["guidance_kappa"] == 0.5
    # the class frequencies of the training images, which a call without class_labels draws from
    assert conditioner_config["class_prior"] == pytest.approx([1 / 3] * 3, abs=1e-5)
    card = (reference / "README.md").read_text()
    assert "class-conditional-image-generation" in card and "effective_guidance_scale=1.5" in card
    assert "class_labels=" in card
    pipe = MMFPipeline.from_pretrained(str(reference))
    assert pipe.class_names == list(CLASSES) and pipe.unet.config.class_embed_type == "identity"
    images = pipe(num_images=3, class_labels=["fox", "cat", "dog"], generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()
    # training moved the label embedding away from its zero start
    weights = load_file(str(reference / "conditioner" / "diffusion_pytorch_model.safetensors"))
    assert weights["label_embedding.weight"].abs().max() > 0

    # SIGKILL right after checkpoint-2, resume, finish: the same losses and final weights (EMA, conditioner included)
    out = tmp_path / "killed"
    result = run_script(tmp_path, conditional_args(data, out, 6), env=script_env(tmp_path, MMF_TEST_KILL="after_save:2"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    result = run_script(tmp_path, conditional_args(data, out, 6) + ["--resume_from_checkpoint", "latest"])
    check(result)
    assert "checkpoint-2" in result.stdout
    expected, got = read_log(reference), read_log(out)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "lam", "grad_norm"):
            assert got[step][key] == expected[step][key], (step, key)
    for component in ("unet", "conditioner"):
        a = load_file(str(reference / component / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(out / component / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), component

    # an unconditional resume of a class-conditional checkpoint is refused, with the reason
    args = [a for a in conditional_args(data, out, 8) if a not in ("--class_conditional",)]
    args = args[:args.index("--label_dropout")] + args[args.index("--lam_schedule"):]
    result = run_script(tmp_path, args + ["--resume_from_checkpoint", "latest"])
    assert result.returncode != 0 and "--class_conditional True -> False" in result.stdout + result.stderr


@pytest.mark.slow
def test_warm_start_of_a_class_conditional_model_keeps_the_unconditional_function(tmp_path):
    import torch

    from mmf_diffusers import MMFPipeline, build_mmf_unet

    unet = build_mmf_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8)
    unet.save_pretrained(str(tmp_path / "pretrained"))
    data = write_class_folder(tmp_path / "images")
    out = tmp_path / "run"
    # learning rate ~0: the saved pair must compute what the pretrained UNet computed, for every label
    check(run_script(tmp_path, ["--train_data_dir", data, "--output_dir", out, *TINY, "--train_batch_size", "6",
                                "--max_train_steps", "1", "--learning_rate", "1e-30", "--class_conditional",
                                "--pretrained_unet", tmp_path / "pretrained", "--cache_dir", tmp_path / "cache"]))
    pipe = MMFPipeline.from_pretrained(str(out))
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, r = torch.tensor([1.0, 0.7, 0.5, 0.2]), torch.tensor([0.0, 0.3, 0.5, 0.1])
    from mmf_diffusers import unet_average_velocity

    with torch.no_grad():
        expected = unet_average_velocity(unet, z, r, t)
        for label in (0, 2, None):
            labels = None if label is None else torch.full((4,), label)
            assert torch.allclose(pipe.average_velocity(z, r, t, labels), expected, atol=1e-5), label


@pytest.mark.parametrize("extra, message", [
    (["--cfg_w", "0.5"], "only applies with --class_conditional"),
    (["--label_column", "kind"], "only applies with --class_conditional"),
    (["--class_conditional", "--cfg_kappa", "1"], "--cfg_kappa must be in [0, 1)"),
    (["--class_conditional", "--cfg_w", "0"], "--cfg_w must be positive"),
    (["--class_conditional", "--label_dropout", "1"], "--label_dropout must be in [0, 1)"),
    (["--class_conditional", "--cfg_w", "2", "--label_dropout", "0"], "needs --label_dropout > 0"),
])
def test_bad_class_conditional_flags(capsys, extra, message):
    assert message in parse_error(capsys, ["--dataset_name", "sklearn-digits", *extra])


def test_class_conditional_on_a_folder_without_classes_is_a_clear_error(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    result = run_script(tmp_path, ["--train_data_dir", folder, "--output_dir", tmp_path / "out", *TINY,
                                   "--train_batch_size", "4", "--max_train_steps", "1", "--class_conditional",
                                   "--cache_dir", tmp_path / "cache"])
    assert result.returncode != 0
    assert "class-conditional training needs labels" in result.stdout + result.stderr
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_class_conditional_on_a_single_class_is_a_clear_error(tmp_path):
    folder = tmp_path / "one"  # a label column with one value: labels exist, but there is nothing to condition on
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,kind\n" + "".join(f"{i}.png,cat\n" for i in range(8)))
    result = run_script(tmp_path, ["--train_data_dir", folder, "--output_dir", tmp_path / "out", *TINY,
                                   "--train_batch_size", "4", "--max_train_steps", "1", "--class_conditional",
                                   "--label_column", "kind", "--cache_dir", tmp_path / "cache"])
    assert result.returncode == 2
    assert "has 1 class; class-conditional training needs two or more" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out" / "model_index.json").exists()
