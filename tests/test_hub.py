"""Tests for Hub sharing (`mmf_diffusers.hub`, `mmf_diffusers.model_card`, `MMFPipeline.from_pretrained(repo_id)` and
`MMFTrajectoryPipeline.from_pretrained(repo_id)`).

Everything runs against `hub_server.HubServer`, a Hub look-alike on 127.0.0.1 driven by the real huggingface_hub client,
with tiny CPU pipelines (`build_mmf_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4)`, and
`build_mmf_unet1d(2, 16, block_out_channels=(8, 16))` for trajectories). Loading by repo id happens in subprocesses
that get ``HF_ENDPOINT`` before huggingface_hub is imported (it is read at import), with their own ``HF_HOME`` /
``HF_HUB_CACHE`` in a temporary folder. One of them cannot import mmf_diffusers at all, and loads with
``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` alone.

Images and trajectories are compared bit for bit (``np.array_equal``) against the original pipeline with the seeded
generator. The original's attention uses diffusers' default processor, the one a loaded UNet gets (`build_mmf_unet`
installs a forward-AD-safe math-backend processor for training, which differs in the last float bit).

The test token is random per run; every file pushed or written, all captured output and every log record are
searched for it.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import os
import secrets
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

import mmf_diffusers
from mmf_diffusers import (
    MMFConditioner,
    MMFPipeline,
    MMFScheduler,
    MMFTrajectoryPipeline,
    add_class_conditioning,
    build_mmf_unet,
    build_mmf_unet1d,
)
from mmf_diffusers.hub import (
    add_remote_code,
    check_hub_auth,
    load_pipeline,
    main,
    make_push_fn,
    push_pipeline_folder,
)
from mmf_diffusers.model_card import redact_command, write_model_card
from mmf_diffusers.pipeline_mmf import PACKAGE_LAYOUT_KEY

from hub_server import HubServer, token_digest

TOKEN = "hf_test" + secrets.token_hex(16)
USER = "tester"
PRIVATE_REPO = f"{USER}/mmf-tiny"  # pushed with push_pipeline_folder(private=True)
PUSH_TO_HUB_REPO = f"{USER}/mmf-tiny-push-to-hub"  # pushed with MMFPipeline.push_to_hub in a subprocess
TRAJECTORY_REPOS = {  # how each was pushed -> repo id
    "push_pipeline_folder": f"{USER}/mmf-pendulum-tiny",
    "mmf-push": f"{USER}/mmf-pendulum-tiny-cli",
    "push_to_hub": f"{USER}/mmf-pendulum-tiny-push-to-hub",
}
SRC = os.path.dirname(os.path.dirname(os.path.abspath(mmf_diffusers.__file__)))
SUBPROCESS_TIMEOUT = 240

#: Goes first in a subprocess script that must run without mmf_diffusers: any import of it fails from then on, and
#: the script stops if the block does not hold (the test would prove nothing).
BLOCK_MMF_DIFFUSERS = textwrap.dedent('''
    import importlib.abc, sys

    class BlockMMF(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "mmf_diffusers":
                raise ModuleNotFoundError("No module named 'mmf_diffusers' (blocked by the test)")

    sys.meta_path.insert(0, BlockMMF())
    try:
        import mmf_diffusers
    except ImportError:
        pass
    else:
        raise SystemExit("mmf_diffusers is importable; the test would prove nothing")
''')


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_pipeline(seed: int = 0) -> MMFPipeline:
    torch.manual_seed(seed)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    for module in unet.modules():  # the processor a loaded UNet2DModel gets
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())
    pipe = MMFPipeline(unet.eval(), MMFScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, steps: int = 1) -> np.ndarray:
    return pipe(num_images=3, num_inference_steps=steps, generator=seeded(0), output_type="np").images


def assert_token_absent(text_or_bytes, where: str) -> None:
    needle = TOKEN.encode() if isinstance(text_or_bytes, bytes) else TOKEN
    # Not `assert TOKEN not in ...`: pytest would print both operands on failure.
    assert (needle in text_or_bytes) is False, f"the token leaked into {where}"


def assert_folder_clean(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert_token_absent(f.read(), os.path.join(root, name))


def hub_env(hub: HubServer, home: str, token: str | None = TOKEN, pythonpath: str | None = SRC) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.pop("PYTHONPATH", None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=os.path.join(home, "hf_home"),
        HF_HUB_CACHE=os.path.join(home, "hub_cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def run_script(script: str, env: dict, cwd: str) -> subprocess.CompletedProcess:
    path = os.path.join(cwd, "script.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(script))
    result = subprocess.run(
        [sys.executable, path], env=env, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )
    assert_token_absent(result.stdout, "a subprocess's stdout")
    assert_token_absent(result.stderr, "a subprocess's stderr")
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(self.format(record))


@contextlib.contextmanager
def captured_everything():
    """stdout, stderr and every log record (root logger, DEBUG), as one list of strings."""
    out, err, handler = io.StringIO(), io.StringIO(), _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    texts = []
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield texts
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        texts += [out.getvalue(), err.getvalue(), *handler.messages]


def same_images(a, b) -> bool:
    """Equal up to float32 rounding: with several threads the fused CPU attention kernel may round differently in two
    processes or two module instances (with one thread the images are bit-identical); a wrong load differs far more."""
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5, atol=1e-5))


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hub():
    with HubServer({TOKEN: USER}) as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    pipe = tiny_pipeline()
    return {"pipe": pipe, "images": images(pipe), "images_2_steps": images(pipe, steps=2)}


@pytest.fixture(scope="module")
def pushed(hub, reference, tmp_path_factory):
    """Push the tiny pipeline twice, then load both repositories in two subprocesses, one without mmf_diffusers."""
    work = str(tmp_path_factory.mktemp("hub"))
    folder = os.path.join(work, "pipeline")
    reference["pipe"].save_pretrained(folder)
    from PIL import Image

    Image.fromarray((reference["images"][0, :, :, 0] * 255).astype("uint8")).save(os.path.join(folder, "samples.png"))
    card_info = {
        "repo_id": PRIVATE_REPO,
        "command": ["training/train_mmf.py", "--hub_token", TOKEN, f"--hub_token={TOKEN}", "--max_train_steps", "5"],
        "steps": 5,
        "curriculum": {"lam_start": 0.0, "lam_end": 1.0, "warmup_steps": 2, "shape": "linear"},
        "loss": {"tangent": "model", "adaptive_p": 1.0},
        "dataset": "sklearn digits (8x8)",
        "wall_time_s": 75.0,
        "sample_grid": "samples.png",
        "metrics": {"sliced W2 (1 step)": 0.125},
        "license": "apache-2.0",
    }
    with captured_everything() as texts:
        commit_url = push_pipeline_folder(
            folder, PRIVATE_REPO, token=TOKEN, private=True, endpoint=hub.url, card_info=card_info
        )
    # push_to_hub goes through module-level huggingface_hub functions bound to HF_ENDPOINT at import: a subprocess.
    push = run_script(
        f"""
        from mmf_diffusers import MMFPipeline
        pipe = MMFPipeline.from_pretrained({folder!r})
        url = pipe.push_to_hub({PUSH_TO_HUB_REPO!r}, token={TOKEN!r})
        print("pushed", url)
        """,
        hub_env(hub, work, token=None),
        work,
    )
    loaded_with_package = run_script(
        f"""
        import json
        import numpy as np
        import torch
        from mmf_diffusers import MMFPipeline, MMFScheduler
        from mmf_diffusers.hub import load_pipeline

        def images(pipe, steps=1):
            pipe.set_progress_bar_config(disable=True)
            return pipe(num_images=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                        output_type="np").images

        report = {{}}
        for name, repo in [("private", {PRIVATE_REPO!r}), ("push_to_hub", {PUSH_TO_HUB_REPO!r})]:
            pipe = MMFPipeline.from_pretrained(repo)
            np.save(name + "_package.npy", images(pipe))
            np.save(name + "_package_2_steps.npy", images(pipe, steps=2))
            report[name] = [type(pipe).__module__, type(pipe.scheduler).__module__]
        np.save("load_pipeline.npy", images(load_pipeline({PRIVATE_REPO!r})))
        json.dump(report, open("package_report.json", "w"))
        """,
        hub_env(hub, work),
        work,
    )
    loaded_without_package = run_script(
        BLOCK_MMF_DIFFUSERS
        + textwrap.dedent(f"""
        import json
        import numpy as np
        import torch
        from diffusers import DiffusionPipeline

        def images(pipe, steps=1):
            pipe.set_progress_bar_config(disable=True)
            return pipe(num_images=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                        output_type="np").images

        report = {{}}
        for name, repo in [("private", {PRIVATE_REPO!r}), ("push_to_hub", {PUSH_TO_HUB_REPO!r}), ("local", {folder!r})]:
            pipe = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
            np.save(name + "_remote_code.npy", images(pipe))
            np.save(name + "_remote_code_2_steps.npy", images(pipe, steps=2))
            report[name] = [type(pipe).__module__, type(pipe.scheduler).__module__]
        report["mmf_diffusers_imported"] = any(m.split(".")[0] == "mmf_diffusers" for m in sys.modules)
        json.dump(report, open("remote_code_report.json", "w"))
        """),
        hub_env(hub, work, pythonpath=None),
        work,
    )
    return {
        "work": work,
        "folder": folder,
        "commit_url": commit_url,
        "texts": texts + [push.stdout, push.stderr],
        "loaders": [loaded_with_package, loaded_without_package],
    }


def load_npy(pushed, name):
    return np.load(os.path.join(pushed["work"], name + ".npy"))


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.slow
def test_repo_loads_with_mmf_pipeline_and_gives_the_same_images(pushed, reference):
    with open(os.path.join(pushed["work"], "package_report.json")) as f:
        report = json.load(f)
    for name in ("private", "push_to_hub"):
        assert report[name] == ["mmf_diffusers.pipeline_mmf", "mmf_diffusers.scheduling_mmf"], name
        assert same_images(load_npy(pushed, f"{name}_package"), reference["images"]), name
        assert same_images(load_npy(pushed, f"{name}_package_2_steps"), reference["images_2_steps"]), name
    assert same_images(load_npy(pushed, "load_pipeline"), reference["images"])


@pytest.mark.slow
def test_repo_loads_with_diffusers_alone_and_gives_the_same_images(pushed, reference):
    with open(os.path.join(pushed["work"], "remote_code_report.json")) as f:
        report = json.load(f)
    assert report["mmf_diffusers_imported"] is False
    for name in ("private", "push_to_hub", "local"):
        pipeline_module, scheduler_module = report[name]
        assert pipeline_module.startswith("diffusers_modules.") and pipeline_module.endswith(".pipeline"), name
        assert scheduler_module.startswith("diffusers_modules.") and scheduler_module.endswith(".scheduling_mmf"), name
        assert same_images(load_npy(pushed, f"{name}_remote_code"), reference["images"]), name
        assert same_images(load_npy(pushed, f"{name}_remote_code_2_steps"), reference["images_2_steps"]), name
    # diffusers' import check would warn about a package the copied files name but cannot find.
    assert "might require the following packages" not in pushed["loaders"][1].stderr


@pytest.mark.slow
def test_pushed_repository_layout(pushed, hub):
    for repo_id in (PRIVATE_REPO, PUSH_TO_HUB_REPO):
        files = hub.files(repo_id)
        for path in (
            "model_index.json",
            "pipeline.py",
            "scheduler/scheduling_mmf.py",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "README.md",
        ):
            assert path in files, (repo_id, path)
        index = json.loads(files["model_index.json"])
        assert index["_class_name"] == ["pipeline", "MMFPipeline"]
        assert index["scheduler"] == ["scheduling_mmf", "MMFScheduler"]
        assert index["unet"] == ["diffusers", "UNet2DModel"]
        assert index[PACKAGE_LAYOUT_KEY] == {
            "_class_name": "MMFPipeline",
            "scheduler": ["mmf_diffusers.scheduling_mmf", "MMFScheduler"],
        }
        with open(mmf_diffusers.pipeline_mmf.__file__, "rb") as f:
            assert files["pipeline.py"] == f.read()
        with open(mmf_diffusers.scheduling_mmf.__file__, "rb") as f:
            assert files["scheduler/scheduling_mmf.py"] == f.read()
        card = ModelCard(files["README.md"].decode())
        assert "mmf" in card.data.tags and card.data.library_name == "diffusers"
    assert "samples.png" in hub.files(PRIVATE_REPO)
    assert hub.unknown_requests == []


def test_local_folders_load_with_mmf_pipeline(tmp_path, reference):
    package_folder, remote_code_folder = str(tmp_path / "package"), str(tmp_path / "remote_code")
    reference["pipe"].save_pretrained(package_folder)
    reference["pipe"].save_pretrained(remote_code_folder)
    add_remote_code(remote_code_folder)
    add_remote_code(remote_code_folder)  # idempotent
    for folder in (package_folder, remote_code_folder):
        for pipe in (MMFPipeline.from_pretrained(folder), load_pipeline(folder)):
            assert type(pipe) is MMFPipeline and type(pipe.scheduler) is MMFScheduler
            pipe.set_progress_bar_config(disable=True)
            assert np.array_equal(images(pipe), reference["images"]), folder
    with open(os.path.join(package_folder, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "MMFPipeline"  # save_pretrained's own layout is untouched


def test_remote_code_folder_asks_for_trust_before_running_its_code(tmp_path, reference):
    from diffusers import DiffusionPipeline

    folder = str(tmp_path / "remote_code")
    reference["pipe"].save_pretrained(folder)
    add_remote_code(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder)


def test_add_remote_code_refuses_a_module_that_is_not_self_contained(tmp_path, monkeypatch):
    from mmf_diffusers import hub as hub_module

    module = tmp_path / "not_self_contained.py"
    module.write_text("from mmf_diffusers.unet import build_mmf_unet\n")
    with pytest.raises(ValueError, match="cannot ship as remote code"):
        hub_module._check_self_contained(str(module))
    module.write_text("from .unet import build_mmf_unet\n")
    with pytest.raises(ValueError, match="relative import"):
        hub_module._check_self_contained(str(module))
    # The files that do ship must stay self-contained.
    hub_module._check_self_contained(mmf_diffusers.pipeline_mmf.__file__)
    hub_module._check_self_contained(mmf_diffusers.scheduling_mmf.__file__)
    hub_module._check_self_contained(mmf_diffusers.conditioning_mmf.__file__)


def test_diffusers_scheduler_needs_no_remote_code(tmp_path):
    from diffusers import FlowMapEulerDiscreteScheduler

    pipe = tiny_pipeline()
    pipe = MMFPipeline(pipe.unet, FlowMapEulerDiscreteScheduler())
    folder = str(tmp_path / "flowmap")
    pipe.save_pretrained(folder)
    index = add_remote_code(folder)
    assert index["scheduler"] == ["diffusers", "FlowMapEulerDiscreteScheduler"]
    assert not os.path.exists(os.path.join(folder, "scheduler", "scheduling_mmf.py"))
    assert type(MMFPipeline.from_pretrained(folder).scheduler) is FlowMapEulerDiscreteScheduler


# ---------------------------------------------------------------------------------------------------- class-conditional
CONDITIONAL_REPOS = {  # how each was pushed -> repo id
    "push_pipeline_folder": f"{USER}/mmf-tiny-conditional",
    "push_to_hub": f"{USER}/mmf-tiny-conditional-push-to-hub",
}
CONDITIONAL_NAMES = ["zero", "one", "two"]


def tiny_conditional_pipeline(seed: int = 0) -> MMFPipeline:
    """The tiny UNet made class-conditional, with a random label embedding and a training-time guidance record."""
    torch.manual_seed(seed)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    unet, conditioner = add_class_conditioning(unet, len(CONDITIONAL_NAMES), CONDITIONAL_NAMES)
    with torch.no_grad():
        conditioner.label_embedding.weight.normal_(generator=seeded(1))
    conditioner.register_to_config(guidance_w=1.5, guidance_kappa=0.25)
    for module in unet.modules():  # the processor a loaded UNet2DModel gets
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())
    pipe = MMFPipeline(unet.eval(), MMFScheduler(), conditioner=conditioner.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditional_samples(pipe):
    """Labels by name (one per image; one for all over two steps), sampling-time guidance, and no label, seeded; the
    loading subprocesses run this same code."""
    pipe.set_progress_bar_config(disable=True)

    def run(**kwargs):
        return pipe(num_images=3, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images

    return np.stack([
        run(class_labels=["two", "zero", "one"]),
        run(class_labels="one", num_inference_steps=2),
        run(class_labels=["two", "zero", "one"], guidance_scale=2.0),
        run(),
    ])


def conditional_report(pipe):
    """What a loaded pipeline says about itself: classes, labels and guidance record."""
    return {
        "pipeline": type(pipe).__module__,
        "conditioner": type(pipe.conditioner).__module__,
        "scheduler": type(pipe.scheduler).__module__,
        "class_names": list(pipe.class_names),
        "guidance": [pipe.conditioner.config.guidance_w, pipe.conditioner.config.guidance_kappa],
    }


CONDITIONAL_CODE = inspect.getsource(conditional_samples) + inspect.getsource(conditional_report)


def read_report(pushed, name):
    with open(os.path.join(pushed["work"], name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pushed_conditional(hub, tmp_path_factory):
    """A tiny class-conditional pipeline pushed with push_pipeline_folder and with push_to_hub, then loaded from both
    repositories (and the pushed local folder) in two subprocesses, one without mmf_diffusers."""
    work = str(tmp_path_factory.mktemp("hub_conditional"))
    pipe = tiny_conditional_pipeline()
    reference = conditional_samples(pipe)
    folder = os.path.join(work, "pipeline")
    pipe.save_pretrained(folder)
    with captured_everything() as texts:
        push_pipeline_folder(folder, CONDITIONAL_REPOS["push_pipeline_folder"], token=TOKEN, endpoint=hub.url)
    repos = dict(CONDITIONAL_REPOS)
    with_package = run_script(
        CONDITIONAL_CODE
        + textwrap.dedent(f"""
        import json
        import numpy as np
        import torch
        from mmf_diffusers import MMFPipeline
        from mmf_diffusers.hub import load_pipeline

        MMFPipeline.from_pretrained({folder!r}).push_to_hub({repos["push_to_hub"]!r}, token={TOKEN!r})
        report = {{}}
        for name, repo in {repos!r}.items():
            pipe = MMFPipeline.from_pretrained(repo)
            np.save(name + "_package.npy", conditional_samples(pipe))
            report[name] = conditional_report(pipe)
        pipe = load_pipeline({repos["push_pipeline_folder"]!r})
        np.save("load_pipeline.npy", conditional_samples(pipe))
        report["load_pipeline"] = conditional_report(pipe)
        json.dump(report, open("package_report.json", "w"))
        """),
        hub_env(hub, work),
        work,
    )
    repos["local"] = folder
    without_package = run_script(
        BLOCK_MMF_DIFFUSERS
        + CONDITIONAL_CODE
        + textwrap.dedent(f"""
        import json
        import numpy as np
        import torch
        from diffusers import DiffusionPipeline

        report = {{}}
        for name, repo in {repos!r}.items():
            pipe = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
            np.save(name + "_remote_code.npy", conditional_samples(pipe))
            report[name] = conditional_report(pipe)
        report["mmf_diffusers_imported"] = any(m.split(".")[0] == "mmf_diffusers" for m in sys.modules)
        json.dump(report, open("remote_code_report.json", "w"))
        """),
        hub_env(hub, work, pythonpath=None),
        work,
    )
    return {"work": work, "folder": folder, "reference": reference, "texts": texts + [with_package.stdout,
            with_package.stderr], "loaders": [with_package, without_package]}


@pytest.mark.slow
def test_conditional_reference_depends_on_the_label(pushed_conditional):
    # Otherwise the comparisons below would not show that labels and names survive the trip.
    named, _, guided, unlabelled = pushed_conditional["reference"]
    assert np.abs(named - unlabelled).max() > 0.01 and np.abs(guided - named).max() > 0.01


@pytest.mark.slow
def test_conditional_repos_load_with_mmf_pipeline_and_give_the_same_images(pushed_conditional):
    report = read_report(pushed_conditional, "package_report.json")
    for name in [*CONDITIONAL_REPOS, "load_pipeline"]:
        assert report[name] == {
            "pipeline": "mmf_diffusers.pipeline_mmf",
            "conditioner": "mmf_diffusers.conditioning_mmf",
            "scheduler": "mmf_diffusers.scheduling_mmf",
            "class_names": CONDITIONAL_NAMES,
            "guidance": [1.5, 0.25],
        }, name
        samples = load_npy(pushed_conditional, name if name == "load_pipeline" else f"{name}_package")
        assert same_images(samples, pushed_conditional["reference"]), name


@pytest.mark.slow
def test_conditional_repos_load_with_diffusers_alone_and_give_the_same_images(pushed_conditional):
    report = read_report(pushed_conditional, "remote_code_report.json")
    assert report["mmf_diffusers_imported"] is False
    for name in [*CONDITIONAL_REPOS, "local"]:
        entry = report[name]
        assert entry["pipeline"].startswith("diffusers_modules.") and entry["pipeline"].endswith(".pipeline"), name
        assert entry["conditioner"].startswith("diffusers_modules."), name
        assert entry["conditioner"].endswith(".conditioning_mmf"), name
        assert entry["scheduler"].endswith(".scheduling_mmf"), name
        assert entry["class_names"] == CONDITIONAL_NAMES and entry["guidance"] == [1.5, 0.25], name
        assert same_images(load_npy(pushed_conditional, f"{name}_remote_code"), pushed_conditional["reference"])
    assert "might require the following packages" not in pushed_conditional["loaders"][1].stderr


@pytest.mark.slow
def test_conditional_repository_layout(pushed_conditional, hub):
    with open(mmf_diffusers.conditioning_mmf.__file__, "rb") as f:
        conditioner_source = f.read()
    with open(mmf_diffusers.pipeline_mmf.__file__, "rb") as f:
        pipeline_source = f.read()
    for how, repo_id in CONDITIONAL_REPOS.items():
        files = hub.files(repo_id)
        assert files["conditioner/conditioning_mmf.py"] == conditioner_source, how
        assert files["pipeline.py"] == pipeline_source, how
        assert "conditioner/diffusion_pytorch_model.safetensors" in files, how
        config = json.loads(files["conditioner/config.json"])
        assert config["_class_name"] == "MMFConditioner" and config["class_names"] == CONDITIONAL_NAMES, how
        assert config["num_classes"] == 3 and config["guidance_w"] == 1.5 and config["guidance_kappa"] == 0.25, how
        index = json.loads(files["model_index.json"])
        assert index["_class_name"] == ["pipeline", "MMFPipeline"], how
        assert index["conditioner"] == ["conditioning_mmf", "MMFConditioner"], how
        assert index["unet"] == ["diffusers", "UNet2DModel"], how
        assert index[PACKAGE_LAYOUT_KEY] == {
            "_class_name": "MMFPipeline",
            "conditioner": ["mmf_diffusers.conditioning_mmf", "MMFConditioner"],
            "scheduler": ["mmf_diffusers.scheduling_mmf", "MMFScheduler"],
        }, how
    for text in pushed_conditional["texts"]:
        assert_token_absent(text, "captured output or logs")
    assert_folder_clean(pushed_conditional["folder"])
    assert hub.unknown_requests == []


def test_unconditional_folder_gets_no_conditioner_code(tmp_path, reference):
    folder = str(tmp_path / "unconditional")
    reference["pipe"].save_pretrained(folder)
    index = add_remote_code(folder)
    assert index.get("conditioner") in (None, [None, None])
    assert "conditioner" not in index[PACKAGE_LAYOUT_KEY]
    assert not os.path.exists(os.path.join(folder, "conditioner"))
    assert MMFPipeline.from_pretrained(folder).conditioner is None


def test_local_conditional_folder_loads_with_mmf_pipeline(tmp_path):
    pipe = tiny_conditional_pipeline()
    folder = str(tmp_path / "remote_code")
    pipe.save_pretrained(folder)
    add_remote_code(folder)
    loaded = MMFPipeline.from_pretrained(folder)
    assert type(loaded.conditioner) is MMFConditioner and loaded.class_names == CONDITIONAL_NAMES
    assert np.array_equal(conditional_samples(loaded), conditional_samples(pipe))


# ---------------------------------------------------------------------------------------------------- trajectories
def tiny_trajectory_pipeline(seed: int = 0) -> MMFTrajectoryPipeline:
    torch.manual_seed(seed)
    pipe = MMFTrajectoryPipeline(build_mmf_unet1d(2, 16, block_out_channels=(8, 16)).eval(), MMFScheduler(),
                                 channel_mean=[0.1, -0.2], channel_std=[0.5, 2.0], channel_names=["theta", "omega"],
                                 dt=0.05, system="pendulum")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trajectory_samples(pipe):
    """Unconditional (1 and 2 steps) and from start states, seeded; the loading subprocesses run this same code."""
    pipe.set_progress_bar_config(disable=True)
    start = torch.tensor([[0.3, -1.1], [1.7, 0.25]])
    return np.stack([
        pipe(num_samples=2, generator=torch.Generator().manual_seed(0)).trajectories,
        pipe(num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).trajectories,
        pipe(start_state=start, generator=torch.Generator().manual_seed(0)).trajectories,
    ])


TRAJECTORY_SAMPLES = inspect.getsource(trajectory_samples)


@pytest.fixture(scope="module")
def pushed_trajectories(hub, tmp_path_factory):
    """A tiny trajectory pipeline pushed three ways (push_pipeline_folder with a card and plot, mmf-push, push_to_hub),
    then loaded from all three repositories in two subprocesses, one without mmf_diffusers."""
    work = str(tmp_path_factory.mktemp("hub_trajectory"))
    pipe = tiny_trajectory_pipeline()
    reference = trajectory_samples(pipe)
    folder, cli_folder = os.path.join(work, "pipeline"), os.path.join(work, "pipeline_cli")
    pipe.save_pretrained(folder)
    pipe.save_pretrained(cli_folder)
    from PIL import Image

    Image.new("RGB", (32, 16), "white").save(os.path.join(folder, "sample_grid.png"))  # stands in for the plot
    with captured_everything() as texts:
        push_pipeline_folder(folder, TRAJECTORY_REPOS["push_pipeline_folder"], token=TOKEN, endpoint=hub.url,
                             card_info={"steps": 3, "sample_grid": "sample_grid.png"})
        token_file = os.path.join(work, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        assert main([cli_folder, TRAJECTORY_REPOS["mmf-push"], "--token-file", token_file, "--endpoint", hub.url]) == 0
    repos = dict(TRAJECTORY_REPOS)
    with_package = run_script(
        TRAJECTORY_SAMPLES
        + textwrap.dedent(f"""
        import json
        import numpy as np
        import torch
        from mmf_diffusers import MMFTrajectoryPipeline
        from mmf_diffusers.hub import load_pipeline

        MMFTrajectoryPipeline.from_pretrained({folder!r}).push_to_hub({repos["push_to_hub"]!r}, token={TOKEN!r})
        report = {{}}
        for name, repo in {repos!r}.items():
            pipe = MMFTrajectoryPipeline.from_pretrained(repo)
            np.save(name + "_package.npy", trajectory_samples(pipe))
            report[name] = [type(pipe).__module__, type(pipe.scheduler).__module__]
        pipe = load_pipeline({repos["mmf-push"]!r})
        np.save("load_pipeline.npy", trajectory_samples(pipe))
        report["load_pipeline"] = type(pipe).__name__
        json.dump(report, open("package_report.json", "w"))
        """),
        hub_env(hub, work),
        work,
    )
    repos["local"] = folder
    without_package = run_script(
        BLOCK_MMF_DIFFUSERS
        + TRAJECTORY_SAMPLES
        + textwrap.dedent(f"""
        import json
        import numpy as np
        import torch
        from diffusers import DiffusionPipeline

        report = {{}}
        for name, repo in {repos!r}.items():
            pipe = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
            np.save(name + "_remote_code.npy", trajectory_samples(pipe))
            report[name] = [type(pipe).__module__, type(pipe).__name__, type(pipe.scheduler).__module__]
        report["mmf_diffusers_imported"] = any(m.split(".")[0] == "mmf_diffusers" for m in sys.modules)
        json.dump(report, open("remote_code_report.json", "w"))
        """),
        hub_env(hub, work, pythonpath=None),
        work,
    )
    return {"work": work, "folder": folder, "reference": reference, "texts": texts,
            "loaders": [with_package, without_package]}


def trajectory_report(pushed_trajectories, name):
    with open(os.path.join(pushed_trajectories["work"], name)) as f:
        return json.load(f)


@pytest.mark.slow
def test_trajectory_repos_load_with_mmf_trajectory_pipeline_and_give_the_same_samples(pushed_trajectories):
    report = trajectory_report(pushed_trajectories, "package_report.json")
    for name in TRAJECTORY_REPOS:
        assert report[name] == ["mmf_diffusers.pipeline_mmf_trajectory", "mmf_diffusers.scheduling_mmf"], name
        assert same_images(load_npy(pushed_trajectories, f"{name}_package"), pushed_trajectories["reference"]), name
    assert report["load_pipeline"] == "MMFTrajectoryPipeline"
    assert same_images(load_npy(pushed_trajectories, "load_pipeline"), pushed_trajectories["reference"])


@pytest.mark.slow
def test_trajectory_repos_load_with_diffusers_alone_and_give_the_same_samples(pushed_trajectories):
    report = trajectory_report(pushed_trajectories, "remote_code_report.json")
    assert report["mmf_diffusers_imported"] is False
    for name in [*TRAJECTORY_REPOS, "local"]:
        pipeline_module, pipeline_class, scheduler_module = report[name]
        assert pipeline_module.startswith("diffusers_modules.") and pipeline_module.endswith(".pipeline"), name
        assert pipeline_class == "MMFTrajectoryPipeline", name
        assert scheduler_module.endswith(".scheduling_mmf"), name
        reference = pushed_trajectories["reference"]
        assert same_images(load_npy(pushed_trajectories, f"{name}_remote_code"), reference), name
    assert "might require the following packages" not in pushed_trajectories["loaders"][1].stderr


@pytest.mark.slow
def test_trajectory_repository_layout_and_card(pushed_trajectories, hub):
    with open(mmf_diffusers.pipeline_mmf_trajectory.__file__, "rb") as f:
        pipeline_source = f.read()
    for how, repo_id in TRAJECTORY_REPOS.items():
        files = hub.files(repo_id)
        assert files["pipeline.py"] == pipeline_source, how
        assert "scheduler/scheduling_mmf.py" in files and "unet/diffusion_pytorch_model.safetensors" in files, how
        index = json.loads(files["model_index.json"])
        assert index["_class_name"] == ["pipeline", "MMFTrajectoryPipeline"], how
        assert index["unet"] == ["diffusers", "UNet1DModel"], how
        assert index["scheduler"] == ["scheduling_mmf", "MMFScheduler"], how
        assert index[PACKAGE_LAYOUT_KEY] == {
            "_class_name": "MMFTrajectoryPipeline",
            "scheduler": ["mmf_diffusers.scheduling_mmf", "MMFScheduler"],
        }
        # Configuration values are left alone, also a 2-list (diffusers would take a list of strings for a module).
        assert index["channel_names"] == "theta,omega" and index["channel_mean"] == [0.1, -0.2], how
        card = ModelCard(files["README.md"].decode())
        assert card.data.pipeline_tag == "time-series-forecasting", how
        assert {"mmf", "time-series", "trajectory-generation"} <= set(card.data.tags), how
        assert f'MMFTrajectoryPipeline.from_pretrained("{repo_id}")' in card.text, how
        assert f'DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)' in card.text, how
        assert ".trajectories" in card.text and "start_state=" in card.text and ".images" not in card.text, how
        assert "Pendulum trajectories (theta, omega; dt = 0.05)" in card.text, how
    card = hub.files(TRAJECTORY_REPOS["push_pipeline_folder"])["README.md"].decode()
    assert "![trajectory samples](sample_grid.png)" in card and "| steps | 3 |" in card
    assert "sample_grid.png" in hub.files(TRAJECTORY_REPOS["push_pipeline_folder"])
    for text in pushed_trajectories["texts"]:
        assert_token_absent(text, "captured output or logs")
    assert_folder_clean(pushed_trajectories["folder"])
    assert hub.unknown_requests == []


@pytest.mark.parametrize("method", ["from_pretrained", "load_config", "_upload_folder"])
def test_trajectory_pipeline_hub_methods_are_exact_copies(method):
    """pipeline_mmf_trajectory.py cannot import pipeline_mmf.py (each ships alone as remote code), so it copies
    MMFPipeline's three Hub methods; their bytecode must stay the same (docstrings may differ)."""

    def shape(code, doc=None):
        consts = tuple(shape(c) if isinstance(c, types.CodeType) else c for c in code.co_consts if c is not doc)
        return code.co_code, code.co_names, code.co_varnames, consts

    shapes = []
    for cls in (MMFPipeline, MMFTrajectoryPipeline):
        function = getattr(cls.__dict__[method], "__func__", cls.__dict__[method])
        shapes.append(shape(function.__code__, function.__doc__))
    assert shapes[0] == shapes[1]
    assert mmf_diffusers.pipeline_mmf_trajectory.PACKAGE_LAYOUT_KEY == PACKAGE_LAYOUT_KEY


def package_import_graph() -> dict:
    """module -> the package modules it imports (``from .x import``, ``import mmf_diffusers.x``, and the deferred
    ``importlib.import_module("mmf_diffusers.x")``), from the source; the package's ``__init__`` is left out."""
    import ast

    graph = {}
    for path in sorted(Path(mmf_diffusers.__file__).parent.glob("*.py")):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.removeprefix("mmf_diffusers.")] if node.module.startswith("mmf_diffusers.") else []
            elif isinstance(node, ast.Import):
                names = [a.name.removeprefix("mmf_diffusers.") for a in node.names if a.name.startswith("mmf_diffusers.")]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("mmf_diffusers.")):
                names = [node.args[0].value.removeprefix("mmf_diffusers.")]
            deps.update(n.split(".")[0] for n in names)
        graph[path.stem] = deps
    return graph


def test_the_package_has_no_import_circle():
    """hub.py and model_card.py do not import the pipeline modules (which import hub.py when pushing), and the
    package layout key they share with the pipelines' own copies is one string."""
    graph = package_import_graph()
    assert "hub" in graph["pipeline_mmf"] and graph["model_card"] == set()
    assert not graph["hub"] & {"pipeline_mmf", "pipeline_mmf_trajectory", "demo"}, graph["hub"]

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join(path[path.index(name):] + [name])}"
        for dep in graph.get(name, ()):
            visit(dep, path + [name])

    for name in graph:
        visit(name, [])
    assert mmf_diffusers.model_card.PACKAGE_LAYOUT_KEY == PACKAGE_LAYOUT_KEY == \
        mmf_diffusers.pipeline_mmf_trajectory.PACKAGE_LAYOUT_KEY


def test_load_pipeline_picks_the_class_and_refuses_other_folders(tmp_path):
    folder = str(tmp_path / "trajectory")
    tiny_trajectory_pipeline().save_pretrained(folder)
    assert type(load_pipeline(folder)) is MMFTrajectoryPipeline
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    index["_class_name"] = "DDPMPipeline"
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="not a pipeline of mmf_diffusers"):
        load_pipeline(folder)


def test_add_remote_code_refuses_a_list_of_strings_in_the_configuration(tmp_path):
    """A folder saved before channel_names became one string: diffusers' download would fail on it, so no push."""
    folder = str(tmp_path / "old")
    tiny_trajectory_pipeline().save_pretrained(folder)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    index["channel_names"] = ["theta", "omega"]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="channel_names=.*save it again"):
        add_remote_code(folder)
    MMFTrajectoryPipeline.from_pretrained(folder).save_pretrained(folder)
    assert add_remote_code(folder)["channel_names"] == "theta,omega"


def test_image_card_without_a_pipeline_folder_is_the_default(tmp_path):
    card = ModelCard.load(write_model_card(str(tmp_path), {}))
    assert card.data.pipeline_tag == "unconditional-image-generation" and "MMFPipeline.from_pretrained" in card.text


# ---------------------------------------------------------------------------------------------------- privacy, token
@pytest.mark.slow
def test_private_flag_and_token_sent(pushed, hub):
    creates = [r for r in hub.requests_to("POST", r"^/api/repos/create$") if r["json"]["name"] == "mmf-tiny"]
    assert creates and all(r["json"].get("visibility") == "private" for r in creates)
    assert hub.repos[PRIVATE_REPO].private is True
    assert hub.repos[PUSH_TO_HUB_REPO].private is False
    writes = hub.requests_to("POST", r"^/api/(repos/create|models/.*/(preupload|commit)/)")
    assert writes and all(r["token_sha256"] == token_digest(TOKEN) and r["user"] == USER for r in writes)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info(PRIVATE_REPO, token=False)
    assert pushed["commit_url"].startswith(f"{hub.url}/{PRIVATE_REPO}/commit/")


@pytest.mark.slow
def test_token_never_leaks(pushed, hub):
    for repo_id, repo in hub.repos.items():
        for sha, files in repo.snapshots.items():
            for path, content in files.items():
                assert_token_absent(content, f"{repo_id}@{sha}:{path}")
    assert_folder_clean(pushed["folder"])
    for text in pushed["texts"]:
        assert_token_absent(text, "captured output or logs")


def test_push_refuses_a_folder_that_contains_the_token(tmp_path, hub, reference):
    folder = str(tmp_path / "leaky")
    reference["pipe"].save_pretrained(folder)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write(f"token={TOKEN}\n")
    commits_before = len(hub.requests_to("POST", "/commit/"))
    with pytest.raises(ValueError, match=r"notes\.txt") as error:
        push_pipeline_folder(folder, f"{USER}/leaky", token=TOKEN, endpoint=hub.url)
    assert_token_absent(str(error.value), "the error message")
    assert len(hub.requests_to("POST", "/commit/")) == commits_before
    assert f"{USER}/leaky" not in hub.repos


# ---------------------------------------------------------------------------------------------------- model card
@pytest.mark.slow
def test_model_card_contents(pushed, hub):
    text = hub.files(PRIVATE_REPO)["README.md"].decode()
    card = ModelCard(text)
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "apache-2.0"
    assert set(card.data.tags) >= {"mmf", "meanflow", "unconditional-image-generation"}
    for expected in (
        "## How it was trained",
        "--hub_token ***",
        "--hub_token=***",
        "--max_train_steps 5",
        "| steps | 5 |",
        "lam_start=0, lam_end=1, warmup_steps=2, shape=linear",
        "tangent=model, adaptive_p=1",
        "sklearn digits (8x8)",
        "1 min 15 s",
        "![sample grid](samples.png)",
        "## Metrics",
        "| sliced W2 (1 step) | 0.125 |",
        f'MMFPipeline.from_pretrained("{PRIVATE_REPO}")',
        f'DiffusionPipeline.from_pretrained("{PRIVATE_REPO}", trust_remote_code=True)',
    ):
        assert expected in text, expected
    # push_to_hub's generic diffusers card is replaced by ours.
    generic = ModelCard(hub.files(PUSH_TO_HUB_REPO)["README.md"].decode())
    assert "mmf" in generic.data.tags
    assert f'MMFPipeline.from_pretrained("{PUSH_TO_HUB_REPO}")' in generic.text


def test_redact_command():
    assert redact_command(["train.py", "--hub_token", "abc", "--lr", "1e-4"]) == "train.py --hub_token *** --lr 1e-4"
    assert redact_command("train.py --hub_token=abc --api-key xyz") == "train.py --hub_token=*** --api-key ***"
    assert redact_command(["train.py", "--note", "contains abc"], secrets=["abc"]) == "train.py --note 'contains ***'"
    assert redact_command(["train.py", "--push_to_hub", "--hub_token"]) == "train.py --push_to_hub --hub_token"


def test_model_card_rejects_bad_info(tmp_path):
    with pytest.raises(ValueError, match="Unknown model card fields"):
        write_model_card(str(tmp_path), {"stepz": 3})
    with pytest.raises(ValueError, match="sample_grid"):
        write_model_card(str(tmp_path), {"sample_grid": "missing.png"})


def test_model_card_scrubs_the_current_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = write_model_card(str(tmp_path), {"description": f"trained by someone whose token is {TOKEN}"})
    with open(path) as f:
        assert_token_absent(f.read(), "the model card")


# ---------------------------------------------------------------------------------------------------- auth, CLI
@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No HF_TOKEN, no cached login."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))


def test_check_hub_auth(no_login, monkeypatch, hub):
    with pytest.raises(ValueError, match="needs a token"):
        check_hub_auth(None)
    assert check_hub_auth(TOKEN) == TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert check_hub_auth(None) == TOKEN
    assert check_hub_auth(None, endpoint=hub.url, validate=True) == TOKEN
    with pytest.raises(ValueError, match="rejected") as error:
        check_hub_auth("hf_wrong_" + TOKEN[-8:], endpoint=hub.url, validate=True)
    assert TOKEN[-8:] not in str(error.value)


def test_make_push_fn(no_login, tmp_path, hub, reference):
    assert make_push_fn(argparse.Namespace(push_to_hub=False)) is None
    args = argparse.Namespace(push_to_hub=True, hub_model_id=None, hub_token=None, output_dir=str(tmp_path / "run-7"))
    with pytest.raises(ValueError, match="needs a token"):
        make_push_fn(args)
    args.hub_token, args.hub_endpoint, args.hub_private_repo = TOKEN, hub.url, True
    push = make_push_fn(args)
    folder = str(tmp_path / "checkpoint")
    reference["pipe"].save_pretrained(folder)
    url = push(folder, "checkpoint 10", card_info={"steps": 10})
    assert f"/{USER}/run-7/commit/" in url  # the repo name defaults to the output folder's, in the token's namespace
    assert hub.repos[f"{USER}/run-7"].private is True
    assert "| steps | 10 |" in hub.files(f"{USER}/run-7")["README.md"].decode()


def test_ignore_patterns_and_a_card_written_before_the_repo_was_known(no_login, tmp_path, hub, reference):
    """The training script's layout: checkpoints and logs beside the pipeline, a card without the repo id."""
    folder = str(tmp_path / "run")
    reference["pipe"].save_pretrained(folder)
    os.makedirs(os.path.join(folder, "checkpoint-10"))
    with open(os.path.join(folder, "checkpoint-10", "state.txt"), "w") as f:
        f.write(f"optimizer state; and a careless copy of the token {TOKEN}\n")  # ignored, so it may hold anything
    write_model_card(folder, {"steps": 10})
    args = argparse.Namespace(push_to_hub=True, hub_model_id=f"{USER}/run", hub_token=TOKEN, hub_endpoint=hub.url)
    push = make_push_fn(args, ignore_patterns=["checkpoint-*"], validate=True)
    for step in (10, 20):  # twice: the ignore list must not grow or change between pushes
        push(folder, f"Checkpoint: step {step}")
        files = hub.files(f"{USER}/run")
        assert not any(path.startswith("checkpoint-") for path in files)
        card = files["README.md"].decode()
        assert "| steps | 10 |" in card and f'MMFPipeline.from_pretrained("{USER}/run")' in card
    assert hub.repos[f"{USER}/run"].messages[hub.repos[f"{USER}/run"].commits[-1]] == "Checkpoint: step 20"


def test_cli_errors(no_login, tmp_path, capsys, reference):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), f"{USER}/x"])
    assert exit_info.value.code == 2 and "is not a directory" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "empty"), f"{USER}/x"])
    assert exit_info.value.code == 2 and "not a saved pipeline" in capsys.readouterr().err

    folder = str(tmp_path / "pipeline")
    reference["pipe"].save_pretrained(folder)
    with pytest.raises(SystemExit) as exit_info:
        main([folder, f"{USER}/x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs a token" in err and "HF_TOKEN" in err


def test_cli_push(no_login, monkeypatch, tmp_path, capsys, hub, reference):
    folder = str(tmp_path / "pipeline")
    reference["pipe"].save_pretrained(folder)
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert main([folder, f"{USER}/cli-private", "--private", "--token-file", str(tmp_path / "token"), "--endpoint",
                 hub.url]) == 0
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main([folder, f"{USER}/cli-public", "--endpoint", hub.url]) == 0
    out, err = capsys.readouterr()
    assert_token_absent(out + err, "the command's output")
    assert out.count("Pushed ") == 2
    assert hub.repos[f"{USER}/cli-private"].private is True
    assert hub.repos[f"{USER}/cli-public"].private is False
    assert "pipeline.py" in hub.files(f"{USER}/cli-public")
    assert_folder_clean(folder)


@pytest.mark.slow
def test_training_script_pushes_at_checkpoints_and_at_the_end(hub, tmp_path):
    """train_mmf.py --push_to_hub: a private repo gets the pipeline folder (remote-code layout and model card) at
    every checkpoint and at the end; the token reaches the server but no file and no output."""
    repo_id = f"{USER}/trained-by-script"
    script = os.path.join(os.path.dirname(SRC), "training", "train_mmf.py")
    env = hub_env(hub, str(tmp_path))
    env["OMP_NUM_THREADS"] = "1"
    output_dir = tmp_path / "out"
    args = ["--dataset_name", "sklearn-digits", "--resolution", "8", "--block_out_channels", "8", "16",
            "--num_sample_images", "4", "--lr_warmup_steps", "0", "--seed", "0", "--train_batch_size", "8",
            "--max_train_steps", "2", "--checkpointing_steps", "1", "--logger", "none",
            "--output_dir", str(output_dir), "--push_to_hub", "--hub_model_id", repo_id, "--hub_private_repo"]
    result = subprocess.run([sys.executable, script, *args], env=env, cwd=str(tmp_path), capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT)
    assert_token_absent(result.stdout, "the training script's stdout")
    assert_token_absent(result.stderr, "the training script's stderr")
    assert result.returncode == 0, result.stderr[-4000:]
    assert_folder_clean(str(output_dir))

    repo = hub.repos[repo_id]
    assert repo.private
    assert len(repo.commits) >= 3  # checkpoint 1, checkpoint 2, the end
    files = hub.files(repo_id)
    for name in ("model_index.json", "pipeline.py", "scheduler/scheduling_mmf.py", "scheduler/scheduler_config.json",
                 "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "sample_grid.png"):
        assert name in files, name
    assert not any(name.startswith(("checkpoint-", "logs/", "samples/")) for name in files)
    for name, content in files.items():
        assert_token_absent(content, f"pushed file {name}")
    assert repo_id in files["README.md"].decode()
