"""Solve for the noise multiplier that meets a target epsilon after the planned rounds.

User level (DP-FedAvg), local DP, and sample level (DP-SGD, via Opacus).

Why: users think in budgets ("epsilon 4 at delta 1e-5 over 100 rounds"), the mechanism needs
z. Calibration must use the SAME accountant, sampling model and neighbouring relation as the
ledger that later reports the spent budget, otherwise the run ends over (or far under) budget.
So the solvers evaluate the ledgers themselves (``UserLevelLedger``, ``LocalDpLedger``); nothing
here re-derives epsilon.

Epsilon is non-increasing in z for every event used here (more noise never costs more), so
bisection on z is sound. The result z satisfies eps(z) <= target and, by default,
eps(z) >= 0.99 * target (PLD's discretisation can make eps(z) a step function; the solver then
returns the smallest z it found that meets the target, still <= target).
"""

from __future__ import annotations

import math
from typing import Callable

from common.privacy.accounting import UserLevelLedger, check_sampling
from common.privacy.composition import check_accountant, check_delta
from common.privacy.local_dp import MECHANISMS, LocalDpLedger

_Z_MIN = 1e-3
_Z_MAX = 1e4
_MAX_ITER = 100


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (0.0 < float(value) < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def solve_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling: str,
    num_clients: int,
    clients_per_round: int,
    accountant: str = "rdp",
    rel_tol: float = 0.01,
) -> float:
    """Smallest z (to ``rel_tol``) whose user-level epsilon after ``rounds`` rounds is <= target.

    Accounting is exactly ``UserLevelLedger(z, sampling, num_clients, clients_per_round, delta,
    accountant)`` stepped ``rounds`` times (see accounting.py for events and relations).
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    rounds = _check_count("rounds", rounds)
    check_sampling(sampling, num_clients, clients_per_round)
    check_accountant(accountant)
    if not (0.0 < rel_tol < 1.0):
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")

    def eps(z: float) -> float:
        ledger = UserLevelLedger(z, sampling, num_clients, clients_per_round, delta, accountant)
        ledger.step(count=rounds)
        return ledger.epsilon()

    return _bisect_noise_multiplier(
        eps, target, rel_tol, f"after {rounds} rounds; raise the target, delta or the number of "
        f"clients, or plan fewer rounds"
    )


def solve_local_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    mechanism: str,
    accountant: str | None = None,
    rel_tol: float = 0.01,
) -> float:
    """Smallest local-DP z (to ``rel_tol``) whose epsilon after ``rounds`` releases is <= target.

    Accounting is exactly ``LocalDpLedger(mechanism, z, delta, accountant)`` stepped ``rounds``
    times (see local_dp.py: sensitivity 2C, no sampling; default accountant RDP for Gaussian,
    PLD for Laplace). The client then adds std/scale z*C (``gaussian_noise_std`` /
    ``laplace_noise_scale``). ``rounds`` is the most releases the client will make.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    rounds = _check_count("rounds", rounds)
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if accountant is not None:
        check_accountant(accountant)
    if not (0.0 < rel_tol < 1.0):
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")

    def eps(z: float) -> float:
        ledger = LocalDpLedger(mechanism, z, delta, accountant)
        ledger.step(count=rounds)
        return ledger.epsilon()

    return _bisect_noise_multiplier(
        eps, target, rel_tol, f"after {rounds} local releases; raise the target or plan fewer rounds"
    )


def _bisect_noise_multiplier(
    eps_of: Callable[[float], float], target: float, rel_tol: float, unreachable_hint: str
) -> float:
    """Return z with (1 - rel_tol) * target <= eps(z) <= target, for eps non-increasing in z."""
    eps_cache: dict[float, float] = {}

    def eps(z: float) -> float:
        if z not in eps_cache:
            eps_cache[z] = eps_of(z)
        return eps_cache[z]

    # Bracket: eps(lo) > target >= eps(hi), by doubling / halving from z = 1.
    z = 1.0
    e = eps(z)
    if e <= target:
        hi, e_hi = z, e
        lo = z / 2.0
        e_lo = eps(lo)
        while e_lo <= target:
            hi, e_hi = lo, e_lo
            if lo <= _Z_MIN:
                raise ValueError(
                    f"target_epsilon={target} is too large to calibrate: even "
                    f"noise_multiplier={lo:g} gives epsilon {e_hi:.4g} <= target; use a target "
                    f"below that or no DP"
                )
            lo /= 2.0
            e_lo = eps(lo)
    else:
        lo = z
        hi = z * 2.0
        e_hi = eps(hi)
        while e_hi > target:
            lo = hi
            hi *= 2.0
            if hi > _Z_MAX:
                raise ValueError(
                    f"target_epsilon={target} is unreachable: noise_multiplier up to {_Z_MAX:g} "
                    f"still gives epsilon {e_hi:.4g} {unreachable_hint}"
                )
            e_hi = eps(hi)

    # Safeguarded bisection: keep eps(lo) > target >= eps(hi); stop once eps(hi) is within
    # rel_tol below target. The trial point interpolates log eps against log z (nearly linear
    # for these accountants), aiming just under target, and is clamped to the inner 80% of the
    # bracket so a poor interpolation still shrinks it like bisection. ~3-5 evaluations.
    aim = math.log(target * (1.0 - rel_tol / 2.0))
    for _ in range(_MAX_ITER):
        if e_hi >= (1.0 - rel_tol) * target:
            break
        e_lo = eps_cache[lo]
        mid = 0.5 * (lo + hi)
        if math.isfinite(e_lo) and e_hi > 0.0:
            t = (math.log(e_lo) - aim) / (math.log(e_lo) - math.log(e_hi))
            t = min(max(t, 0.1), 0.9)
            mid = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
        e_mid = eps(mid)
        if e_mid <= target:
            hi, e_hi = mid, e_mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi


def sample_level_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """DP-SGD noise multiplier for a client (sample-level DP, Abadi et al. 2016).

    Mechanism: per-example gradients clipped to C, Gaussian noise std z*C on the batch sum;
    sampling: Poisson with rate q = 1/ceil(n_local/batch), ceil(n_local/batch) steps per epoch
    (client_app/dpsgd.py's own secret batch sampler); relation: add/remove
    one example; accountant: Opacus's RDP accountant, matching the per-client ledger that
    ``dpsgd`` mode keeps. ``steps`` is the TOTAL over all rounds the client will train in.
    Wraps opacus.accountants.utils.get_noise_multiplier (absolute epsilon tolerance 0.01).
    """
    target = _check_positive("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not (
        0.0 < float(sample_rate) <= 1.0
    ):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    steps = _check_count("steps", steps)
    # Imported here: opacus pulls in torch (seconds per fresh ClientApp process).
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=float(sample_rate),
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=0.01,
            )
        )
    except ValueError as exc:  # opacus: "The privacy budget is too low."
        raise ValueError(
            f"target_epsilon={target} is unreachable with sample_rate={sample_rate}, "
            f"steps={steps}, delta={delta}: {exc}"
        ) from exc
