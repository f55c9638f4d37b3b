"""The Modular MeanFlow (MMF) loss family.

Conventions: ``t = 0`` is data, ``t = 1`` noise, ``0 <= r <= t <= 1``; ``z_t = (1 - t) x + t e`` with
``e ~ N(0, I)``; conditional velocity ``v = e - x``; ``u(z_t, r, t)`` is the average velocity over ``[r, t]``.

The MeanFlow identity ``u = v - (t - r) du/dt`` (``du/dt`` the total derivative along the flow) gives, per
sample and before weighting,

    L_lam = || u_theta(z_t, r, t) + (t - r) * SG_lam[du_theta/dt] - v ||^2,
    SG_lam[a] = lam * a + (1 - lam) * stopgrad(a).

``lam = 0`` is exactly MeanFlow's stop-gradient loss, ``lam = 1`` lets gradients flow through ``du/dt``, values in
between interpolate the gradients linearly (the loss *value* does not depend on ``lam``). Rows with ``r = t``
have no derivative term: they are conditional flow matching.

Class-conditional models with classifier-free guidance folded into training (MeanFlow, Sec. 4.2) replace ``v`` on
the rows that keep their label by

    v_tilde = w * v + kappa * stopgrad(u(z_t, t, t | c)) + (1 - w - kappa) * stopgrad(u(z_t, t, t | none)),

whose fixed point is the guided velocity of scale ``w / (1 - kappa)``; rows whose label was dropped keep ``v``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from .derivatives import DERIVATIVES, finite_difference_derivative, jvp_derivative

ModelFn = Callable[..., torch.Tensor]

TANGENTS = ("conditional", "model")


def sg_lambda(a: torch.Tensor, lam: float) -> torch.Tensor:
    """Gradient modulation ``SG_lam[a] = lam * a + (1 - lam) * stopgrad(a)``: the value of ``a``, a fraction
    ``lam`` of its gradient."""
    if lam == 0.0:
        return a.detach()
    if lam == 1.0:
        return a
    return lam * a + (1.0 - lam) * a.detach()


class TimeSampler:
    """Draws ``(t, r)`` for a batch as MeanFlow does.

    Two times are drawn independently from ``distribution`` (``"uniform"`` on [0, 1] or ``"logit_normal"``:
    ``sigmoid(N(mean, std))``); ``t`` is the larger, ``r`` the smaller. Then all but ``round(r_neq_t_fraction * B)``
    randomly chosen rows get ``r = t`` (flow-matching rows).

    Paper defaults: ImageNet logit-normal(-0.4, 1.0) with 25% of rows ``r != t`` (ours); CIFAR-10
    logit-normal(-2.0, 2.0) with 75%.
    """

    DISTRIBUTIONS = ("uniform", "logit_normal")

    def __init__(
        self,
        distribution: str = "logit_normal",
        mean: float = -0.4,
        std: float = 1.0,
        r_neq_t_fraction: float = 0.25,
    ):
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"Unknown time distribution {distribution!r}; choose one of {self.DISTRIBUTIONS}")
        if not (isinstance(std, numbers.Real) and std > 0):
            raise ValueError(f"std must be positive, got {std!r}")
        if not (isinstance(mean, numbers.Real) and math.isfinite(mean)):
            raise ValueError(f"mean must be a finite number, got {mean!r}")
        if not (isinstance(r_neq_t_fraction, numbers.Real) and 0.0 <= r_neq_t_fraction <= 1.0):
            raise ValueError(f"r_neq_t_fraction must be in [0, 1], got {r_neq_t_fraction!r}")
        self.distribution = distribution
        self.mean = float(mean)
        self.std = float(std)
        self.r_neq_t_fraction = float(r_neq_t_fraction)

    def _draw(self, n: int, device, generator) -> torch.Tensor:
        if self.distribution == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(self.mean + self.std * torch.randn(n, device=device, generator=generator))

    def __call__(
        self, batch_size: int, device=None, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(t, r)``, float32 tensors of shape ``(batch_size,)`` with ``0 <= r <= t <= 1``."""
        a = self._draw(batch_size, device, generator)
        b = self._draw(batch_size, device, generator)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        num_neq = round(self.r_neq_t_fraction * batch_size)
        keep = torch.randperm(batch_size, device=device, generator=generator)[:num_neq]
        neq = torch.zeros(batch_size, dtype=torch.bool, device=device)
        neq[keep] = True
        r = torch.where(neq, r, t)
        return t, r

    def __repr__(self) -> str:
        return (f"TimeSampler(distribution={self.distribution!r}, mean={self.mean}, std={self.std}, "
                f"r_neq_t_fraction={self.r_neq_t_fraction})")


@dataclass
class MMFLossOutput:
    """What `ModularMeanFlowLoss` returns.

    Attributes:
        loss: scalar, the batch mean of ``per_sample``; call ``.backward()`` on it.
        per_sample: ``(B,)``, the weighted per-sample loss.
        stats: floats for logging: ``mse`` (unweighted mean error), ``mean_abs_dudt`` (mean ``|du/dt|`` over rows
            with ``r != t``, 0 if none), ``frac_r_neq_t``, ``lam``, ``mean_weight``.
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    stats: Dict[str, float] = field(default_factory=dict)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row boolean ``(B,)`` shaped to broadcast against ``like`` ``(B, ...)``."""
    return mask.view((-1,) + (1,) * (like.dim() - 1))


def _as_batch_times(name: str, value: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise ValueError(f"`{name}` must be a float tensor of shape ({batch_size},)")
    if value.shape != (batch_size,):
        raise ValueError(f"`{name}` must have shape ({batch_size},), got {tuple(value.shape)}")
    return value.to(device)


class ModularMeanFlowLoss:
    """The MMF loss ``|| u + (t - r) SG_lam[du/dt] - v ||^2`` with adaptive weighting, as a callable object.

    Args:
        time_sampler: draws ``(t, r)`` when the call does not give them.
        derivative: ``"jvp"`` (exact, `torch.func.jvp`) or ``"finite_difference"`` (two forwards, no forward-mode
            AD; error ``O(fd_eps)``).
        fd_eps: step of the finite difference, in units of ``t``.
        adaptive_p, adaptive_c: per-sample weight ``w = 1 / stopgrad(err + c) ** p``; ``p = 0`` is plain MSE.
        tangent: direction of ``z`` in the derivative. ``"conditional"`` uses ``v = e - x`` (MeanFlow);
            ``"model"`` uses the model's own instantaneous velocity ``stopgrad(u(z_t, t, t))``, which removes the
            noise of the conditional velocity from the derivative (one extra no-grad forward on the ``r != t``
            rows). The regression target is ``v = e - x`` (or ``v_tilde`` with guidance) either way.
        guidance_w, guidance_kappa: training-time classifier-free guidance (class-conditional calls only):
            labelled rows regress on ``v_tilde`` above, which is also their tangent with ``tangent="conditional"``.
            ``w = 1, kappa = 0`` (the default) is no guidance; the effective scale is ``w / (1 - kappa)``.

    Call:
        ``loss_fn(model_fn, x, lam, t=None, r=None, noise=None, generator=None, class_labels=None, null_label=None)
        -> MMFLossOutput`` where ``model_fn(z, r, t) -> u`` takes ``z`` of shape ``(B, ...)`` and float ``r``,
        ``t`` of shape ``(B,)`` in ``[0, 1]``; ``x`` is a data batch ``(B, ...)``; ``lam`` in ``[0, 1]``. ``t``,
        ``r``, ``noise`` are used as given when passed. Class-conditional: ``class_labels`` is a long ``(B,)`` tensor
        of ids (``null_label`` marks rows whose label was dropped), and ``model_fn(z, r, t, class_labels)`` gets the
        ids of the rows it is evaluated on.
    """

    def __init__(
        self,
        time_sampler: Optional[TimeSampler] = None,
        derivative: str = "jvp",
        fd_eps: float = 1e-3,
        adaptive_p: float = 0.0,
        adaptive_c: float = 1e-3,
        tangent: str = "conditional",
        guidance_w: float = 1.0,
        guidance_kappa: float = 0.0,
    ):
        if derivative not in DERIVATIVES:
            raise ValueError(f"Unknown derivative estimator {derivative!r}; choose one of {DERIVATIVES}")
        if tangent not in TANGENTS:
            raise ValueError(f"Unknown tangent {tangent!r}; choose one of {TANGENTS}")
        if not (isinstance(fd_eps, numbers.Real) and fd_eps > 0):
            raise ValueError(f"fd_eps must be positive, got {fd_eps!r}")
        if not (isinstance(adaptive_p, numbers.Real) and adaptive_p >= 0):
            raise ValueError(f"adaptive_p must be >= 0, got {adaptive_p!r}")
        if not (isinstance(adaptive_c, numbers.Real) and adaptive_c > 0):
            raise ValueError(f"adaptive_c must be positive, got {adaptive_c!r}")
        if isinstance(guidance_w, bool) or not isinstance(guidance_w, numbers.Real) or not (
            math.isfinite(guidance_w) and guidance_w > 0
        ):
            raise ValueError(f"guidance_w must be a positive finite number, got {guidance_w!r}")
        if isinstance(guidance_kappa, bool) or not isinstance(guidance_kappa, numbers.Real) or not (
            0.0 <= guidance_kappa < 1.0
        ):
            raise ValueError(f"guidance_kappa must be in [0, 1), got {guidance_kappa!r}")
        self.guidance_w = float(guidance_w)
        self.guidance_kappa = float(guidance_kappa)
        self.time_sampler = time_sampler if time_sampler is not None else TimeSampler()
        self.derivative = derivative
        self.fd_eps = float(fd_eps)
        self.adaptive_p = float(adaptive_p)
        self.adaptive_c = float(adaptive_c)
        self.tangent = tangent

    @property
    def guided(self) -> bool:
        """Whether training-time guidance changes the target (``w != 1`` or ``kappa != 0``)."""
        return self.guidance_w != 1.0 or self.guidance_kappa != 0.0

    @property
    def effective_guidance_scale(self) -> float:
        """``w / (1 - kappa)``: the guidance scale the model learns (1 is none)."""
        return self.guidance_w / (1.0 - self.guidance_kappa)

    def guidance_mix(self, v: torch.Tensor, u_cond: torch.Tensor, u_none: torch.Tensor) -> torch.Tensor:
        """``w v + kappa u_cond + (1 - w - kappa) u_none``; the caller passes the model terms without gradient."""
        w, kappa = self.guidance_w, self.guidance_kappa
        return w * v + kappa * u_cond + (1.0 - w - kappa) * u_none

    def guided_target(self, model_fn, z, t, v, class_labels, null_label):
        """``v_tilde`` on the rows with a label, ``v`` on the rest; the model terms carry no gradient.

        The definition, with two extra forwards per labelled row. `__call__` computes the same target with fewer: on
        rows with ``r = t`` the term ``u(z_t, t, t | c)`` is the batch's own (detached) prediction.
        """
        keep = (class_labels != null_label).nonzero().squeeze(1)
        if keep.numel() == 0 or not self.guided:
            return v
        z_k, t_k, c_k = z[keep], t[keep], class_labels[keep]
        with torch.no_grad():
            # Both model terms from one batch: labels, then "no label".
            both = model_fn(torch.cat([z_k, z_k]), torch.cat([t_k, t_k]), torch.cat([t_k, t_k]),
                            torch.cat([c_k, torch.full_like(c_k, null_label)]))
            u_cond, u_none = both.to(v.dtype).chunk(2)
            v_tilde = self.guidance_mix(v[keep], u_cond, u_none)
        return v.index_copy(0, keep, v_tilde)

    def _time_derivative(self, model_fn, z, r, t, v, create_graph, u=None):
        if self.derivative == "jvp":
            return jvp_derivative(model_fn, z, r, t, v, create_graph=create_graph)
        return finite_difference_derivative(model_fn, z, r, t, v, create_graph=create_graph, u=u, eps=self.fd_eps)

    def __call__(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        lam: float,
        t: Optional[torch.Tensor] = None,
        r: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        class_labels: Optional[torch.Tensor] = None,
        null_label: Optional[int] = None,
    ) -> MMFLossOutput:
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
        lam = float(lam)
        batch = x.shape[0]
        if (t is None) != (r is None):
            raise ValueError("Give both `t` and `r`, or neither")
        if t is None:
            t, r = self.time_sampler(batch, device=x.device, generator=generator)
        t = _as_batch_times("t", t, batch, x.device)
        r = _as_batch_times("r", r, batch, x.device)
        if bool(((r < 0) | (t > 1) | (r > t)).any()):
            raise ValueError("Times must satisfy 0 <= r <= t <= 1 for every row")
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        elif noise.shape != x.shape:
            raise ValueError(f"`noise` must have the shape of `x` {tuple(x.shape)}, got {tuple(noise.shape)}")

        if class_labels is not None:
            if not torch.is_tensor(class_labels) or class_labels.dtype != torch.long or class_labels.shape != (batch,):
                raise ValueError(f"`class_labels` must be a long tensor of shape ({batch},)")
            if isinstance(null_label, bool) or not isinstance(null_label, numbers.Integral):
                raise ValueError(f"`null_label` (the id of the 'no label' token) must be an int, got {null_label!r}")
            class_labels = class_labels.to(x.device)
            if bool(((class_labels < 0) | (class_labels > null_label)).any()):
                raise ValueError(f"class label ids must lie in [0, {null_label}] ({null_label} is 'no label')")
        elif self.guided:
            raise ValueError("Training-time guidance (guidance_w != 1 or guidance_kappa != 0) needs class_labels")

        def rows_fn(rows=None):
            """``model_fn`` restricted to ``rows`` of the batch (``None``: all), with their labels."""
            if class_labels is None:
                return model_fn
            labels = class_labels if rows is None else class_labels[rows]
            return lambda z_, r_, t_: model_fn(z_, r_, t_, labels)

        bshape = (batch,) + (1,) * (x.dim() - 1)
        t_b, r_b = t.view(bshape).to(x.dtype), r.view(bshape).to(x.dtype)
        z = (1 - t_b) * x + t_b * noise
        v = noise - x

        # Only rows with r != t need du/dt; the others are flow matching.
        neq = t > r
        idx = neq.nonzero().squeeze(1)
        rest = (~neq).nonzero().squeeze(1)
        dudt = torch.zeros_like(x)

        # Training-time guidance needs u(z_t, t, t | none) (computed on every row: gathering the labelled ones is not
        # worth it) and u(z_t, t, t | c) on the labelled rows. On rows with r = t the latter is the main prediction
        # itself (detached below), so only the r != t rows need it here, where it doubles as the tangent with
        # tangent="model". One no-grad batch computes what is needed.
        guided = class_labels is not None and self.guided
        keep = (class_labels != null_label) if guided else None
        u_none = u_tt_d = None
        if guided or (idx.numel() and self.tangent == "model"):
            pieces = []  # (z, t, labels) blocks: "no label" on every row, then u(z, t, t | c) on the r != t rows
            if guided:
                pieces.append((z, t, torch.full_like(class_labels, null_label)))
            if idx.numel() and (guided or self.tangent == "model"):
                pieces.append((z[idx], t[idx], None if class_labels is None else class_labels[idx]))
            with torch.no_grad():
                zs, ts = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
                if class_labels is None:
                    out = model_fn(zs, ts, ts)
                else:
                    out = model_fn(zs, ts, ts, torch.cat([p[2] for p in pieces]))
                out = out.to(v.dtype)
            if guided:
                u_none, out = out[:batch], out[batch:]
            u_tt_d = out if idx.numel() and out.shape[0] else None

        target = v
        if guided and idx.numel():
            # the r != t rows' target is needed before the derivative (it is their tangent when "conditional")
            v_tilde_d = self.guidance_mix(v[idx], u_tt_d, u_none[idx])
            target = v.index_copy(0, idx, torch.where(_rows(keep[idx], v), v_tilde_d, v[idx]))

        full_fn = rows_fn()
        if idx.numel() == 0:
            u = full_fn(z, r, t)
        else:
            fn_d = rows_fn(idx)
            z_d, r_d, t_d, v_d = z[idx], r[idx], t[idx], target[idx]
            if self.tangent == "model":
                v_d = u_tt_d
            if lam == 0.0:
                # MeanFlow: the derivative is a constant target; u comes from one ordinary forward.
                u = full_fn(z, r, t)
                _, dudt_d = self._time_derivative(fn_d, z_d, r_d, t_d, v_d, create_graph=False, u=u[idx])
            elif self.derivative == "jvp":
                # u and du/dt from one differentiable jvp on the r != t rows, a plain forward on the rest.
                u_d, dudt_d = self._time_derivative(fn_d, z_d, r_d, t_d, v_d, create_graph=True)
                if rest.numel():
                    u_rest = rows_fn(rest)(z[rest], r[rest], t[rest])
                    u = torch.cat([u_d, u_rest]).index_select(0, torch.argsort(torch.cat([idx, rest])))
                else:
                    u = u_d
            else:
                u = full_fn(z, r, t)
                _, dudt_d = self._time_derivative(fn_d, z_d, r_d, t_d, v_d, create_graph=True, u=u[idx])
            dudt = dudt.index_copy(0, idx, dudt_d.to(dudt.dtype))

        if guided and rest.numel():
            # r = t rows: u(z_t, t, t | c) is this batch's own prediction, without its gradient
            u_rest = u[rest].detach().to(v.dtype)
            v_tilde_rest = self.guidance_mix(v[rest], u_rest, u_none[rest])
            target = target.index_copy(0, rest, torch.where(_rows(keep[rest], v), v_tilde_rest, v[rest]))

        h = (t_b - r_b)
        prediction = u + h * sg_lambda(dudt, lam)
        err = (prediction - target).pow(2).flatten(1).mean(1)
        if self.adaptive_p > 0:
            weight = 1.0 / (err.detach() + self.adaptive_c).pow(self.adaptive_p)
        else:
            weight = torch.ones_like(err)
        per_sample = weight * err
        loss = per_sample.mean()

        with torch.no_grad():
            abs_dudt = dudt[idx].abs().mean().item() if idx.numel() else 0.0
            stats = {
                "mse": err.mean().item(),
                "mean_abs_dudt": abs_dudt,
                "frac_r_neq_t": idx.numel() / batch,
                "lam": lam,
                "mean_weight": weight.mean().item(),
            }
        return MMFLossOutput(loss=loss, per_sample=per_sample, stats=stats)

    def __repr__(self) -> str:
        return (f"ModularMeanFlowLoss(time_sampler={self.time_sampler!r}, derivative={self.derivative!r}, "
                f"fd_eps={self.fd_eps}, adaptive_p={self.adaptive_p}, adaptive_c={self.adaptive_c}, "
                f"tangent={self.tangent!r}, guidance_w={self.guidance_w}, guidance_kappa={self.guidance_kappa})")
