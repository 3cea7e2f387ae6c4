"""Audit of Flower 1.41's DP pieces for user-level DP-FedAvg, on the real Flower classes.

Every Flower object here is the real one: strategies are constructed and driven through
their own ``configure_train``/``aggregate_train`` with real Message/RecordDict/ArrayRecord
objects (built in tests/flower_messages.py). Nothing of Flower is mocked or patched.

The tests that document a Flower defect assert the defective behaviour as observed in
flwr 1.41.0. If one of them fails, Flower changed: read the failure message, re-check the
finding, and update common/privacy/ and the notes rather than the assertion alone.

Our replacements (common/privacy/clipping.py, common/privacy/adaptive_clipping.py) are
tested next to each finding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import (
    compute_adaptive_noise_params,
    compute_clip_model_update,
    compute_stdv,
)

from common.privacy.adaptive_clipping import AdaptiveClipping, effective_noise_multiplier
from common.privacy.clipping import (
    apply_delta,
    arrays_from_record,
    clip_update,
    fixed_denominator_mean,
    gaussian_noise_like,
    model_delta,
    record_from_arrays,
    update_norm,
)
from common.privacy.secret_random import SecretRandom
from tests.flower_messages import array_record, train_reply, train_round

UPSTREAM_CHANGED = (
    "Flower's behaviour differs from what flwr 1.41.0 did when this audit was written "
    "(tests/test_flower_dp_audit.py). It looks FIXED or changed upstream: re-check the finding, "
    "then update common/privacy/ and the README's notes on Flower's DP wrappers accordingly. Detail: "
)

SHAPES = {"w": (6, 5), "b": (5,)}


@pytest.fixture(autouse=True)
def _restore_numpy_global_rng():
    """Flower draws its noise from numpy's global RNG: seed it per test and restore it after."""
    state = np.random.get_state()
    np.random.seed(1234)
    yield
    np.random.set_state(state)


def _zeros() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def _direction(seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed unit-norm update direction."""
    rng = np.random.default_rng(seed)
    d = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    n = update_norm(d)
    return {k: v / n for k, v in d.items()}


def _scaled(direction: dict[str, np.ndarray], norm: float, base=None) -> dict[str, np.ndarray]:
    base = base or _zeros()
    return {k: (base[k] + norm * direction[k]).astype(np.float32) for k in direction}


def _flower_adaptive_round(strategy, server_round: int, current: dict, norms: list[float], seed: int):
    """One real round of Flower's server-side adaptive clipping: updates of the given norms."""
    node_ids = list(range(100, 100 + len(norms)))
    instructions = train_round(strategy, server_round, array_record(current), node_ids)
    replies = [
        train_reply(msg, _scaled(_direction(seed + i), n, current), num_examples=10)
        for i, (msg, n) in enumerate(zip(instructions, norms))
    ]
    return strategy.aggregate_train(server_round, replies)


def _our_adaptive_round(clip: AdaptiveClipping, norms, rng, seed: int) -> float:
    """One round of our rule, with the bits produced by our clip_update on real updates."""
    bits = [clip_update(_scaled(_direction(seed + i), n), clip.clipping_norm)[2] for i, n in enumerate(norms)]
    return clip.update(bits, expected_clients=len(norms), rng=rng)


# --------------------------------------------------------------------------------------
# a. Adaptive clipping: direction of the clip-norm update
# --------------------------------------------------------------------------------------


def test_a1_flower_adaptive_clipping_shrinks_C_when_every_update_is_clipped():
    """All updates have norm 100 >> C = 1: C must grow; Flower 1.41 shrinks it by exp(-0.1) a round."""
    m = 4
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=m, initial_clipping_norm=1.0
    )  # noise 0 => clipped_count_stddev 0: deterministic
    assert strategy.clipped_count_stddev == 0.0
    history = [strategy.clipping_norm]
    for rnd in range(1, 4):
        arrays, _ = _flower_adaptive_round(strategy, rnd, _zeros(), [100.0] * m, seed=10 * rnd)
        # Flower did clip every update with the C of that round: same result as ours (equal weights)
        ours_clipped = [clip_update(_scaled(_direction(10 * rnd + i), 100.0), history[-1])[0] for i in range(m)]
        expected_mean = fixed_denominator_mean(ours_clipped, m)
        got = arrays_from_record(arrays)
        assert all(np.allclose(got[k], expected_mean[k], rtol=1e-5, atol=1e-7) for k in SHAPES)
        history.append(strategy.clipping_norm)

    expected = [math.exp(-0.1 * r) for r in range(4)]  # 1.0, 0.905, 0.819, 0.741
    if not all(b < a for a, b in zip(history, history[1:])):
        pytest.fail(UPSTREAM_CHANGED + f"all-clipped rounds no longer shrink C: {history}")
    assert history == pytest.approx(expected, rel=1e-12), history

    ours = AdaptiveClipping(initial_clipping_norm=1.0, count_noise_std=0.0)
    ours_history = [ours.clipping_norm]
    for rnd in range(1, 4):
        ours_history.append(_our_adaptive_round(ours, [100.0] * m, rng=None, seed=10 * rnd))
    assert ours_history == pytest.approx([math.exp(0.1 * r) for r in range(4)], rel=1e-12)  # 1 -> 1.105 -> 1.221 -> 1.350


def test_a2_flower_adaptive_clipping_grows_C_when_no_update_is_clipped():
    """All updates have norm 1e-3 << C = 1: C must shrink; Flower 1.41 grows it."""
    m = 4
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=m, initial_clipping_norm=1.0
    )
    for rnd in range(1, 4):
        _flower_adaptive_round(strategy, rnd, _zeros(), [1e-3] * m, seed=10 * rnd)
    if not strategy.clipping_norm > 1.0:
        pytest.fail(UPSTREAM_CHANGED + f"never-clipped rounds no longer grow C: C = {strategy.clipping_norm}")
    assert strategy.clipping_norm == pytest.approx(math.exp(0.3), rel=1e-12)  # 1.0 -> 1.350

    ours = AdaptiveClipping(initial_clipping_norm=1.0, count_noise_std=0.0)
    for rnd in range(1, 4):
        _our_adaptive_round(ours, [1e-3] * m, rng=None, seed=10 * rnd)
    assert ours.clipping_norm == pytest.approx(math.exp(-0.3), rel=1e-12)  # 1.0 -> 0.741


def test_a3_our_rule_converges_to_the_target_quantile_and_flowers_runs_away():
    """Fixed norm distribution (log-normal, median 1.63), 50 rounds of 40 clients, paper defaults.

    Ours, from C = 0.1 with the paper's count noise sigma_b = m/20, ends where about half the
    norms are unclipped (C 1.63). Flower's (noise off, same norms) from C = 0.1 sees every update
    clipped and shrinks C every single round (to 0.00067); from C = 2.0 (above the median) it
    grows without bound (to ~222). The median is an unstable fixed point of its rule.
    """
    m, rounds = 40, 50
    norm_rng = np.random.default_rng(7)
    population = np.exp(norm_rng.normal(0.5, 0.4, size=5000))  # the fixed distribution of update norms
    median = float(np.median(population))
    draws = [norm_rng.choice(population, size=m) for _ in range(rounds)]

    ours = AdaptiveClipping(initial_clipping_norm=0.1)  # gamma 0.5, eta 0.2, sigma_b = m/20 = 2
    count_rng = SecretRandom.from_debug_key('99')
    for rnd, norms in enumerate(draws):
        _our_adaptive_round(ours, norms, count_rng, seed=rnd)
    unclipped_share = float(np.mean(population <= ours.clipping_norm))
    assert 0.4 <= unclipped_share <= 0.6, (ours.clipping_norm, median, unclipped_share)
    assert ours.clipping_norm == pytest.approx(median, rel=0.2)

    flower = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=m, initial_clipping_norm=0.1
    )
    for rnd, norms in enumerate(draws, start=1):
        _flower_adaptive_round(flower, rnd, _zeros(), list(norms), seed=rnd)
    if not flower.clipping_norm < 0.1 * math.exp(-0.1 * rounds) * 1.0001:
        pytest.fail(UPSTREAM_CHANGED + f"C after {rounds} rounds is {flower.clipping_norm}, median {median}")
    assert float(np.mean(population <= flower.clipping_norm)) == 0.0  # every update clipped, to ~0.0007

    flower = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=m, initial_clipping_norm=2.0
    )
    for rnd, norms in enumerate(draws, start=1):
        _flower_adaptive_round(flower, rnd, _zeros(), list(norms), seed=rnd)
    if not flower.clipping_norm > 10 * population.max():
        pytest.fail(UPSTREAM_CHANGED + f"C from 2.0 after {rounds} rounds is {flower.clipping_norm}, median {median}")
    assert float(np.mean(population <= flower.clipping_norm)) == 1.0  # nothing clipped any more


def test_a4_flower_noises_adaptive_round_with_the_updated_C_not_the_C_it_clipped_with():
    """Sensitivity of round t is C_t (clipping used C_t), but Flower draws noise with C_{t+1}.

    When C shrinks (as it does in Flower whenever most updates are clipped) the noise is
    smaller than the sensitivity requires, so the round is less private than claimed.
    """
    m, size = 10, 200_000
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=1.0, num_sampled_clients=m, initial_clipping_norm=1.0, clipped_count_stddev=1.0
    )
    z_eff = strategy.noise_multiplier  # Flower stores the effective multiplier (1-1/4)^-1/2 = 1.1547
    assert z_eff == pytest.approx(effective_noise_multiplier(1.0, 1.0))
    current = {"w": np.zeros(size, dtype=np.float32)}
    direction = np.zeros(size)
    direction[0] = 1.0
    instructions = train_round(strategy, 1, array_record(current), list(range(100, 100 + m)))
    replies = [train_reply(msg, {"w": (100.0 * direction).astype(np.float32)}, 10) for msg in instructions]
    c_used_for_clipping = strategy.clipping_norm
    arrays, _ = strategy.aggregate_train(1, replies)
    c_after = strategy.clipping_norm

    noise = arrays_from_record(arrays)["w"].astype(np.float64) - c_used_for_clipping * direction
    measured = float(np.std(noise))
    required = z_eff * c_used_for_clipping / m
    used = z_eff * c_after / m
    assert c_after < 0.95 * c_used_for_clipping  # all clipped: Flower shrank C (about exp(-0.1))
    if measured == pytest.approx(required, rel=0.01):
        pytest.fail(UPSTREAM_CHANGED + "noise std now matches the C used for clipping")
    assert measured == pytest.approx(used, rel=0.01), (measured, used, required)
    assert measured < 0.96 * required  # under-noised by ~9-10% in this round


# --------------------------------------------------------------------------------------
# b. Zero-norm update
# --------------------------------------------------------------------------------------


def _expect_flower_zero_division(call):
    try:
        result = call()
    except ZeroDivisionError:
        return
    pytest.fail(UPSTREAM_CHANGED + f"an all-zero update no longer raises ZeroDivisionError (got {result!r})")


def test_b1_flower_clipping_helper_crashes_on_a_zero_update():
    """compute_clip_model_update (used by server-side fixed clipping and fixedclipping_mod)."""
    current = [np.ones((3, 2), dtype=np.float32), np.ones(2, dtype=np.float32)]
    reply = [a.copy() for a in current]  # the client did not move: update is exactly zero

    def call():
        compute_clip_model_update(param1=reply, param2=current, clipping_norm=1.0)
        return reply

    _expect_flower_zero_division(call)


def test_b2_flower_fixed_clipping_strategy_crashes_the_round_on_one_zero_update():
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 0.0, 1.0, 2)
    current = _scaled(_direction(1), 3.0)
    instructions = train_round(strategy, 1, array_record(current), [100, 101])
    replies = [
        train_reply(instructions[0], current, 10),  # zero update
        train_reply(instructions[1], _scaled(_direction(2), 5.0, current), 10),
    ]
    _expect_flower_zero_division(lambda: strategy.aggregate_train(1, replies))


def test_b3_flower_adaptive_clipping_strategy_crashes_the_round_on_one_zero_update():
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 2, initial_clipping_norm=1.0)
    current = _scaled(_direction(1), 3.0)
    instructions = train_round(strategy, 1, array_record(current), [100, 101])
    replies = [
        train_reply(instructions[0], current, 10),
        train_reply(instructions[1], _scaled(_direction(2), 5.0, current), 10),
    ]
    _expect_flower_zero_division(lambda: strategy.aggregate_train(1, replies))


def test_b4_our_clip_update_keeps_a_zero_update_zero_and_finite():
    zero = _zeros()
    for c in (1e-12, 0.1, 1.0, 1e6):
        clipped, norm, bit = clip_update(zero, c)
        assert norm == 0.0 and bit == 1
        for key, value in clipped.items():
            assert value.dtype == zero[key].dtype and value.shape == zero[key].shape
            assert np.all(np.isfinite(value)) and not np.any(value)
    # and through the whole server path: delta of an unchanged model, clipped, applied
    current = _scaled(_direction(3), 2.0)
    clipped, norm, bit = clip_update(model_delta(current, current), 1.0)
    assert (norm, bit) == (0.0, 1)
    restored = apply_delta(current, clipped)
    assert all(np.array_equal(restored[k], current[k]) for k in current)


# --------------------------------------------------------------------------------------
# c. Example-weighted mean: the sensitivity is not C/m
# --------------------------------------------------------------------------------------


def test_c_flower_fixed_clipping_fedavg_depends_on_one_client_by_more_than_C_over_m():
    """Two clients, num-examples 1000 and 1, C = 1, m = 2, noise multiplier 0 (deterministic).

    Replace the heavy client's update +10 u by -10 u (both clipped to norm C): the aggregate
    moves by 2 C * 1000/1001 = 1.998, while Flower's noise std z*C/m is calibrated for a
    replace-one sensitivity of 2C/m = 1.0 (add/remove: the heavy client's share is 0.999 C
    against C/m = 0.5). The fixed-denominator unweighted mean moves by exactly 2C/m.
    """
    C, m, w_heavy, w_light = 1.0, 2, 1000, 1
    assert compute_stdv(1.0, C, m) == C / m  # Flower's noise std: z*C/m, i.e. sensitivity C/m assumed
    current = _scaled(_direction(4), 1.0)
    u, v = _direction(5), _direction(6)

    def flower_aggregate(heavy_sign: float) -> dict[str, np.ndarray]:
        strategy = DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=0.0, clipping_norm=C, num_sampled_clients=m)
        instructions = train_round(strategy, 1, array_record(current), [100, 101])
        replies = [
            train_reply(instructions[0], _scaled(u, heavy_sign * 10.0, current), w_heavy),
            train_reply(instructions[1], _scaled(v, 10.0, current), w_light),
        ]
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays_from_record(arrays)

    shift = update_norm(model_delta(flower_aggregate(+1.0), flower_aggregate(-1.0)))
    replace_one_bound = 2 * C / m
    assert shift == pytest.approx(2 * C * w_heavy / (w_heavy + w_light), rel=1e-5)  # 1.998
    if shift <= replace_one_bound * 1.01:
        pytest.fail(UPSTREAM_CHANGED + f"weighted aggregate now within 2C/m: shift {shift}")
    assert shift > 1.9 * replace_one_bound

    def ours(heavy_sign: float) -> dict[str, np.ndarray]:
        deltas = [_scaled(u, heavy_sign * 10.0), _scaled(v, 10.0)]
        clipped = [clip_update(d, C)[0] for d in deltas]
        return fixed_denominator_mean(clipped, m)

    our_shift = update_norm(model_delta(ours(+1.0), ours(-1.0)))
    assert our_shift == pytest.approx(replace_one_bound, rel=1e-5)


# --------------------------------------------------------------------------------------
# d. Our clip_update and friends
# --------------------------------------------------------------------------------------


def test_d1_clip_update_bounds_every_norm_and_leaves_small_updates_unchanged():
    rng = np.random.default_rng(2024)
    for trial in range(500):
        dtype = np.float32 if trial % 2 else np.float64
        delta = {
            "conv.weight": rng.standard_normal((4, 3, 3)).astype(dtype),
            "conv.bias": rng.standard_normal(4).astype(dtype),
            "fc.weight": rng.standard_normal((10, 8)).astype(dtype),
        }
        target = 10.0 ** rng.uniform(-6, 6)
        delta = {k: (v * (target / update_norm(delta))).astype(dtype) for k, v in delta.items()}
        c = 10.0 ** rng.uniform(-6, 6)
        clipped, norm, bit = clip_update(delta, c)
        assert norm == pytest.approx(update_norm(delta))
        assert update_norm(clipped) <= c * (1 + 1e-6)
        assert all(clipped[k].dtype == delta[k].dtype and clipped[k].shape == delta[k].shape for k in delta)
        if norm <= c:
            assert bit == 1
            assert all(np.array_equal(clipped[k], delta[k]) for k in delta)
        else:
            assert bit == 0
            assert update_norm(clipped) == pytest.approx(c, rel=1e-5)
            scale = c / norm  # same direction
            assert all(np.allclose(clipped[k], delta[k] * scale, rtol=1e-5, atol=0) for k in delta)
    # boundary: norm exactly C is not clipped; input never modified
    d = {"x": np.array([3.0, 4.0])}
    clipped, norm, bit = clip_update(d, 5.0)
    assert (norm, bit) == (5.0, 1) and np.array_equal(d["x"], [3.0, 4.0])
    clipped, norm, bit = clip_update(d, 1.0)
    assert bit == 0 and np.allclose(clipped["x"], [0.6, 0.8]) and np.array_equal(d["x"], [3.0, 4.0])


def test_d2_clip_update_rejects_bad_inputs():
    with pytest.raises(ValueError):
        clip_update({"x": np.ones(3)}, 0.0)
    with pytest.raises(ValueError):
        clip_update({"x": np.ones(3)}, float("nan"))
    with pytest.raises(ValueError):
        clip_update({"x": np.array([1.0, np.inf])}, 1.0)
    with pytest.raises(ValueError):
        model_delta({"a": np.ones(2)}, {"b": np.ones(2)})
    with pytest.raises(ValueError):
        apply_delta({"a": np.ones(2)}, {"a": np.ones(3)})


def test_d3_delta_roundtrip_through_flower_arrayrecord():
    old = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "steps": np.array(7, dtype=np.int64)}
    new = {"w": old["w"] + 0.5, "steps": np.array(9, dtype=np.int64)}
    record = record_from_arrays(new)
    assert list(record.keys()) == ["w", "steps"]
    back = arrays_from_record(record)
    delta = model_delta(back, old)
    assert delta["w"].dtype == np.float32 and delta["steps"].dtype == np.float64
    restored = apply_delta(old, delta)
    assert restored["w"].dtype == np.float32 and restored["steps"].dtype == np.int64
    assert np.array_equal(restored["w"], new["w"]) and int(restored["steps"]) == 9


def test_d4_gaussian_noise_like_has_the_requested_std_and_shapes():
    template = {"w": np.zeros((300, 300), dtype=np.float32), "b": np.zeros(7, dtype=np.float64)}
    noise = gaussian_noise_like(template, 0.25, SecretRandom.from_debug_key('0'))
    assert {k: (v.shape, v.dtype) for k, v in noise.items()} == {k: (v.shape, v.dtype) for k, v in template.items()}
    assert float(np.std(noise["w"])) == pytest.approx(0.25, rel=0.01)
    again = gaussian_noise_like(template, 0.25, SecretRandom.from_debug_key('0'))
    assert all(np.array_equal(noise[k], again[k]) for k in noise)  # reproducible from the seed
    assert not np.any(gaussian_noise_like(template, 0.0, SecretRandom.from_debug_key('0'))["w"])


def test_d5_adaptive_clipping_state_noise_and_effective_multiplier():
    clip = AdaptiveClipping(initial_clipping_norm=0.3)
    rng = SecretRandom.from_debug_key('5')
    # with the paper's count noise (sigma_b = m/20 = 5 for m = 100) the direction is still right
    assert clip.update([0] * 100, 100, rng) > 0.3
    up = clip.clipping_norm
    assert clip.update([1] * 100, 100, rng) < up
    assert clip.count_noise_std_for(100) == 5.0
    restored = AdaptiveClipping.from_state_dict(clip.state_dict())
    assert restored.state_dict() == clip.state_dict()
    with pytest.raises(ValueError):
        clip.update([2], 1, rng)
    # same z_delta formula as Flower's compute_adaptive_noise_params, and same refusal
    sigma_b, flower_z_delta = compute_adaptive_noise_params(1.0, 100, None)
    assert effective_noise_multiplier(1.0, sigma_b) == pytest.approx(flower_z_delta)
    assert effective_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError):
        effective_noise_multiplier(1.0, 0.5)
    assert effective_noise_multiplier(0.0, 0.0) == 0.0
