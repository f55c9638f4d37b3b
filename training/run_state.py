"""The training script's own resumable state, in files that cannot run code: JSON and safetensors.

accelerate's ``register_for_checkpointing`` pickles custom objects to ``custom_checkpoint_<i>.pkl`` and loads them
with ``torch.load(weights_only=False)``, so a crafted checkpoint would run its payload on resume. Instead, the
curriculum, the learning-rate schedule, the run position and the EMA live in two files written into the temporary
checkpoint folder before its atomic rename (``mmf_diffusers.checkpointing``):

    mmf_state.json          {"format": 1, "curriculum": {...}, "lr_scheduler": {...}, "position": {"global_step",
                            "micro_batch"}, "ema": {decay, optimization_step, ...} or null}
    mmf_state.safetensors   "loss_generator" (uint8, the torch.Generator state) and "ema.<i>" (EMA shadow params)

Floats go through JSON exactly (``repr`` round trip), tensors bit for bit, so a resume reproduces the run exactly.
A checkpoint that holds a ``custom_checkpoint_*.pkl`` (written by an older version of this script, or crafted) is
refused with `UnsafeCheckpoint` before anything in it is read.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Dict, List, Optional

STATE_JSON = "mmf_state.json"
STATE_TENSORS = "mmf_state.safetensors"
FORMAT = 1
#: Files every checkpoint of this script holds (accelerate's model, optimizer and RNG state, and ours); a checkpoint
#: that lacks one is damaged.
CHECKPOINT_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", STATE_JSON, STATE_TENSORS)


class UnsafeCheckpoint(ValueError):
    """The checkpoint holds a pickle that accelerate would load with weights_only=False, or its state is malformed."""


def refuse_pickled_state(folder: str) -> None:
    """Raise `UnsafeCheckpoint` if ``folder`` holds accelerate ``custom_checkpoint_*.pkl`` files (pickles that
    would be loaded with weights_only=False, i.e. able to run code)."""
    pickles = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "custom_checkpoint_*.pkl")))
    if pickles:
        raise UnsafeCheckpoint(
            f"{folder} holds {', '.join(pickles)}: pickled training state, which loading would execute. This "
            "version stores it as JSON/safetensors and refuses such checkpoints; if an older train_mmf.py wrote it, "
            f"convert it first (safely): python training/convert_checkpoint.py {folder}")


#: What train_mmf.py reads from a checkpoint's training_state.json (mmf_diffusers.checkpointing.METADATA_FILE).
METADATA_TYPES = {"global_step": int, "global_batch_size": int, "num_samples": int, "use_ema": bool, "config": dict}


def metadata_problem(meta: Any) -> Optional[str]:
    """Why a checkpoint's parsed ``training_state.json`` cannot be resumed (a key missing or of the wrong type, a
    configuration without its seed), or None."""
    if not isinstance(meta, dict):
        return f"training_state.json is not a JSON object but a {type(meta).__name__}"
    for key, kind in METADATA_TYPES.items():
        if key not in meta:
            return f"training_state.json lacks {key!r} (not written by this script, or edited)"
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            return f"training_state.json has {key!r} of type {type(meta[key]).__name__}, not {kind.__name__}"
    seed = meta["config"].get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return "the configuration in training_state.json has no integer 'seed'"
    return None


def _json_safe(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds the non-finite number {value}")
    if isinstance(value, dict):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where} holds a {type(value).__name__}, which the JSON state cannot store")


def save_state(folder: str, *, schedule, lr_scheduler, position, ema=None) -> None:
    """Write `STATE_JSON` and `STATE_TENSORS` into ``folder`` (main process, the temporary checkpoint folder).

    ``schedule``: a LambdaSchedule; ``lr_scheduler``: a torch LambdaLR (diffusers' get_scheduler; its lambdas are
    closures, which its state_dict leaves out); ``position``: an object with ``global_step``, ``micro_batch`` and
    ``generator`` (the loss's torch.Generator); ``ema``: a diffusers EMAModel or None.
    """
    from safetensors.torch import save_file

    tensors = {"loss_generator": position.generator.get_state()}
    ema_scalars = None
    if ema is not None:
        ema_state = dict(ema.state_dict())
        for i, param in enumerate(ema_state.pop("shadow_params")):
            tensors[f"ema.{i}"] = param.detach().cpu().contiguous()
        ema_scalars = ema_state
    lr_state = dict(lr_scheduler.state_dict())
    if any(fn is not None for fn in lr_state.get("lr_lambdas", [])):
        raise TypeError("the learning-rate scheduler has callable-object lambdas, which the JSON state cannot store")
    payload = {
        "format": FORMAT,
        "curriculum": schedule.state_dict(),
        "lr_scheduler": lr_state,
        "position": {"global_step": int(position.global_step), "micro_batch": int(position.micro_batch)},
        "ema": ema_scalars,
    }
    text = json.dumps(_json_safe(payload, "state"), indent=2, sort_keys=True, allow_nan=False)
    with open(os.path.join(folder, STATE_JSON), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    save_file(tensors, os.path.join(folder, STATE_TENSORS))


def _require(condition: bool, folder: str, what: str) -> None:
    if not condition:
        raise UnsafeCheckpoint(f"{folder}: {what}")


def load_state(folder: str, *, schedule, lr_scheduler, position, ema=None) -> Dict[str, Any]:
    """Restore what `save_state` wrote. Raises `UnsafeCheckpoint` (a ValueError) for a pickled or malformed
    state, and ValueError when the saved curriculum differs from ``schedule`` (LambdaSchedule refuses). Returns the
    parsed JSON payload."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    refuse_pickled_state(folder)
    json_path, tensor_path = os.path.join(folder, STATE_JSON), os.path.join(folder, STATE_TENSORS)
    for path in (json_path, tensor_path):
        _require(os.path.isfile(path), folder, f"{os.path.basename(path)} is missing (not a complete checkpoint of "
                 "this version)")
    try:
        with open(json_path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnsafeCheckpoint(f"{folder}: {STATE_JSON} is unreadable ({error})")
    _require(isinstance(payload, dict) and payload.get("format") == FORMAT, folder,
             f"{STATE_JSON} is not format {FORMAT}")
    try:
        tensors = load_file(tensor_path)
    except (OSError, SafetensorError) as error:
        raise UnsafeCheckpoint(f"{folder}: {STATE_TENSORS} is unreadable ({error})")

    pos = payload.get("position")
    _require(isinstance(pos, dict) and all(isinstance(pos.get(k), int) and pos[k] >= 0
                                           for k in ("global_step", "micro_batch")), folder, "bad position")
    curriculum = payload.get("curriculum")
    _require(isinstance(curriculum, dict), folder, "bad curriculum")
    lr_state = payload.get("lr_scheduler")
    expected_keys = set(lr_scheduler.state_dict())
    # Only the attributes this scheduler has: LambdaLR.load_state_dict copies every key into its __dict__.
    _require(isinstance(lr_state, dict) and set(lr_state) == expected_keys, folder,
             f"the LR scheduler state has keys {sorted(lr_state) if isinstance(lr_state, dict) else lr_state}, "
             f"expected {sorted(expected_keys)}")
    generator_state = tensors.get("loss_generator")
    _require(generator_state is not None and generator_state.dtype == torch.uint8
             and generator_state.shape == position.generator.get_state().shape, folder, "bad loss_generator state")
    ema_scalars = payload.get("ema")
    _require((ema_scalars is None) == (ema is None), folder,
             "EMA state " + ("missing" if ema_scalars is None else "present but this run has no --use_ema"))
    shadow: Optional[List[torch.Tensor]] = None
    if ema is not None:
        _require(isinstance(ema_scalars, dict), folder, "bad EMA state")
        shadow = []
        for i, current in enumerate(ema.shadow_params):
            saved = tensors.get(f"ema.{i}")
            _require(saved is not None and saved.shape == current.shape and saved.dtype == current.dtype, folder,
                     f"EMA parameter {i} is missing or has another shape/dtype")
            shadow.append(saved)
        _require(f"ema.{len(shadow)}" not in tensors, folder, "more EMA parameters than the model has")

    schedule.load_state_dict(curriculum)
    lr_scheduler.load_state_dict(lr_state)
    position.global_step, position.micro_batch = pos["global_step"], pos["micro_batch"]
    position.generator.set_state(generator_state)
    if ema is not None:
        ema.load_state_dict({**ema_scalars, "shadow_params": shadow})
    return payload


def set_base_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> Optional[float]:
    """Make a restored LambdaLR (and its optimizer) follow the peak ``learning_rate`` from its current position:
    ``lr = learning_rate * lambda(last_epoch)``. Returns the previous peak when it changed, else None."""
    old = list(lr_scheduler.base_lrs)
    if all(lr == learning_rate for lr in old):
        return None
    lr_scheduler.base_lrs = [learning_rate for _ in old]
    current = [learning_rate * fn(lr_scheduler.last_epoch) for fn in lr_scheduler.lr_lambdas]
    for group, lr in zip(optimizer.param_groups, current):
        group["initial_lr"] = learning_rate
        group["lr"] = lr
    lr_scheduler._last_lr = current
    return old[0]


#: Flags a resume cannot change: the model (its size and inputs), the loss, and the states restored from the
#: checkpoint (optimizer hyper-parameters, EMA), whose new value would be recorded but not used. The estimator of
#: du/dt (--derivative, --fd_eps) may change: both compute the same loss (to ~0.3%), only the cost differs.
FROZEN_ON_RESUME = (
    "modality", "resolution", "num_channels", "block_out_channels", "layers_per_block", "attention_levels",
    "norm_num_groups", "attention_head_dim", "pretrained_unet", "pretrained_unet_subfolder", "time_scale",
    "second_time", "class_conditional", "label_column", "label_dropout", "cfg_w", "cfg_kappa", "label_init_std",
    "pair_rows", "tangent", "time_distribution", "time_mean", "time_std", "r_neq_t_fraction",
    "adaptive_p", "adaptive_c", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "ema_max_decay",
    "ema_inv_gamma", "ema_power", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
    "gradient_accumulation_steps", "backbone", "dit_size", "dit_layers", "dit_heads", "dit_head_dim", "patch_size",
    "dit_init", "pretrained_dit", "pretrained_dit_subfolder",
)


def resume_conflicts(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``--flag saved -> current`` for every `FROZEN_ON_RESUME` flag that the two configurations both record and
    that differs (lists and tuples compare alike), and the VAE's change if any (`vae_conflicts`)."""
    def norm(value):
        return list(value) if isinstance(value, tuple) else value

    problems = []
    for name in FROZEN_ON_RESUME:
        if name in saved and name in current and norm(saved[name]) != norm(current[name]):
            problems.append(f"--{name} {saved[name]} -> {current[name]}")
    return problems + vae_conflicts(saved, current.get("vae"))


def vae_conflicts(saved: Dict[str, Any], vae: Optional[Dict[str, Any]]) -> List[str]:
    """How the VAE of the run changed between the saved configuration and ``vae`` (the current run's
    ``latents.vae_identity``, or None on pixels): a latent space is fixed by the checkpoint like the model's size.

    The saved ``"vae"`` entry is compared (class, then config, then the SHA-256 of config and weights); a checkpoint
    of latent training that does not record it (an older version) is refused too, as its VAE cannot be checked. A
    VAE moved to another folder is the same VAE."""
    recorded = saved.get("vae")
    if recorded is None and "vae" not in saved and saved.get("vae_name_or_path"):
        return [f"the checkpoint trained on the latents of --vae_name_or_path {saved['vae_name_or_path']} but does not "
                "record which VAE that was (an older version wrote it), so this VAE cannot be checked against it"]
    if recorded is None or vae is None:
        if (recorded is None) != (vae is None):
            return ["the latent space: " + ("pixels -> the latents of a VAE" if vae else "the latents of a "
                                            f"{recorded.get('class')} -> pixels (no --vae_name_or_path)")]
        return []
    if not isinstance(recorded, dict):
        return [f"the checkpoint's VAE record is malformed ({type(recorded).__name__})"]
    if recorded.get("class") != vae.get("class"):
        return [f"the VAE: a {recorded.get('class')} -> a {vae.get('class')}"]
    old_config, new_config = recorded.get("config") or {}, vae.get("config") or {}
    changed = sorted(k for k in set(old_config) | set(new_config) if old_config.get(k) != new_config.get(k))
    if changed:
        return ["the VAE's config: " + ", ".join(f"{k} {old_config.get(k)} -> {new_config.get(k)}"
                                                  for k in changed[:4]) + (" ..." if len(changed) > 4 else "")]
    if recorded.get("sha256") != vae.get("sha256"):
        return [f"the VAE's weights (SHA-256 {str(recorded.get('sha256'))[:12]}... -> "
                f"{str(vae.get('sha256'))[:12]}...): another VAE with the same config"]
    return []
