"""Adaptive clipping norm for user-level DP-FedAvg (Andrew et al., NeurIPS 2021).

Mechanism ("Differentially private learning with adaptive clipping", geometric update):

* In round t every sampled client i clips its update with the current norm C_t and reports
  the bit b_i = 1 if ||delta_i|| <= C_t (the update was NOT clipped), else 0.
* The server releases a noisy fraction of unclipped updates over the EXPECTED number of
  sampled clients m (a fixed denominator, never the number of replies)::

      b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2      (clamped to [0, 1])

* and moves the norm towards the gamma-quantile of the update norms::

      C_{t+1} = C_t * exp(-eta_C * (b_bar - gamma))

  Too many clipped updates (b_bar < gamma) increase C; too few decrease it. The fixed point
  is the C at which a fraction gamma of updates is unclipped. Defaults follow the paper:
  gamma = 0.5, eta_C = 0.2, sigma_b = m / 20.

Flower 1.41's ``DifferentialPrivacy*AdaptiveClipping`` count CLIPPED updates but keep this
sign, so their C moves away from the target (see tests/test_flower_dp_audit.py).

Privacy. Each client contributes one bit to a count query. With bits in {0, 1} the count
has sensitivity 1 (add/remove one client); centring the bits as (b_i - 1/2), as above and as
in tensorflow_privacy's QuantileEstimatorQuery, halves it to 1/2, so the count is a Gaussian
mechanism with noise multiplier 2*sigma_b. Released together with the update sum (noise
multiplier z_delta), the pair costs the same as one Gaussian mechanism with multiplier z where
z^-2 = z_delta^-2 + (2*sigma_b)^-2. So to spend a budget computed for z, the update noise must
use the larger ``z_delta = (z^-2 - (2*sigma_b)^-2)^-1/2`` (see
:func:`effective_noise_multiplier`), which requires z < 2*sigma_b. The accountant (the ledger,
elsewhere) is fed z; the update noise std is z_delta * C_t / m, with the C_t USED FOR CLIPPING
in that round (not the updated C_{t+1}).

Client-sampling amplification (Poisson rate q) applies to the pair as a whole, since the
same sampled clients feed both queries.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from common.privacy.secret_random import SecretRandom

DEFAULT_TARGET_UNCLIPPED_QUANTILE = 0.5
DEFAULT_CLIP_LEARNING_RATE = 0.2
DEFAULT_COUNT_NOISE_FRACTION = 1.0 / 20.0  # sigma_b = m / 20


def default_count_noise_std(expected_clients: float) -> float:
    """Andrew et al.'s default sigma_b = m / 20 for m expected clients per round."""
    return float(expected_clients) * DEFAULT_COUNT_NOISE_FRACTION


def effective_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier for the update sum so that update + count cost as much as ``noise_multiplier``.

    ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``. ``z = 0`` (no privacy) returns 0. Raises if
    ``z >= 2 sigma_b``: the count alone would already cost more than the whole budget.
    """
    z, sigma_b = float(noise_multiplier), float(count_noise_std)
    if z < 0 or sigma_b < 0:
        raise ValueError("noise multiplier and count noise std must be non-negative")
    if z == 0.0:
        return 0.0
    if z >= 2.0 * sigma_b:
        raise ValueError(
            f"noise multiplier {z} needs count noise std > {z / 2} (got {sigma_b}): "
            "the clipped-count query would use up the whole budget"
        )
    return (z**-2 - (2.0 * sigma_b) ** -2) ** -0.5


class AdaptiveClipping:
    """Holds the clipping norm C and applies Andrew et al.'s geometric update once per round.

    ``count_noise_std=None`` means sigma_b = expected_clients / 20 at each update (constant
    as long as the expected number of clients per round is). The caller owns the ``rng``:
    the server's secret CSPRNG (:class:`common.privacy.secret_random.SecretRandom`), since
    count noise an observer could regenerate would reveal the exact clipped count.
    """

    def __init__(
        self,
        initial_clipping_norm: float = 0.1,
        target_unclipped_quantile: float = DEFAULT_TARGET_UNCLIPPED_QUANTILE,
        learning_rate: float = DEFAULT_CLIP_LEARNING_RATE,
        count_noise_std: float | None = None,
    ) -> None:
        if not (math.isfinite(initial_clipping_norm) and initial_clipping_norm > 0):
            raise ValueError("initial clipping norm must be positive and finite")
        if not 0.0 <= target_unclipped_quantile <= 1.0:
            raise ValueError("target unclipped quantile must be in [0, 1]")
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError("clip learning rate must be positive")
        if count_noise_std is not None and not count_noise_std >= 0:
            raise ValueError("count noise std must be non-negative")
        self.clipping_norm = float(initial_clipping_norm)
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_std = None if count_noise_std is None else float(count_noise_std)
        self.rounds = 0
        self.last_unclipped_fraction: float | None = None

    def count_noise_std_for(self, expected_clients: float) -> float:
        """sigma_b used for a round with ``expected_clients`` expected participants."""
        if self.count_noise_std is not None:
            return self.count_noise_std
        return default_count_noise_std(expected_clients)

    def noisy_unclipped_fraction(
        self, bits: Iterable[int | bool], expected_clients: float, rng: "SecretRandom | None"
    ) -> float:
        """The released b_bar: (sum(b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2, clamped to [0, 1]."""
        m = float(expected_clients)
        if not (math.isfinite(m) and m > 0):
            raise ValueError("expected_clients must be positive")
        values = [int(b) for b in bits]
        if any(v not in (0, 1) for v in values):
            raise ValueError("unclipped bits must be 0 or 1")
        centred = sum(v - 0.5 for v in values)
        sigma_b = self.count_noise_std_for(m)
        if sigma_b > 0:
            if rng is None:
                raise ValueError("an rng is required when the count noise std is positive")
            centred += float(rng.gaussian((), sigma_b))
        return min(1.0, max(0.0, centred / m + 0.5))

    def update(
        self, bits: Iterable[int | bool], expected_clients: float, rng: "SecretRandom | None"
    ) -> float:
        """Apply one round's bits (1 = unclipped at the current C); return the new C."""
        fraction = self.noisy_unclipped_fraction(bits, expected_clients, rng)
        self.clipping_norm *= math.exp(-self.learning_rate * (fraction - self.target_unclipped_quantile))
        self.last_unclipped_fraction = fraction
        self.rounds += 1
        return self.clipping_norm

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state, to checkpoint with the run."""
        return {
            "clipping_norm": self.clipping_norm,
            "target_unclipped_quantile": self.target_unclipped_quantile,
            "learning_rate": self.learning_rate,
            "count_noise_std": self.count_noise_std,
            "rounds": self.rounds,
            "last_unclipped_fraction": self.last_unclipped_fraction,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AdaptiveClipping":
        obj = cls(
            initial_clipping_norm=float(state["clipping_norm"]),
            target_unclipped_quantile=float(state["target_unclipped_quantile"]),
            learning_rate=float(state["learning_rate"]),
            count_noise_std=None if state.get("count_noise_std") is None else float(state["count_noise_std"]),
        )
        obj.rounds = int(state.get("rounds", 0))
        last = state.get("last_unclipped_fraction")
        obj.last_unclipped_fraction = None if last is None else float(last)
        return obj

    def __repr__(self) -> str:
        return (
            f"AdaptiveClipping(C={self.clipping_norm:.6g}, gamma={self.target_unclipped_quantile}, "
            f"eta={self.learning_rate}, sigma_b={self.count_noise_std})"
        )
