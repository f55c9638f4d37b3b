"""Tests for MMF on 1-D trajectories: `MMFTrajectoryPipeline`, the two-time `UNet1DModel` helpers, the simulated data
and metrics in `mmf_diffusers.trajectories`, and ``train_mmf.py --modality trajectory``.

Time convention: t = 0 is data, t = 1 is noise, 0 <= r <= t <= 1. Trajectories are ``(B, C, L)``. The second time
``h = t - r`` and a known-entries mask reach the stock UNet1DModel through its ``extra_in_channels``; derivative
tests run in float64 against `torch.autograd.functional.jvp` (reverse mode) as the reference.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmf_diffusers import (
    MMFScheduler,
    MMFTrajectoryPipeline,
    ModularMeanFlowLoss,
    TimeSampler,
    build_mmf_unet1d,
    trajectory_average_velocity,
    trajectory_model_fn,
)
from mmf_diffusers.trajectories import (
    SYSTEMS,
    TrajectoryDataset,
    channel_stats,
    derivative_scale,
    distribution_distance,
    dynamics_residual,
    get_system,
    load_trajectories_npy,
    make_trajectories,
    simulate,
)
from mmf_diffusers.unet1d import augment, freeze_known_entries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 16


def tiny_unet(channels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_mmf_unet1d(channels, LENGTH, block_out_channels=(8, 16))


def tiny_pipeline(seed: int = 0) -> MMFTrajectoryPipeline:
    pipe = MMFTrajectoryPipeline(tiny_unet(seed=seed), MMFScheduler(), channel_mean=[0.1, -0.2],
                                 channel_std=[0.5, 2.0], channel_names=["theta", "omega"], dt=0.05, system="pendulum")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def times(dtype=torch.float32):
    t = torch.tensor([1.0, 0.7, 0.4], dtype=dtype)
    r = torch.tensor([0.0, 0.2, 0.4], dtype=dtype)
    return r, t


# ----------------------------------------------------------------------------------------------------------------
# The backbone and the second time
# ----------------------------------------------------------------------------------------------------------------


def test_build_mmf_unet1d_is_a_stock_unet1d():
    unet = tiny_unet()
    assert type(unet).__name__ == "UNet1DModel" and type(unet).__module__.startswith("diffusers.")
    assert unet.config.extra_in_channels == 1 + 8
    assert unet.config.time_embedding_type == "positional" and unet.config.use_timestep_embedding
    for kwargs, message in [(dict(length=15), "divisible"), (dict(block_out_channels=(8, 12)), "divide by 8"),
                            (dict(second_time_channels=3), "even")]:
        args = dict(channels=2, length=LENGTH, block_out_channels=(8, 16)) | kwargs
        with pytest.raises(ValueError, match=message):
            build_mmf_unet1d(**args)


def test_second_time_and_t_change_the_output_and_known_entries_get_zero_velocity():
    unet = tiny_unet()
    z = torch.randn(3, 2, LENGTH, generator=torch.Generator().manual_seed(0))
    r, t = times()
    with torch.no_grad():
        u = trajectory_average_velocity(unet, z, None, r, t)
        assert u.shape == z.shape
        other_r = trajectory_average_velocity(unet, z, None, torch.zeros(3), t)  # same t, other h
        other_t = trajectory_average_velocity(unet, z, None, r * 0.5, t * 0.5 + 0.1)
        mask = torch.zeros(3, 1, LENGTH)
        mask[:, :, 0] = 1
        masked = trajectory_average_velocity(unet, z, mask, r, t)
    assert (u[1:] - other_r[1:]).abs().max() > 1e-3  # h changed (rows 1, 2), t did not
    assert torch.allclose(u[0], other_r[0])  # row 0 already had r = 0
    assert (u - other_t).abs().max() > 1e-3
    assert torch.all(masked[:, :, 0] == 0)
    assert (masked[:, :, 1:] - u[:, :, 1:]).abs().max() > 1e-4  # the mask is an input the network sees


def test_jvp_through_unet1d_matches_reverse_mode_reference_float64():
    unet = tiny_unet().double()
    fn = trajectory_model_fn(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, LENGTH, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 1, LENGTH, dtype=torch.float64)
    mask[0, :, 0] = 1
    z = augment(x, mask)
    r, t = times(torch.float64)
    v = freeze_known_entries(z, torch.randn(z.shape, generator=g, dtype=torch.float64)) - z

    def along_flow(z_, t_):
        return fn(z_, r, t_)

    u, dudt = torch.func.jvp(along_flow, (z, t), (v, torch.ones_like(t)))
    u_ref, dudt_ref = torch.autograd.functional.jvp(along_flow, (z, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(u, u_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dudt, dudt_ref, rtol=1e-9, atol=1e-11)
    assert dudt.abs().mean() > 1e-2
    assert torch.all(u[:, -1] == 0) and torch.all(dudt[:, -1] == 0)  # the mask channel never moves
    assert torch.all(u[0, :, 0] == 0) and torch.all(dudt[0, :, 0] == 0)  # neither does the known state


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference"])
def test_mmf_loss_runs_through_the_1d_model(derivative):
    unet = tiny_unet()
    fn = trajectory_model_fn(unet)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, LENGTH, generator=g)
    mask = torch.zeros(8, 1, LENGTH)
    mask[::2, :, 0] = 1
    x_aug = augment(x, mask)
    noise = freeze_known_entries(x_aug, torch.randn(x_aug.shape, generator=g))
    sampler = TimeSampler("logit_normal", r_neq_t_fraction=0.5)
    for lam in (0.0, 0.5):
        loss_fn = ModularMeanFlowLoss(sampler, derivative=derivative, tangent="model")
        unet.zero_grad()
        out = loss_fn(fn, x_aug, lam, noise=noise, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.stats["mean_abs_dudt"] > 0
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(gr).all() for gr in grads)


def test_freeze_known_entries_keeps_them_on_the_path():
    x = torch.randn(4, 2, LENGTH)
    mask = torch.zeros(4, 1, LENGTH)
    mask[1:3, :, 0] = 1
    x_aug = augment(x, mask)
    noise = freeze_known_entries(x_aug, torch.randn_like(x_aug))
    for t in (0.3, 1.0):
        z = (1 - t) * x_aug + t * noise
        torch.testing.assert_close(z[1:3, :2, 0], x[1:3, :, 0])
        torch.testing.assert_close(z[:, 2], mask[:, 0])
    assert not torch.allclose(noise[0, :2, 0], x[0, :, 0])  # unconditioned rows keep their noise


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def test_pipeline_shapes_determinism_and_output_types():
    pipe = tiny_pipeline()
    a = pipe(num_samples=3, generator=torch.Generator().manual_seed(0)).trajectories
    b = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").trajectories
    assert isinstance(a, np.ndarray) and a.shape == (3, 2, LENGTH) and a.dtype == np.float32
    assert torch.is_tensor(b) and torch.equal(torch.from_numpy(a), b)
    c = pipe(num_samples=3, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectories
    assert not np.allclose(a, c)
    (d,) = pipe(latents=torch.zeros(2, 2, LENGTH), return_dict=False)
    assert d.shape == (2, 2, LENGTH)
    for kwargs in [dict(output_type="pil"), dict(num_samples=2, batch_size=3), dict(num_inference_steps=0),
                   dict(latents=torch.zeros(2, 2, 8)), dict(length=15), dict(start_state=torch.zeros(3)),
                   dict(start_state=torch.zeros(2, 2), num_samples=3)]:
        with pytest.raises(ValueError):
            pipe(**kwargs)


@pytest.mark.parametrize("steps", [1, 3])
def test_conditioning_reproduces_the_start_state_exactly(steps):
    pipe = tiny_pipeline()
    start = torch.tensor([[0.3, -1.1], [1.7, 0.25], [-0.05, 3.0]])
    out = pipe(start_state=start, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="pt").trajectories
    assert torch.equal(out[:, :, 0], start)
    # Exact in normalised units too, before the copy back: the known entries never moved.
    normalised = pipe.normalize(out)
    assert torch.equal(normalised[:, :, 0], pipe.normalize(start))
    # One state, repeated: several futures from the same place, which differ.
    futures = pipe(num_samples=4, start_state=np.array([0.3, -1.1]), generator=torch.Generator().manual_seed(1)).trajectories
    assert futures.shape == (4, 2, LENGTH) and np.all(futures[:, :, 0] == np.float32([0.3, -1.1]))
    assert np.abs(futures[0, :, 1:] - futures[1, :, 1:]).max() > 1e-3


def test_save_load_round_trip(tmp_path):
    pipe = tiny_pipeline(seed=3)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "MMFTrajectoryPipeline" and index["unet"] == ["diffusers", "UNet1DModel"]
    assert index["channel_mean"] == [0.1, -0.2] and index["channel_std"] == [0.5, 2.0]
    loaded = MMFTrajectoryPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.channel_names == "theta,omega" and loaded.config.dt == 0.05
    # A list of strings in model_index.json would be taken for a [module, class] component by diffusers' download.
    assert index["channel_names"] == "theta,omega"
    with pytest.raises(ValueError, match="channel_names"):
        MMFTrajectoryPipeline(tiny_unet(), MMFScheduler(), channel_names=["theta", "omega,2"])
    for kwargs in (dict(num_samples=2), dict(start_state=torch.tensor([0.2, 0.1]), num_samples=2)):
        a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).trajectories
        b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).trajectories
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Data and metrics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_dynamics_residual_of_ground_truth_is_small_and_of_noise_large(name):
    system = get_system(name)
    scale = derivative_scale(system, 32, n=64)
    truth = make_trajectories(system, 32, 32, "train", seed=0)
    ood = make_trajectories(system, 32, 32, "ood", seed=1)
    mean, std = channel_stats(truth)
    noise = mean.view(1, -1, 1) + std.view(1, -1, 1) * torch.randn(truth.shape, dtype=torch.float64,
                                                                  generator=torch.Generator().manual_seed(0))
    assert dynamics_residual(system, truth, scale).max() < 0.01
    assert dynamics_residual(system, ood, scale).max() < 0.02
    assert dynamics_residual(system, noise, scale).min() > 1.0
    # A trajectory of the wrong system (no gravity: a straight line in theta) is penalised too.
    assert distribution_distance(truth, truth, mean, std) == 0.0
    assert distribution_distance(truth, noise, mean, std) > 0.2


def test_simulation_against_the_analytic_small_angle_pendulum():
    system = get_system("pendulum")
    theta0 = 1e-3  # linear regime: theta(t) = theta0 e^{-g t / 2} (cos(w t) + g / (2 w) sin(w t))
    x = simulate(system, torch.tensor([[theta0, 0.0]], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64),
                 40)
    tt = torch.arange(40, dtype=torch.float64) * system.dt
    w = (9.81 - 0.3**2 / 4) ** 0.5
    exact = theta0 * torch.exp(-0.15 * tt) * (torch.cos(w * tt) + 0.15 / w * torch.sin(w * tt))
    torch.testing.assert_close(x[0, 0], exact, rtol=0, atol=theta0 * 2e-4)  # sin(theta) ~ theta to 1e-7


def test_ood_initial_states_are_outside_the_training_range():
    system = get_system("pendulum")
    train = make_trajectories(system, 64, 4, "train", seed=0)[:, :, 0]
    ood = make_trajectories(system, 64, 4, "ood", seed=0)[:, :, 0]
    assert train[:, 0].abs().max() <= 1.2 and ood[:, 0].abs().min() >= 1.6


def test_load_trajectories_npy_layouts(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3, 7))
    np.save(tmp_path / "ncl.npy", x)
    np.save(tmp_path / "nlc.npy", x.transpose(0, 2, 1))
    torch.testing.assert_close(load_trajectories_npy(str(tmp_path / "ncl.npy")), torch.from_numpy(x))
    torch.testing.assert_close(load_trajectories_npy(str(tmp_path / "nlc.npy"), layout="NLC"), torch.from_numpy(x))
    np.save(tmp_path / "bad.npy", x[0])
    with pytest.raises(ValueError, match="expected"):
        load_trajectories_npy(str(tmp_path / "bad.npy"))


def test_dataset_normalises_and_marks_conditioned_rows():
    x = make_trajectories(get_system("pendulum"), 200, 8, seed=0)
    mean, std = channel_stats(x)
    dataset = TrajectoryDataset(x, mean, std, condition_prob=0.5, seed=1)
    items = np.stack([dataset[(i, 0)] for i in range(len(dataset))])
    assert items.shape == (200, 3, 8)
    np.testing.assert_allclose(items[:, :2].mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(items[:, :2].std(axis=(0, 2)), 1, atol=1e-2)
    share = items[:, 2, 0].mean()
    assert 0.35 < share < 0.65 and items[:, 2, 1:].max() == 0
    assert np.array_equal(dataset[(5, 3)], dataset[(5, 3)])


# ----------------------------------------------------------------------------------------------------------------
# Training script
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_script_trajectory_modality_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, os.path.join(ROOT, "training", "train_mmf.py"), "--modality", "trajectory",
               "--trajectory_system", "pendulum", "--trajectory_length", "16", "--trajectory_num_train", "32",
               "--block_out_channels", "8", "16", "--train_batch_size", "8", "--max_train_steps", "3",
               "--checkpointing_steps", "3", "--num_sample_images", "2", "--logger", "none", "--seed", "0",
               "--lr_warmup_steps", "0", "--output_dir", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "model_index.json",
                 "README.md", "sample_grid.png", "checkpoint-3"):
        assert (out / name).exists(), name
    pipe = MMFTrajectoryPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.system == "pendulum" and len(pipe.config.channel_std) == 2
    start = torch.tensor([0.4, -0.3])
    x = pipe(num_samples=2, start_state=start, output_type="pt").trajectories
    assert x.shape == (2, 2, 16) and torch.equal(x[:, :, 0], start.expand(2, 2))
    # Bad input is refused before training.
    bad = subprocess.run(command[:-2] + ["--trajectory_length", "15", "--output_dir", str(tmp_path / "bad")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "divisible" in bad.stderr
