"""The curriculum for the gradient-modulation weight ``lam`` of the MMF loss.

``lam = 0`` is MeanFlow's stop-gradient loss (coarse, stable supervision), ``lam = 1`` the fully differentiable
loss. The schedule rises from ``lam_start`` at step 0 to ``lam_end`` at ``warmup_steps`` and stays there:

    lam(step) = lam_start + (lam_end - lam_start) * shape(min(step / warmup_steps, 1))

with ``shape`` one of ``SHAPES``. It keeps a step counter (advanced by `step`), saved by `state_dict` so that a
resumed run continues the same curve.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional


def _linear(p: float) -> float:
    return p


def _cosine(p: float) -> float:
    # Slow start and slow finish: half a cosine period.
    return 0.5 * (1.0 - math.cos(math.pi * p))


def _step(p: float) -> float:
    # Hard switch at the end of the warmup: lam_start before, lam_end from warmup_steps on.
    return 1.0 if p >= 1.0 else 0.0


def _sqrt(p: float) -> float:
    # Fast start, slow finish.
    return math.sqrt(p)


SHAPES = {"constant": None, "linear": _linear, "cosine": _cosine, "step": _step, "sqrt": _sqrt}


class LambdaSchedule:
    """``lam(step)`` for the MMF loss.

    Args:
        shape: ``"constant"`` (``lam_start`` must equal ``lam_end``; use `LambdaSchedule.constant`), ``"linear"``,
            ``"cosine"``, ``"sqrt"``, or ``"step"`` (a hard switch at ``warmup_steps``).
        lam_start: value at step 0, in ``[0, 1]``.
        lam_end: value from ``warmup_steps`` on, in ``[0, 1]``.
        warmup_steps: length of the rise, ``>= 0`` (0 means ``lam_end`` from the first step).

    Example:
        >>> schedule = LambdaSchedule("linear", lam_start=0.0, lam_end=1.0, warmup_steps=100)
        >>> schedule(50)
        0.5
    """

    def __init__(self, shape: str = "linear", lam_start: float = 0.0, lam_end: float = 1.0, warmup_steps: int = 0):
        if shape not in SHAPES:
            raise ValueError(f"Unknown lambda schedule shape {shape!r}; choose one of {sorted(SHAPES)}")
        for name, value in (("lam_start", lam_start), ("lam_end", lam_end)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        if shape == "constant" and lam_start != lam_end:
            raise ValueError(
                f"A constant schedule has one value, got lam_start={lam_start} and lam_end={lam_end}; "
                "use LambdaSchedule.constant(lam) or a warmup shape"
            )
        self.shape = shape
        self.lam_start = float(lam_start)
        self.lam_end = float(lam_end)
        self.warmup_steps = int(warmup_steps)
        self.current_step = 0

    @classmethod
    def constant(cls, lam: float) -> "LambdaSchedule":
        return cls("constant", lam_start=lam, lam_end=lam, warmup_steps=0)

    def __call__(self, step: Optional[int] = None) -> float:
        """``lam`` at ``step`` (default: the schedule's own counter)."""
        if step is None:
            step = self.current_step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if self.shape == "constant":
            return self.lam_end
        if self.warmup_steps == 0:
            return self.lam_end
        progress = min(step / self.warmup_steps, 1.0)
        return self.lam_start + (self.lam_end - self.lam_start) * SHAPES[self.shape](progress)

    def step(self) -> None:
        """Advance the counter by one optimiser step."""
        self.current_step += 1

    def config(self) -> Dict[str, Any]:
        return {
            "shape": self.shape,
            "lam_start": self.lam_start,
            "lam_end": self.lam_end,
            "warmup_steps": self.warmup_steps,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {**self.config(), "current_step": self.current_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the counter. Raises ValueError when the saved schedule differs from this one, so that resuming
        with other curriculum flags does not silently change the curve."""
        saved = {k: state[k] for k in self.config() if k in state}
        if saved != self.config():
            raise ValueError(f"The saved lambda schedule {saved} differs from this one {self.config()}")
        self.current_step = int(state["current_step"])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
