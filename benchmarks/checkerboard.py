"""2-D checkerboard benchmarks: quality against the number of network evaluations (NFE), and the lam curriculum.

Conventions: ``t = 0`` data, ``t = 1`` noise; a `TwoTimeMLP` predicts ``u(z, r, t)``. Quality is the sliced
Wasserstein-2 distance (`metrics.sliced_wasserstein`, lower is better) between ``eval_n`` generated points and
``eval_n`` exact checkerboard samples; the same reference set, noise and projections are used for every model of a
run, and the distance of a standard Gaussian and of a second exact sample (the noise floor) are reported beside.

Used by ``benchmarks/run.py`` (``--only quality curriculum``); the functions take plain arguments so that a test can
run them at tiny sizes.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mmf_diffusers import LambdaSchedule, ModularMeanFlowLoss, TimeSampler
from mmf_diffusers.metrics import sliced_wasserstein
from mmf_diffusers.toy import TwoTimeMLP, sample_average_velocity, sample_checkerboard, sample_euler

# lam curricula compared by the curriculum benchmark: (name, shape, lam_start, lam_end).
# Warmups last a third of the run.
SCHEDULES = [
    ("lam0", "constant", 0.0, 0.0),
    ("lam1", "constant", 1.0, 1.0),
    ("linear_0to1", "linear", 0.0, 1.0),
    ("cosine_0to1", "cosine", 0.0, 1.0),
]
TANGENTS = ("conditional", "model")


def make_schedule(name: str, steps: int) -> LambdaSchedule:
    shape, start, end = next((s, a, b) for n, s, a, b in SCHEDULES if n == name)
    if shape == "constant":
        return LambdaSchedule.constant(start)
    return LambdaSchedule(shape, lam_start=start, lam_end=end, warmup_steps=max(1, steps // 3))


class Evaluator:
    """Fixed reference set, noise and projections, so that every model of one run is scored on the same draw."""

    def __init__(self, n: int, seed: int = 12345):
        g = torch.Generator().manual_seed(seed)
        self.reference = sample_checkerboard(n, generator=g)
        self.noise = torch.randn(n, 2, generator=g)
        self.floor = self.distance(sample_checkerboard(n, generator=g))
        self.gaussian = self.distance(torch.randn(n, 2, generator=g))

    def distance(self, samples: torch.Tensor) -> float:
        if not torch.isfinite(samples).all():
            return float("nan")
        return sliced_wasserstein(samples, self.reference, num_projections=256,
                                  generator=torch.Generator().manual_seed(0))

    def mmf(self, model, steps: int) -> float:
        return self.distance(sample_average_velocity(model, self.noise, num_steps=steps))

    def euler(self, model, steps: int) -> float:
        return self.distance(sample_euler(model, self.noise, num_steps=steps))


def train(schedule, tangent: str, lr: float, seed: int, steps: int, batch: int,
          r_neq_t_fraction: float = 0.25, hidden: int = 128, derivative: str = "jvp",
          pair_rows: bool = False, depth: int = 4, adaptive_p: float = 0.0, adaptive_reduction: str = "mean",
          on_step: Optional[Callable[[int, torch.nn.Module], None]] = None) -> Dict:
    """Train a TwoTimeMLP with Adam; returns ``{"model", "losses", "finite", "seconds_per_step"}``.

    ``schedule`` is a name of `SCHEDULES` or a `LambdaSchedule`. ``r_neq_t_fraction = 0`` is plain flow matching
    (every row has ``r = t``; lam and tangent then do nothing). ``on_step(step, model)`` runs after each optimiser
    step (e.g. to score the model on the way). Training stops at the first non-finite loss (``finite = False``)."""
    import time

    torch.manual_seed(seed)
    model = TwoTimeMLP(dim=2, hidden=hidden, depth=depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = ModularMeanFlowLoss(TimeSampler("logit_normal", -0.4, 1.0, r_neq_t_fraction=r_neq_t_fraction,
                                              pair_rows=pair_rows),
                                  derivative=derivative, tangent=tangent, pair_rows=pair_rows,
                                  adaptive_p=adaptive_p, adaptive_c=1e-3, adaptive_reduction=adaptive_reduction)
    lam_schedule = schedule if isinstance(schedule, LambdaSchedule) else make_schedule(schedule, steps)
    g = torch.Generator().manual_seed(10_000 + seed)
    losses: List[float] = []
    finite = True
    start = time.perf_counter()
    for step in range(1, steps + 1):
        out = loss_fn(model, sample_checkerboard(batch, generator=g), lam_schedule(), generator=g)
        value = out.loss.item()
        losses.append(value)
        if not math.isfinite(value):
            finite = False
            break
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        lam_schedule.step()
        if on_step is not None:
            on_step(step, model)
    return {"model": model, "losses": losses, "finite": finite,
            "seconds_per_step": (time.perf_counter() - start) / max(1, len(losses))}


def quality_vs_nfe(steps: int, batch: int, lr: float, eval_n: int, mmf_schedule: str = "linear_0to1",
                   mmf_tangent: str = "model", mmf_steps: Sequence[int] = (1, 2, 4),
                   euler_steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 100), seed: int = 0) -> Dict:
    """Train an MMF model and a flow-matching model with the same budget (steps, batch, lr, architecture), then
    score MMF sampling at ``mmf_steps`` and Euler on ``u(z, t, t)`` of both models at ``euler_steps``."""
    ev = Evaluator(eval_n)
    mmf = train(mmf_schedule, mmf_tangent, lr, seed, steps, batch)
    fm = train("lam0", "conditional", lr, seed, steps, batch, r_neq_t_fraction=0.0)
    rows = []
    for n in mmf_steps:
        rows.append({"sampler": "mmf_average_velocity", "model": "mmf", "nfe": n, "sw": ev.mmf(mmf["model"], n)})
    for name, run in (("mmf", mmf), ("flow_matching", fm)):
        for n in euler_steps:
            rows.append({"sampler": "euler_instantaneous", "model": name, "nfe": n, "sw": ev.euler(run["model"], n)})
    one_step = next(r["sw"] for r in rows if r["sampler"] == "mmf_average_velocity" and r["nfe"] == 1)
    multi = [r for r in rows if r["nfe"] > 1 and math.isfinite(r["sw"])]
    best = min(multi, key=lambda r: r["sw"]) if multi else None
    ratio = one_step / best["sw"] if best else None
    return {
        "config": {"train_steps": steps, "batch": batch, "lr": lr, "eval_n": eval_n, "seed": seed,
                   "mmf_schedule": mmf_schedule, "mmf_tangent": mmf_tangent, "r_neq_t_fraction": 0.25,
                   "time_sampler": "logit_normal(-0.4, 1.0)", "model": "TwoTimeMLP(hidden=128, depth=4)"},
        "noise_floor_sw": ev.floor,
        "gaussian_sw": ev.gaussian,
        "train_ms_per_step": {"mmf": 1000 * mmf["seconds_per_step"], "flow_matching": 1000 * fm["seconds_per_step"]},
        "rows": rows,
        "mmf_1step_sw": one_step,
        "best_multistep": best,
        "ratio_1step_to_best_multistep": ratio,
        "target_ratio": 1.3,
        "meets_target": bool(ratio is not None and ratio <= 1.3),
    }


def _curriculum_run(job) -> Dict:
    schedule, tangent, lr, seed, steps, batch, eval_n, threads = job
    torch.set_num_threads(threads)
    ev = Evaluator(eval_n)
    run = train(schedule, tangent, lr, seed, steps, batch)
    losses = run["losses"]
    tail = losses[-max(2, len(losses) // 4):]
    out = {"schedule": schedule, "tangent": tangent, "lr": lr, "seed": seed, "finite": run["finite"],
           "steps_done": len(losses), "ms_per_step": 1000 * run["seconds_per_step"],
           "loss_var_last_quarter": statistics.variance(tail) if run["finite"] and len(tail) > 1 else float("nan"),
           "loss_mean_last_quarter": statistics.fmean(tail) if run["finite"] else float("nan"),
           "sw_1step": float("nan"), "sw_2step": float("nan"), "sw_euler64": float("nan")}
    if run["finite"]:
        out.update(sw_1step=ev.mmf(run["model"], 1), sw_2step=ev.mmf(run["model"], 2),
                   sw_euler64=ev.euler(run["model"], 64))
    out["diverged"] = (not run["finite"]) or not math.isfinite(out["sw_1step"]) or out["sw_1step"] > ev.gaussian
    return out


def _mean_std(values: List[float]) -> Dict:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def curriculum(steps: int, batch: int, lrs: Sequence[float], seeds: int, eval_n: int, workers: int = 1,
               schedules: Optional[Sequence[str]] = None, tangents: Sequence[str] = TANGENTS) -> Dict:
    """Every (schedule, tangent, lr, seed); summary per (schedule, tangent, lr): diverged runs, one-step SW mean and
    std over the seeds that did not diverge, loss variance over the last quarter of training."""
    schedules = list(schedules or [s[0] for s in SCHEDULES])
    jobs = [(s, tg, lr, seed, steps, batch, eval_n, 1)
            for s in schedules for tg in tangents for lr in lrs for seed in range(seeds)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            runs = pool.map(_curriculum_run, jobs, chunksize=1)
    else:
        runs = [_curriculum_run(j) for j in jobs]
    ev = Evaluator(eval_n)
    summary = []
    for s in schedules:
        for tg in tangents:
            for lr in lrs:
                sel = [r for r in runs if r["schedule"] == s and r["tangent"] == tg and r["lr"] == lr]
                ok = [r for r in sel if not r["diverged"]]
                summary.append({
                    "schedule": s, "tangent": tg, "lr": lr, "runs": len(sel),
                    "diverged": sum(r["diverged"] for r in sel),
                    "sw_1step": _mean_std([r["sw_1step"] for r in ok]),
                    "sw_2step": _mean_std([r["sw_2step"] for r in ok]),
                    "sw_euler64": _mean_std([r["sw_euler64"] for r in ok]),
                    "sw_1step_all_runs": _mean_std([r["sw_1step"] for r in sel]),
                    "loss_var_last_quarter": _mean_std([r["loss_var_last_quarter"] for r in sel]),
                })
    return {
        "config": {"train_steps": steps, "batch": batch, "lrs": list(lrs), "seeds": seeds, "eval_n": eval_n,
                   "warmup_steps": max(1, steps // 3), "r_neq_t_fraction": 0.25, "derivative": "jvp",
                   "time_sampler": "logit_normal(-0.4, 1.0)", "model": "TwoTimeMLP(hidden=128, depth=4)",
                   "diverged_means": "non-finite loss, or final one-step SW above the Gaussian's"},
        "noise_floor_sw": ev.floor,
        "gaussian_sw": ev.gaussian,
        "summary": summary,
        "runs": runs,
    }
