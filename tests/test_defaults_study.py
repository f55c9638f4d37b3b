"""benchmarks/defaults_study.py at a tiny size: rows are appended to the JSON file one by one, rows already there
are skipped (resume), the table shows them, and every configuration's flags mean what its factors say when
training/train_mmf.py parses them."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "training"))

import defaults_study  # noqa: E402
# imported at collection, as the rest of the suite does, so that the test times the study alone
from mmf_diffusers import LambdaSchedule, ModularMeanFlowLoss  # noqa: E402,F401

TINY = ["--budget", "checkerboard.steps=6", "--budget", "checkerboard.batch=16", "--budget", "checkerboard.hidden=8",
        "--budget", "checkerboard.eval_n=64", "--budget", "checkerboard.curve_every=3"]


def test_rows_are_appended_and_resumed(tmp_path, capsys):
    out = tmp_path / "study.json"
    argv = ["--datasets", "checkerboard", "--configs", "current", "previous", "--seeds", "0",
            "--json", str(out), "--workdir", str(tmp_path / "work"), *TINY]
    assert defaults_study.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["seed"]) for r in rows] == [("current", 0), ("previous", 0)]
    for r in rows:
        m = r["metrics"]
        assert m["finite"] and 0 < m["sw_1step"] < 10 and 0 < m["sw_2step"] < 10
        assert [step for step, _ in m["sw_1step_curve"]] == [3, 6]
        assert m["sw_1step_curve"][-1][1] == m["sw_1step"]  # the same evaluator: the last curve point is the score
        assert r["budget"]["steps"] == 6 and r["threads"] == 1 and r["wall_s"] >= 0 and "node" in r["machine"]
    # the two configurations trained different models (lam schedule and adaptive weight differ)
    assert rows[0]["metrics"]["sw_1step"] != rows[1]["metrics"]["sw_1step"]
    capsys.readouterr()
    assert defaults_study.main(argv) == 0  # resume: nothing left to do
    assert capsys.readouterr().out == ""
    assert json.loads(out.read_text())["rows"] == rows
    assert defaults_study.main(["--json", str(out), "--table"]) == 0
    table = capsys.readouterr().out
    assert "| current | lam0 | 1 | mean | yes |" in table and "| previous | linear | 0 | mean | yes |" in table
    # the full budget is another row key: those rows are still to do
    assert defaults_study.main(["--json", str(out), "--plan", "--configs", "current", "--seeds", "0"]) == 0
    assert capsys.readouterr().out.startswith("todo")


def test_bad_budget_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        defaults_study.main(["--budget", "checkerboard.nosuchkey=3", "--plan"])
    assert info.value.code == 2 and "DATASET.KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(defaults_study.CONFIGS))
def test_flags_mean_the_factors(name):
    import train_mmf

    factors = defaults_study.CONFIGS[name]
    args = train_mmf.parse_args(["--dataset_name", "sklearn-digits", "--resolution", "8",
                                 "--block_out_channels", "16", "32", *defaults_study.config_flags(factors)])
    lam = factors["lam"]
    assert args.lam_schedule == ("constant" if lam in ("lam0", "lam1") else lam)
    assert args.lam_end == (0.0 if lam == "lam0" else 1.0)
    assert args.adaptive_p == factors["adaptive_p"] and args.adaptive_reduction == factors["adaptive_reduction"]
    assert args.pair_rows is factors["paired"] and args.tangent == "model" and args.derivative == "finite_difference"


def test_worst_case_is_the_largest_ratio_to_the_best_configuration_of_each_dataset():
    def row(dataset, config, seed, score):
        key = "sw_1step" if dataset == "checkerboard" else "fd_1step"
        return {"dataset": dataset, "config": config, "seed": seed, "metrics": {key: score}}

    rows = [row("checkerboard", "current", 0, 0.2), row("checkerboard", "current", 1, 0.4),  # mean 0.3
            row("checkerboard", "previous", 0, 0.1), row("digits", "current", 0, 10.0),
            row("digits", "previous", 0, 20.0), row("digits", "current, p=0", 0, 12.0),
            row("digits", "current, lam1", 0, float("nan"))]
    lines = defaults_study.worst_case(rows)
    table = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert table["current"] == "| current | 3.00 | 1.00 | 3.00 |"
    assert table["previous"] == "| previous | 1.00 | 2.00 | 2.00 |"
    assert "current, p=0" not in table and "current, lam1" not in table  # one dataset only / no finite score
    assert [name for name in table if name != "configuration"] == ["previous", "current"]  # best worst case first


def _write_curve(path, points):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "fd_1step": a, "fd_2step": b}) + "\n" for s, a, b in points))


def test_curriculum_curves_are_read_ordered_and_judged_flat_or_falling(tmp_path):
    pattern = str(tmp_path / "curriculum-mnist-{arm}-seed{seed}" / "curve.jsonl")
    # a resumed chunk scored step 4000 twice: the later score counts; lines come in any order
    _write_curve(tmp_path / "curriculum-mnist-lam0-seed0" / "curve.jsonl",
                 [(2000, 80.0, 40.0), (6000, 40.0, 15.0), (4000, 99.0, 50.0), (4000, 41.0, 16.0)])
    _write_curve(tmp_path / "curriculum-mnist-warmup-seed0" / "curve.jsonl",
                 [(2000, 120.0, 60.0), (4000, 90.0, 45.0), (6000, 70.0, 35.0)])
    curves = defaults_study.load_curves(pattern)
    assert sorted(curves) == [("lam0", 0), ("warmup", 0)]
    assert [p["step"] for p in curves[("lam0", 0)]] == [2000, 4000, 6000]
    assert curves[("lam0", 0)][1]["fd_1step"] == 41.0
    # the trend compares the means of the last two points and of the two before: lam0 here, (80 + 41) / 2 -> 40 (a
    # 4th point at 8000), fell 34%: still falling; 2% down is flat; a rise is flat too; three points are too short
    four = curves[("lam0", 0)] + [{"step": 8000, "fd_1step": 40.0}]
    assert defaults_study.curve_trend(four) == "still falling (-34% from steps 2000-4000 to 6000-8000)"
    curve = lambda *values: [{"step": i, "fd_1step": v} for i, v in enumerate(values, 1)]  # noqa: E731
    assert defaults_study.curve_trend(curve(50, 51, 49, 50)) == "flat (-2% from steps 1-2 to 3-4)"
    assert defaults_study.curve_trend(curve(50, 52, 56, 54)) == "flat (+8% from steps 1-2 to 3-4)"
    # one noisy point moves the verdict less than it moved a comparison of single points: a low second point does not
    # end a falling curve early (40 -> 40 would have read flat), a high one does not keep a flat curve running
    assert defaults_study.curve_trend(curve(50, 40, 44, 40)) == "still falling (-7% from steps 1-2 to 3-4)"
    assert defaults_study.curve_trend(curve(50, 52, 50, 49)) == "flat (-3% from steps 1-2 to 3-4)"
    assert defaults_study.curve_trend(curves[("lam0", 0)]) == "too short"
    table = defaults_study.curriculum_table(curves)
    assert "| step | warmup, seed 0 | lam0, seed 0 |" in table
    assert "| 4000 | 90.0 / 45.0 | 41.0 / 16.0 |" in table


def test_the_git_copy_of_a_curriculum_log_keeps_every_10th_step_of_the_final_path(tmp_path):
    import gzip
    import subprocess

    log = tmp_path / "train_log.jsonl"
    # steps 1..25, then a resume from step 10 that logs steps 11..30 again with other losses
    records = [{"step": s, "loss": 1.0} for s in range(1, 26)] + [{"event": "resume", "from_step": 10}] \
        + [{"step": s, "loss": 2.0} for s in range(11, 31)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    target = tmp_path / "copy.jsonl.gz"
    subprocess.run([sys.executable, str(REPO / "runs" / "curriculum-mnist-common" / "thin_log.py"), str(log),
                    str(target)], check=True)
    kept = [json.loads(line) for line in gzip.open(target, "rt")]
    assert kept[0] == {"event": "resume", "from_step": 10}
    assert [(r["step"], r["loss"]) for r in kept[1:]] == [(1, 1.0), (10, 1.0), (20, 2.0), (30, 2.0)]


def test_fill_docs_replaces_only_its_blocks_and_refuses_a_missing_one(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- t: cmd -->\nold\n<!-- /t -->\nmiddle\n<!-- u: cmd -->\n<!-- /u -->\nend\n")
    defaults_study.fill_docs(str(doc), {"t": "caption\n| a |\n| --- |", "u": "| b |"})
    assert doc.read_text() == ("intro\n<!-- t: cmd -->\n**caption**\n\n| a |\n| --- |\n<!-- /t -->\nmiddle\n"
                               "<!-- u: cmd -->\n| b |\n<!-- /u -->\nend\n")
    before = doc.read_text()
    with pytest.raises(SystemExit, match="no '<!-- v: ... -->'"):
        defaults_study.fill_docs(str(doc), {"v": "| c |"})
    assert doc.read_text() == before


@pytest.mark.parametrize("dataset", ["digits", "mnist", "latent-mnist"])
def test_image_rows_are_commands_the_training_script_accepts(dataset, tmp_path):
    """Every image row's command passes the training script's own parsing and validation (a row that the script
    refuses would only fail after the study had queued it)."""
    import train_mmf

    for name, config in defaults_study.CONFIGS.items():
        cmd = defaults_study.image_train_command(dataset, config, 0, defaults_study.BUDGETS[dataset],
                                                 str(tmp_path / "out"), str(tmp_path / "work"))
        assert cmd[1].endswith("train_mmf.py")
        argv = ["sklearn-digits" if a == "mnist-offline" else a for a in cmd[2:]]  # no MNIST file needed to parse
        args = train_mmf.parse_args(argv)
        assert args.seed == 0 and args.max_train_steps == defaults_study.BUDGETS[dataset]["steps"], name
