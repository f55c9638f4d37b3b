"""benchmarks/mnist_quality.py on a tiny random class-conditional 28x28 pipeline: every row and field is there, the
Euler sampler at 1 step equals the MMF sampler at 1 step with r = t = 1 by construction, and the real-image floor
is far below random-model scores."""

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


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path):
    import mnist_quality

    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=28, in_channels=1, block_out_channels=(8, 8, 8), norm_num_groups=4)
    unet, conditioner = add_class_conditioning(unet, 10, [str(i) for i in range(10)])
    conditioner.register_to_config(guidance_w=1.0, guidance_kappa=0.5)
    MMFPipeline(unet, MMFScheduler(), conditioner=conditioner).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "q.json"
    # the same folder as its own baseline: its Euler rows must be the model's own Euler rows, number for number
    assert mnist_quality.main(["--pipeline", str(tmp_path / "pipe"), "--quick", "--json", str(out),
                               "--baseline", f"fm={tmp_path / 'pipe'}"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["sampler"], r["steps"], r.get("guidance_scale")): r for r in result["rows"]}
    assert set(rows) == {("mmf", 1, None), ("mmf", 2, None), ("euler", 1, None), ("euler", 4, None),
                         ("euler", 16, None), ("mmf", 1, 0.5), ("mmf-nolabel", 1, None), ("real", 0, None),
                         ("fm", 1, None), ("fm", 4, None), ("fm", 16, None)}
    for steps in (1, 4, 16):
        assert rows[("fm", steps, None)]["fd-mnistcnn"] == rows[("euler", steps, None)]["fd-mnistcnn"]
    summary = result["summary"]["fm"]
    assert summary["best_fd"] == min(rows[("fm", n, None)]["fd-mnistcnn"] for n in (1, 4, 16))
    assert result["baselines"] == {"fm": str(tmp_path / "pipe")}
    assert result["training_guidance_scale"] == 2.0
    for row in result["rows"]:
        assert math.isfinite(row["fd-mnistcnn"])
    # one Euler step on u(z, 1, 1) and one MMF step on u(z, 0, 1) differ only in the second time (h = 0 vs 1)
    assert rows[("euler", 1, None)]["fd-mnistcnn"] != rows[("mmf", 1, None)]["fd-mnistcnn"]
    assert rows[("real", 0, None)]["fd-mnistcnn"] * 10 < rows[("mmf", 1, None)]["fd-mnistcnn"]
    assert rows[("real", 0, None)]["class-accuracy"] > 0.95
    assert 0 <= rows[("mmf", 1, None)]["class-accuracy"] <= 1


def test_a_baseline_must_be_a_pipeline_folder_with_a_name(tmp_path, capsys):
    import mnist_quality

    shipped = str(Path(__file__).resolve().parents[1] / "pipelines" / "mmf-mnist")
    for bad in ("fm", "=x", f"euler={shipped}", f"fm={tmp_path}"):
        with pytest.raises(SystemExit) as info:
            mnist_quality.main(["--pipeline", shipped, "--baseline", bad, "--quick"])
        assert info.value.code == 2
        assert "--baseline" in capsys.readouterr().err
