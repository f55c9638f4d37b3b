"""training/train_mmf.py with ``--backbone dit``: the DiT (`MMFDiTTransformer2DModel`) in the UNet's place.

The script runs as users run it (a subprocess, OMP_NUM_THREADS=1) for a few steps on scikit-learn's 8x8 digits with
a tiny DiT (2 layers, 2 heads x 8 channels, patch 2), unconditional and class-conditional, with both estimators of
du/dt; the saved folder is then loaded with `MMFPipeline.from_pretrained` and generates. Flag refusals go through
``parse_args`` in-process.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_training import parse_error, run_script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

#: The run without the DiT's size flags (a pretrained DiT brings its own size).
DIT_RUN = ["--dataset_name", "sklearn-digits", "--resolution", "8", "--backbone", "dit", "--train_batch_size", "8",
           "--max_train_steps", "3", "--num_sample_images", "4", "--lr_warmup_steps", "0", "--seed", "0"]
TINY_DIT = [*DIT_RUN, "--dit_layers", "2", "--dit_heads", "2", "--dit_head_dim", "8", "--patch_size", "2"]


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load_and_generate(folder: Path, **call):
    from mmf_diffusers import MMFDiTTransformer2DModel, MMFPipeline

    pipe = MMFPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer) is MMFDiTTransformer2DModel and pipe.unet is None
    images = pipe(num_images=4, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                  **call).images
    assert images.shape == (4, 8, 8, 1) and np.isfinite(images).all() and images.std() > 0
    return pipe


def saved_dit(folder: Path) -> dict:
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["mmf_diffusers.transformer_mmf", "MMFDiTTransformer2DModel"]
    assert index["unet"] == [None, None]
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "MMFDiTTransformer2DModel"
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (2, 2, 8)
    assert (config["patch_size"], config["sample_size"], config["in_channels"]) == (2, 8, 1)
    return config


@pytest.mark.slow
def test_unconditional_dit_finite_differences_with_ema_then_generate(tmp_path):
    out = tmp_path / "out"
    result = check(run_script(tmp_path, [*TINY_DIT, "--output_dir", out, "--use_ema"]))
    assert "DiT with 0.02M parameters" in result.stdout + result.stderr
    assert saved_dit(out)["class_embed_type"] == "timestep"
    training = json.loads((out / "training_config.json").read_text())
    assert training["backbone"] == "dit" and training["derivative"] == "finite_difference"
    card = (out / "README.md").read_text()
    assert "the diffusion transformer (DiT) predicts" in card and "UNet" not in card
    load_and_generate(out)


@pytest.mark.slow
def test_class_conditional_dit_jvp_with_lam_then_generate(tmp_path):
    out = tmp_path / "out"
    check(run_script(tmp_path, [*TINY_DIT, "--output_dir", out, "--class_conditional", "--derivative", "jvp",
                                "--lam_end", "0.5"]))
    assert saved_dit(out)["class_embed_type"] == "identity"
    conditioner = json.loads((out / "conditioner" / "config.json").read_text())
    assert conditioner["num_classes"] == 10 and conditioner["time_embed_dim"] == 16
    pipe = load_and_generate(out, class_labels=[0, 1, 2, 3])
    assert pipe.class_names == [str(d) for d in range(10)]


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "dit", "--block_out_channels", "8", "16"], "--block_out_channels size or load a UNet"),
    # given explicitly at its default value: still refused, as it would be ignored
    (["--backbone", "dit", "--attention_head_dim", "8"], "--attention_head_dim size or load a UNet"),
    (["--backbone", "dit", "--pretrained_unet", "x"], "--pretrained_unet size or load a UNet"),
    (["--patch_size", "2"], "--patch_size only apply with --backbone dit"),
    (["--dit_size", "S", "--dit_init", "1"], "--dit_size, --dit_init only apply with --backbone dit"),
    (["--backbone", "dit", "--resolution", "9"], "--resolution 9 is not a multiple of the DiT's --patch_size 2"),
    (["--backbone", "dit", "--dit_layers", "0"], "--dit_layers must be a positive integer"),
    (["--backbone", "vit"], "invalid choice"),
])
def test_flags_of_the_other_backbone_are_refused_in_one_line(capsys, tmp_path, extra, message):
    argv = ["--dataset_name", "sklearn-digits", "--output_dir", str(tmp_path / "out"), *extra]
    assert message in parse_error(capsys, argv)


def test_dit_size_names_match_the_library():
    import dit_backbone
    import train_mmf

    from mmf_diffusers import DIT_SIZES

    assert tuple(DIT_SIZES) == dit_backbone.DIT_SIZE_NAMES
    args = train_mmf.parse_args(["--dataset_name", "sklearn-digits", "--backbone", "dit", "--dit_size", "B",
                                 "--dit_layers", "3"])
    assert dit_backbone.dit_config(args) == dict(DIT_SIZES["B"], num_layers=3)


@pytest.mark.slow
def test_dit_resumes_and_refuses_a_changed_size(tmp_path):
    out = tmp_path / "out"
    base = [*TINY_DIT, "--output_dir", out, "--checkpointing_steps", "3", "--logger", "none"]
    check(run_script(tmp_path, base))
    assert (out / "checkpoint-3").is_dir()
    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    result = run_script(tmp_path, base + resume + ["--dit_heads", "4"])
    assert result.returncode == 2 and "--dit_heads 2 -> 4" in result.stderr
    check(run_script(tmp_path, base + resume))
    lines = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["from_step"] for r in lines if r.get("event") == "resume"] == [3]
    assert max(r["step"] for r in lines if "step" in r) == 4
    load_and_generate(out)


@pytest.mark.slow
def test_latent_dit_through_a_tiny_vae_then_generate(tmp_path):
    from test_latent import tiny_vae

    from mmf_diffusers import MMFPipeline

    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)  # factor 2: 8x8 digits become 4x4x4 latents
    out = tmp_path / "out"
    check(run_script(tmp_path, [*TINY_DIT, "--output_dir", out, "--vae_name_or_path", vae_dir, "--center_crop",
                                "--max_train_steps", "2"]))
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["sample_size"], config["patch_size"]) == (4, 4, 2)
    pipe = MMFPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.is_latent and pipe.image_size == 8
    images = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    # the latent side (4) must be a multiple of the patch: refused in one line once the VAE is read
    result = run_script(tmp_path, [*TINY_DIT, "--output_dir", tmp_path / "bad", "--vae_name_or_path", vae_dir,
                                   "--center_crop", "--patch_size", "3", "--max_train_steps", "1"])
    assert result.returncode != 0
    assert "The latent size 4 is not a multiple of the DiT's --patch_size 3" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_dit_under_fsdp2_on_two_processes(tmp_path):
    """training/configs/fsdp2_dit.yaml on 2 CPU processes (gloo; MMF_TEST_ENGINE_ON_CPU applies FSDP2 there, as
    tests/test_fsdp.py does for the UNet): the 2 blocks' attention and feed-forward modules are units of their own."""
    import yaml
    from test_multiprocess import free_port
    from test_training import script_env

    config = yaml.safe_load((REPO / "training" / "configs" / "fsdp2_dit.yaml").read_text())
    config.update(main_process_port=free_port(), use_cpu=True)
    config.pop("rdzv_backend", None)
    path = tmp_path / "fsdp2_dit.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    out = tmp_path / "out"
    result = check(run_script(tmp_path, [*TINY_DIT, "--train_batch_size", "4", "--max_train_steps", "2",
                                         "--output_dir", out], launcher=launcher,
                              env=script_env(tmp_path, MMF_TEST_ENGINE_ON_CPU="1"), timeout=400))
    assert "Engine: fsdp2 over 2 processes" in result.stdout and "parameters sharded" in result.stdout
    units = int(result.stdout.split("FSDP2: ")[1].split()[0])
    assert units >= 5, result.stdout[-2000:]  # the root and 2 x (attention, feed-forward)
    saved_dit(out)
    load_and_generate(out)


def tiny_stock_dit(folder: Path, num_classes: int = 10, sample_size: int = 8):
    """A diffusers DiTTransformer2DModel as diffusers saves it (the kind of model a converted ImageNet DiT is)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=num_classes)
    tables = [block.norm1.emb.class_embedder.embedding_table.weight for block in dit.transformer_blocks]
    with torch.no_grad():  # converted DiT checkpoints hold one label table, repeated in every block
        for table in tables[1:]:
            table.copy_(tables[0])
    dit.save_pretrained(str(folder / "transformer"))
    return dit


@pytest.mark.slow
def test_pretrained_stock_dit_brings_its_labels_and_a_trained_mmf_dit_warm_starts(tmp_path):
    tiny_stock_dit(tmp_path / "stock")
    out = tmp_path / "conditional"
    result = check(run_script(tmp_path, [*DIT_RUN, "--output_dir", out, "--class_conditional", "--pretrained_dit",
                                         tmp_path / "stock", "--pretrained_dit_subfolder", "transformer"]))
    assert "10 label embeddings become the conditioner's" in result.stdout + result.stderr
    load_and_generate(out, class_labels=[0, 1, 2, 3])
    # An unconditional MMF DiT trained by the script warm-starts the next run (here: the same model, from its folder).
    first = tmp_path / "first"
    check(run_script(tmp_path, [*TINY_DIT, "--output_dir", first]))
    second = tmp_path / "second"
    check(run_script(tmp_path, [*DIT_RUN, "--output_dir", second, "--pretrained_dit", first,
                                "--pretrained_dit_subfolder", "transformer"]))
    assert saved_dit(second)["class_embed_type"] == "timestep"
    # A class-conditional MMF DiT keeps its labels in the conditioner, which a warm start does not load: refused.
    refused = run_script(tmp_path, [*DIT_RUN, "--output_dir", tmp_path / "third", "--pretrained_dit", out,
                                    "--pretrained_dit_subfolder", "transformer"])
    assert refused.returncode != 0 and "it is a class-conditional MMF DiT" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "third" / "model_index.json").exists()


@pytest.mark.slow
def test_a_pretrained_dit_of_another_size_is_refused_in_one_line(tmp_path):
    tiny_stock_dit(tmp_path / "stock", sample_size=4)
    result = run_script(tmp_path, ["--dataset_name", "sklearn-digits", "--resolution", "8", "--backbone", "dit",
                                   "--pretrained_dit", tmp_path / "stock" / "transformer", "--max_train_steps", "1",
                                   "--output_dir", tmp_path / "out"])
    assert result.returncode != 0 and "built for 4x4 inputs, the images are 8x8" in result.stderr
    assert "Traceback" not in result.stderr
    from mmf_diffusers import build_mmf_unet

    build_mmf_unet(8, 1, block_out_channels=(8, 16)).save_pretrained(str(tmp_path / "unet"))
    result = run_script(tmp_path, ["--dataset_name", "sklearn-digits", "--resolution", "8", "--backbone", "dit",
                                   "--pretrained_dit", tmp_path / "unet", "--max_train_steps", "1",
                                   "--output_dir", tmp_path / "out2"])
    assert result.returncode != 0 and "it holds a UNet2DModel, not a DiTTransformer2DModel" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "dit", "--pretrained_dit", "x", "--dit_layers", "2"], "--dit_layers size a new DiT and do not "
                                                                          "apply with --pretrained_dit"),
    (["--backbone", "dit", "--pretrained_dit_subfolder", "transformer"], "--pretrained_dit_subfolder needs "
                                                                         "--pretrained_dit"),
    (["--pretrained_dit", "x"], "--pretrained_dit only apply with --backbone dit"),
    (["--gradient_checkpointing", "--derivative", "jvp", "--lam_end", "0.5"],
     "--gradient_checkpointing does not apply to --derivative jvp with lam > 0"),
])
def test_pretrained_dit_and_checkpointing_flags_are_checked_in_one_line(capsys, tmp_path, extra, message):
    argv = ["--dataset_name", "sklearn-digits", "--output_dir", str(tmp_path / "out"), *extra]
    assert message in parse_error(capsys, argv)


def train_log(folder: Path) -> list:
    with open(folder / "logs" / "train_log.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "step" in r]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [
    ["--block_out_channels", "8", "16"],
    ["--backbone", "dit", "--dit_layers", "2", "--dit_heads", "2", "--dit_head_dim", "8", "--patch_size", "2"],
])
def test_gradient_checkpointing_gives_the_same_steps(tmp_path, backbone):
    """Recomputed activations, same maths: the loss, du/dt and gradient norm of each step agree with a plain run."""
    common = ["--dataset_name", "sklearn-digits", "--resolution", "8", "--train_batch_size", "8",
              "--max_train_steps", "2", "--num_sample_images", "4", "--lr_warmup_steps", "0", "--seed", "0",
              *backbone]
    check(run_script(tmp_path, [*common, "--output_dir", tmp_path / "plain"]))
    check(run_script(tmp_path, [*common, "--output_dir", tmp_path / "checkpointed", "--gradient_checkpointing"]))
    for a, b in zip(train_log(tmp_path / "plain"), train_log(tmp_path / "checkpointed"), strict=True):
        for key in ("loss", "grad_norm", "mean_abs_dudt"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)


def test_the_dit_of_the_same_budget_comparison_has_about_the_unets_parameters():
    """benchmarks/dit_vs_unet_mnist.py compares backbones of similar size: built from its flags as the script
    builds them (class-conditional, 28x28x1), the DiT's parameter count is within 25% of the UNet's."""
    import importlib.util

    import dit_backbone
    import train_mmf

    from mmf_diffusers import add_class_conditioning, build_mmf_unet

    spec = importlib.util.spec_from_file_location("dit_vs_unet", REPO / "benchmarks" / "dit_vs_unet_mnist.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = [str(d) for d in range(10)]
    counts = {}
    for name, flags in bench.MODELS.items():
        common = ["sklearn-digits" if a == "mnist-offline" else a for a in bench.COMMON]  # no MNIST needed to parse
        args = train_mmf.parse_args([*common, *flags, "--output_dir", "unused"])
        if args.backbone == "dit":
            parts = dit_backbone.add_class_conditioning(dit_backbone.build(args, 28, 1), names, 1.0)
        else:
            parts = add_class_conditioning(build_mmf_unet(28, 1, block_out_channels=args.block_out_channels), 10,
                                           names, 1.0)
        counts[name] = sum(p.numel() for part in parts for p in part.parameters())
    assert set(counts) >= {"unet", "dit"}
    for name, count in counts.items():
        assert 0.8 < count / counts["unet"] < 1.25, counts
