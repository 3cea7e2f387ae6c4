"""The server's DP-FedAvg aggregation: the noise is real and calibrated, clipping bounds every
update, the denominator is fixed, and the strategy only post-processes the noisy mean."""

import numpy as np
import pytest

from common.config import ConfigError, RunConfig
from common.names import MEAN_BASED_STRATEGIES, STRATEGIES
from common.privacy.adaptive_clipping import AdaptiveClipping, effective_noise_multiplier
from common.privacy.clipping import update_norm
from common.privacy.secret_random import SecretRandom
from server_app.privacy import plan_privacy
from server_app.user_level_dp import UserLevelDP

SIZE = 20_000  # coordinates per draw


def _rng(n: int) -> SecretRandom:
    """The production generator, keyed reproducibly so these statistical checks never flake."""
    return SecretRandom.from_debug_key(f"test-user-level-dp-{n}")


def _global():
    return {"w": np.zeros(SIZE, dtype=np.float64)}


def _clients(norms, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for norm in norms:
        direction = rng.normal(size=SIZE)
        out.append({"w": direction / np.linalg.norm(direction) * norm})
    return out


@pytest.mark.parametrize("z, clip, m", [(1.0, 1.0, 10), (0.7, 2.5, 4), (3.0, 0.1, 50)])
def test_noise_std_matches_z_c_over_m(z, clip, m):
    dp = UserLevelDP(z, clip, expected_clients=m, clip_on_server=True, rng=_rng(1))
    clients = _clients([0.5 * clip] * 3)
    expected_mean = sum(c["w"] for c in clients) / m  # unclipped (within the norm), fixed denominator
    draws = [dp.aggregate(_global(), clients)[0]["w"] - expected_mean for _ in range(5)]
    noise = np.concatenate(draws)
    assert abs(noise.mean()) < 5 * (z * clip / m) / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(z * clip / m, rel=0.05)


def test_clipping_bounds_every_update_and_uses_the_fixed_denominator():
    clip, m = 1.0, 8
    dp = UserLevelDP(0.0, clip, expected_clients=m, clip_on_server=True, rng=_rng(0))
    for norm in (1e-9, 0.3, 0.999, 7.0, 1e6):
        new, release = dp.aggregate(_global(), _clients([norm]))
        assert update_norm(new) == pytest.approx(min(norm, clip) / m, rel=1e-6)
        assert release.num_clipped == (1 if norm > clip else 0)
    # Three clients of norm 100: each contributes at most C/m, whatever their number of examples.
    new, release = dp.aggregate(_global(), _clients([100.0] * 3))
    assert update_norm(new) <= 3 * clip / m + 1e-9 and release.num_clipped == 3


def test_zero_update_does_not_crash():
    dp = UserLevelDP(1.0, 1.0, expected_clients=2, clip_on_server=True, rng=_rng(0))
    new, _ = dp.aggregate(_global(), [{"w": np.zeros(SIZE)}, {"w": np.zeros(SIZE)}])
    assert np.all(np.isfinite(new["w"]))


def test_client_mode_rejects_updates_beyond_the_norm():
    dp = UserLevelDP(0.0, 1.0, expected_clients=2, clip_on_server=False, rng=_rng(0))
    new, release = dp.aggregate(_global(), _clients([0.5, 5.0]), reported_unclipped=[1, 1])
    assert release.num_rejected == 1
    assert update_norm(new) == pytest.approx(0.5 / 2)


def test_an_empty_poisson_round_still_releases_noise():
    dp = UserLevelDP(1.0, 1.0, expected_clients=5, clip_on_server=True, rng=_rng(0))
    new, _ = dp.aggregate(_global(), [])
    assert new["w"].std() == pytest.approx(1.0 / 5, rel=0.05)


def test_adaptive_clipping_uses_the_effective_noise_and_moves_the_norm_up_when_all_are_clipped():
    adaptive = AdaptiveClipping(initial_clipping_norm=1.0, count_noise_std=2.0)
    dp = UserLevelDP(1.0, 1.0, expected_clients=10, clip_on_server=True, rng=_rng(0), adaptive=adaptive)
    z_delta = effective_noise_multiplier(1.0, 2.0)
    assert z_delta > 1.0
    new, release = dp.aggregate(_global(), _clients([50.0] * 10))
    assert release.clipping_norm == 1.0 and release.noise_std == pytest.approx(z_delta * 1.0 / 10)
    assert adaptive.clipping_norm > 1.0  # all clipped: C grows toward the median


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - set(MEAN_BASED_STRATEGIES)))
@pytest.mark.parametrize("dp", ["server", "client"])
def test_non_mean_strategies_are_refused_with_central_dp(strategy, dp):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_run_config({"strategy": strategy, "dp": dp})
    message = str(error.value)
    assert "does not aggregate by the mean" in message and "'dpsgd' or 'local'" in message
    RunConfig.from_run_config({"strategy": strategy, "dp": "dpsgd"})  # these combine
    RunConfig.from_run_config({"strategy": strategy, "dp": "local"})


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"sampling": "poisson", "clients-per-round": 10}, (0.1, 10)),
        ({"sampling": "fixed", "clients-per-round": 0.25}, (0.25, 25)),
        ({"sampling": "all"}, (1.0, 100)),
    ],
)
def test_plan_samples_the_way_the_ledger_accounts(overrides, expected):
    config = RunConfig.from_run_config({"dp": "server"} | overrides)
    plan = plan_privacy(config, num_clients=100)
    rate, m = expected
    assert plan.expected_clients == m and plan.ledger.describe()["sample_rate"] == pytest.approx(rate)
    sizes = [len(plan.sampler.sample(range(100))) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(m, rel=0.05)
    if overrides["sampling"] == "poisson":
        assert np.std(sizes) > 1  # Poisson: the round size varies
    else:
        assert set(sizes) == {m}


def test_target_epsilon_is_met_by_the_planned_rounds():
    config = RunConfig.from_run_config(
        {"dp": "server", "sampling": "poisson", "clients-per-round": 10, "target-epsilon": 3.0, "num-server-rounds": 20}
    )
    plan = plan_privacy(config, num_clients=100)
    for _ in range(20):
        plan.ledger.step()
    assert 0.95 * 3.0 <= plan.ledger.epsilon() <= 3.0


def test_pld_with_fixed_sampling_and_too_much_noise_for_adaptive_are_refused_up_front():
    with pytest.raises(ConfigError, match="accountant = 'pld' cannot account sampling = 'fixed'"):
        RunConfig.from_run_config({"dp": "server", "sampling": "fixed", "accountant": "pld"})
    config = RunConfig.from_run_config({"dp": "server", "clipping": "adaptive", "noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="noise-multiplier = 1 is too large for adaptive clipping with 10 clients"):
        plan_privacy(config, num_clients=10)
