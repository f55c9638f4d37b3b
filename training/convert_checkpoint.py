#!/usr/bin/env python
"""Convert a checkpoint written by an older train_mmf.py (accelerate ``custom_checkpoint_<i>.pkl`` files) to the
pickle-free training state of run_state.py, so that it can be resumed again:

    python training/convert_checkpoint.py runs/my-run/checkpoint-5000

The old script registered, in this order, the curriculum (0), the LR scheduler (1), the run position (2) and, with
--use_ema, the EMA (3). Their state dicts hold only numbers, strings, lists and tensors, so they are read with
``torch.load(weights_only=True)``, which builds nothing else: a crafted file is refused, never executed. The
converted folder gets ``mmf_state.json`` / ``mmf_state.safetensors`` and loses the ``.pkl`` files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import run_state  # noqa: E402

NAMES = ("curriculum", "lr_scheduler", "position", "ema")


def convert(folder: str) -> str:
    """Convert ``folder`` in place; returns a one-line summary. Raises ValueError with the reason."""
    import torch
    from safetensors.torch import save_file

    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a checkpoint folder")
    pickles = sorted(glob.glob(os.path.join(folder, "custom_checkpoint_*.pkl")))
    indices = sorted(int(os.path.basename(p)[len("custom_checkpoint_"):-len(".pkl")]) for p in pickles)
    if indices not in ([0, 1, 2], [0, 1, 2, 3]):
        raise ValueError(f"{folder} holds custom_checkpoint files {indices}; expected 0-2 (or 0-3 with EMA) as the "
                         "older train_mmf.py wrote them")
    states = {}
    for index in indices:
        path = os.path.join(folder, f"custom_checkpoint_{index}.pkl")
        try:
            with warnings.catch_warnings():  # a foreign file's pickle protocol warning says nothing more than the error
                warnings.simplefilter("ignore", UserWarning)
                states[NAMES[index]] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - UnpicklingError names the global a crafted file asks for
            raise ValueError(f"{path} is not plain training state ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}); not converted") from None
    position = states["position"]
    generator = position.get("generator") if isinstance(position, dict) else None
    if not (torch.is_tensor(generator) and generator.dtype == torch.uint8) or not all(
            isinstance(position.get(k), int) for k in ("global_step", "micro_batch")):
        raise ValueError(f"{folder}: custom_checkpoint_2.pkl is not the run position the older script saved")
    ema = states.get("ema")
    if ema is not None and not (isinstance(ema, dict) and isinstance(ema.get("shadow_params"), (list, tuple))
                                and all(torch.is_tensor(p) for p in ema["shadow_params"])):
        raise ValueError(f"{folder}: custom_checkpoint_3.pkl is not the EMA state the older script saved")
    tensors = {"loss_generator": generator}
    ema = states.get("ema")
    if ema is not None:
        ema = dict(ema)
        for i, param in enumerate(ema.pop("shadow_params")):
            tensors[f"ema.{i}"] = param.detach().cpu().contiguous()
    payload = {"format": run_state.FORMAT, "curriculum": states["curriculum"], "lr_scheduler": states["lr_scheduler"],
               "position": {"global_step": int(position["global_step"]), "micro_batch": int(position["micro_batch"])},
               "ema": ema}
    try:
        text = json.dumps(run_state._json_safe(payload, "state"), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:  # e.g. a tensor where the older script saved a number
        raise ValueError(f"{folder}: the pickled state is not what the older script saved ({error}); not converted")
    tmp_json, tmp_tensors = (os.path.join(folder, f".{name}.tmp") for name in (run_state.STATE_JSON,
                                                                               run_state.STATE_TENSORS))
    with open(tmp_json, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    save_file(tensors, tmp_tensors)
    os.replace(tmp_tensors, os.path.join(folder, run_state.STATE_TENSORS))
    os.replace(tmp_json, os.path.join(folder, run_state.STATE_JSON))
    for path in pickles:  # last: until here the folder is still the old, complete checkpoint
        os.remove(path)
    return (f"converted {folder}: step {payload['position']['global_step']}, "
            f"{'with' if ema is not None else 'without'} EMA")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint-<step> folders written by an older train_mmf.py "
                        "(each is converted in place; the exit status is 2 if any is refused)")
    args = parser.parse_args(argv)
    status = 0
    for folder in args.checkpoints:
        try:
            print(convert(folder))
        except (OSError, ValueError) as error:
            print(f"convert_checkpoint.py: error: {error}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
