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
