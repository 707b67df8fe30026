"""The textbook toy of bench/toy_power20.py: gradient descent blows up, orthogonalised steps converge."""

import math

from bench.toy_power20 import train


def test_gradient_descent_overflows_within_a_few_steps():
    for lr in (1e-6, 1e-4, 1e-2):
        result = train("gradient descent", lr, steps=100)
        assert result["steps"] <= 3 and not math.isfinite(result["loss"]), result


def test_gradient_descent_small_enough_to_stay_finite_stalls():
    result = train("gradient descent", 1e-7, steps=1000)
    assert math.isfinite(result["loss"]) and result["distance"] > 1.0, result


def test_orthogonalised_steps_reach_the_target_within_100_steps():
    result = train("orthogonalised", 0.1, steps=100)
    assert result["steps"] == 100 and result["distance"] < 1e-2 and result["loss"] < 1e-4, result
