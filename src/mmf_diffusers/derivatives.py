"""Estimators of the total time derivative of the average velocity along the flow.

For ``u = u(z_t, r, t)`` with ``z_t`` moving with velocity ``v`` (``dz_t/dt = v``) and ``r`` fixed,

    du/dt = d_z u . v + d_t u,

a Jacobian-vector product with tangents ``(v, 0, 1)`` for ``(z, r, t)``. Conventions: ``t = 0`` is data,
``t = 1`` noise, ``0 <= r <= t <= 1``; ``z`` and ``v`` have shape ``(B, ...)``, ``r`` and ``t`` shape ``(B,)``.

Every estimator has the signature ``(model_fn, z, r, t, v, *, create_graph, u=None) -> (u, dudt)``:
with ``create_graph=False`` the derivative carries no gradient (MeanFlow's stop-gradient target, cheap), with
``create_graph=True`` gradients flow through it to the model's parameters. ``u`` is ``model_fn(z, r, t)``; an
estimator that needs it anyway reuses a value the caller passes in.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DERIVATIVES = ("jvp", "finite_difference")


def jvp_derivative(
    model_fn: ModelFn,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    *,
    create_graph: bool,
    u: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact ``du/dt`` with `torch.func.jvp` (forward-mode AD). Returns ``(u, du/dt)`` of the shape of ``z``.

    With ``create_graph=False`` it runs under ``torch.no_grad()``; with ``create_graph=True`` both outputs are
    differentiable with respect to the model's parameters (reverse-over-forward). ``u`` is ignored: the jvp
    computes the primal itself.
    """

    def along_flow(z_, t_):
        return model_fn(z_, r, t_)

    tangents = (v, torch.ones_like(t))
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        u_out, dudt = torch.func.jvp(along_flow, (z, t), tangents)
    return u_out, dudt


def finite_difference_derivative(
    model_fn: ModelFn,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    *,
    create_graph: bool,
    u: Optional[torch.Tensor] = None,
    eps: float = 1e-3,
    central: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``du/dt`` by a finite difference along the flow: ``(u(z + eps v, r, t + eps) - u(z, r, t)) / eps``, or the
    central version ``(u(z + eps v, r, t + eps) - u(z - eps v, r, t - eps)) / (2 eps)``.

    Needs no forward-mode AD, so it works with any attention kernel, under DDP and in mixed precision. With
    ``create_graph=True`` the gradient is ordinary backprop through the evaluations. The shifted times may leave
    ``[0, 1]`` by ``eps``; the sinusoidal embedding is smooth there. Returns ``(u, du/dt)``, ``u`` the evaluation at
    ``(z, r, t)`` that the difference used.

    A model that draws random numbers (dropout in train mode) must draw the same ones in the evaluations it
    differences, or du/dt is the difference of two dropout masks divided by ``eps``: the evaluations start from one
    state of the device's default generator. A given ``u`` is reused only if the shifted evaluation draws no random
    numbers (else ``u`` is evaluated again with the shifted evaluation's draws).
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    device = z.device
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        start = _rng_state(device)
        if central:
            u_plus = model_fn(z + eps * v, r, t + eps)
            _set_rng_state(device, start)
            u_minus = model_fn(z - eps * v, r, t - eps)
            if u is None:
                u = model_fn(z, r, t)
            return u, (u_plus - u_minus) / (2 * eps)
        if u is None:
            u = model_fn(z, r, t)
            _set_rng_state(device, start)
            u_plus = model_fn(z + eps * v, r, t + eps)
        else:
            u_plus = model_fn(z + eps * v, r, t + eps)
            if start is not None and not torch.equal(_rng_state(device), start):
                after = _rng_state(device)
                _set_rng_state(device, start)
                u = model_fn(z, r, t)  # the random numbers (dropout masks) of the shifted evaluation
                _set_rng_state(device, after)
        u_base = u if create_graph else u.detach()
        dudt = (u_plus - u_base) / eps
    return u, dudt


def _rng_state(device: torch.device) -> Optional[torch.Tensor]:
    """The state of ``device``'s default random generator (None for devices without one, e.g. meta)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "get_rng_state"):
        return None
    return module.get_rng_state(device)


def _set_rng_state(device: torch.device, state: Optional[torch.Tensor]) -> None:
    if state is None:
        return
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)


ESTIMATORS = {"jvp": jvp_derivative, "finite_difference": finite_difference_derivative}
