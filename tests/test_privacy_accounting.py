"""Tests for common/privacy: ledgers against independent computations and reference values.

Offline, no Flower runtime. Reference values are dp-accounting 0.6's own figures for the
settings below (RDP and PLD, delta 1e-5), recorded here; independent computations use Opacus's RDP accountant, Flower 1.41's
RdpAccountant, dp_accounting's lower-level PLD/RDP functions and the analytic Gaussian
mechanism (Balle & Wang 2018).
"""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from common.privacy.accounting import UserLevelLedger
from common.privacy.adaptive_clipping import effective_noise_multiplier
from common.privacy.calibration import (
    sample_level_noise_multiplier,
    solve_local_noise_multiplier,
    solve_noise_multiplier,
)
from common.privacy.local_dp import (
    LocalDpLedger,
    gaussian_noise_std,
    laplace_noise_multiplier,
    laplace_noise_scale,
)

DELTA = 1e-5
Rel = dp_accounting.NeighboringRelation


def ledger_after(rounds, *args, **kwargs) -> UserLevelLedger:
    ledger = UserLevelLedger(*args, **kwargs)
    for _ in range(rounds):
        ledger.step()
    return ledger


# ---- user level: independent references ------------------------------------------------


@pytest.mark.parametrize("z,q,T", [(1.0, 0.1, 10), (1.0, 0.05, 100), (0.8, 0.01, 1000)])
def test_poisson_matches_opacus_rdp(z, q, T):
    from opacus.accountants import RDPAccountant

    opacus_acc = RDPAccountant()
    opacus_acc.history = [(z, q, T)]
    reference = opacus_acc.get_epsilon(DELTA)
    n = 1000
    ours = UserLevelLedger(z, "poisson", n, int(round(q * n)), DELTA)
    ours.step(count=T)
    assert ours.epsilon() == pytest.approx(reference, rel=0.01)


@pytest.mark.parametrize("z,T", [(1.0, 10), (2.0, 100), (1.5, 37)])
def test_all_clients_matches_flower_rdp_accountant(z, T):
    # Flower 1.41's accountant (flwr.supercore.privacy_accounting.rdp_accountant, exported from
    # flwr.serverapp): NO_AMPLIFICATION + ADD_OR_REMOVE_ONE composes GaussianDpEvent(z) in a
    # dp_accounting RdpAccountant with default orders -- the same assumptions as our "all".
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    n = 10
    config = PrivacyConfig(
        target_delta=DELTA,
        population_size=n,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    flower = RdpAccountant(config)
    flower.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=n, population_size=n), T)
    ours = UserLevelLedger(z, "all", n, n, DELTA)
    ours.step(count=T)
    assert ours.epsilon() == pytest.approx(flower.get_epsilon(DELTA), rel=0.01)


# (N, m, z, T, RDP, PLD) from dp-facts.md
REFERENCE_TABLE = [
    (10, 10, 1.0, 10, 19.1, 17.9),
    (10, 10, 2.0, 100, 35.1, 33.1),
    (100, 10, 1.0, 10, 3.44, 2.85),
    (100, 10, 1.0, 100, 7.90, 7.05),
    (1000, 50, 1.0, 100, 4.04, 3.50),
]


@pytest.mark.parametrize("N,m,z,T,rdp,pld", REFERENCE_TABLE)
def test_reference_table(N, m, z, T, rdp, pld):
    sampling = "all" if m == N else "poisson"
    ledger = UserLevelLedger(z, sampling, N, m, DELTA)
    ledger.step(count=T)
    eps = ledger.epsilons()
    assert eps["rdp"] == pytest.approx(rdp, rel=0.03)
    assert eps["pld"] == pytest.approx(pld, rel=0.03)


# ---- user level: fixed-size sampling (replace-one) ---------------------------------------


def test_dp_accounting_replace_one_semantics_are_what_accounting_py_assumes():
    # Pins dp_accounting 0.6 behaviour that the z/2 in the "fixed" event relies on:
    # RDP does NOT double the sensitivity under REPLACE_ONE (same value as add/remove) ...
    rdp_replace = dp_accounting.rdp.RdpAccountant(neighboring_relation=Rel.REPLACE_ONE)
    rdp_replace.compose(dp_event.GaussianDpEvent(1.0))
    rdp_addrem = dp_accounting.rdp.RdpAccountant()
    rdp_addrem.compose(dp_event.GaussianDpEvent(1.0))
    assert rdp_replace.get_epsilon(DELTA) == pytest.approx(rdp_addrem.get_epsilon(DELTA))
    # ... while PLD does (REPLACE_ONE at z equals add/remove at z/2).
    pld_replace = dp_accounting.pld.PLDAccountant(neighboring_relation=Rel.REPLACE_ONE)
    pld_replace.compose(dp_event.GaussianDpEvent(1.0))
    pld_half = dp_accounting.pld.PLDAccountant()
    pld_half.compose(dp_event.GaussianDpEvent(0.5))
    assert pld_replace.get_epsilon(DELTA) == pytest.approx(pld_half.get_epsilon(DELTA), rel=1e-3)
    # PLD cannot account sampling without replacement at all.
    pld_any = dp_accounting.pld.PLDAccountant(neighboring_relation=Rel.REPLACE_ONE)
    assert not pld_any.supports(
        dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(1.0))
    )


def test_fixed_sampling_counts_replace_one_sensitivity_2C():
    # With m = N, fixed-size sampling is the plain Gaussian under replace-one. Independent path:
    # dp_accounting's PLD, which doubles the sensitivity for REPLACE_ONE by itself. RDP is an
    # upper bound on the (near-exact) PLD value and usually within ~10% of it.
    z, n, T = 2.0, 20, 10
    ours = ledger_after(T, z, "fixed", n, n, DELTA).epsilon()
    pld = dp_accounting.pld.PLDAccountant(neighboring_relation=Rel.REPLACE_ONE)
    pld.compose(dp_event.GaussianDpEvent(z), T)
    reference = pld.get_epsilon(DELTA)
    assert reference <= ours <= 1.15 * reference
    # Flower 1.41's WITHOUT_REPLACEMENT accounting passes z unhalved: it reports about half.
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    flower = RdpAccountant(
        PrivacyConfig(DELTA, n, NeighboringRelation.REPLACE_ONE, SamplingMethod.WITHOUT_REPLACEMENT)
    )
    flower.compose(GaussianPrivacyEvent(z, n, n), T)
    assert flower.get_epsilon(DELTA) < 0.6 * reference


def test_fixed_sampling_is_rdp_only():
    with pytest.raises(ValueError, match="SampledWithoutReplacementDpEvent"):
        UserLevelLedger(1.0, "fixed", 100, 10, DELTA, accountant="pld")
    ledger = ledger_after(3, 1.0, "fixed", 100, 10, DELTA)
    eps = ledger.epsilons()
    assert eps["pld"] is None and math.isfinite(eps["rdp"]) and eps["rdp"] > 0
    assert ledger.describe()["neighbouring_relation"] == "replace-one-client"


# ---- ledger mechanics ------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling,N,m,accountant,rounds",
    # Few rounds: each query recomposes (0.2-0.8 s for PLD and for fixed-size RDP).
    [("poisson", 100, 10, "rdp", 12), ("fixed", 100, 10, "rdp", 4), ("all", 10, 10, "pld", 4),
     ("poisson", 100, 10, "pld", 3)],
)
def test_epsilon_monotone_over_rounds(sampling, N, m, accountant, rounds):
    ledger = UserLevelLedger(1.0, sampling, N, m, DELTA, accountant=accountant)
    previous = ledger.epsilon()
    assert previous == 0.0
    for _ in range(rounds):
        ledger.step()
        current = ledger.epsilon()
        assert current >= previous
        previous = current
    assert ledger.rounds == rounds


def test_state_dict_round_trip_and_epsilon_if_step_is_pure():
    ledger = ledger_after(7, 1.1, "poisson", 200, 20, DELTA)
    ledger.step(noise_multiplier=1.4)
    before = ledger.epsilon()
    ahead = ledger.epsilon_if_step()
    assert ahead > before
    assert ledger.rounds == 8 and ledger.epsilon() == before  # nothing committed
    state = json.loads(json.dumps(ledger.state_dict(), allow_nan=False))
    restored = UserLevelLedger.from_state_dict(state)
    assert restored.rounds == 8
    assert restored.epsilon() == pytest.approx(before, rel=1e-12)
    assert restored.epsilon_if_step() == pytest.approx(ahead, rel=1e-12)
    assert restored.describe() == ledger.describe()
    ledger.step()
    assert ledger.epsilon() == pytest.approx(ahead, rel=1e-12)
    with pytest.raises(ValueError, match="LocalDpLedger"):
        LocalDpLedger.from_state_dict(state)


def test_heterogeneous_noise_multipliers_compose_each_event():
    ledger = UserLevelLedger(1.0, "poisson", 100, 10, DELTA)
    ledger.step(noise_multiplier=0.8)
    ledger.step(count=3)
    ledger.step(noise_multiplier=1.3)
    acc = dp_accounting.rdp.RdpAccountant()
    for z, n in [(0.8, 1), (1.0, 3), (1.3, 1)]:
        acc.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z)), n)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert ledger.rounds == 5


def test_zero_and_infinite_noise_never_crash():
    for accountant in ("rdp", "pld"):
        no_noise = UserLevelLedger(0.0, "poisson", 100, 10, DELTA, accountant=accountant)
        no_noise.step()
        assert no_noise.epsilon() == math.inf
        assert no_noise.epsilons() == {"rdp": math.inf, "pld": math.inf}
        silent = UserLevelLedger(math.inf, "all", 5, 5, DELTA, accountant=accountant)
        silent.step(count=4)
        assert silent.epsilon() == 0.0
        restored = UserLevelLedger.from_state_dict(
            json.loads(json.dumps(silent.state_dict(), allow_nan=False))
        )
        assert restored.epsilon() == 0.0 and restored.rounds == 4
    mixed = UserLevelLedger(1.0, "all", 5, 5, DELTA)
    mixed.step()
    assert mixed.epsilon_if_step(noise_multiplier=0.0) == math.inf
    # Tiny noise: a huge but finite (or inf) epsilon, no MemoryError from PLD's grid.
    tiny = UserLevelLedger(1e-3, "poisson", 100, 10, DELTA, accountant="pld")
    tiny.step(count=5)
    assert tiny.epsilon() > 1e4


def test_invalid_inputs_name_value_and_range():
    with pytest.raises(ValueError, match=r"sampling must be one of .*'uniform'"):
        UserLevelLedger(1.0, "uniform", 100, 10, DELTA)
    with pytest.raises(ValueError, match=r"clients_per_round must be in \[1, num_clients=10\], got 11"):
        UserLevelLedger(1.0, "poisson", 10, 11, DELTA)
    with pytest.raises(ValueError, match="must equal num_clients=10, got 5"):
        UserLevelLedger(1.0, "all", 10, 5, DELTA)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 0"):
        UserLevelLedger(1.0, "poisson", 100, 10, 0)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        UserLevelLedger(-1.0, "poisson", 100, 10, DELTA)
    with pytest.raises(ValueError, match="accountant must be one of"):
        UserLevelLedger(1.0, "poisson", 100, 10, DELTA, accountant="prv")


# ---- adaptive clipping -----------------------------------------------------------------


def test_effective_noise_multiplier_formula_and_error():
    # Andrew et al. 2021 defaults: sigma_b = m / 20; with m = 100, sigma_b = 5.
    z, sigma_b = 1.0, 5.0
    z_delta = effective_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((1.0 - 1.0 / 100.0) ** -0.5)
    assert z_delta > z
    # The pair (update sum with z_delta, count with 2*sigma_b) composes back to z.
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(ValueError, match=r"noise multiplier 1\.0 needs count noise std > 0\.5 \(got 0\.5\)"):
        effective_noise_multiplier(1.0, 0.5)  # m = 10 -> sigma_b = 0.5: z must be < 1
    with pytest.raises(ValueError, match="count noise std"):
        effective_noise_multiplier(1.0, 0.0)
    assert effective_noise_multiplier(0.0, 1.0) == 0.0


# ---- calibration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,sampling,N,m,T,accountant",
    [
        (4.0, "poisson", 1000, 50, 100, "rdp"),
        (2.0, "poisson", 100, 10, 30, "rdp"),
        (8.0, "fixed", 100, 10, 20, "rdp"),
        (10.0, "all", 10, 10, 20, "rdp"),
        (10.0, "all", 10, 10, 20, "pld"),
    ],
)
def test_calibration_meets_target(target, sampling, N, m, T, accountant):
    z = solve_noise_multiplier(target, DELTA, T, sampling, N, m, accountant=accountant)
    ledger = UserLevelLedger(z, sampling, N, m, DELTA, accountant=accountant)
    ledger.step(count=T)
    eps = ledger.epsilon()
    assert 0.95 * target <= eps <= target


def test_calibration_errors():
    with pytest.raises(ValueError, match="target_epsilon must be a finite number > 0, got 0"):
        solve_noise_multiplier(0, DELTA, 10, "poisson", 100, 10)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        solve_noise_multiplier(1.0, DELTA, 0, "poisson", 100, 10)
    with pytest.raises(ValueError, match="too large to calibrate"):
        solve_noise_multiplier(1e12, DELTA, 1, "poisson", 100, 10)
    with pytest.raises(ValueError, match="not available"):
        solve_noise_multiplier(1.0, DELTA, 10, "fixed", 100, 10, accountant="pld")


@pytest.mark.parametrize("mechanism,target,T", [("gaussian", 5.0, 10), ("laplace", 5.0, 10)])
def test_local_calibration_meets_target(mechanism, target, T):
    z = solve_local_noise_multiplier(target, DELTA, T, mechanism)
    ledger = LocalDpLedger(mechanism, z, DELTA)
    ledger.step(count=T)
    assert 0.95 * target <= ledger.epsilon() <= target
    with pytest.raises(ValueError, match="mechanism must be one of"):
        solve_local_noise_multiplier(target, DELTA, T, "uniform")


def test_sample_level_noise_multiplier_meets_target_with_opacus_rdp():
    from opacus.accountants import RDPAccountant

    q, steps, target = 0.05, 600, 3.0
    sigma = sample_level_noise_multiplier(target, DELTA, q, steps)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    eps = acc.get_epsilon(DELTA)
    assert target - 0.02 <= eps <= target
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got 1.5"):
        sample_level_noise_multiplier(target, DELTA, 1.5, steps)


# ---- local DP --------------------------------------------------------------------------


def analytic_gaussian_epsilon(sensitivity: float, sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism (Balle & Wang 2018, Thm 8) at ``delta``."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    a = sensitivity / (2.0 * sigma)
    b = sigma / sensitivity

    def delta_of(eps: float) -> float:
        return norm.cdf(a - eps * b) - math.exp(eps + norm.logcdf(-a - eps * b))

    return brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


@pytest.mark.parametrize("C,z,T", [(1.0, 2.0, 1), (0.5, 4.0, 1), (1.0, 8.0, 10), (2.0, 3.0, 5)])
def test_local_gaussian_matches_analytic_gaussian_mechanism(C, z, T):
    pytest.importorskip("scipy")
    sigma = gaussian_noise_std(C, z)
    assert sigma == pytest.approx(z * C)
    ledger = LocalDpLedger("gaussian", z, DELTA, accountant="pld")
    ledger.step(count=T)
    # T Gaussian releases of a 2C-sensitive query with std sigma compose to one Gaussian with
    # sensitivity 2C*sqrt(T) (privacy loss is additive in the Gaussian shift).
    exact = analytic_gaussian_epsilon(2.0 * C * math.sqrt(T), sigma, DELTA)
    assert ledger.epsilon() == pytest.approx(exact, rel=0.02)
    assert ledger.epsilon() >= exact * (1 - 1e-6)  # PLD is pessimistic: never below the truth


@pytest.mark.parametrize("z,T", [(2.0, 1), (3.0, 20)])
def test_local_gaussian_matches_dp_accounting_computed_independently(z, T):
    C = 0.7
    sigma, sensitivity = gaussian_noise_std(C, z), 2.0 * C
    ledger = LocalDpLedger("gaussian", z, DELTA)  # RDP by default
    for _ in range(T):
        ledger.step()
    eps = ledger.epsilons()
    # RDP of the Gaussian: alpha * sensitivity^2 / (2 sigma^2) per release, times T.
    orders = rdp_lib.DEFAULT_RDP_ORDERS
    rdp = [T * a * sensitivity**2 / (2.0 * sigma**2) for a in orders]
    rdp_ref, _ = rdp_lib.compute_epsilon(orders, rdp, DELTA)
    assert eps["rdp"] == pytest.approx(rdp_ref, rel=0.01)
    pld_ref = (
        pld_lib.from_gaussian_mechanism(standard_deviation=sigma, sensitivity=sensitivity)
        .self_compose(T)
        .get_epsilon_for_delta(DELTA)
    )
    assert eps["pld"] == pytest.approx(pld_ref, rel=0.01)


def test_local_laplace_pure_epsilon_per_round():
    C, eps_round = 1.5, 0.8
    z = laplace_noise_multiplier(eps_round)
    b = laplace_noise_scale(C, z)
    assert 2.0 * C / b == pytest.approx(eps_round)
    one = LocalDpLedger("laplace", z, 1e-12)
    assert one.accountant == "pld"
    assert one.pure_epsilon_per_round() == pytest.approx(eps_round)
    one.step()
    assert one.epsilon() == pytest.approx(eps_round, rel=0.01)
    # Over T rounds PLD at delta beats basic composition T * eps but stays positive and growing.
    many = LocalDpLedger("laplace", z, DELTA)
    many.step(count=20)
    assert one.epsilon() < many.epsilon() <= 20 * eps_round
    ref = pld_lib.from_laplace_mechanism(parameter=b, sensitivity=2.0 * C).self_compose(20)
    assert many.epsilon() == pytest.approx(ref.get_epsilon_for_delta(DELTA), rel=0.01)
    state = json.loads(json.dumps(many.state_dict()))
    assert LocalDpLedger.from_state_dict(state).epsilon() == pytest.approx(many.epsilon())
    assert many.describe()["sample_rate"] == 1.0


def test_local_ledger_validation():
    with pytest.raises(ValueError, match="mechanism must be one of"):
        LocalDpLedger("exponential", 1.0, DELTA)
    with pytest.raises(ValueError, match="clip_norm must be a finite number > 0, got 0"):
        gaussian_noise_std(0, 1.0)
    zero = LocalDpLedger("laplace", 0.0, DELTA)
    zero.step()
    assert zero.epsilon() == math.inf
