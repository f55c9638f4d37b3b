"""Two CPU processes (accelerate launch, gloo) train exactly like one.

train_mmf.py synchronises gradients in one of two ways (see its docstring): with ``--derivative finite_difference``
the loss calls accelerate's DistributedDataParallel wrappers and ``accelerator.accumulate`` skips the all-reduce on
all but the last micro-batch; with ``--derivative jvp`` (torch.func.jvp cannot go through DDP) the loss uses the
unwrapped UNet and the script averages gradients itself with one all-reduce per optimiser step. These tests check,
for both, with and without gradient accumulation, unconditional and class-conditional (two prepared modules), and with lam = 0 (steps 1-2) and lam = 0.5 (steps 3-4: the shifted
forward of the finite difference then carries gradient, so DDP sees three forwards before one backward):
    * the parameters are bit-identical on both ranks after every step (--check_param_sync all-gathers a SHA-256
      of the parameters after each step and stops the run if they differ);
    * 2 processes x batch 4 follow 1 process x batch 8 (same data, same t, r and noise per image): the same losses
      and final weights within float tolerance (the all-reduce sums in another order).

Adam's epsilon is raised to 1e-4 here: some biases of the UNet feed straight into a GroupNorm, which removes them,
so their exact gradient is zero and the computed one is float noise; with the default 1e-8, Adam turns that noise
into full-size steps whose sign differs between any two summation orders, and the weights could not be compared.
"""

import socket

import pytest

from test_training import TINY, accelerate_launch, check, read_log, run_script

ARGS = ["--dataset_name", "sklearn-digits", *TINY, "--max_train_steps", "4", "--checkpointing_steps", "100",
        "--save_images_steps", "100", "--lam_schedule", "step", "--lam_start", "0", "--lam_end", "0.5",
        "--lam_warmup_steps", "2", "--r_neq_t_fraction", "0.5", "--learning_rate", "1e-3", "--adam_epsilon", "1e-4", "--logger", "none"]

SYNC = {"jvp": "hand-written all-reduce", "finite_difference": "accelerate's DistributedDataParallel wrapper"}


def load_weights(folder, component: str = "unet") -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / component / "diffusion_pytorch_model.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Class-conditional runs (with training-time guidance: a no-grad forward with labels and "no label" rows) have two
# prepared modules, the UNet and the conditioner.
CONDITIONAL = ["--class_conditional", "--label_dropout", "0.25", "--cfg_w", "1.5"]


@pytest.mark.parametrize("derivative,accumulation,conditional", [("jvp", 1, False), ("finite_difference", 1, False),
                                                                 ("jvp", 2, True), ("finite_difference", 2, True)])
@pytest.mark.slow
def test_two_processes_stay_in_sync_and_match_one_process(tmp_path, derivative, accumulation, conditional):
    import torch

    two, one = tmp_path / "two", tmp_path / "one"
    args = ARGS + ["--derivative", derivative, "--gradient_accumulation_steps", str(accumulation)]
    args += CONDITIONAL if conditional else []
    result = run_script(tmp_path, args + ["--train_batch_size", "4", "--output_dir", two, "--check_param_sync"],
                        launcher=accelerate_launch(2, free_port()), timeout=400)
    check(result)
    assert "num_processes 2" in result.stdout
    assert f"Gradient synchronisation: {SYNC[derivative]}" in result.stdout
    # The one-process run also keeps a checkpoint at step 2, to show below that the optimiser really steps (with
    # accelerator.accumulate an optimiser step can be skipped silently, and two runs that never step would agree).
    one_args = args + ["--train_batch_size", "8", "--output_dir", one]
    one_args[one_args.index("--checkpointing_steps") + 1] = "2"
    check(run_script(tmp_path, one_args))

    log_two, log_one = read_log(two), read_log(one)
    assert sorted(log_two) == sorted(log_one) == [1, 2, 3, 4]
    assert [log_two[s]["lam"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 0.5, 0.5]
    for step in (1, 2, 3, 4):
        assert log_two[step]["frac_r_neq_t"] == pytest.approx(log_one[step]["frac_r_neq_t"], abs=1e-12)
        for key in ("loss", "mse", "mean_abs_dudt", "grad_norm"):
            # A finite difference with eps = 1e-3 multiplies float32 rounding differences of u by 1000.
            rel = 1e-3 if key == "mean_abs_dudt" and derivative == "finite_difference" else 1e-4
            assert log_two[step][key] == pytest.approx(log_one[step][key], rel=rel, abs=1e-6), (step, key)
    a, b = load_weights(two), load_weights(one)
    if conditional:
        a.update({f"conditioner.{k}": v for k, v in load_weights(two, "conditioner").items()})
        b.update({f"conditioner.{k}": v for k, v in load_weights(one, "conditioner").items()})
        assert any(name.startswith("conditioner.") for name in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    from safetensors.torch import load_file

    # A class-conditional checkpoint holds one module: unet.* and conditioner.* (the pipeline's unet/ has bare names).
    at_step_2 = {name.removeprefix("unet."): value
                 for name, value in load_file(str(one / "checkpoint-2" / "model.safetensors")).items()}
    moved = [name for name in at_step_2 if not torch.equal(at_step_2[name], b[name])]
    assert len(moved) > len(at_step_2) // 2, f"only {len(moved)} of {len(at_step_2)} tensors changed in steps 3-4"


def test_jvp_is_refused_where_it_cannot_run():
    """jvp's hand-written all-reduce needs whole gradients on every rank: refused under FSDP / DeepSpeed (accelerate
    1.15 cannot run FSDP on CPU processes, so the check itself is tested), and torch.compile does not apply inside
    torch.func.jvp."""
    import engine as engine_lib
    import train_mmf

    for kind in ("FSDP", "DEEPSPEED"):
        name = engine_lib.engine_name(f"DistributedType.{kind}")
        with pytest.raises(engine_lib.EngineError, match=f"jvp cannot run under accelerate's {kind}"):
            engine_lib.refuse_derivative(name, "jvp")
        engine_lib.refuse_derivative(name, "finite_difference")
    engine_lib.refuse_derivative(engine_lib.engine_name("DistributedType.MULTI_GPU"), "jvp")
    with pytest.raises(SystemExit):
        train_mmf.parse_args(["--dataset_name", "sklearn-digits", "--derivative", "jvp", "--torch_compile"])
    args = train_mmf.parse_args(["--dataset_name", "sklearn-digits", "--derivative", "finite_difference",
                                 "--torch_compile"])
    assert args.torch_compile


def test_engine_configurations_the_script_cannot_run_are_refused_in_one_line():
    """engine.Engine reads accelerate's state (faked here: no GPU to build the real FSDP / DeepSpeed states) and
    refuses what it cannot run; for DeepSpeed it writes the per-process micro-batch, the accumulation, the global batch
    and the clipping into the plugin's configuration (no dataloader is prepared, so accelerate cannot)."""
    import types

    import engine as engine_lib

    def engine(kind, plugin=None, **flags):
        accelerator = types.SimpleNamespace(is_main_process=True, num_processes=2, mixed_precision="no",
                                            distributed_type=f"DistributedType.{kind}",
                                            state=types.SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=plugin))
        args = dict(derivative="finite_difference", check_param_sync=False, mixed_precision="no", train_batch_size=4,
                    gradient_accumulation_steps=3, max_grad_norm=0.5)
        return engine_lib.Engine(accelerator, types.SimpleNamespace(**{**args, **flags}), log=lambda message: None)

    def fsdp(version=2, kind="FULL_STATE_DICT"):
        return types.SimpleNamespace(fsdp_version=version, state_dict_type=f"StateDictType.{kind}")

    def deepspeed(stage, **config):
        return types.SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}, **config})

    assert engine("FSDP", fsdp()).checkpoint_files[0] == "pytorch_model_fsdp.bin"
    for plugin, flags, message in [
            (fsdp(1), {}, "FSDP version 1 is not supported: set fsdp_version: 2"),
            (fsdp(kind="SHARDED_STATE_DICT"), {}, "SHARDED_STATE_DICT is not supported"),
            (fsdp(), {"check_param_sync": True}, "--check_param_sync compares whole parameters"),
            (deepspeed(1), {}, "DeepSpeed ZeRO stage 1 is not supported"),
            (deepspeed(2, train_micro_batch_size_per_gpu=16), {}, "train_micro_batch_size_per_gpu 16 differs from "
             "--train_batch_size 4"),
            (deepspeed(2, gradient_clipping=1.0), {}, "gradient_clipping 1.0 differs from --max_grad_norm 0.5"),
            (deepspeed(3, zero_optimization={"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}), {},
             "ZeRO-3 needs zero3_save_16bit_model: true")]:
        kind = "FSDP" if hasattr(plugin, "fsdp_version") else "DEEPSPEED"
        with pytest.raises(engine_lib.EngineError, match=message):
            engine(kind, plugin, **flags)
    with pytest.raises(engine_lib.EngineError, match="accelerate's XLA is not supported"):
        engine("XLA")
    plugin = deepspeed(3, train_micro_batch_size_per_gpu="auto")
    zero3 = engine("DEEPSPEED", plugin)
    assert zero3.sharded and zero3.checkpoint_format == "deepspeed-zero3-2procs"
    assert {k: plugin.deepspeed_config[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                    "train_batch_size", "gradient_clipping")} == \
        {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "train_batch_size": 24,
         "gradient_clipping": 0.5}
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert not engine("DEEPSPEED", deepspeed(2)).sharded


@pytest.mark.slow
def test_two_processes_share_the_latent_encoding(tmp_path):
    """Each process encodes its half of the images (on its device) into a part file and the main process merges them:
    the cache file is the one a single process writes (same name, i.e. the same key, and the same latents to the bit),
    and the run then trains on it."""
    from safetensors.numpy import load_file

    import data as data_lib
    import latents as latent_lib
    from test_latent import tiny_vae

    vae_dir, out = tmp_path / "vae", tmp_path / "out"
    tiny_vae().save_pretrained(vae_dir)
    result = run_script(tmp_path, ["--dataset_name", "sklearn-digits", *TINY, "--center_crop", "--random_flip",
                                   "--vae_name_or_path", vae_dir, "--train_batch_size", "8", "--max_train_steps", "1",
                                   "--checkpointing_steps", "100", "--logger", "none", "--output_dir", out,
                                   "--process_group_timeout", "120"],
                        launcher=accelerate_launch(2, free_port()), timeout=400)
    check(result)
    assert "Latent cache: encoding 1797 images in both orientations" in result.stdout
    assert "(2 processes share them)" in result.stdout
    (cache_file,) = (out / "latent_cache").iterdir()  # the part files are gone

    source = data_lib.load_source("sklearn-digits", None)
    valid, _ = data_lib.scan_images(source, log=lambda m: None)
    dataset = data_lib.ImageDataset(source, valid, 8, 1, center_crop=True, random_flip=True, seed=0)
    alone = tmp_path / "alone"
    latents, flipped = latent_lib.cached_latents(latent_lib.load_vae(str(vae_dir)), dataset, str(alone),
                                                 log=lambda m: None)
    assert [p.name for p in alone.iterdir()] == [cache_file.name]
    shared = load_file(str(cache_file))
    # up to float32 rounding: each process encodes its own share in batches of another size than one process does
    import numpy as np

    assert np.allclose(shared["latents"], latents, rtol=1e-5, atol=1e-5)
    assert np.allclose(shared["latents_flipped"], flipped, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_class_conditional_checkpoint_of_two_prepared_models_still_resumes(tmp_path):
    """The UNet and the conditioner are prepared as one module (one model for FSDP2 / DeepSpeed); checkpoints written
    when they were two models hold model.safetensors (the UNet) and model_1.safetensors (the conditioner). Such a
    checkpoint, made here by splitting a new one, resumes to the same weights, to the bit."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    args = ["--dataset_name", "sklearn-digits", *TINY, "--max_train_steps", "3", "--checkpointing_steps", "2",
            "--save_images_steps", "100", "--logger", "none", "--train_batch_size", "8", *CONDITIONAL, "--use_ema"]
    new = tmp_path / "new"
    check(run_script(tmp_path, args + ["--output_dir", new]))
    old = tmp_path / "old"
    old.mkdir()
    shutil.copytree(new / "checkpoint-2", old / "checkpoint-2")
    whole = load_file(str(old / "checkpoint-2" / "model.safetensors"))
    assert {name.split(".")[0] for name in whole} == {"unet", "conditioner"}
    for file, prefix in (("model.safetensors", "unet."), ("model_1.safetensors", "conditioner.")):
        save_file({k[len(prefix):]: v for k, v in whole.items() if k.startswith(prefix)}, str(old / "checkpoint-2" / file))
    result = run_script(tmp_path, args + ["--output_dir", old, "--resume_from_checkpoint", "latest"])
    check(result)
    assert "Resuming from" in result.stdout
    for component in ("unet", "conditioner"):
        a, b = load_weights(new, component), load_weights(old, component)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), component
