"""The files of a Gradio Space that serves `mmf_diffusers.demo` for a pushed Hub model (`mmf-push --with-demo`).

Standard library only, so `mmf_diffusers.hub` can write a Space without importing the demo (and gradio).
"""

from __future__ import annotations

import os
from typing import List, Optional

SPACE_APP = '''"""A Gradio Space for the Modular MeanFlow pipeline {repo_id} (written by `mmf-push --with-demo`)."""
from mmf_diffusers.demo import build_demo
from mmf_diffusers.hub_timeouts import use_hub_timeouts

# Every Hub request ends within MMF_HUB_TIMEOUT seconds (default 30), as in the command-line tools: a Hub that does
# not answer stops the app with an error instead of leaving it loading forever.
use_hub_timeouts()
try:
    demo = build_demo("{repo_id}")
except (OSError, ValueError) as error:  # the Hub does not answer, the repository is not there: one line in the log
    raise SystemExit(f"The demo of {repo_id} cannot start: {{error}}")
demo.queue(default_concurrency_limit=1)

if __name__ == "__main__":
    demo.launch()
'''


def write_space(directory: str, repo_id: str, requirement: Optional[str] = None) -> List[str]:
    """Write ``app.py``, ``requirements.txt`` and the Space's ``README.md`` (its YAML header) into ``directory``:
    uploaded as a Gradio Space (``hf upload USER/NAME-demo DIRECTORY --repo-type space``), they serve this app for the
    Hub model ``repo_id``. ``requirement`` is the pip requirement of this package there (default
    ``mmf_diffusers[demo]==<this version>``; a ``git+https://...`` URL where the package is not on the index).
    Returns the paths written."""
    from importlib import metadata

    from . import __version__

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise ValueError(f"the Space needs the model's repo id as user/name, got {repo_id!r}")
    os.makedirs(directory, exist_ok=True)
    requirement = requirement or f"mmf_diffusers[demo]=={__version__}"
    try:
        sdk_version = f"sdk_version: {metadata.version('gradio')}\n"
    except metadata.PackageNotFoundError:
        sdk_version = ""  # the Hub then picks its current gradio
    files = {
        "app.py": SPACE_APP.format(repo_id=repo_id),
        "requirements.txt": f"{requirement}\n",
        "README.md": (
            f"---\ntitle: {repo_id.split('/')[1]} demo\nsdk: gradio\n{sdk_version}app_file: app.py\nmodels:\n"
            f"- {repo_id}\ntags:\n- mmf\n- meanflow\n---\n\n"
            f"Samples from [{repo_id}](https://huggingface.co/{repo_id}) with Modular MeanFlow in one or a few "
            f"network evaluations. Run it locally: `mmf-demo --pipeline {repo_id}`.\n"
        ),
    }
    paths = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(path)
    return paths
