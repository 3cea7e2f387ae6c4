"""Will the noise swamp the update? A pre-training estimate for user-level DP-FedAvg.

In ``dp = "server"`` / ``"client"`` every round releases (server_app/user_level_dp.py)::

    noisy mean = (1/m) * sum_i clip(delta_i, C)  +  N(0, sigma^2 I_d),   sigma = z * C / m

with z the noise multiplier, C the clipping norm, m the expected clients per round (the fixed
denominator) and d the number of model parameters (every coordinate gets noise).

* Noise: its L2 norm is about ``sigma * sqrt(d) = z * C * sqrt(d) / m`` (a chi distribution
  with d degrees of freedom concentrates at sqrt(d) times the per-coordinate std).
* Signal: the mean of m vectors of norm <= C has norm <= C, with equality only when every
  client's clipped update points the same way. Real updates disagree, so C is the BEST case.

So, per round, noise norm / best-case signal norm::

    r = z * sqrt(d) / m            (C cancels: clipping harder shrinks signal and noise alike)

Over T rounds a consistent signal adds up linearly (T * C) while independent noise adds up
as sqrt(T) * sigma * sqrt(d), so the whole run's ratio is ``r / sqrt(T)``. This module warns when
that is above 1: even if every client agreed in every round, the noise added over the run would
be larger than everything the clients contributed. It ignores how much of the noise lands in
directions that matter to the loss, so it is a screen for hopeless settings, not a prediction
of accuracy. Measured on MNIST-1D (benchmarks/results_privacy.md, "Recipes"; 1,000 clients,
cnn1d with d = 9,802): m = 50, 100 rounds, epsilon 4 (z = 1.01): r = 2.0, run ratio 0.20, 61%
against 77% non-private; m = 50, 50 rounds, epsilon 1 (z = 1.85): r = 3.7, run ratio 0.52, 38%
against 55%. The README's 10 clients with a 26k-parameter MLP (r ~ 19 per round) did not learn.

What lowers r: more clients per round (r falls as 1/m for a given z; under a target epsilon z
grows more slowly than m while the sampling rate is small), a larger target epsilon or fewer
rounds (both lower the z that the calibration solves for), or a smaller model (sqrt(d)).

Pure arithmetic (no torch, no accountant), so the server can call it before the first round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Warn when the noise added over the whole run exceeds the best-case signal of the whole run.
RUN_RATIO_WARNING = 1.0


@dataclass(frozen=True)
class SignalEstimate:
    noise_multiplier: float  # z
    clipping_norm: float  # C
    expected_clients: float  # m
    num_params: int  # d
    rounds: int  # T

    @property
    def noise_std(self) -> float:
        """Per-coordinate noise std on the mean update, z * C / m."""
        return self.noise_multiplier * self.clipping_norm / self.expected_clients

    @property
    def noise_norm(self) -> float:
        """Typical L2 norm of one round's noise, z * C * sqrt(d) / m."""
        return self.noise_std * math.sqrt(self.num_params)

    @property
    def round_ratio(self) -> float:
        """Noise norm over the best-case signal norm C in one round: z * sqrt(d) / m."""
        return self.noise_multiplier * math.sqrt(self.num_params) / self.expected_clients

    @property
    def run_ratio(self) -> float:
        """The same over all T rounds (signal adds up as T, noise as sqrt(T)): round_ratio / sqrt(T)."""
        return self.round_ratio / math.sqrt(self.rounds)

    @property
    def swamped(self) -> bool:
        return self.run_ratio > RUN_RATIO_WARNING

    def clients_for_ratio_one(self) -> float:
        """Expected clients per round that would bring the run ratio to 1 AT THE SAME z."""
        return self.expected_clients * self.run_ratio


def estimate(noise_multiplier: float, clipping_norm: float, expected_clients: float, num_params: int,
             rounds: int) -> SignalEstimate:
    """A :class:`SignalEstimate`, with the inputs checked (z >= 0, C > 0, m > 0, d >= 1, T >= 1)."""
    z, c, m = float(noise_multiplier), float(clipping_norm), float(expected_clients)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"noise multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"clipping norm must be finite and > 0, got {clipping_norm!r}")
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"expected clients per round must be > 0, got {expected_clients!r}")
    if int(num_params) < 1 or int(rounds) < 1:
        raise ValueError(f"need num_params >= 1 and rounds >= 1, got {num_params!r} and {rounds!r}")
    return SignalEstimate(z, c, m, int(num_params), int(rounds))


def noise_warning(noise_multiplier: float, clipping_norm: float, expected_clients: float, num_params: int,
                  rounds: int) -> str | None:
    """A plain warning when the noise will swamp the update (see the module docstring), else None."""
    e = estimate(noise_multiplier, clipping_norm, expected_clients, num_params, rounds)
    if not e.swamped:
        return None
    return (
        f"the privacy noise will swamp the model update: with noise multiplier z = {e.noise_multiplier:.3g}, "
        f"{e.expected_clients:g} expected clients per round and {e.num_params} model parameters, each round's "
        f"noise has norm ~{e.round_ratio:.3g} x the largest possible mean update (z * sqrt(d) / m), and "
        f"~{e.run_ratio:.3g} x over all {e.rounds} rounds, even if every client agreed. Expect little or no "
        f"learning. To fix: sample more clients per round (the noise on the mean falls as 1/m; about "
        f"{math.ceil(e.clients_for_ratio_one()):d} per round at this z), raise target-epsilon, plan fewer rounds, "
        f"or use a smaller model"
    )
