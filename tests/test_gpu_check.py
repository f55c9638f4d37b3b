"""benchmarks/gpu_check.sh, the GPU check of the training path, in its CPU dry run (``GPU_CHECK_DRY_RUN=1``), so it
cannot rot between the rare runs on a GPU: every training run of it (bf16 and float32 with both estimators, latent
training through a tiny VAE, --torch_compile, a resume) goes through training/train_mmf.py, the step-1 parity
against float32 holds within 5%, and every saved pipeline generates. The dry run writes into a new temporary folder,
never into the repository."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_outside_the_repository(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    for name in ("HF_TOKEN", "ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "MMF_TEST_KILL"):
        env.pop(name, None)
    default_out = REPO / "runs" / "gpu_check"
    before = sorted(p.name for p in default_out.iterdir()) if default_out.is_dir() else None
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    out = Path(re.search(r"^Output: (\S+) \(dry run: 1\)$", result.stdout, re.M).group(1))
    assert out.is_relative_to(tmp_path) and not out.is_relative_to(REPO)
    after = sorted(p.name for p in default_out.iterdir()) if default_out.is_dir() else None
    assert before == after  # the repository's runs/gpu_check is left alone

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failures"] == []
    assert set(summary["parity"]) == {"fd_no", "fd_bf16", "jvp_no", "jvp_bf16"}
    for name, row in summary["parity"].items():
        assert all(abs(v) <= 0.05 for v in row["relative"].values()), (name, row)
        assert row["mean_abs_dudt"] > 0.01
    assert summary["checks"]["resume"] is True
    assert all(summary["checks"][f"{name}_generates"] for name in ("fm_bf16", "fd_bf16", "jvp_bf16", "latent_bf16",
                                                                    "compile_bf16", "dit_fd_bf16"))
    # the DiT's cost of MMF against flow matching (same model and batch): measured, not bounded, on a CPU
    assert summary["timing"]["dit_fd_bf16"]["ratio_to_flow_matching"] > 0
    assert summary["timing"]["dit_fm_bf16"]["steps"] == summary["timing"]["dit_fd_bf16"]["steps"] == 2
    assert summary["timing"]["dit_fd_bf16_gc"]["steps"] == 2  # activation checkpointing: the same step 1
    assert all(abs(v) <= 0.01 for v in summary["checks"]["gradient_checkpointing_step1_relative"].values())
    assert "Mixed precision: bf16" not in result.stdout  # the script's flag, no launcher here
    assert "gpu_check done" in result.stdout
    shutil.rmtree(out)
