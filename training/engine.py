"""How train_mmf.py runs on accelerate's engines: one process, DDP, FSDP2 and DeepSpeed ZeRO-2/3.

Everything in the training script that depends on the engine is here, in the order the script meets it:

1. ``accelerator_kwargs``: the Accelerator's process-group timeout (``--process_group_timeout``, as diffusers' scripts
   pass one), so a rank that waits for work another rank never enters fails with an error instead of hanging.
2. ``Engine(accelerator, args, log)``: which engine accelerate applies (``single``, ``ddp``, ``fsdp2``, ``deepspeed``)
   and what it refuses: ``--derivative jvp`` where parameters are sharded (its hand-written all-reduce needs whole
   gradients), FSDP version 1, FSDP's SHARDED_STATE_DICT (loading it unpickles torch.distributed.checkpoint metadata),
   ZeRO stages other than 2 and 3. For DeepSpeed it writes the per-process micro-batch (no dataloader is prepared,
   so ``"auto"`` cannot be resolved), the gradient accumulation and ``--max_grad_norm`` (DeepSpeed clips inside its
   step) into the plugin's config, as accelerate's documentation says to.
3. ``Engine.on_main``: a decision taken on the main process (which repaired interrupted checkpoint commits) and
   given to every rank, such as which checkpoint to resume.
4. ``combine``: the UNet and, for class-conditional runs, its conditioner become one module (FSDP2 and DeepSpeed
   accept one model; DDP then has one wrapper). ``Engine.prepare`` prepares it with the optimiser and builds the EMA
   where the engine keeps parameters: after ``prepare`` on the same DTensor shards (FSDP2: diffusers' EMAModel mixes
   plain tensors and DTensors otherwise) or device tensors (DDP, ZeRO-2), before ``prepare`` on full weights for
   ZeRO-3 (EMAModel then gathers each partitioned parameter in ``step``, its documented ZeRO-3 path).
5. In the loop: ``loss_model`` (the wrapped module, or the unwrapped one for jvp's hand all-reduce),
   ``average_gradients``, ``clip_grad_norm`` (a float on every engine), ``check_param_sync``.
6. Saving and sampling: ``exported`` yields plain modules with the weights to save (the EMA's with ``--use_ema``)
   on the main process; on sharded engines every rank takes part in gathering them (``accelerator.get_state_dict``,
   the EMA's shards) and the main process then saves and samples a full copy alone, so no rank ever runs a forward
   through a sharded module that the others do not enter. ``checkpoint_ema`` / ``place_ema`` do the same for the
   EMA in checkpoints; ``non_finite`` agrees across ranks on whether any weight is NaN/inf.
7. Checkpoints: ``checkpoint_files`` are the names accelerate writes for this engine (``model.safetensors``;
   ``pytorch_model_fsdp.bin``; DeepSpeed's ``pytorch_model/`` folder), so ``--resume_from_checkpoint latest`` finds
   them; ``checkpoint_format`` is recorded in each checkpoint and a resume under another engine is refused.

A function whose docstring says *collective* must be called by every rank at the same point of the run.

CPU stand-ins (tests only). accelerate 1.15 applies FSDP only to GPU-type processes (a CPU run with an FSDP
configuration is DDP) and counts one process for DeepSpeed on a machine without a GPU. With ``MMF_TEST_ENGINE_ON_CPU=1``
in the environment, ``Engine`` switches accelerate's state to the configured engine over gloo on CPU processes:
FSDP2 through accelerate's own ``_prepare_fsdp2`` (torch's ``fully_shard`` on a CPU device mesh), save/load and
``get_state_dict``; DeepSpeed with the real process count. tests/test_fsdp.py runs the script that way.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os

#: Test hook (see the module docstring): run accelerate's FSDP2 / DeepSpeed on CPU processes over gloo.
CPU_STAND_IN_ENV = "MMF_TEST_ENGINE_ON_CPU"
TESTED_ZERO_STAGES = (2, 3)
#: Files accelerate writes into a checkpoint folder, by engine (besides the script's own run_state files).
ACCELERATE_FILES = {
    "plain": ("model.safetensors", "optimizer.bin", "random_states_0.pkl"),
    "fsdp2": ("pytorch_model_fsdp.bin", "optimizer.bin", "random_states_0.pkl"),
    "deepspeed": ("latest", "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt", "random_states_0.pkl"),
}


class EngineError(ValueError):
    """A configuration the engine cannot run (one line, for the user)."""


def add_arguments(parser) -> None:
    g = parser.add_argument_group("several processes (accelerate launch: DDP, FSDP2, DeepSpeed)")
    g.add_argument("--process_group_timeout", type=int, default=1800,
                   help="Seconds a process waits in a collective (a barrier, an all-gather) for the others before the "
                   "run fails with an error instead of hanging; it bounds the waits while the main process writes "
                   "checkpoints and sample grids. Passed to accelerate (InitProcessGroupKwargs), as diffusers' "
                   "scripts do.")


def validate(args, need) -> None:
    need(1 <= args.process_group_timeout <= 7 * 24 * 3600,
         f"--process_group_timeout must be between 1 s and a week, got {args.process_group_timeout}")


def accelerator_kwargs(args) -> dict:
    """Arguments for ``Accelerator(...)``: the process-group timeout, and ``cpu=True`` for several processes on a
    machine without a GPU (gloo), except for the DeepSpeed stand-in (accelerate refuses DeepSpeed with ``cpu``)."""
    from datetime import timedelta

    import torch
    from accelerate.utils import InitProcessGroupKwargs

    has_device = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed_stand_in = _stand_in() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return {"cpu": not has_device and several and not deepspeed_stand_in,
            "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=args.process_group_timeout))]}


def _stand_in() -> bool:
    return os.environ.get(CPU_STAND_IN_ENV) == "1"


def engine_name(distributed_type) -> str:
    kind = str(distributed_type).rsplit(".", 1)[-1]
    return {"NO": "single", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(kind, "ddp" if kind.startswith("MULTI_") else
                                                                          kind.lower())


def refuse_derivative(name: str, derivative: str) -> None:
    """jvp's hand-written all-reduce (and torch.func.jvp itself) needs whole parameters on every rank."""
    if derivative == "jvp" and name in ("fsdp", "fsdp2", "deepspeed", "megatron_lm"):
        engine = {"fsdp2": "FSDP", "deepspeed": "DEEPSPEED", "megatron_lm": "MEGATRON_LM"}.get(name, name.upper())
        raise EngineError(f"--derivative jvp cannot run under accelerate's {engine} (torch.func.jvp cannot go through "
                          "the wrapper, and the hand-written gradient all-reduce needs unsharded parameters); use "
                          "--derivative finite_difference")


class Engine:
    """What the training script asks of accelerate's engine; see the module docstring."""

    def __init__(self, accelerator, args, log=print):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.num_processes = accelerator.num_processes
        self.name = engine_name(accelerator.distributed_type)
        self.hand_reduce = args.derivative == "jvp"  # torch.func.jvp cannot go through DDP: see average_gradients
        self.zero_stage = None
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and self.name != "fsdp":
            applied = str(accelerator.distributed_type).rsplit(".", 1)[-1]
            log(f"Note: the accelerate configuration asks for FSDP, but accelerate runs {applied} here (it has no FSDP "
                "for CPU processes); the model is not sharded.")
        refuse_derivative(self.name, args.derivative)
        if self.name not in ("single", "ddp", "fsdp", "deepspeed"):
            raise EngineError(f"accelerate's {str(accelerator.distributed_type).rsplit('.', 1)[-1]} is not supported by "
                              "this script (it runs one process, DDP, FSDP2 and DeepSpeed ZeRO-2/3)")
        if self.name == "fsdp":
            self._check_fsdp(accelerator.state.fsdp_plugin, args)
        if self.name == "deepspeed":
            self._configure_deepspeed(accelerator.state.deepspeed_plugin, args)
        #: Parameters are split across ranks: whole weights exist only after a collective gather.
        self.sharded = self.name == "fsdp2" or self.zero_stage == 3
        if args.check_param_sync and self.sharded:
            raise EngineError(f"--check_param_sync compares whole parameters across processes; under {self.name} each "
                              "process holds a shard (leave the flag out)")
        self.checkpoint_format = {"single": "plain", "ddp": "plain", "fsdp2": "fsdp2"}.get(
            self.name, f"deepspeed-zero{self.zero_stage}-{self.num_processes}procs")
        files = ACCELERATE_FILES["deepspeed" if self.name == "deepspeed" else self.checkpoint_format]
        import run_state

        self.checkpoint_files = files + (run_state.STATE_JSON, run_state.STATE_TENSORS)
        self._plain_copy = None  # the main process's full copy of a sharded model, for saving and sampling
        self.log = log
        if self.num_processes > 1:
            log(f"Engine: {self.name}" + (f" ZeRO-{self.zero_stage}" if self.zero_stage else "") +
                f" over {self.num_processes} processes" + ("; parameters sharded" if self.sharded else ""))

    # -- 2. configuration -------------------------------------------------------------------------------------------
    def _check_fsdp(self, plugin, args) -> None:
        if plugin.fsdp_version != 2:
            raise EngineError(f"FSDP version {plugin.fsdp_version} is not supported: set fsdp_version: 2 in the "
                              "accelerate configuration (training/configs/fsdp2.yaml)")
        self.name = "fsdp2"
        kind = str(plugin.state_dict_type).rsplit(".", 1)[-1]
        if kind != "FULL_STATE_DICT":
            raise EngineError(f"fsdp_state_dict_type {kind} is not supported: its checkpoints hold "
                              "torch.distributed.checkpoint metadata that loading unpickles; set fsdp_state_dict_type: "
                              "FULL_STATE_DICT (training/configs/fsdp2.yaml)")
        if args.mixed_precision not in (None, "no") or str(self.accelerator.mixed_precision) != "no":
            # Keep FSDP2's parameters float32 (no MixedPrecisionPolicy casting): the loop's autocast sets the precision
            # of the main forward, and du/dt stays float32 as on the other engines.
            from torch.distributed.fsdp import MixedPrecisionPolicy

            plugin.mixed_precision_policy = MixedPrecisionPolicy()

    def _configure_deepspeed(self, plugin, args) -> None:
        config = plugin.deepspeed_config
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage not in TESTED_ZERO_STAGES:
            raise EngineError(f"DeepSpeed ZeRO stage {self.zero_stage} is not supported (tested: 2 and 3); set "
                              "zero_stage in the accelerate configuration (training/configs/deepspeed_zero2.yaml)")

        def fill(key, value, flag):
            if config.get(key, "auto") not in ("auto", value):
                raise EngineError(f"the DeepSpeed configuration's {key} {config[key]} differs from {flag} {value}: "
                                  f"remove it (or set it to auto) and use {flag}")
            config[key] = value

        # No dataloader is prepared (the script shards batches itself), so accelerate cannot resolve "auto" sizes.
        accumulation = args.gradient_accumulation_steps
        fill("train_micro_batch_size_per_gpu", args.train_batch_size, "--train_batch_size")
        fill("gradient_accumulation_steps", accumulation, "--gradient_accumulation_steps")
        fill("train_batch_size", args.train_batch_size * accumulation * self.num_processes,
             "--train_batch_size x --gradient_accumulation_steps x processes =")
        # DeepSpeed clips inside its optimiser step (accelerator.clip_grad_norm_ only reports the norm).
        fill("gradient_clipping", float(args.max_grad_norm), "--max_grad_norm")
        if self.zero_stage == 3:
            zero = config.setdefault("zero_optimization", {})
            if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
                raise EngineError("ZeRO-3 needs zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_"
                                  "save) to gather the weights the pipeline is saved with")
            zero["stage3_gather_16bit_weights_on_model_save"] = True

    # -- 3. one decision for every rank -----------------------------------------------------------------------------
    def on_main(self, decide, error_class=ValueError):
        """*Collective.* ``decide()`` on the main process only; its result, or its ``error_class`` error (raised
        again on every rank with the same message), is shared with every rank."""
        box = [None, None]
        if self.is_main:
            try:
                box[0] = decide()
            except (error_class, EngineError) as error:
                box[1] = str(error)
                if self.num_processes == 1:
                    raise
        if self.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box)
        if box[1] is not None:
            raise error_class(box[1])
        return box[0]

    def refuse_other_engine(self, path: str) -> None:
        """Refuse a checkpoint written under another engine (its files differ; a resume needs the same layout)."""
        import json

        try:
            with open(os.path.join(path, "training_state.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return  # unreadable: the checkpoint checks report it
        saved = meta.get("engine", "plain") if isinstance(meta, dict) else "plain"  # older checkpoints are plain
        if saved != self.checkpoint_format:
            raise EngineError(f"{path} was written under {saved}, this run is {self.checkpoint_format}: resume it with "
                              "the accelerate configuration (and number of processes) it was written with")

    # -- 4. the model, its optimiser and EMA ------------------------------------------------------------------------
    def prepare(self, model, optimizer, make_ema=None):
        """``accelerator.prepare`` the one ``model`` and the optimiser; ``make_ema(parameters)`` (or None) builds the
        EMA where this engine keeps parameters (see the module docstring). Returns ``(prepared, optimizer, ema)``."""
        if self.sharded and self.is_main:
            self._plain_copy = copy.deepcopy(model).cpu()  # rebuilt with gathered weights for saving and sampling
        if self.checkpoint_format == "plain" and getattr(model, "legacy_layout_hook", None) is not None:
            self.accelerator.register_load_state_pre_hook(model.legacy_layout_hook)
        prepared, optimizer, ema = prepare_for_training(self.accelerator, model, optimizer, make_ema,
                                                        ema_before=self.zero_stage == 3)
        if self.name == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            units = sum(isinstance(module, FSDPModule) for module in prepared.modules())
            self.log(f"FSDP2: {units} units (the root and each module its auto-wrap policy names)")
        return prepared, optimizer, ema

    def unwrap(self, prepared):
        """The module inside accelerate's wrapper, without the fp32-output autocast wrapper (the loss sets autocast
        itself, so du/dt stays float32). Under FSDP2 the module itself is sharded: call it on every rank."""
        return self.accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)

    def loss_model(self, prepared, inner):
        """The module the loss calls: accelerate's wrapped one, as diffusers' scripts use it (DDP handles the loss's
        several forwards before one backward: a no-grad one for the model tangent, the main one, a shifted one that
        carries gradient when lam > 0), or the unwrapped one for jvp's hand-written all-reduce."""
        return inner if self.hand_reduce else prepared

    # -- 5. the step --------------------------------------------------------------------------------------------------
    def average_gradients(self, params, extras):
        """*Collective.* jvp only: all-reduce (mean) every parameter's gradient plus the ``extras`` statistics in one
        flat buffer; returns the averaged extras. A parameter without a gradient counts as zero so every rank sends
        the same layout. With one process nothing is communicated."""
        import torch

        if self.num_processes == 1:
            return extras
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [extras.float().to(grads[0].device)])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n
        return flat[offset:].double().cpu()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """*Collective.* Clip to ``max_norm`` (inf: only measure) and return the global norm as a float. FSDP2 returns
        a replicated DTensor; DeepSpeed has clipped inside its step (``gradient_clipping``) and reports the norm."""
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        if norm is None:
            return float("nan")
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def check_param_sync(self, params, step: int) -> None:
        """*Collective.* Stop if the parameters differ across processes (compares a SHA-256 of their bytes)."""
        import hashlib

        import torch

        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        value = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], dtype=torch.int64,
                             device=self.accelerator.device)
        gathered = self.accelerator.gather(value).tolist()
        if len(set(gathered)) != 1:
            raise RuntimeError(f"Parameters differ across processes after step {step}: checksums {gathered}")

    def end_training(self) -> None:
        """*Collective.* The last barrier, then accelerate's ``end_training`` (which destroys the process group).

        torch 2.13's ProcessGroupGloo destructor joins its worker threads while holding the GIL, and it runs when the
        last reference goes (here: when DDP's reducer is freed as train() returns). A worker thread that is still
        releasing the tensors of the last collective needs the GIL for that, while holding the queue lock the other
        worker waits for: a deadlock. Seen with gdb on a hung rank 1 (rank 0 had exited): the main thread in
        ~ProcessGroupGloo -> std::thread::join, one pt_gloo_runloop thread in TensorImpl::decref_pyobject waiting for
        the GIL, the other waiting for the lock. It struck the rank that had no file to write after the barrier (no
        I/O, so the GIL was never released before the destructor). Sleeping briefly after the barrier releases the
        GIL so the workers finish first."""
        import time

        self.accelerator.wait_for_everyone()
        if self.num_processes > 1:
            time.sleep(0.5)
        self.accelerator.end_training()

    # -- 6. saving and sampling -------------------------------------------------------------------------------------
    def non_finite(self, named_tensors) -> list:
        """*Collective.* Names of NaN/inf tensors among ``(name, tensor)`` pairs, agreed by every rank (each checks
        its own shards; a count is summed across ranks)."""
        import torch

        bad = non_finite_here(named_tensors)
        if self.num_processes > 1:
            count = torch.tensor([len(bad)], device=self.accelerator.device)
            total = int(self.accelerator.reduce(count, reduction="sum").item())
            if total and not bad:
                bad = [f"{total} tensor(s) on another process"]
        return bad

    def checkpoint_ema(self, ema):
        """*Collective.* What run_state.save_state writes for the EMA (main process): the EMA itself, or under FSDP2 a
        view of it with whole (gathered) shadow weights."""
        if ema is None or self.name != "fsdp2":
            return ema
        return _EMAWithWeights(ema, [_full(s) for s in ema.shadow_params])

    def place_ema(self, ema, params) -> None:
        """*Collective.* After run_state.load_state put whole saved shadow weights where the parameters live: the
        same shards as ``params`` under FSDP2, the device otherwise."""
        if ema is None:
            return
        if self.name != "fsdp2":
            ema.to(self.accelerator.device)
            return
        from torch.distributed.tensor import distribute_tensor

        ema.shadow_params = [distribute_tensor(s.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                             if not hasattr(s, "device_mesh") else s for s, p in zip(ema.shadow_params, params)]

    @contextlib.contextmanager
    def exported(self, prepared, inner, ema):
        """*Collective.* On the main process: plain modules ``(unet, conditioner or None)`` holding the weights to save
        and sample (the EMA's with ``ema``); ``None`` on the others. Unsharded engines lend the trained module itself
        (EMA weights swapped in and out); sharded ones gather a whole copy (every rank takes part) that the main
        process uses alone, on its device, so no forward runs through a sharded module on one rank only."""
        params = list(inner.parameters())
        if not self.sharded:
            if not self.is_main:
                yield None
                return
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)
            try:
                yield split(inner)
            finally:
                if ema is not None:
                    ema.restore(params)
            return
        state = self.accelerator.get_state_dict(prepared)  # whole weights on the main process only
        shadow = [_full(s) for s in ema.shadow_params] if ema is not None else None
        if not self.is_main:
            yield None
            return
        if shadow is not None:
            state.update(zip([name for name, _ in inner.named_parameters()], [s.cpu() for s in shadow]))
        model = self._plain_copy
        model.load_state_dict(state)
        model.to(self.accelerator.device)
        try:
            yield split(model)
        finally:
            model.cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------------


def prepare_for_training(accelerator, model, optimizer, make_ema=None, ema_before: bool = False):
    """``accelerator.prepare(model, optimizer)`` and the EMA on the accelerator's device: built from the prepared
    module's parameters (the device tensors, or FSDP2's DTensor shards), or with ``ema_before`` from the whole
    parameters before ``prepare`` (ZeRO-3 partitions them) and then moved. Returns ``(prepared, optimizer, ema)``."""
    ema = make_ema(list(model.parameters())) if make_ema is not None and ema_before else None
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if make_ema is not None and not ema_before:
        inner = accelerator.unwrap_model(prepared) if hasattr(accelerator, "unwrap_model") else prepared
        ema = make_ema(list(inner.parameters()))
    if ema is not None:
        ema.to(accelerator.device)
    return prepared, optimizer, ema


def combine(unet, conditioner, time_scale: float, second_time: str):
    """The one module to train: ``unet`` alone, or with a ``conditioner`` a module whose forward is
    ``(z, r, t, class_labels=None) -> u`` (`mmf_diffusers.pipeline_mmf.unet_average_velocity`); its state dict holds
    ``unet.*`` and ``conditioner.*``."""
    if conditioner is None:
        return unet
    return _unet_with_conditioner()(unet, conditioner, time_scale, second_time)


def split(model):
    """``(unet, conditioner or None)`` of a module made by `combine`."""
    return (model.unet, model.conditioner) if hasattr(model, "conditioner") else (model, None)


@functools.lru_cache(maxsize=None)
def _unet_with_conditioner():
    import torch

    from mmf_diffusers.pipeline_mmf import unet_average_velocity

    class UNetWithConditioner(torch.nn.Module):
        """The UNet and its conditioner as one module (one model for accelerate's engines)."""

        def __init__(self, unet, conditioner, time_scale: float, second_time: str):
            super().__init__()
            self.unet, self.conditioner = unet, conditioner
            self.time_scale, self.second_time = time_scale, second_time

        def forward(self, z, r, t, class_labels=None):
            return unet_average_velocity(self.unet, z, r, t, time_scale=self.time_scale, second_time=self.second_time,
                                         conditioner=self.conditioner, class_labels=class_labels)

        def legacy_layout_hook(self, models, input_dir):
            """accelerate load-state hook: checkpoints written while the UNet and the conditioner were prepared as
            two models hold ``model.safetensors`` (the UNet) and ``model_1.safetensors`` (the conditioner)."""
            second = os.path.join(input_dir, "model_1.safetensors")
            if not os.path.isfile(second):
                return
            from safetensors.torch import load_file

            self.unet.load_state_dict(load_file(os.path.join(input_dir, "model.safetensors")))
            self.conditioner.load_state_dict(load_file(second))
            models.clear()  # loaded: accelerate loads the optimiser and RNG states only

    return UNetWithConditioner


class _EMAWithWeights:
    """An EMA whose ``state_dict`` carries other (whole) shadow weights; what run_state.save_state reads."""

    def __init__(self, ema, shadow_params):
        self._ema, self._shadow = ema, shadow_params

    def state_dict(self) -> dict:
        return {**self._ema.state_dict(), "shadow_params": self._shadow}


def non_finite_here(named_tensors) -> list:
    """Names of the ``(name, tensor)`` pairs whose part on this process holds a NaN or an infinity."""
    import torch

    return [name for name, tensor in named_tensors if not bool(torch.isfinite(_local(tensor)).all())]


def _full(tensor):
    """A whole tensor from an FSDP2 DTensor shard (*collective*); other tensors as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _local(tensor):
    """This rank's part of a tensor: a DTensor's local shard, a ZeRO-3 parameter's partition, else the tensor."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    return partition if partition is not None else tensor


def apply_cpu_stand_in(accelerator) -> None:
    """Tests only, with MMF_TEST_ENGINE_ON_CPU=1 (else nothing): apply the FSDP2 / DeepSpeed configuration that
    accelerate leaves unapplied on CPU processes. Call it right after creating the Accelerator."""
    if not _stand_in():
        return
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and state.distributed_type != DistributedType.FSDP:
        plugin = FullyShardedDataParallelPlugin()  # reads the launch configuration's FSDP_* variables
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if state.distributed_type == DistributedType.DEEPSPEED and dist.is_initialized():
        counts = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
                  "local_process_index": int(os.environ.get("LOCAL_RANK", "0")), "backend": "gloo"}
        PartialState._shared_state.update(counts)
        state.__dict__.update(counts)
