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
ADAPTIVE_REDUCTIONS = ("mean", "sum")


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

    With ``pair_rows=True`` the rows with ``r != t`` are drawn among the even rows only, so that row ``2j + 1``
    (``r = t``) can be the partner of row ``2j`` (`ModularMeanFlowLoss(pair_rows=True)`); this layout survives
    splitting an even-sized batch across processes.

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
        pair_rows: bool = False,
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
        if not isinstance(pair_rows, bool):
            raise ValueError(f"pair_rows must be True or False, got {pair_rows!r}")
        if pair_rows and r_neq_t_fraction > 0.5:
            raise ValueError(f"pair_rows needs r_neq_t_fraction <= 0.5, got {r_neq_t_fraction!r}")
        self.pair_rows = pair_rows

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
        if self.pair_rows:
            if num_neq > batch_size // 2:
                raise ValueError(f"pair_rows: {num_neq} rows with r != t do not fit into the {batch_size // 2} "
                                 f"even rows of a batch of {batch_size}")
            keep = 2 * torch.randperm(batch_size // 2, device=device, generator=generator)[:num_neq]
        else:
            keep = torch.randperm(batch_size, device=device, generator=generator)[:num_neq]
        neq = torch.zeros(batch_size, dtype=torch.bool, device=device)
        neq[keep] = True
        r = torch.where(neq, r, t)
        return t, r

    def neq_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Which rows have ``r != t`` when a batch is drawn row by row (`draw_row_randomness`): a fixed pattern of
        the row index, so that any block of ``B`` consecutive rows holds ``floor(fraction * B + 1/2)`` of them, or
        one less or more (exactly that many from row 0, and in every block when ``fraction * B`` is an integer).

        ``rows``: long tensor of row indices in the (global) batch; returns a bool tensor of its shape. The
        pattern spreads the rows evenly (e.g. fraction 0.25: rows 1, 5, 9, ...); with ``pair_rows`` it places them
        on even rows 2j whose partner 2j + 1 follows (fraction 0.25: rows 0, 4, 8, ...). Which images get ``r != t``
        is still random: the data order is.
        """
        rows = rows.long()
        if self.pair_rows:
            pairs = (rows // 2).double()
            step = 2.0 * self.r_neq_t_fraction
            on = torch.floor((pairs + 1) * step + 0.5) > torch.floor(pairs * step + 0.5)
            return on & (rows % 2 == 0)
        index = rows.double()
        f = self.r_neq_t_fraction
        return torch.floor((index + 1) * f + 0.5) > torch.floor(index * f + 0.5)

    def __repr__(self) -> str:
        return (f"TimeSampler(distribution={self.distribution!r}, mean={self.mean}, std={self.std}, "
                f"r_neq_t_fraction={self.r_neq_t_fraction}, pair_rows={self.pair_rows})")


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def row_seed(base_seed: int, row: int) -> int:
    """The seed of row ``row`` of a batch whose randomness has the seed ``base_seed`` (63 bits)."""
    return _mix64(_mix64(int(base_seed) & _MASK64) ^ int(row)) >> 1


def draw_row_randomness(
    time_sampler: TimeSampler,
    base_seed: int,
    rows: torch.Tensor,
    sample_shape,
    device=None,
    dtype: torch.dtype = torch.float32,
    label_dropout: Optional[float] = None,
):
    """The loss's randomness for some rows of a batch, each row drawn on its own: ``(t, r, noise, drop)``.

    Row ``i`` (``rows`` holds global row indices, shape ``(b,)``) takes two times, then a uniform for the label drop
    (only with ``label_dropout``), then its noise ``(*sample_shape)``, from a generator on ``device`` seeded with
    ``row_seed(base_seed, i)``; whether it has ``r != t`` is `TimeSampler.neq_rows`. So the rows of a batch do not
    depend on which other rows are drawn beside them: N processes drawing their own rows (on their device) get
    exactly the rows of one process drawing the whole batch, and the number of ``r != t`` rows of each process is
    the same at every step (static shapes for torch.compile and GPUs).

    Returns ``t``, ``r`` float32 ``(b,)`` with ``0 <= r <= t <= 1``, ``noise`` ``(b, *sample_shape)`` of ``dtype``
    and ``drop`` bool ``(b,)`` (``u < label_dropout``; None without ``label_dropout``), all on ``device``. Values are
    the same on every device of a type (CPU and CUDA generators differ).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    times, noises, uniforms = [], [], []
    for row in rows.tolist():
        # The meta device (shapes only, used to check placement) has no generator.
        generator = None if device.type == "meta" else torch.Generator(device).manual_seed(row_seed(base_seed, row))
        times.append(time_sampler._draw(2, device, generator))
        if label_dropout is not None:
            uniforms.append(torch.rand(1, device=device, generator=generator))
        noises.append(torch.randn(tuple(sample_shape), device=device, generator=generator, dtype=dtype))
    pair = torch.stack(times)
    t, r = pair.max(dim=1).values, pair.min(dim=1).values
    r = torch.where(time_sampler.neq_rows(rows).to(device), r, t)
    drop = torch.cat(uniforms) < label_dropout if label_dropout is not None else None
    return t, r, torch.stack(noises), drop


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


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row ``(B,)`` tensor shaped to broadcast against ``like`` ``(B, ...)`` (float values in its dtype)."""
    values = values.view((-1,) + (1,) * (like.dim() - 1))
    return values.to(like.dtype) if values.is_floating_point() else values


def _bind_labels(model_fn: ModelFn, class_labels: Optional[torch.Tensor], null_label: Optional[int]):
    """``fn(z, r, t, rows) -> u``: ``model_fn`` on some rows of the batch, with their labels when class-conditional.
    ``rows`` is ``None`` (every row), an index tensor, ``"none"`` (every row, as "no label"), or a list of those
    for a concatenated batch."""
    if class_labels is None:
        return lambda z, r, t, rows: model_fn(z, r, t)

    def labels_of(rows):
        if rows is None:
            return class_labels
        if isinstance(rows, str):
            return torch.full_like(class_labels, null_label)
        return class_labels[rows]

    def fn(z, r, t, rows):
        blocks = rows if isinstance(rows, list) else [rows]
        return model_fn(z, r, t, torch.cat([labels_of(b) for b in blocks]))

    return fn


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
        adaptive_reduction: how ``err``, the per-sample squared error ``||delta||^2`` of ``delta = u + (t - r)
            SG_lam[du/dt] - target``, is reduced over the ``D`` dimensions of a sample, for both the weight and the
            loss (``per_sample = w * err``). ``"mean"`` (the default): ``err = ||delta||^2 / D``, so ``c`` acts like
            ``c * D`` on the sum and the loss keeps the per-element scale. ``"sum"``: ``err = ||delta||^2``, MeanFlow's
            definition (``w = 1 / (||delta||^2 + c)^p``, arXiv 2505.13447, with ``c = 1e-3``). With ``p = 1`` and
            ``err >> c`` the two give the same gradient; they differ by where ``c`` sits (``D``-fold), and for
            ``p != 1`` by a constant factor ``D^(1 - p)`` on the loss. ``stats["mse"]`` is the per-element mean either
            way.
        pair_rows: with ``tangent="model"``: the model tangent of row ``2j`` (``r != t``) is read off the prediction
            of row ``2j + 1`` (``r = t``), which takes row ``2j``'s ``(x, e, t)`` (its own image is not used),
            instead of an extra no-grad forward. Times must have that layout (``TimeSampler(pair_rows=True)``).
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
        pair_rows: bool = False,
        adaptive_reduction: str = "mean",
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
        if adaptive_reduction not in ADAPTIVE_REDUCTIONS:
            raise ValueError(f"Unknown adaptive_reduction {adaptive_reduction!r}; choose one of {ADAPTIVE_REDUCTIONS}")
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
        self.adaptive_reduction = adaptive_reduction
        self.tangent = tangent
        if not isinstance(pair_rows, bool):
            raise ValueError(f"pair_rows must be True or False, got {pair_rows!r}")
        if pair_rows and tangent != "model":
            raise ValueError("pair_rows only applies with tangent='model' (it supplies the model tangent)")
        self.pair_rows = pair_rows

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
        lam, t, r, noise, class_labels = self._check_call(x, lam, t, r, noise, generator, class_labels, null_label)
        d = (t > r).nonzero().squeeze(1)  # rows that need du/dt; the others (r = t) are flow matching
        if self.pair_rows and d.numel():
            # Row 2j + 1 (r = t) takes the (x, e, t, label) of row 2j (r != t): its prediction u(z_t, t, t) is then
            # the model tangent for free (its own image is not used).
            partners = d + 1
            x, noise, t = (a.index_copy(0, partners, a[d]) for a in (x, noise, t))
            r = r.index_copy(0, partners, t[partners])
            if class_labels is not None:
                class_labels = class_labels.index_copy(0, partners, class_labels[d])
        fn = _bind_labels(model_fn, class_labels, null_label)  # fn(z, r, t, rows): u on those rows of the batch
        t_b, r_b = _per_row(t, x), _per_row(r, x)
        z, v = (1 - t_b) * x + t_b * noise, noise - x
        guided = class_labels is not None and self.guided

        # 1. u(z_t, t, t) without gradient, in one batch, where it is needed: on the derivative rows (the model
        #    tangent, and the guidance term u(z, t, t | c)) and, with guidance, u(z, t, t | none) on every row.
        need_inst = d.numel() > 0 and (guided or self.tangent == "model") and not self.pair_rows
        u_inst_d, u_none = self._instantaneous(fn, z, t, d if need_inst else None, guided, null_label)

        # 2. u(z_t, r, t) on every row, the main path of the gradient (with jvp and lam > 0 the derivative rows get
        #    theirs from the differentiable jvp in step 4).
        joint = self.derivative == "jvp" and lam > 0 and d.numel() > 0
        rest = (t == r).nonzero().squeeze(1)
        u = u_rest = None
        if not joint:
            u = fn(z, r, t, None)
        elif rest.numel():
            u_rest = fn(z[rest], r[rest], t[rest], rest)
        if self.pair_rows and d.numel():
            pairs = u[partners] if not joint else u_rest[torch.searchsorted(rest, partners)]
            u_inst_d = pairs.detach().to(v.dtype)

        # 3. the target: v, or v_tilde on the labelled rows (u(z, t, t | c) is u_inst_d on the derivative rows and
        #    the batch's own detached prediction on the others, computed after step 4 when joint).
        # 4. du/dt on the derivative rows, in float32 outside autocast, along the model or conditional tangent.
        dudt = torch.zeros_like(x)
        if d.numel():
            target_d = self._target(v[d], u_inst_d, u_none, class_labels, null_label, d) if guided else v[d]
            tangent = u_inst_d if self.tangent == "model" else target_d
            u_d, dudt_d = self._derivative(fn, z[d], r[d], t[d], tangent, d, lam, None if joint else u[d])
            dudt = dudt.index_copy(0, d, dudt_d.to(x.dtype))
            if joint:
                if u_rest is None:
                    u = u_d
                else:
                    u = torch.cat([u_d.to(u_rest.dtype), u_rest]).index_select(0, torch.argsort(torch.cat([d, rest])))
        target = v
        if guided:
            u_inst = u.detach().to(v.dtype)  # r = t rows: the prediction is u(z, t, t | c)
            if d.numel():
                u_inst = u_inst.index_copy(0, d, u_inst_d)
            target = self._target(v, u_inst, u_none, class_labels, null_label, None)

        # 5. the per-sample error and weight
        sq = (u + (t_b - r_b) * sg_lambda(dudt, lam) - target).pow(2).flatten(1)
        err = sq.sum(1) if self.adaptive_reduction == "sum" else sq.mean(1)
        weight = 1.0 / (err.detach() + self.adaptive_c).pow(self.adaptive_p) if self.adaptive_p > 0 else \
            torch.ones_like(err)
        per_sample = weight * err
        with torch.no_grad():
            stats = {"mse": sq.mean().item(), "mean_abs_dudt": dudt[d].abs().mean().item() if d.numel() else 0.0,
                     "frac_r_neq_t": d.numel() / x.shape[0], "lam": lam, "mean_weight": weight.mean().item()}
        return MMFLossOutput(loss=per_sample.mean(), per_sample=per_sample, stats=stats)

    # -- the steps of __call__ --------------------------------------------------------------------------------

    def _instantaneous(self, fn, z, t, d, guided, null_label):
        """No-grad ``u(z_t, t, t | c)`` on rows ``d`` (or ``None``) and, with guidance, ``u(z_t, t, t | none)`` on
        every row, from one batch of the network. Returns ``(u_inst_d, u_none)`` (``None`` where not computed)."""
        blocks = ([(z, t, "none")] if guided else []) + ([(z[d], t[d], d)] if d is not None else [])
        if not blocks:
            return None, None
        with torch.no_grad():
            out = fn(torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks]),
                     torch.cat([b[1] for b in blocks]), [b[2] for b in blocks]).to(z.dtype)
        u_none = out[: z.shape[0]] if guided else None
        return (out[z.shape[0]:] if guided else out) if d is not None else None, u_none

    def _target(self, v, u_cond, u_none, class_labels, null_label, rows):
        """``v_tilde`` on the labelled rows among ``rows`` (``None``: all), ``v`` on rows whose label was dropped;
        ``v``, ``u_cond`` are those rows' values, ``u_none`` covers the whole batch."""
        labels = class_labels if rows is None else class_labels[rows]
        u_none = u_none if rows is None else u_none[rows]
        return torch.where(_per_row(labels != null_label, v), self.guidance_mix(v, u_cond, u_none), v)

    def _derivative(self, fn, z, r, t, tangent, rows, lam, u):
        """``(u, du/dt)`` on the derivative rows, computed in float32 with autocast off: a finite difference of
        low-precision outputs is rounding noise, and torch.func.jvp fails under autocast. With gradient (through
        the tangent output of a jvp, or the shifted forward of the finite difference) only when ``lam > 0``.
        ``u``: the main prediction on these rows, reused by the finite difference when it is float32."""
        device_type = z.device.type
        autocast = torch.is_autocast_enabled(device_type)
        row_fn = lambda z_, r_, t_: fn(z_, r_, t_, rows)  # noqa: E731
        with torch.autocast(device_type, enabled=False):
            if autocast:
                z, tangent, u = z.float(), tangent.float(), None  # u is recomputed in float32
            if self.derivative == "jvp":
                return jvp_derivative(row_fn, z, r, t, tangent, create_graph=lam > 0)
            return finite_difference_derivative(row_fn, z, r, t, tangent, create_graph=lam > 0, u=u, eps=self.fd_eps)

    def _check_call(self, x, lam, t, r, noise, generator, class_labels, null_label):
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must be a number in [0, 1], got {lam!r}")
        batch = x.shape[0]
        if (t is None) != (r is None):
            raise ValueError("Give both `t` and `r`, or neither")
        if t is None:
            t, r = self.time_sampler(batch, device=x.device, generator=generator)
        t = _as_batch_times("t", t, batch, x.device)
        r = _as_batch_times("r", r, batch, x.device)
        if bool(((r < 0) | (t > 1) | (r > t)).any()):
            raise ValueError("Times must satisfy 0 <= r <= t <= 1 for every row")
        if self.pair_rows:
            d = (t > r).nonzero().squeeze(1)
            if bool((d % 2 != 0).any()) or bool((d + 1 >= batch).any()) or bool((t[d + 1] > r[d + 1]).any()):
                raise ValueError("pair_rows needs every row with r != t at an even index 2j and r = t at 2j + 1 "
                                 "(TimeSampler(pair_rows=True) draws such times)")
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
        return float(lam), t, r, noise, class_labels

    def __repr__(self) -> str:
        return (f"ModularMeanFlowLoss(time_sampler={self.time_sampler!r}, derivative={self.derivative!r}, "
                f"fd_eps={self.fd_eps}, adaptive_p={self.adaptive_p}, adaptive_c={self.adaptive_c}, "
                f"adaptive_reduction={self.adaptive_reduction!r}, "
                f"tangent={self.tangent!r}, guidance_w={self.guidance_w}, guidance_kappa={self.guidance_kappa}, "
                f"pair_rows={self.pair_rows})")
