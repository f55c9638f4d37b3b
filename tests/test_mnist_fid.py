"""benchmarks/mnist_fid.py with the cheap FD-MNISTCNN features on a tiny random pipeline: the real-vs-real row is far
below the random model's, a rerun keeps finished rows, and new weights are scored again."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mmf_diffusers import MMFPipeline, MMFScheduler, add_class_conditioning, build_mmf_unet
from mmf_diffusers.offline_data import mnist_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.skipif(mnist_source() is None, reason="MNIST file absent")


def _tiny_pipeline(folder, seed):
    torch.manual_seed(seed)
    unet = build_mmf_unet(sample_size=28, in_channels=1, block_out_channels=(8, 8, 8), norm_num_groups=4)
    unet, conditioner = add_class_conditioning(unet, 10, [str(i) for i in range(10)])
    MMFPipeline(unet, MMFScheduler(), conditioner=conditioner).save_pretrained(folder)


@pytest.mark.slow
def test_rows_are_scored_kept_and_rescored_for_new_weights(tmp_path, capsys):
    import mnist_fid

    _tiny_pipeline(tmp_path / "pipe", 0)
    out = tmp_path / "fid.json"
    argv = ["--pipeline", f"tiny={tmp_path / 'pipe'}", "--num-images", "60", "--steps", "1", "2",
            "--metric", "fd-mnistcnn", "--json", str(out)]
    assert mnist_fid.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["name"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {("real", 0), ("tiny", 1), ("tiny", 2)}
    assert all(math.isfinite(r["value"]) for r in rows.values())
    assert rows[("real", 0)]["value"] * 5 < rows[("tiny", 1)]["value"]
    assert result["settings"]["class_labels"] == "random" and result["settings"]["num_images"] == 60
    capsys.readouterr()

    assert mnist_fid.main(argv) == 0
    assert "tiny steps=1: kept" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == result["rows"]

    _tiny_pipeline(tmp_path / "pipe", 1)  # new weights in the same folder: its rows are scored again
    assert mnist_fid.main(argv) == 0
    printed = capsys.readouterr().out
    assert "real steps=0: kept" in printed and "tiny steps=1: kept" not in printed
    again = {(r["name"], r["steps"]): r for r in json.loads(out.read_text())["rows"]}
    assert again[("tiny", 1)]["weights"] != rows[("tiny", 1)]["weights"]
    assert again[("tiny", 1)]["value"] != rows[("tiny", 1)]["value"]


def test_bad_requests_are_refused(tmp_path):
    import mnist_fid

    for argv in (["--pipeline", "nofolder"], ["--pipeline", f"x={tmp_path}"], ["--pipeline", "real=x"],
                 ["--num-images", "0"], ["--num-images", "70000", "--metric", "fd-mnistcnn"]):
        with pytest.raises(SystemExit) as info:
            mnist_fid.main(argv)
        assert info.value.code == 2


@pytest.mark.slow
def test_a_run_naming_other_pipelines_keeps_the_earlier_rows(tmp_path, capsys):
    import mnist_fid

    _tiny_pipeline(tmp_path / "a", 0)
    _tiny_pipeline(tmp_path / "b", 1)
    out = tmp_path / "fid.json"
    common = ["--num-images", "40", "--metric", "fd-mnistcnn", "--json", str(out)]
    assert mnist_fid.main(["--pipeline", f"a={tmp_path / 'a'}"] + common) == 0
    first = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert mnist_fid.main(["--pipeline", f"b={tmp_path / 'b'}"] + common) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["real", "a", "b"]
    assert rows[1] == first["a"]
    assert "| a | 1 |" in capsys.readouterr().out
    assert mnist_fid.main(["--pipeline", f"a={tmp_path / 'b'}"] + common) == 0  # "a" again, other weights
    again = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["real", "b", "a"]
    assert again["a"]["weights"] == again["b"]["weights"] and again["b"] == rows[2]
    assert mnist_fid.main(["--num-images", "40", "--metric", "fd-mnistcnn", "--json", str(out)]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["real", "b", "a"]  # only "real" ran
