"""Smoke test of the benchmark suite (benchmarks/run.py): every benchmark at tiny sizes, and the JSON it writes has
the keys the tables and plots read. Plots are off so that matplotlib is not needed."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--no_plots", "--cost_steps", "1", "--cost_warmup", "0", "--cost_batch", "2", "--cost_configs", "flow_matching",
    "mmf_jvp_lam0", "--channels", "8", "16", "16", "--sampling_batch", "2", "--sampling_rounds", "1",
    "--sampling_euler_steps", "2", "--toy_batch", "32", "--eval_n", "128", "--quality_steps", "5",
    "--quality_euler_steps", "1", "2", "--curriculum_steps", "4", "--lrs", "1e-3", "--seeds", "1", "--workers", "1",
]


def test_suite_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--out", str(tmp_path), *TINY],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("training_cost", "sampling", "quality", "curriculum", "low_data_shift"):
        assert f"## {name}" in out.stdout

    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["command"].startswith("python benchmarks/run.py")
    b = suite["benchmarks"]
    assert set(b) == {"training_cost", "sampling", "quality", "curriculum", "low_data_shift"}

    cost = {r["config"]: r for r in b["training_cost"]["rows"]}
    assert set(cost) == {"flow_matching", "mmf_jvp_lam0"}
    assert cost["flow_matching"]["ratio_to_flow_matching"] == 1.0

    sampling = {r["config"]: r for r in b["sampling"]["rows"]}
    assert {"bare_unet_forward", "mmf_pipeline_1step", "euler_2step"} <= set(sampling)
    assert sampling["bare_unet_forward"]["ratio_to_bare_forward"] == 1.0
    assert all(r["images_per_s"] > 0 for r in sampling.values())
    assert {"pipeline_1step_overhead", "overhead_target", "meets_target"} <= set(b["sampling"])

    quality = b["quality"]
    nfes = {(r["sampler"], r["model"], r["nfe"]) for r in quality["rows"]}
    assert {("mmf_average_velocity", "mmf", 1), ("mmf_average_velocity", "mmf", 4),
            ("euler_instantaneous", "mmf", 2), ("euler_instantaneous", "flow_matching", 2)} <= nfes
    assert {"mmf_1step_sw", "best_multistep", "ratio_1step_to_best_multistep", "noise_floor_sw",
            "gaussian_sw"} <= set(quality)
    assert math.isfinite(quality["mmf_1step_sw"])

    summary = b["curriculum"]["summary"]
    assert {(s["schedule"], s["tangent"]) for s in summary} == {
        (s, t) for s in ("lam0", "lam1", "linear_0to1", "cosine_0to1") for t in ("conditional", "model")}
    for s in summary:
        assert {"diverged", "runs", "sw_1step", "loss_var_last_quarter"} <= set(s)
        assert {"mean", "std", "n"} == set(s["sw_1step"])

    assert b["low_data_shift"]["status"] == "not yet measured"
