"""The Python examples of README.md and docs/*.md run as written (each in a fresh interpreter, in a scratch folder that
sees the repository's shipped pipelines). Every ```python block is run: keep examples offline and quick, and show
commands that need a network or a GPU as ```bash blocks."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


EXAMPLES = [(page.relative_to(ROOT).as_posix(), index, block)
            for page in PAGES for index, block in enumerate(python_blocks(page.read_text()))]


def test_block_extraction():
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n  ```python\nindented = 1\n  ```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_readme_has_examples():
    assert sum(1 for page, _, _ in EXAMPLES if page == "README.md") >= 2
    # the README's first example is the mission's call
    readme = [block for page, _, block in EXAMPLES if page == "README.md"]
    assert 'MMFPipeline.from_pretrained("pipelines/mmf-mnist")(num_images=8)' in readme[0]


@pytest.mark.parametrize("page, index, block",
                         [pytest.param(page, index, block, id=f"{page}-{index}",
                                       marks=() if page == "README.md" else pytest.mark.slow)
                          for page, index, block in EXAMPLES])
def test_example_runs(page, index, block, tmp_path):
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, f"{page}, Python block {index}:\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------ the commands of the ```bash blocks
def bash_commands(text: str) -> list[str]:
    """Each command line of the ```bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def _parsers():
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import train_mmf
        import train_vae
    finally:
        sys.path.remove(str(ROOT / "training"))
    from mmf_diffusers import demo, evaluation, generate, hub

    return {"train_mmf.py": train_mmf.build_parser(), "train_vae.py": train_vae.build_parser(),
            "mmf-generate": generate.build_parser(), "mmf-evaluate": evaluation.build_parser(),
            "mmf-push": hub._parser(), "mmf-demo": demo.build_parser()}


def unknown_flags(text: str, parsers) -> tuple[list[str], int]:
    """(the --flags of the known commands in ``text``'s bash blocks that their parser lacks, how many commands)."""
    import shlex

    unknown, checked = [], 0
    for command in bash_commands(text):
        tokens = shlex.split(command.replace('"$@"', ""))
        for start, token in enumerate(tokens):
            name = Path(token).name
            if name not in parsers:
                continue
            options = parsers[name]._option_string_actions
            for arg in tokens[start + 1:]:
                if arg in ("&&", "||", ";", "|"):
                    break
                if arg.startswith("--") and arg.split("=", 1)[0] not in options:
                    unknown.append(f"{name} {arg}")
            checked += 1
    return unknown, checked


def test_documented_command_flags_exist():
    """Every --flag that README.md or docs/*.md passes to the training scripts or the mmf-* commands is one of
    theirs (a renamed or removed flag fails here, not in a reader's terminal)."""
    parsers = _parsers()
    probe = "```bash\naccelerate launch --multi_gpu training/train_mmf.py --use_ema \\\n    --no_such_flag 1  # --x\n```\n"
    assert unknown_flags(probe, parsers) == (["train_mmf.py --no_such_flag"], 1)
    unknown, checked = [], 0
    for page in PAGES:
        found, count = unknown_flags(page.read_text(), parsers)
        unknown += [f"{page.relative_to(ROOT)}: {item}" for item in found]
        checked += count
    assert checked >= 10, checked
    assert not unknown, unknown
