"""The adaptive weight of the MMF loss, both definitions, against an independent float64 computation.

MeanFlow (arXiv 2505.13447) weights a sample by ``w = 1 / sg(||delta||^2 + c)^p`` with ``||delta||^2`` the squared
error *summed* over the sample's ``D`` values and uses ``w * ||delta||^2`` as the sample's loss
(``adaptive_reduction="sum"``); the loss's default reduces by the per-element *mean* (``"mean"``), which is the same
as the sum with ``c`` multiplied by ``D`` and a constant factor ``D^(p - 1)``. The references below use a linear
model whose ``du/dt`` is known in closed form, so nothing of the loss's own code path is reused.
"""

import pytest
import torch

from mmf_diffusers import ModularMeanFlowLoss, TimeSampler

SHAPE = (3, 4)  # D = 12 values per sample, reduced over a non-flat shape on purpose
D = 12
B = 6


class Linear(torch.nn.Module):
    """``u(z, r, t) = A z + b t + h (t - r)`` on the flattened sample, so that along the tangent ``(v, 0, 1)`` of
    ``(z, r, t)``: ``du/dt = A v + b + h``."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(0.3 * torch.randn(D, D, generator=g))
        self.b = torch.nn.Parameter(torch.randn(D, generator=g))
        self.h = torch.nn.Parameter(torch.randn(D, generator=g))

    def forward(self, z, r, t):
        flat = z.flatten(1)
        out = flat @ self.A.T + t[:, None].to(flat) * self.b + (t - r)[:, None].to(flat) * self.h
        return out.view_as(z)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SHAPE, generator=g)
    e = torch.randn(B, *SHAPE, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    r = torch.where(torch.arange(B) % 2 == 0, t * torch.rand(B, generator=g), t)  # half the rows r = t
    return x, e, r, t


def reference(model, x, e, r, t, p, c, reduction, lam):
    """float64: per-sample loss and the gradient of the batch mean w.r.t. (A, b, h), written out by hand."""
    A, b, h = (q.detach().double().requires_grad_(True) for q in (model.A, model.b, model.h))
    x, e, r, t = x.double().flatten(1), e.double().flatten(1), r.double(), t.double()
    z = (1 - t)[:, None] * x + t[:, None] * e
    v = e - x
    u = z @ A.T + t[:, None] * b + (t - r)[:, None] * h
    dudt = v @ A.T + b + h  # along the conditional tangent v; exact for the linear model
    dudt = lam * dudt + (1 - lam) * dudt.detach()
    delta = u + (t - r)[:, None] * dudt - v
    total = (delta ** 2).sum(1)
    err = total if reduction == "sum" else total / D
    w = 1.0 / (err.detach() + c) ** p
    per_sample = w * err
    grads = torch.autograd.grad(per_sample.mean(), (A, b, h))
    return per_sample.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_loss_and_gradient_match_float64_reference(reduction, p, lam):
    model = Linear(seed=1)
    x, e, r, t = batch(seed=2)
    loss_fn = ModularMeanFlowLoss(TimeSampler(), derivative="jvp", tangent="conditional", adaptive_p=p,
                                  adaptive_c=1e-3, adaptive_reduction=reduction)
    out = loss_fn(model, x, lam, t=t, r=r, noise=e)
    out.loss.backward()
    want, want_grads = reference(model, x, e, r, t, p, 1e-3, reduction, lam)
    torch.testing.assert_close(out.per_sample.double(), want, rtol=2e-5, atol=1e-7)
    for got, ref in zip((model.A.grad, model.b.grad, model.h.grad), want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    # the logged error is the per-element mean whatever the reduction
    x64, e64, r64, t64 = x.double(), e.double(), r.double(), t.double()
    assert out.stats["mse"] == pytest.approx(float(reference(model, x64, e64, r64, t64, 0.0, 1e-3, "mean", 0.0)[0]
                                                   .mean()), rel=1e-5)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_mean_is_sum_with_c_times_d(p):
    """mean(c) = D^(p - 1) * sum(c * D), per sample: the mean definition only moves c by the dimension."""
    x, e, r, t = batch(seed=3)
    x, e = 0.01 * x, 0.01 * e  # errors of the order of c, so that where c sits matters
    model = Linear(seed=4)
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(0.01)
    outs = {}
    for reduction, c in (("mean", 1e-3), ("sum", 1e-3 * D), ("sum", 1e-3)):
        fn = ModularMeanFlowLoss(TimeSampler(), derivative="jvp", tangent="conditional", adaptive_p=p, adaptive_c=c,
                                 adaptive_reduction=reduction)
        outs[reduction, c] = fn(model, x, 0.0, t=t, r=r, noise=e).per_sample.double()
    torch.testing.assert_close(outs["mean", 1e-3], D ** (p - 1) * outs["sum", 1e-3 * D], rtol=1e-5, atol=0)
    # and c is not negligible here: the same c on the sum gives another loss (so the test can fail)
    assert not torch.allclose(outs["mean", 1e-3], D ** (p - 1) * outs["sum", 1e-3], rtol=1e-3, atol=0)


def test_p1_gradients_agree_when_c_is_negligible():
    """With p = 1 and c -> 0 both definitions give w * err = 1 per sample and the same gradient, grad(S) / S."""
    x, e, r, t = batch(seed=5)
    grads = []
    for reduction in ("mean", "sum"):
        model = Linear(seed=6)
        fn = ModularMeanFlowLoss(TimeSampler(), derivative="jvp", tangent="conditional", adaptive_p=1.0,
                                 adaptive_c=1e-12, adaptive_reduction=reduction)
        out = fn(model, x, 0.0, t=t, r=r, noise=e)
        torch.testing.assert_close(out.per_sample, torch.ones(B), rtol=1e-5, atol=0)
        out.loss.backward()
        grads.append(model.A.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="adaptive_reduction"):
        ModularMeanFlowLoss(adaptive_reduction="max")
    assert "adaptive_reduction='sum'" in repr(ModularMeanFlowLoss(adaptive_reduction="sum"))


def test_training_script_passes_the_reduction(tmp_path):
    """Through training/train_mmf.py as launched: one step on sklearn digits (8x8, D = 64) with p = 0 and each
    reduction, from the same seed: the logged loss of the sum is 64 times the mean's, and the choice is saved."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    import train_mmf

    losses = {}
    for reduction in ("mean", "sum"):
        out = tmp_path / reduction
        argv = ["--dataset_name", "sklearn-digits", "--resolution", "8", "--block_out_channels", "8", "16",
                "--train_batch_size", "8", "--max_train_steps", "1", "--lr_warmup_steps", "0", "--seed", "0",
                "--num_sample_images", "2", "--logger", "none", "--adaptive_p", "0",
                "--adaptive_reduction", reduction, "--output_dir", str(out)]
        assert train_mmf.main(argv) == 0
        record = next(json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()
                      if '"step"' in line)
        losses[reduction] = record["loss"]
        assert json.loads((out / "training_config.json").read_text())["adaptive_reduction"] == reduction
    assert losses["sum"] == pytest.approx(64 * losses["mean"], rel=1e-4)
