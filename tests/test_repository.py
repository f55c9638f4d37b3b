"""The repository's shape: what git tracks under runs/, the licence and citation files, and links that resolve.

A clone should carry the library, its tests, the shipped pipelines and the record of each training run (command,
notes, config, compressed log, sample images), not resumable training state: checkpoints live outside the
repository and each run's RESUME.md gives the command that reproduces them.
"""

import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_RUN_FILE_BYTES = 1024 * 1024

# Names of resumable training state (accelerate's save_state and train_mmf.py's checkpoint folders).
CHECKPOINT_FILE = re.compile(
    r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|mmf_state\.(json|safetensors)"
    r"|training_state\.json|model(_\d+)?\.safetensors|pytorch_model(_\d+)?\.bin)$")


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()[:200]}")
    return proc.stdout


def _tracked(prefix: str = "") -> list[str]:
    out = _git("ls-files", "-z", "--", *( [prefix] if prefix else []))
    return [p for p in out.split("\0") if p]


def is_checkpoint_path(path: str) -> bool:
    parts = PurePosixPath(path).parts
    if any(p.startswith(("checkpoint-", ".tmp-checkpoint-")) for p in parts[:-1]):
        return True
    return bool(CHECKPOINT_FILE.match(parts[-1]))


def test_checkpoint_rule_recognises_training_state():
    # the rule itself, on the names accelerate and train_mmf.py write
    for path in ("runs/a/checkpoint-500/optimizer.bin", "runs/a/checkpoint-500/config.json",
                 "runs/a/.tmp-checkpoint-9/x", "runs/a/random_states_0.pkl", "runs/a/optimizer.bin",
                 "runs/a/model_1.safetensors", "runs/a/mmf_state.safetensors"):
        assert is_checkpoint_path(path), path
    for path in ("runs/a/command.sh", "runs/a/RESUME.md", "runs/a/logs/train_log.jsonl.gz",
                 "runs/a/unet/config.json", "runs/a/samples/step-000500-1step.png"):
        assert not is_checkpoint_path(path), path


def test_no_checkpoints_or_large_files_under_runs():
    tracked = _tracked("runs")
    checkpoints = [p for p in tracked if is_checkpoint_path(p)]
    assert not checkpoints, f"training state is tracked under runs/ (keep it outside the repository): {checkpoints[:10]}"
    large = [(p, (ROOT / p).stat().st_size) for p in tracked
             if (ROOT / p).is_file() and (ROOT / p).stat().st_size > MAX_RUN_FILE_BYTES]
    assert not large, f"files over 1 MB are tracked under runs/ (compress or drop them): {large[:10]}"


def test_gitignore_keeps_training_state_out():
    # a new run's checkpoint, weights and raw log are ignored; its notes and compressed log are not
    ignored = ["runs/new-run/checkpoint-500/optimizer.bin", "runs/new-run/checkpoint-500/random_states_0.pkl",
               "runs/new-run/.tmp-checkpoint-500/model.safetensors", "runs/new-run/unet/diffusion_pytorch_model.safetensors",
               "runs/new-run/logs/train_log.jsonl", "runs/new-run/latent_cache/abc.safetensors",
               "my-run/checkpoint-10/optimizer.bin"]
    kept = ["runs/new-run/command.sh", "runs/new-run/RESUME.md", "runs/new-run/logs/train_log.jsonl.gz",
            "runs/new-run/training_config.json"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(ignored + kept),
                          capture_output=True, text=True, timeout=60)
    if proc.returncode not in (0, 1):
        pytest.skip(f"git check-ignore failed: {proc.stderr.strip()[:200]}")
    reported = set(proc.stdout.split())
    assert reported == set(ignored), (sorted(set(ignored) - reported), sorted(reported - set(ignored)))


def test_every_run_folder_says_how_to_reproduce_it():
    tracked = [PurePosixPath(p) for p in _tracked("runs")]
    runs = sorted({p.parts[1] for p in tracked if len(p.parts) > 2})
    assert runs, "no run folders are tracked"
    for run in runs:
        folder = ROOT / "runs" / run
        assert any(folder.glob("*.sh")), f"runs/{run} has no command script (command.sh)"
        # a run with results (a log, samples, a config) says what they are and how to get its checkpoint back; a
        # folder holding only the command of a run not started yet may leave that to a shared README
        has_results = any(p.parts[1] == run and p.suffix != ".sh" for p in tracked)
        notes = [folder / name for name in ("RESUME.md", "README.md") if (folder / name).is_file()]
        assert notes or not has_results, f"runs/{run} has results but no RESUME.md or README.md"


def test_licence_and_citation():
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    yaml = pytest.importorskip("yaml")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"].startswith("1.2")
    assert citation["preferred-citation"]["title"].startswith("Modular MeanFlow")
    assert "2508.17426" in str(citation["preferred-citation"])


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


# "issue" or "session" followed by a number: the history of the work is in git, not in the files
NOTEBOOK_WORDS = re.compile(r"\b(issues? ?#?-?\d+|sessions? \d+)\b", re.I)


def test_no_work_notes_in_tracked_text():
    offenders = []
    for path in _tracked():
        if not path.endswith((".py", ".md", ".sh", ".cfg", ".toml", ".txt", ".json", ".cff")) or path == ".gitignore":
            continue
        file = ROOT / path
        if not file.is_file() or file.stat().st_size > MAX_RUN_FILE_BYTES:
            continue
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            if NOTEBOOK_WORDS.search(line):
                offenders.append(f"{path}:{number}: {line.strip()[:100]}")
    assert not offenders, "work notes in the repository:\n" + "\n".join(offenders[:40])
