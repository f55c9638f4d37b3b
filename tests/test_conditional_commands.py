"""``mmf-generate`` and ``mmf-evaluate`` with class-conditional pipelines: class labels by name, in turn or
'none', sampling-time guidance, the class-accuracy metric against a known answer, clear errors."""

import json

import numpy as np
import pytest
import torch

from mmf_diffusers import MMFPipeline, MMFScheduler, add_class_conditioning, build_mmf_unet, evaluation
from mmf_diffusers.generate import main as generate_main
from mmf_diffusers.generate import resolve_class_labels
from mmf_diffusers.offline_data import load_mnist, mnist_source

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    unet, conditioner = add_class_conditioning(unet, 10, DIGITS)
    with torch.no_grad():  # labels that matter (the warm-start zero embedding would make them all alike)
        conditioner.label_embedding.weight.normal_(0, 1)
    folder = tmp_path_factory.mktemp("cond")
    MMFPipeline(unet, MMFScheduler(), conditioner=conditioner).save_pretrained(folder)
    return folder


def tiles(path, n, size=8, upscale=8, padding=2, nrow=None):
    """The tiles of a grid written by mmf-generate, as arrays."""
    from PIL import Image

    grid = np.asarray(Image.open(path))
    nrow = nrow or n
    step = size * upscale + padding
    return [grid[padding + (i // nrow) * step:(i // nrow + 1) * step, padding + (i % nrow) * step:(i % nrow + 1) * step]
            for i in range(n)]


def test_resolve_class_labels():
    assert resolve_class_labels(None, ["a", "b", "c"], 5) == [0, 1, 2, 0, 1]
    assert resolve_class_labels(["none"], ["a", "b"], 3) == "none"  # the "no label" token
    assert resolve_class_labels(["random"], ["a", "b"], 3) is None  # the pipeline draws the classes
    assert resolve_class_labels(["b"], ["a", "b"], 3) == "b"
    assert resolve_class_labels(["1", "a"], ["a", "b"], 2) == [1, "a"]  # "1" is not a name here: an id
    assert resolve_class_labels(["1", "7"], DIGITS, 2) == ["1", "7"]  # digit names stay names


def test_generate_with_labels_in_turn_by_name_and_guided(conditional_dir, tmp_path, capsys):
    default, named, guided = tmp_path / "default.png", tmp_path / "named.png", tmp_path / "guided.png"
    common = ["--pipeline", str(conditional_dir), "--num-images", "3", "--nrow", "3", "--upscale", "8"]
    assert generate_main(common + ["--output", str(default)]) == 0
    assert "classes in turn" in capsys.readouterr().out
    assert generate_main(common + ["--output", str(named), "--class-labels", "0", "1", "2"]) == 0
    # the default asks for classes 0, 1, 2: the same images as naming them
    assert default.read_bytes() == named.read_bytes()
    # one label for all: every tile differs from the 'in turn' tile of another class, equals its own class's
    same = tmp_path / "same.png"
    assert generate_main(common + ["--output", str(same), "--class-labels", "0", "--seed", "0"]) == 0
    a, b = tiles(default, 3), tiles(same, 3)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])
    assert generate_main(common + ["--output", str(guided), "--class-labels", "0", "1", "2",
                                   "--guidance-scale", "3"]) == 0
    assert "guidance scale 3.0" in capsys.readouterr().out
    assert guided.read_bytes() != named.read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--class-labels", "11"], "out of range"),
    (["--class-labels", "cat"], "Unknown class name 'cat'"),
    (["--class-labels", "1", "2"], "Got 2 class labels for 3 images"),
    (["--class-labels", "none", "--guidance-scale", "2"], "needs class labels"),
    (["--guidance-scale", "inf"], "expected a finite number"),
])
def test_generate_errors(conditional_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--pipeline", str(conditional_dir), "--num-images", "3", "--output", str(tmp_path / "x.png"),
                       *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_unconditional_pipeline_refuses_labels(tmp_path, capsys):
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    MMFPipeline(unet, MMFScheduler()).save_pretrained(tmp_path / "plain")
    for extra in (["--class-labels", "1"], ["--guidance-scale", "2"]):
        with pytest.raises(SystemExit):
            generate_main(["--pipeline", str(tmp_path / "plain"), "--output", str(tmp_path / "x.png"), *extra])
        assert "is unconditional" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.main(["--pipeline", str(tmp_path / "plain"), "--guidance-scale", "2", "--reference",
                         "sklearn-digits", "--output", str(tmp_path / "e.json")])
    assert "need a class-conditional pipeline" in capsys.readouterr().err


@pytest.mark.skipif(mnist_source() is None, reason="MNIST file absent")
def test_class_accuracy_known_answers():
    images, labels = load_mnist("test")
    images = torch.from_numpy(images[:1000]).float().div(127.5).sub(1).unsqueeze(1)
    labels = labels[:1000]
    scorer = evaluation.Evaluator(["class-accuracy"], "mnist-test", 28)
    # real digits with their labels: the classifier's accuracy (99.12% on all 10k); with labels rolled by one: ~0
    assert scorer.score(images, labels)["class-accuracy"] >= 0.98
    assert scorer.score(images, (labels + 1) % 10)["class-accuracy"] <= 0.02
    with pytest.raises(ValueError, match="needs the digit"):
        scorer.score(images)


def test_evaluate_command_with_class_accuracy(conditional_dir, tmp_path):
    out = tmp_path / "e.json"
    assert evaluation.main(["--pipeline", str(conditional_dir), "--reference", "sklearn-digits", "--metric",
                            "class-accuracy", "fd-mnistcnn", "--num-images", "40", "--steps", "1", "--guidance-scale",
                            "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert result["class_labels"] == "cycle" and result["guidance_scale"] == 2.0
    assert 0.0 <= row["class-accuracy"] <= 1.0 and np.isfinite(row["fd-mnistcnn"])
    # 'none' samples the unconditional distribution, which has no requested class
    with pytest.raises(SystemExit):
        evaluation.main(["--pipeline", str(conditional_dir), "--reference", "sklearn-digits", "--metric",
                         "class-accuracy", "--class-labels", "none", "--output", str(out)])
