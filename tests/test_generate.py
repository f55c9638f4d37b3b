"""The ``mmf-generate`` command: writes a grid from a pipeline folder; clear errors for bad requests."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from mmf_diffusers import MMFPipeline, MMFScheduler, build_mmf_unet
from mmf_diffusers.generate import main, make_grid


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    folder = tmp_path_factory.mktemp("pipe")
    MMFPipeline(unet, MMFScheduler()).save_pretrained(folder)
    return folder


def test_generate_writes_grid(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["--pipeline", str(pipeline_dir), "--num-images", "6", "--steps", "2", "--output", str(out),
                 "--nrow", "3", "--upscale", "2", "--save-individual"]) == 0
    grid = Image.open(out)
    # 3 x 2 tiles of 16 px (8 px upscaled twice) with 2 px padding.
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2) and grid.mode == "L"
    assert len(list(tmp_path.glob("grid_*.png"))) == 6
    assert str(out) in capsys.readouterr().out


def test_generate_is_seeded(pipeline_dir, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "1"), (b, "1"), (c, "2")):
        main(["--pipeline", str(pipeline_dir), "--num-images", "4", "--seed", seed, "--output", str(path)])
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-images", "0"], "positive integer"),
        (["--steps", "-1"], "positive integer"),
        (["--steps", "1.5"], "positive integer"),
        (["--output", "/no/such/dir/x.png"], "does not exist"),
    ],
)
def test_generate_rejects_bad_numbers_and_paths(pipeline_dir, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--pipeline", str(pipeline_dir), *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_generate_rejects_missing_or_non_pipeline_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--pipeline", str(tmp_path / "missing")])
    assert "no such pipeline folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--pipeline", str(tmp_path)])
    assert "not a pipeline folder" in capsys.readouterr().err


def test_console_script_is_installed(pipeline_dir, tmp_path):
    out = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, "-m", "mmf_diffusers.generate", "--pipeline", str(pipeline_dir),
                           "--num-images", "2", "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


def test_make_grid_layout():
    tiles = [Image.new("RGB", (4, 5), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(tiles, nrow=2, padding=1)
    assert grid.size == (2 * 5 + 1, 3 * 6 + 1)
    assert grid.getpixel((1 + 5, 1)) == (40, 0, 0)  # second tile, first row
