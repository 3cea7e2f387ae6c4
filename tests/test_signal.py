"""The pre-training noise-to-signal estimate (common/privacy/signal.py): its arithmetic and its warning."""

import math

import pytest

from common.privacy.signal import RUN_RATIO_WARNING, estimate, noise_warning


def test_the_ratio_is_z_sqrt_d_over_m_and_the_clip_norm_cancels():
    for clip in (0.1, 0.5, 4.0):
        e = estimate(1.0, clip, 50, 9802, 100)
        assert e.noise_std == pytest.approx(clip / 50)
        assert e.noise_norm == pytest.approx(clip * math.sqrt(9802) / 50)
        assert e.round_ratio == pytest.approx(math.sqrt(9802) / 50)  # = noise_norm / clip
        assert e.run_ratio == pytest.approx(math.sqrt(9802) / 50 / 10)


def test_noise_on_the_mean_falls_as_one_over_m():
    small, large = estimate(1.3, 1.0, 10, 1000, 50), estimate(1.3, 1.0, 40, 1000, 50)
    assert small.round_ratio == pytest.approx(4 * large.round_ratio)


def test_the_measured_mnist1d_setting_does_not_warn():
    # 1,000 clients, m = 50, cnn1d (9,802 parameters), 100 rounds, epsilon ~4 (z ~1.0): it learns.
    assert noise_warning(1.007, 0.5, 50, 9802, 100) is None


def test_too_few_clients_for_the_budget_warn_and_say_what_to_change():
    # 10 clients, all every round, epsilon 1 over 100 rounds needs z in the tens.
    text = noise_warning(40.0, 1.0, 10, 9802, 100)
    assert text is not None and "swamp" in text
    for advice in ("more clients per round", "target-epsilon", "fewer rounds"):
        assert advice in text
    e = estimate(40.0, 1.0, 10, 9802, 100)
    assert e.run_ratio > RUN_RATIO_WARNING
    # at the suggested cohort size (same z) the run ratio is 1
    assert estimate(40.0, 1.0, e.clients_for_ratio_one(), 9802, 100).run_ratio == pytest.approx(1.0)


def test_the_warning_threshold_is_the_run_ratio():
    d, rounds = 10_000, 25  # sqrt(d) = 100, sqrt(T) = 5
    assert noise_warning(0.5, 1.0, 10, d, rounds) is None  # run ratio exactly 1: not above
    assert noise_warning(0.51, 1.0, 10, d, rounds) is not None
    assert noise_warning(0.0, 1.0, 10, d, rounds) is None  # no noise


@pytest.mark.parametrize("args", [(-1, 1, 1, 1, 1), (1, 0, 1, 1, 1), (1, 1, 0, 1, 1), (1, 1, 1, 0, 1),
                                  (1, 1, 1, 1, 0), (float("nan"), 1, 1, 1, 1), (1, float("inf"), 1, 1, 1)])
def test_bad_inputs_are_refused(args):
    with pytest.raises(ValueError):
        estimate(*args)
