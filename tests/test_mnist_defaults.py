"""benchmarks/mnist_defaults.py at a toy budget: one configuration trains, is scored on every row the README table
shows, and a second call with the same --workdir reads the scores back instead of training again."""

import json
import math
import sys
from pathlib import Path

import pytest

from mmf_diffusers.offline_data import mnist_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.skipif(mnist_source() is None, reason="MNIST file absent")


@pytest.mark.slow
def test_a_toy_run_is_scored_and_cached(tmp_path, capsys):
    import mnist_defaults

    argv = ["--configs", "lam 0", "--steps", "10", "--seeds", "0", "--batch", "4", "--num-images", "20",
            "--block_out_channels", "8", "8", "8", "--workdir", str(tmp_path / "runs"), "--json", str(tmp_path / "o.json")]
    assert mnist_defaults.main(argv) == 0
    result = json.loads((tmp_path / "o.json").read_text())
    (row,) = result["rows"]
    assert row["config"] == "lam 0" and row["flags"] == ["--lam_schedule", "constant", "--lam_end", "0"]
    for key in ("fd_1step", "fd_2step", "fd_1step_drawn", "fd_1step_none", "s_per_step"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert 0 <= row["accuracy_1step"] <= 1
    config = json.loads((tmp_path / "runs" / "lam_0-seed0" / "training_config.json").read_text())
    assert config["lam_schedule"] == "constant" and config["lam_end"] == 0 and config["class_conditional"]
    table = capsys.readouterr().out
    assert "| lam 0 |" in table

    weights = tmp_path / "runs" / "lam_0-seed0" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert mnist_defaults.main(argv) == 0
    assert weights.stat().st_mtime_ns == before  # not trained again
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == [row]
    # --table-only reports what is scored and trains nothing (the previous default was never run here)
    assert mnist_defaults.main(argv[:1] + ["previous default", "lam 0"] + argv[2:] + ["--table-only"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == [row]
    assert not (tmp_path / "runs" / "previous_default-seed0").exists()


def test_bad_budgets_are_refused():
    import mnist_defaults

    for argv in (["--steps", "3"], ["--batch", "3"], ["--configs", "nonsense"]):
        with pytest.raises(SystemExit) as info:
            mnist_defaults.main(argv)
        assert info.value.code == 2
