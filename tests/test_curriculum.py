"""The lambda curriculum: shapes, endpoints, validation, and state that survives a resume."""

import math

import pytest

from mmf_diffusers import LambdaSchedule


def test_linear_and_endpoints():
    s = LambdaSchedule("linear", lam_start=0.0, lam_end=1.0, warmup_steps=100)
    assert s(0) == 0.0 and s(50) == 0.5 and s(100) == 1.0 and s(10_000) == 1.0
    down = LambdaSchedule("linear", lam_start=1.0, lam_end=0.2, warmup_steps=10)
    assert down(5) == pytest.approx(0.6) and down(20) == pytest.approx(0.2)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt", "step"])
def test_shapes_are_monotone_and_hit_the_ends(shape):
    s = LambdaSchedule(shape, lam_start=0.1, lam_end=0.9, warmup_steps=40)
    values = [s(i) for i in range(60)]
    assert values[0] == pytest.approx(0.1) and values[40] == pytest.approx(0.9) and values[-1] == pytest.approx(0.9)
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


def test_shape_formulas():
    cos = LambdaSchedule("cosine", 0.0, 1.0, 100)
    assert cos(25) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert cos(50) == pytest.approx(0.5)
    assert LambdaSchedule("sqrt", 0.0, 1.0, 100)(25) == pytest.approx(0.5)
    step = LambdaSchedule("step", 0.0, 1.0, 100)
    assert step(99) == 0.0 and step(100) == 1.0


def test_constant_and_zero_warmup():
    assert all(LambdaSchedule.constant(0.3)(i) == 0.3 for i in (0, 5, 10**6))
    assert LambdaSchedule("linear", 0.0, 0.7, warmup_steps=0)(0) == 0.7


def test_counter_and_state_dict_round_trip():
    s = LambdaSchedule("cosine", 0.0, 1.0, warmup_steps=10)
    for _ in range(4):
        s.step()
    assert s() == s(4)
    state = s.state_dict()
    resumed = LambdaSchedule("cosine", 0.0, 1.0, warmup_steps=10)
    resumed.load_state_dict(state)
    assert resumed.current_step == 4 and resumed() == s()
    other = LambdaSchedule("linear", 0.0, 1.0, warmup_steps=10)
    with pytest.raises(ValueError, match="differs"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": "exponential"},
        {"lam_start": -0.1},
        {"lam_end": 1.5},
        {"lam_end": float("nan")},
        {"warmup_steps": -1},
        {"warmup_steps": 2.5},
        {"shape": "constant", "lam_start": 0.0, "lam_end": 1.0},
    ],
)
def test_errors(kwargs):
    with pytest.raises(ValueError):
        LambdaSchedule(**kwargs)


def test_bad_step():
    s = LambdaSchedule()
    for step in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            s(step)
