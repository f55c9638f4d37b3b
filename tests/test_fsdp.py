"""accelerate's FSDP2 and DeepSpeed ZeRO-2/3 engines running training/train_mmf.py on 2 CPU processes (gloo).

accelerate 1.15 applies FSDP only to GPU-type processes (with an FSDP configuration a CPU run is plain DDP) and counts
one process for DeepSpeed on a machine without a GPU. With MMF_TEST_ENGINE_ON_CPU=1 the script's engine module
(training/engine.py, ``apply_cpu_stand_in``) switches accelerate's state to the configured engine: FSDP2 then runs
through accelerate's own ``_prepare_fsdp2`` (torch's ``fully_shard`` on a CPU device mesh, each ResnetBlock2D its own
unit as training/configs/fsdp2.yaml says), ``save_state`` / ``load_state`` (``pytorch_model_fsdp.bin``) and
``get_state_dict``; DeepSpeed runs with the real process count. The launch configurations are the shipped ones
(training/configs/*.yaml), with ``use_cpu`` for FSDP2 and a free port.

One class-conditional run (UNet + conditioner as one wrapped module) with an EMA, 2 processes x batch 4, 3 steps
(lam 0 in steps 1-2, 0.5 in step 3, so the shifted forward of the finite difference carries gradient), a checkpoint
and sample grids at step 2, then the pipeline at step 3; checked against DDP (2 x 4) and one process (1 x 8) on the
same data and loss randomness:
    * losses, mse and gradient norms per step: relative 1e-4 (the all-reduce and the reduce-scatter sum in another
      order than one process);
    * the live weights of checkpoint-2 and the EMA weights of the final pipeline: rtol 1e-4, atol 1e-5;
    * ``--resume_from_checkpoint latest`` finds the engine's checkpoint (accelerate's FSDP / DeepSpeed file names)
      and the resumed run ends bit-identical to the uninterrupted one;
    * a checkpoint written under one engine is refused (one line) under another.
DeepSpeed needs ``pip install deepspeed transformers`` (accelerate's DeepSpeed plugin imports transformers): not in
the test extras, so those cases are skipped where they are missing.
"""

import importlib.util
import sys

import pytest
import yaml

from test_multiprocess import free_port, load_weights
from test_training import REPO, TINY, check, read_log, run_script, script_env

ARGS = ["--dataset_name", "sklearn-digits", *TINY, "--max_train_steps", "3", "--checkpointing_steps", "2",
        "--save_images_steps", "2", "--lam_schedule", "step", "--lam_start", "0", "--lam_end", "0.5",
        "--lam_warmup_steps", "2", "--r_neq_t_fraction", "0.5", "--learning_rate", "1e-3", "--adam_epsilon", "1e-4",
        "--logger", "none", "--class_conditional", "--label_dropout", "0.25", "--cfg_w", "1.5", "--use_ema",
        "--derivative", "finite_difference", "--process_group_timeout", "120"]

ENGINES = {"fsdp2": "fsdp2.yaml", "deepspeed_zero2": "deepspeed_zero2.yaml", "deepspeed_zero3": "deepspeed_zero3.yaml"}
HAVE_DEEPSPEED = all(importlib.util.find_spec(name) is not None for name in ("deepspeed", "transformers"))

pytestmark = pytest.mark.slow


def engine_launcher(tmp_path, engine: str) -> list:
    """``accelerate launch --config_file <the shipped configuration>``, made to run 2 CPU processes here."""
    config = yaml.safe_load((REPO / "training" / "configs" / ENGINES[engine]).read_text())
    config["main_process_port"] = free_port()
    config.pop("rdzv_backend", None)
    if engine == "fsdp2":
        config["use_cpu"] = True  # gloo; the stand-in then applies FSDP2 (DeepSpeed's launcher needs use_cpu false)
    path = tmp_path / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]


def live_weights(checkpoint):
    """The trained (not EMA) weights accelerate saved in a checkpoint folder, whatever the engine."""
    import torch
    from safetensors.torch import load_file

    if (checkpoint / "model.safetensors").exists():
        return load_file(str(checkpoint / "model.safetensors"))
    if (checkpoint / "pytorch_model_fsdp.bin").exists():
        return torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def pipeline_weights(folder) -> dict:
    weights = {f"unet.{k}": v for k, v in load_weights(folder).items()}
    weights.update({f"conditioner.{k}": v for k, v in load_weights(folder, "conditioner").items()})
    return weights


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The same run under DDP (2 processes x 4) and on one process (batch 8).

    The DDP run is launched with the FSDP2 configuration and without the stand-in: accelerate 1.15 has no FSDP for CPU
    processes and wraps the model in DDP without an error; the script says so, and the ranks stay in sync
    (--check_param_sync). (If a later accelerate shards here, this fails and docs/multi_gpu.md needs updating.)"""
    tmp = tmp_path_factory.mktemp("references")
    ddp, one = tmp / "ddp", tmp / "one"
    result = run_script(tmp, ARGS + ["--train_batch_size", "4", "--output_dir", ddp, "--check_param_sync"],
                        launcher=engine_launcher(tmp, "fsdp2"), timeout=400)
    check(result)
    assert "the accelerate configuration asks for FSDP, but accelerate runs MULTI_CPU here" in result.stdout
    assert "Gradient synchronisation: accelerate's DistributedDataParallel wrapper" in result.stdout
    check(run_script(tmp, ARGS + ["--train_batch_size", "8", "--output_dir", one]))
    return {"ddp": ddp, "one": one}


def assert_same_run(a, b, rtol=1e-4, atol=1e-5):
    import torch

    log_a, log_b = read_log(a), read_log(b)
    assert sorted(log_a) == sorted(log_b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "mse", "grad_norm"):
            assert log_a[step][key] == pytest.approx(log_b[step][key], rel=rtol, abs=1e-6), (step, key)
    for name, (x, y) in {"live": (live_weights(a / "checkpoint-2"), live_weights(b / "checkpoint-2")),
                         "ema": (pipeline_weights(a), pipeline_weights(b))}.items():
        assert sorted(x) == sorted(y), name
        for key in x:
            torch.testing.assert_close(x[key].float(), y[key].float(), rtol=rtol, atol=atol, msg=f"{name} {key}")


@pytest.mark.parametrize("engine", list(ENGINES))
def test_an_engine_trains_like_ddp_and_one_process_and_resumes_exactly(tmp_path, references, engine, capsys):
    import torch

    if engine.startswith("deepspeed") and not HAVE_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed transformers)")
    out = tmp_path / "out"
    env = script_env(tmp_path, MMF_TEST_ENGINE_ON_CPU="1")
    result = run_script(tmp_path, ARGS + ["--train_batch_size", "4", "--output_dir", out],
                        launcher=engine_launcher(tmp_path, engine), env=env, timeout=400)
    check(result)
    name = "fsdp2" if engine == "fsdp2" else f"deepspeed ZeRO-{engine[-1]}"
    assert f"Engine: {name} over 2 processes" in result.stdout
    assert ("parameters sharded" in result.stdout) == (engine != "deepspeed_zero2")
    if engine == "fsdp2":  # the root, and each ResnetBlock2D (fsdp2.yaml's wrap policy) its own unit
        units = int(result.stdout.split("FSDP2: ")[1].split()[0])
        assert units > 1, result.stdout
    # Every rank entered the sample grids and the pipeline save (the main process wrote them).
    for step, steps in ((2, 1), (2, 2), (3, 1)):
        assert (out / "samples" / f"step-{step:06d}-{steps}step.png").is_file()
    assert (out / "sample_grid.png").is_file()
    for reference in ("ddp", "one"):
        assert_same_run(out, references[reference])

    # Resume: checkpoint-2 (the engine's own files) is found by "latest", and step 3 is the same to the bit.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    result = run_script(tmp_path, ARGS + ["--train_batch_size", "4", "--output_dir", resumed,
                                          "--resume_from_checkpoint", "latest"],
                        launcher=engine_launcher(tmp_path, engine), env=env, timeout=400)
    check(result)
    assert "Resuming from" in result.stdout and "checkpoint-2" in result.stdout
    final, again = pipeline_weights(out), pipeline_weights(resumed)
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert read_log(resumed)[3]["loss"] == read_log(out)[3]["loss"]

    # Another engine (here one plain process) cannot load these files: refused in one line, before any training.
    import train_mmf

    assert train_mmf.main([str(a) for a in ARGS] + ["--train_batch_size", "8", "--output_dir", str(resumed),
                                                    "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "was written under" in err and "this run is plain" in err and "Traceback" not in err, err[-2000:]
