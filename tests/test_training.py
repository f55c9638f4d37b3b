"""Tests for training/train_mmf.py: an end-to-end `accelerate launch` run with the saved artifacts, crash-safe
checkpoints (SIGKILL right after a checkpoint and in the middle of writing one, then resume from `latest`), a
non-finite loss, and the bad-input errors. CPU only, tiny UNets, offline data (PNG folders written here, or
scikit-learn's digits).

The script runs in subprocesses with OMP_NUM_THREADS=1: on a busy 2-core machine, two OpenMP threads per tiny
model are several times slower than one.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_mmf.py"
sys.path.insert(0, str(REPO / "training"))

TINY = ["--resolution", "8", "--block_out_channels", "8", "16", "--num_sample_images", "4", "--lr_warmup_steps", "0",
        "--seed", "0"]


def script_env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MMF_TEST_KILL", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"), HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_script(tmp_path: Path, args, *, launcher=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run train_mmf.py with ``python`` (launcher None) or a launcher prefix (e.g. accelerate launch ...)."""
    prefix = launcher if launcher is not None else [sys.executable]
    return subprocess.run(prefix + [str(SCRIPT)] + [str(a) for a in args], cwd=tmp_path, env=env or script_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def accelerate_launch(num_processes: int, port: int):
    """``accelerate launch`` without any user config. One process: ``--cpu``; several on a CPU-only machine:
    ``--multi_gpu`` (torchrun) with ACCELERATE_USE_CPU=1 in the environment (gloo)."""
    base = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes == 1:
        return base + ["--cpu"]
    return base + ["--multi_gpu", "--main_process_port", str(port)]


def read_log(output_dir: Path) -> dict:
    """step -> the last record of that step in logs/train_log.jsonl (a resumed run logs steps again)."""
    records = {}
    for line in (output_dir / "logs" / "train_log.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "step" in record:
                records[record["step"]] = record
    return records


def load_unet_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def check(result: subprocess.CompletedProcess, returncode: int = 0) -> None:
    assert result.returncode == returncode, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\n" \
                                            f"STDERR:\n{result.stderr[-6000:]}"


def write_image_folder(root: Path) -> Path:
    """24 readable PNGs of several sizes and modes, one broken PNG and a text file."""
    rng = np.random.default_rng(0)
    (root / "nested").mkdir(parents=True)
    for i in range(24):
        size = (8 + i % 5, 8 + (i * 3) % 7)
        if i % 3 == 0:
            image = Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), "L")
        elif i % 3 == 1:
            image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB")
        else:
            image = Image.fromarray(rng.integers(0, 256, (*size, 4), dtype=np.uint8), "RGBA")
        image.save(root / ("nested" if i % 2 else ".") / f"img{i:02d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "readme.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_accelerate_launch_end_to_end(tmp_path):
    import torch

    from mmf_diffusers import MMFPipeline

    data = write_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    token = "hf_secretTestToken123"
    result = run_script(tmp_path, ["--train_data_dir", data, "--output_dir", out, *TINY, "--train_batch_size", "4",
                                   "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit",
                                   "1", "--use_ema", "--random_flip", "--dataloader_num_workers", "1"],
                        launcher=accelerate_launch(1, 0), env=script_env(tmp_path, HF_TOKEN=token))
    check(result)
    assert "Skipping 1 unreadable image" in result.stdout + result.stderr

    # the pipeline folder
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json", "scheduler/scheduler_config.json",
                 "model_index.json", "README.md", "sample_grid.png", "training_config.json",
                 "samples/step-000004-1step.png", "samples/step-000004-2step.png", "samples/step-000002-1step.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "sample_grid.png").size[0] >= 64
    # checkpoints rotated to the last one; no temporary folders left
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]
    meta = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert meta["global_step"] == 4 and meta["config"]["use_ema"] is True
    # logs: one record per step, tensorboard events
    log = read_log(out)
    assert sorted(log) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log.values())
    # the default loss (docs/defaults.md): lam = 0 throughout, the adaptive weight with p = 0.5
    assert all(r["lam"] == 0.0 for r in log.values())
    assert all(r["mean_weight"] != 1.0 for r in log.values())
    assert list((out / "logs" / "train_mmf").rglob("events.out.tfevents.*"))
    # the token is nowhere: not printed, not in any file written
    assert token not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    config = json.loads((out / "training_config.json").read_text())
    assert config["hub_token"] is None and config["num_channels"] == 3 and config["num_training_images"] == 24

    pipe = MMFPipeline.from_pretrained(str(out))
    assert pipe.config.time_scale == config["time_scale"]
    images = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    # with --use_ema the saved weights are the EMA weights, not those of the last checkpoint's model
    from safetensors.torch import load_file

    trained = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    saved = load_unet_state(out)
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)


@pytest.mark.slow
def test_warm_start_from_an_ordinary_one_time_unet(tmp_path):
    """--pretrained_unet: a stock diffusion UNet2DModel (no second time) gains the zero-initialised second-time
    embedding and trains; the result loads as an MMF pipeline."""
    import torch
    from diffusers import UNet2DModel

    from mmf_diffusers import MMFPipeline

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                layers_per_block=1).save_pretrained(tmp_path / "ddpm" / "unet")
    out = tmp_path / "run"
    result = run_script(tmp_path, ["--dataset_name", "sklearn-digits", "--pretrained_unet", tmp_path / "ddpm",
                                   "--pretrained_unet_subfolder", "unet", *TINY, "--train_batch_size", "8",
                                   "--max_train_steps", "2", "--checkpointing_steps", "100", "--logger", "none",
                                   "--output_dir", out])
    check(result)
    assert json.loads((out / "unet" / "config.json").read_text())["class_embed_type"] == "timestep"
    images = MMFPipeline.from_pretrained(str(out))(num_images=1, output_type="np").images
    assert images.shape == (1, 8, 8, 1)


# ---------------------------------------------------------------------------------------------------------------
# crash-safe checkpoints and exact resume


RESUME_ARGS = ["--dataset_name", "sklearn-digits", *TINY, "--train_batch_size", "4", "--gradient_accumulation_steps",
               "2", "--max_train_steps", "8",
               "--checkpointing_steps", "3", "--save_images_steps", "100", "--use_ema", "--random_flip",
               "--lam_schedule", "linear", "--lam_warmup_steps", "5", "--r_neq_t_fraction", "0.5",
               "--learning_rate", "1e-3", "--logger", "none"]


@pytest.mark.slow
def test_sigkill_after_and_during_checkpoint_then_resume_reproduces_the_run(tmp_path):
    import torch

    reference = tmp_path / "reference"
    check(run_script(tmp_path, RESUME_ARGS + ["--output_dir", reference]))
    expected = read_log(reference)
    assert sorted(expected) == list(range(1, 9))

    out = tmp_path / "killed"
    args = RESUME_ARGS + ["--output_dir", out]
    # 1. SIGKILL right after checkpoint-3 is complete
    result = run_script(tmp_path, args, env=script_env(tmp_path, MMF_TEST_KILL="after_save:3"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert (out / "checkpoint-3" / "training_state.json").is_file()
    # 2. resume, and SIGKILL in the middle of writing checkpoint-6
    result = run_script(tmp_path, args + ["--resume_from_checkpoint", "latest"],
                        env=script_env(tmp_path, MMF_TEST_KILL="during_save:6"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert "Resuming from" in result.stdout and "checkpoint-3" in result.stdout
    partial = out / ".tmp-checkpoint-6"
    assert partial.is_dir() and (partial / "model.safetensors").is_file()
    assert not (partial / "training_state.json").exists() and not (out / "checkpoint-6").exists()
    # 3. `latest` ignores the partial folder and resumes from checkpoint-3 again; the run finishes
    result = run_script(tmp_path, args + ["--resume_from_checkpoint", "latest"])
    check(result)
    assert "checkpoint-3" in result.stdout
    assert not partial.exists() and (out / "checkpoint-6" / "training_state.json").is_file()

    got = read_log(out)
    assert sorted(got) == list(range(1, 9))
    # Bit-identical on this CPU: same kernels, same batch shapes, every state restored exactly.
    for step in range(1, 9):
        for key in ("loss", "lam", "grad_norm", "lr", "mean_abs_dudt"):
            assert got[step][key] == expected[step][key], (step, key, got[step][key], expected[step][key])
    a, b = load_unet_state(reference), load_unet_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    assert sum('"event": "resume"' in line for line in log_lines) == 2


@pytest.mark.slow
def test_resume_refuses_fixed_flags_and_honours_a_new_learning_rate(tmp_path):
    """The training state is JSON + safetensors (no pickle for accelerate to unpickle); a resume lists the flags it
    cannot change, and a new --learning_rate is used from the resumed step on and recorded."""
    out = tmp_path / "run"
    base = ["--dataset_name", "sklearn-digits", *TINY, "--train_batch_size", "4", "--max_train_steps", "2",
            "--checkpointing_steps", "2", "--logger", "none", "--lr_scheduler", "constant", "--learning_rate", "1e-3",
            "--output_dir", out]
    check(run_script(tmp_path, base))
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "mmf_state.json").is_file() and (checkpoint / "mmf_state.safetensors").is_file()
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))

    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    result = run_script(tmp_path, base + resume + ["--tangent", "conditional", "--pair_rows", "0", "--adaptive_p", "0"])
    check(result, 2)
    assert "--tangent model -> conditional" in result.stderr and "--adaptive_p 0.5 -> 0.0" in result.stderr
    assert "--pair_rows True -> False" in result.stderr

    result = run_script(tmp_path, base + resume + ["--learning_rate", "5e-4"])
    check(result)
    assert "becomes --learning_rate 0.0005" in result.stdout
    log = read_log(out)
    assert log[2]["lr"] == 1e-3 and log[3]["lr"] == log[4]["lr"] == 5e-4
    assert json.loads((out / "training_config.json").read_text())["learning_rate"] == 5e-4


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    # lr 0 at step 1 (warmup), then 1e30: the weights explode and step 3's loss is not finite.
    result = run_script(tmp_path, ["--dataset_name", "sklearn-digits", *TINY[:-4], "--seed", "0", "--train_batch_size",
                                   "8", "--max_train_steps", "6", "--checkpointing_steps", "1", "--save_images_steps",
                                   "100", "--learning_rate", "1e30", "--lr_scheduler", "constant_with_warmup",
                                   "--lr_warmup_steps", "3", "--logger", "none", "--output_dir", out])
    check(result, 1)
    assert "non-finite" in result.stderr and "--resume_from_checkpoint latest" in result.stderr
    import mmf_diffusers.checkpointing as ckpt

    steps = [step for step, _ in ckpt.list_checkpoints(str(out))]
    assert steps and max(steps) < 6
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors before any work


def parse_error(capsys, argv) -> str:
    import train_mmf

    with pytest.raises(SystemExit) as exit_info:
        train_mmf.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--resolution", "12", "--block_out_channels", "8", "16", "16", "16"], "divisible by 2**3 = 8"),
    (["--lam_schedule", "exponential"], "invalid choice"),
    (["--derivative", "autograd"], "invalid choice"),
    (["--lam_end", "1.5"], "--lam_end must be in [0, 1]"),
    (["--lam_warmup_steps", "100"], "--lam_warmup_steps 100 needs a warm-up: add --lam_schedule linear"),
    (["--lam_start", "-0.1"], "--lam_start must be in [0, 1]"),
    (["--max_train_steps", "-3"], "--max_train_steps must be a positive integer"),
    (["--train_batch_size", "0"], "--train_batch_size must be a positive integer"),
    (["--learning_rate", "nan"], "expected a finite number"),
    (["--r_neq_t_fraction", "2"], "--r_neq_t_fraction must be in [0, 1]"),
    (["--lam_schedule", "constant", "--lam_start", "0", "--lam_end", "1"], "constant keeps lam"),
    (["--block_out_channels", "8", "12"], "not divisible by --norm_num_groups"),
    (["--attention_levels", "1"], "one 0/1 per level"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "is not a folder"),
    (["--tangent", "conditional", "--pair_rows", "1"], "--pair_rows 1 needs --tangent model"),
    (["--pair_rows", "1", "--r_neq_t_fraction", "0.75"], "--pair_rows 1 needs --r_neq_t_fraction <= 0.5"),
])
def test_bad_numbers_and_names(capsys, extra, message):
    assert message in parse_error(capsys, ["--dataset_name", "sklearn-digits", *extra])


def test_bad_data_folders(capsys, tmp_path):
    assert "does not exist" in parse_error(capsys, ["--train_data_dir", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in parse_error(capsys, ["--train_data_dir", str(tmp_path / "empty")])
    assert "exactly one of" in parse_error(capsys, [])


def test_bad_input_from_the_command_line_is_fast_and_names_the_problem(tmp_path):
    # Before any heavy import: no torch, so well under the ~7 s that importing torch + diffusers takes.
    result = run_script(tmp_path, ["--train_data_dir", tmp_path / "nowhere"], timeout=60)
    check(result, 2)
    assert "--train_data_dir" in result.stderr and "does not exist" in result.stderr
    # --push_to_hub without a token (no --hub_token, no HF_TOKEN, an empty HF_HOME)
    result = run_script(tmp_path, ["--dataset_name", "sklearn-digits", "--push_to_hub"], timeout=60)
    check(result, 2)
    assert "--push_to_hub needs a Hub token" in result.stderr


def test_folder_of_unreadable_images_is_an_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"")
    result = run_script(tmp_path, ["--train_data_dir", folder, "--output_dir", tmp_path / "out", *TINY], timeout=120)
    check(result, 2)
    assert "No readable image" in result.stderr
    assert not (tmp_path / "out" / "checkpoint-1").exists()


# ---------------------------------------------------------------------------------------------------------------
# checkpoint folders


def test_checkpoint_folders_are_atomic_and_rotated(tmp_path):
    import mmf_diffusers.checkpointing as ckpt

    out = str(tmp_path)
    for step in (2, 4, 6):
        tmp = ckpt.prepare_temp_dir(out, step)
        Path(tmp, "model.bin").write_text(str(step))
        ckpt.commit_checkpoint(tmp, out, step, {"global_step": step})
    # a partial write, a foreign folder and an incomplete checkpoint-like folder are all ignored
    Path(ckpt.prepare_temp_dir(out, 8), "model.bin").write_text("partial")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-best").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4, 6]
    assert ckpt.latest_checkpoint(out).endswith("checkpoint-6")
    assert ckpt.read_metadata(ckpt.latest_checkpoint(out)) == {"global_step": 6}

    removed = ckpt.rotate_checkpoints(out, 2)
    assert [Path(p).name for p in removed] == ["checkpoint-2"]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 6]

    # saving a step again replaces the old folder only once the new one is complete
    tmp = ckpt.prepare_temp_dir(out, 6)
    Path(tmp, "model.bin").write_text("new")
    ckpt.commit_checkpoint(tmp, out, 6, {"global_step": 6, "again": True})
    assert Path(out, "checkpoint-6", "model.bin").read_text() == "new"
    assert not any(name.startswith(".trash-") for name in os.listdir(out))
