"""Tests for `MMFScheduler`.

diffusers' common scheduler test-suite (`SchedulerCommonTest`) cannot be used here: `step` takes a target time
`r_timestep` besides `timestep`, a non-standard signature (diffusers' own `FlowMapEulerDiscreteScheduler` tests say
the same). These tests check the contract directly: the grid, the update `z_r = z_t - (t - r) * u` with exact
answers in float64, agreement with `FlowMapEulerDiscreteScheduler` on the same inputs, the forward process
`z_t = (1 - t) * x + t * e`, serialisation, and every refused input.

Time convention: t = 0 is data, t = 1 is noise; timesteps are t * num_train_timesteps.
"""

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler

from mmf_diffusers.scheduling_mmf import MMFScheduler, MMFSchedulerOutput

SCHEDULER_FILE = Path(__file__).resolve().parents[1] / "src" / "mmf_diffusers" / "scheduling_mmf.py"


def make_pair(num_inference_steps=None, shift=1.0, **grid):
    """An MMFScheduler and a FlowMapEulerDiscreteScheduler with the same config and grid."""
    mmf = MMFScheduler(shift=shift)
    flow_map = FlowMapEulerDiscreteScheduler(shift=shift)
    mmf.set_timesteps(num_inference_steps, **grid)
    flow_map.set_timesteps(num_inference_steps, **grid)
    return mmf, flow_map


def random_pair(shape=(2, 3, 4, 4), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    model_output = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return sample, model_output


# ----------------------------------------------------------------------------------------------------------------
# Configuration and serialisation
# ----------------------------------------------------------------------------------------------------------------


def test_defaults():
    scheduler = MMFScheduler()
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.shift == 1.0
    assert scheduler.order == 1
    assert scheduler.init_noise_sigma == 1.0
    assert len(scheduler) == 1000
    assert "FlowMapEulerDiscreteScheduler" in MMFScheduler._compatibles
    assert FlowMapEulerDiscreteScheduler in scheduler.compatibles


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_new_scheduler_has_flow_maps_default_grid(shift):
    """diffusers' convention: a scheduler has a grid from construction (FlowMap's is the 1000-step training grid)."""
    mmf, flow_map = MMFScheduler(shift=shift), FlowMapEulerDiscreteScheduler(shift=shift)
    assert mmf.num_inference_steps == flow_map.num_inference_steps == 1000
    assert mmf.timesteps.shape == (1000,) and mmf.sigmas.shape == (1001,)
    torch.testing.assert_close(mmf.sigmas.double(), flow_map.sigmas, atol=1e-7, rtol=0)
    torch.testing.assert_close(mmf.timesteps.double(), flow_map.timesteps, atol=1e-4, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    scheduler = MMFScheduler(num_train_timesteps=500, shift=3.0)
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "MMFScheduler"
    assert saved["num_train_timesteps"] == 500 and saved["shift"] == 3.0

    loaded = MMFScheduler.from_pretrained(tmp_path)
    assert isinstance(loaded, MMFScheduler)
    assert dict(loaded.config) == dict(scheduler.config)


def test_from_config_with_flow_map_both_ways():
    mmf = MMFScheduler(num_train_timesteps=800, shift=2.5)
    flow_map = FlowMapEulerDiscreteScheduler.from_config(mmf.config)
    assert isinstance(flow_map, FlowMapEulerDiscreteScheduler)
    assert (flow_map.config.num_train_timesteps, flow_map.config.shift) == (800, 2.5)

    back = MMFScheduler.from_config(flow_map.config)
    assert isinstance(back, MMFScheduler)
    assert (back.config.num_train_timesteps, back.config.shift) == (800, 2.5)


def test_scale_model_input_is_identity():
    sample = torch.randn(2, 3)
    assert MMFScheduler().scale_model_input(sample) is sample
    assert MMFScheduler().scale_model_input(sample, 500.0) is sample


def test_file_imports_only_torch_numpy_diffusers():
    # The file ships alone as Hub remote code, so it must not import the package it lives in.
    tree = ast.parse(SCHEDULER_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    assert roots <= {"dataclasses", "typing", "numpy", "torch", "diffusers"}


def test_file_loads_standalone():
    spec = importlib.util.spec_from_file_location("scheduling_mmf_standalone", SCHEDULER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scheduler = module.MMFScheduler()
    scheduler.set_timesteps(1)
    sample, model_output = random_pair(dtype=torch.float64)
    torch.testing.assert_close(scheduler.step(model_output, 1000.0, sample).prev_sample, sample - model_output)


# ----------------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_inference_steps", [1, 2, 4, 7])
def test_default_grid(num_inference_steps):
    mmf, flow_map = make_pair(num_inference_steps)
    expected = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
    assert mmf.sigmas.dtype == torch.float32 and mmf.timesteps.dtype == torch.float32
    assert mmf.sigmas.shape == (num_inference_steps + 1,)
    assert mmf.timesteps.shape == (num_inference_steps,)
    assert mmf.num_inference_steps == num_inference_steps
    torch.testing.assert_close(mmf.sigmas.double(), expected)
    torch.testing.assert_close(mmf.timesteps, mmf.sigmas[:-1] * 1000)
    torch.testing.assert_close(mmf.sigmas.double(), flow_map.sigmas)
    torch.testing.assert_close(mmf.timesteps.double(), flow_map.timesteps)
    assert mmf.sigmas[0] == 1.0 and mmf.sigmas[-1] == 0.0


def test_one_step_grid_is_one_to_zero():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(1)
    assert scheduler.sigmas.tolist() == [1.0, 0.0]
    assert scheduler.timesteps.tolist() == [1000.0]


@pytest.mark.parametrize(
    "grid",
    [
        {"sigmas": [1.0, 0.6, 0.25]},
        {"sigmas": torch.tensor([0.9, 0.3])},
        {"timesteps": [1000.0, 700.0, 100.0]},
        {"num_inference_steps": 2, "sigmas": [0.8, 0.1]},
    ],
)
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # FlowMap's torch.tensor(tensor)
def test_custom_grid_matches_flow_map(grid, shift):
    grid = dict(grid)
    num_inference_steps = grid.pop("num_inference_steps", None)
    mmf, flow_map = make_pair(num_inference_steps, shift=shift, **grid)
    torch.testing.assert_close(mmf.sigmas.double(), flow_map.sigmas)
    torch.testing.assert_close(mmf.timesteps.double(), flow_map.timesteps)
    assert mmf.sigmas[-1] == 0.0


def test_shift_grid_matches_formula():
    shift = 3.0
    scheduler = MMFScheduler(shift=shift)
    scheduler.set_timesteps(5)
    s = torch.linspace(1.0, 0.0, 6, dtype=torch.float64)
    torch.testing.assert_close(scheduler.sigmas.double(), shift * s / (1 + (shift - 1) * s))


def test_set_timesteps_resets_state():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair()
    scheduler.step(model_output, scheduler.timesteps[0], sample)
    assert scheduler.step_index == 1
    scheduler.set_timesteps(2)
    assert scheduler.step_index is None and scheduler.begin_index is None


# ----------------------------------------------------------------------------------------------------------------
# step
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_step_shape_and_dtype(dtype):
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair(dtype=dtype)
    prev_sample = scheduler.step(model_output, scheduler.timesteps[1], sample, r_timestep=300.0).prev_sample
    assert prev_sample.shape == sample.shape
    assert prev_sample.dtype == dtype
    expected = sample.double() - 0.45 * model_output.double()
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(prev_sample.double(), expected, atol=tolerance, rtol=tolerance)
    if dtype != torch.float64:
        # Half-precision inputs are computed in float32 and rounded once at the end.
        interval = torch.tensor(0.75) - torch.tensor(300.0) / 1000
        in_float32 = (sample.float() - interval * model_output.float()).to(dtype)
        torch.testing.assert_close(prev_sample, in_float32, atol=0, rtol=0)


def test_step_output_dtype_follows_model_output():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(2)
    sample = torch.randn(2, 3)
    model_output = torch.randn(2, 3, dtype=torch.float16)
    assert scheduler.step(model_output, 1000.0, sample).prev_sample.dtype == torch.float16


def test_step_float64_is_exact():
    # float64 inputs are computed in float64 (on float32 sigmas, exact for this grid).
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair(dtype=torch.float64)
    prev_sample = scheduler.step(model_output, 750.0, sample).prev_sample
    torch.testing.assert_close(prev_sample, sample - 0.25 * model_output, atol=0, rtol=0)


def test_step_dict_and_tuple():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair()
    output = scheduler.step(model_output, scheduler.timesteps[0], sample)
    assert isinstance(output, MMFSchedulerOutput)
    as_tuple = scheduler.step(model_output, scheduler.timesteps[0], sample, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], output.prev_sample, atol=0, rtol=0)


@pytest.mark.parametrize("timestep", [1000.0, 437.5, 0.0])
def test_zero_interval_returns_input(timestep):
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair()
    prev_sample = scheduler.step(model_output, timestep, sample, r_timestep=timestep).prev_sample
    torch.testing.assert_close(prev_sample, sample, atol=0, rtol=0)


def test_one_shot_from_noise_to_data():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(1)
    sample, model_output = random_pair(dtype=torch.float64)
    prev_sample = scheduler.step(model_output, scheduler.timesteps[0], sample).prev_sample
    torch.testing.assert_close(prev_sample, sample - model_output, atol=0, rtol=0)
    explicit = scheduler.step(model_output, 1000.0, sample, r_timestep=0.0).prev_sample
    torch.testing.assert_close(explicit, sample - model_output, atol=0, rtol=0)


@pytest.mark.parametrize("num_inference_steps", [1, 2, 4, 7])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rollout_with_constant_velocity(num_inference_steps, shift):
    # The intervals of a grid add up to 1, so a constant u carries z_1 to exactly z_1 - u.
    scheduler = MMFScheduler(shift=shift)
    scheduler.set_timesteps(num_inference_steps)
    sample, model_output = random_pair(dtype=torch.float64)
    z = sample
    for i, t in enumerate(scheduler.timesteps):
        z = scheduler.step(model_output, t, z).prev_sample
        assert scheduler.step_index == i + 1
    torch.testing.assert_close(z, sample - model_output, atol=1e-6, rtol=0)


def test_rollout_on_custom_sigmas():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(sigmas=[1.0, 0.6, 0.25])
    sample, model_output = random_pair(dtype=torch.float64)
    z = sample
    for t in scheduler.timesteps:
        z = scheduler.step(model_output, t, z).prev_sample
    torch.testing.assert_close(z, sample - model_output, atol=1e-6, rtol=0)
    first = scheduler.step(model_output, scheduler.timesteps[0], sample).prev_sample
    torch.testing.assert_close(first, sample - 0.4 * model_output, atol=1e-6, rtol=0)


def test_per_sample_timesteps():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair(shape=(3, 2, 4, 4), dtype=torch.float64)
    t = torch.tensor([1000.0, 500.0, 300.0], dtype=torch.float64)
    r = torch.tensor([0.0, 250.0, 300.0], dtype=torch.float64)
    prev_sample = scheduler.step(model_output, t, sample, r_timestep=r).prev_sample
    for i in range(3):
        row = scheduler.step(model_output[i : i + 1], float(t[i]), sample[i : i + 1], r_timestep=float(r[i]))
        torch.testing.assert_close(prev_sample[i : i + 1], row.prev_sample, atol=0, rtol=0)
    expected = sample - torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64).view(3, 1, 1, 1) * model_output
    torch.testing.assert_close(prev_sample, expected, atol=1e-7, rtol=0)


def test_per_sample_timesteps_default_to_each_next_grid_point():
    # FlowMap looks up only the first element; here every sample steps to its own next grid point.
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair(shape=(2, 5), dtype=torch.float64)
    prev_sample = scheduler.step(model_output, torch.tensor([1000.0, 250.0]), sample).prev_sample
    torch.testing.assert_close(prev_sample, sample - 0.25 * model_output, atol=0, rtol=0)


def test_scalar_time_broadcasts_with_per_sample_target():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(2)
    sample, model_output = random_pair(shape=(2, 5), dtype=torch.float64)
    prev_sample = scheduler.step(model_output, 1000.0, sample, r_timestep=torch.tensor([500.0, 0.0])).prev_sample
    expected = sample - torch.tensor([[0.5], [1.0]], dtype=torch.float64) * model_output
    torch.testing.assert_close(prev_sample, expected, atol=0, rtol=0)


def test_step_is_idempotent_and_accepts_generator():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair()
    a = scheduler.step(model_output, 750.0, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    b = scheduler.step(model_output, 750.0, sample).prev_sample
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_step_index_and_begin_index():
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair()
    assert scheduler.step_index is None
    scheduler.step(model_output, scheduler.timesteps[2], sample)
    assert scheduler.step_index == 3
    assert scheduler.index_for_timestep(scheduler.timesteps[1]) == 1
    assert scheduler.index_for_timestep(123.0) is None

    scheduler.set_timesteps(4)
    scheduler.set_begin_index(1)
    scheduler.step(model_output, scheduler.timesteps[2], sample)
    assert scheduler.step_index == 2

    scheduler.set_timesteps(4)
    scheduler.step(model_output, 600.0, sample, r_timestep=100.0)  # off the grid: the counter starts at 0
    assert scheduler.step_index == 1


# ----------------------------------------------------------------------------------------------------------------
# Agreement with FlowMapEulerDiscreteScheduler
# ----------------------------------------------------------------------------------------------------------------

FLOW_MAP_CASES = [
    # (set_timesteps kwargs, shift, [(timestep index or value, r_timestep index or value or None), ...])
    ({"num_inference_steps": 4}, 1.0, [(0, None), (1, None), (3, None), (0, 2), (1, 0.0)]),
    ({"num_inference_steps": 7}, 1.0, [(i, None) for i in range(7)]),
    ({"num_inference_steps": 1}, 1.0, [(0, None)]),
    ({"num_inference_steps": 5}, 3.0, [(i, None) for i in range(5)] + [(0, 4), (1, 333.0)]),
    ({"sigmas": [1.0, 0.6, 0.25]}, 1.0, [(0, None), (1, None), (2, None), (0, 2)]),
    ({"sigmas": [0.95, 0.5, 0.2]}, 2.0, [(0, None), (1, None), (2, None)]),
    ({"timesteps": [1000.0, 700.0, 100.0]}, 1.0, [(0, None), (1, None), (2, None)]),
    # Off the grid: both ends given explicitly, resolved as timestep / num_train_timesteps.
    ({"num_inference_steps": 4}, 1.0, [(870.0, 420.0), (600.0, 0.0), (999.5, 998.0)]),
    ({"num_inference_steps": 4}, 3.0, [(870.0, 420.0), (0, 420.0)]),
]


def _resolve(value, timesteps):
    if value is None:
        return None
    return timesteps[value] if isinstance(value, int) else torch.tensor(value, dtype=torch.float64)


@pytest.mark.parametrize("grid, shift, pairs", FLOW_MAP_CASES)
@pytest.mark.parametrize("as_batch", [False, True])
def test_step_matches_flow_map(grid, shift, pairs, as_batch):
    grid = dict(grid)
    num_inference_steps = grid.pop("num_inference_steps", None)
    mmf, flow_map = make_pair(num_inference_steps, shift=shift, **grid)
    sample, model_output = random_pair()
    for t_spec, r_spec in pairs:
        for scheduler in (mmf, flow_map):
            t = _resolve(t_spec, scheduler.timesteps)
            r = _resolve(r_spec, scheduler.timesteps)
            if as_batch:  # FlowMap's own tests pass length-1 slices such as timesteps[0:1]
                t = t.reshape(1)
                r = None if r is None else r.reshape(1)
            prev = scheduler.step(model_output, t, sample, r_timestep=r).prev_sample
            if scheduler is mmf:
                ours = prev
            else:
                theirs = prev
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_flow_map_timesteps_drive_mmf():
    # A pipeline written for FlowMap hands over its float64 timesteps; MMF must find them on its float32 grid.
    mmf, flow_map = make_pair(7, shift=3.0)
    sample, model_output = random_pair()
    for t in flow_map.timesteps:
        ours = mmf.step(model_output, t, sample).prev_sample
        theirs = flow_map.step(model_output, t, sample).prev_sample
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Forward process
# ----------------------------------------------------------------------------------------------------------------


def test_noising_is_the_linear_path():
    scheduler = MMFScheduler(shift=3.0)  # the shift belongs to the inference grid, never to the path
    x, e = random_pair(shape=(3, 2, 4), dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    expected = (1 - t.view(3, 1, 1)) * x + t.view(3, 1, 1) * e
    torch.testing.assert_close(scheduler.interpolate(x, e, t), expected, atol=0, rtol=0)
    torch.testing.assert_close(scheduler.scale_noise(x, t * 1000, e), expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(scheduler.add_noise(x, e, t * 1000), expected, atol=1e-15, rtol=0)
    # Scalars, Python numbers and integer training-style timesteps are accepted here.
    torch.testing.assert_close(scheduler.interpolate(x, e, 0.25), 0.75 * x + 0.25 * e, atol=0, rtol=0)
    torch.testing.assert_close(scheduler.add_noise(x, e, 250), 0.75 * x + 0.25 * e, atol=1e-15, rtol=0)
    by_index = scheduler.add_noise(x, e, torch.tensor([0, 250, 1000]))
    torch.testing.assert_close(by_index, scheduler.interpolate(x, e, torch.tensor([0.0, 0.25, 1.0])), atol=1e-15, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_noise_matches_flow_map(dtype):
    mmf, flow_map = MMFScheduler(), FlowMapEulerDiscreteScheduler()
    x, e = random_pair(shape=(3, 2, 4), dtype=dtype)
    timesteps = torch.tensor([0.0, 412.5, 1000.0])
    ours = mmf.scale_noise(x, timesteps, e)
    theirs = flow_map.scale_noise(x, timesteps, e)
    assert ours.dtype == theirs.dtype == dtype
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


# ----------------------------------------------------------------------------------------------------------------
# Refused input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_inference_steps", [0, -3, 2.5, 4.0, True, "4"])
def test_bad_num_inference_steps(num_inference_steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        MMFScheduler().set_timesteps(num_inference_steps)


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"sigmas": [1.0, 0.5, 0.7]}, "strictly decrease"),
        ({"sigmas": [0.5, 0.5]}, "strictly decrease"),
        ({"sigmas": [1.0, 0.5, 0.0]}, "terminal 0"),
        ({"sigmas": [1.2, 0.5]}, r"\[0, 1\]"),
        ({"sigmas": [1.0, -0.1]}, r"\[0, 1\]"),
        ({"sigmas": [1.0, float("nan")]}, r"\[0, 1\]"),
        ({"sigmas": []}, "non-empty"),
        ({"timesteps": [1200.0, 500.0]}, r"\[0, 1000\]"),
        ({"timesteps": [500.0, 700.0]}, "strictly decrease"),
        ({"sigmas": [1.0, 0.5], "timesteps": [1000.0, 500.0]}, "not both"),
        ({"num_inference_steps": 3, "sigmas": [1.0, 0.5]}, "length"),
        ({}, "needs"),
    ],
)
def test_bad_grid(grid, message):
    with pytest.raises(ValueError, match=message):
        MMFScheduler().set_timesteps(**grid)


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        MMFScheduler(shift=shift)


def test_step_before_set_timesteps_uses_the_default_grid_as_flow_map():
    sample, model_output = random_pair()
    mmf, flow_map = MMFScheduler(), FlowMapEulerDiscreteScheduler()
    expected = flow_map.step(model_output.double(), torch.tensor(1000.0), sample.double()).prev_sample
    got = mmf.step(model_output, 1000.0, sample).prev_sample  # one step of 1/1000 towards the data
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, sample - model_output / 1000, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "timestep, r_timestep",
    [
        (1000, None),  # a Python int, even one that is a grid value
        (750.0, 0),
        (torch.tensor(1000), None),
        (torch.tensor([1000, 750]), None),
        (1000.0, torch.tensor([0, 0])),
    ],
)
def test_integer_timesteps_refused(timestep, r_timestep):
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair()
    with pytest.raises(ValueError, match="integer indices"):
        scheduler.step(model_output, timestep, sample, r_timestep=r_timestep)


@pytest.mark.parametrize(
    "timestep, r_timestep, message",
    [
        (500.0, 600.0, "must not exceed"),
        (torch.tensor([1000.0, 500.0]), torch.tensor([0.0, 501.0]), r"r = \[501\] > t = \[500\]"),
        (torch.tensor([1000.0, 500.0]), 700.0, r"r = \[700\] > t = \[500\]"),
        (600.0, None, "not on the current grid"),
        (torch.tensor([1000.0, 600.0]), None, r"\[600\] is not on the current grid"),
        (1000.5, 0.0, r"\[0, 1000\]"),
        (-1.0, None, r"\[0, 1000\]"),
        (500.0, -0.5, r"\[0, 1000\]"),
        (float("nan"), 0.0, r"\[0, 1000\]"),
        (torch.tensor([[1000.0]]), None, "1-d"),
        (torch.tensor([1000.0, 750.0, 500.0]), None, "batch size"),
    ],
)
def test_bad_step_times(timestep, r_timestep, message):
    scheduler = MMFScheduler()
    scheduler.set_timesteps(4)
    sample, model_output = random_pair()
    with pytest.raises(ValueError, match=message):
        scheduler.step(model_output, timestep, sample, r_timestep=r_timestep)
    assert scheduler.step_index is None  # a refused call changes no state


def test_bad_noising_times():
    scheduler = MMFScheduler()
    x, e = random_pair()
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        scheduler.scale_noise(x, torch.tensor([1001.0, 0.0]), e)
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        scheduler.add_noise(x, e, -5.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scheduler.interpolate(x, e, torch.tensor([0.5, 1.5]))
