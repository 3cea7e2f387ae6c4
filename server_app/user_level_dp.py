"""User-level DP-FedAvg aggregation, placed BEFORE the strategy's server step.

Mechanism (McMahan et al., ICLR 2018, "Learning differentially private recurrent language
models"; the Gaussian sum query of Andrew et al. 2021 for adaptive clipping):

* every sampled client's update delta_i = w_i - w_global is clipped to L2 norm C (by the
  server in ``dp = "server"``, by the client itself in ``dp = "client"``, where the server
  checks the bound and rejects replies that break it);
* the clipped deltas are summed and divided by a FIXED denominator m, the expected number of
  sampled clients (never the number of replies, never example weights), so adding or
  removing one client changes the mean by at most C/m;
* Gaussian noise N(0, (z*C/m)^2) is added to every coordinate of that mean.

Neighbouring relation: datasets differing in ALL the data of one client (user-level), with
add/remove-one for Poisson sampling and "all", replace-one for fixed-size sampling.

:class:`server_app.dp_strategy.UserLevelDPStrategy` wraps the run's Flower strategy around
this mechanism: the strategy's server step (FedAvgM's momentum, FedAdam's moments) then runs on
the noisy mean only, as post-processing.

With adaptive clipping the clipped-count query of Andrew et al. (2021) also touches the
data; the update noise then uses the larger effective multiplier z_delta so that the pair
costs what the ledger is told (z). See common/privacy/adaptive_clipping.py.

Randomness: the update noise and the count noise come from ``rng``, the server's secret
CSPRNG (:class:`common.privacy.secret_random.SecretRandom`: AES-256-CTR keyed from the OS's
entropy, Gaussian drawn as a sum of four draws against floating-point attacks). It is never
derived from ``seed``: noise that can be regenerated can be subtracted, leaving the clipped
sum itself (tests/test_red_team.py tries).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.privacy.adaptive_clipping import AdaptiveClipping, effective_noise_multiplier
from common.privacy.clipping import (
    Arrays,
    apply_delta,
    clip_update,
    fixed_denominator_mean,
    gaussian_noise_like,
    model_delta,
    update_norm,
)
from common.privacy.secret_random import SecretRandom

# Client-side clipping is checked with this slack for float32 round-off.
CLIP_TOLERANCE = 1e-4


@dataclass
class RoundPrivacy:
    """What one DP aggregation did, for the metrics row."""

    clipping_norm: float
    noise_std: float
    num_clipped: int
    num_rejected: int


class UserLevelDP:
    def __init__(
        self,
        noise_multiplier: float,
        clipping_norm: float,
        expected_clients: float,
        clip_on_server: bool,
        rng: SecretRandom,
        adaptive: AdaptiveClipping | None = None,
    ):
        self.noise_multiplier = noise_multiplier
        self.fixed_clipping_norm = clipping_norm
        self.expected_clients = expected_clients
        self.clip_on_server = clip_on_server
        self.adaptive = adaptive
        self.rng = rng
        # Noise multiplier actually applied to the update sum (z_delta >= z with adaptive clipping).
        self.update_noise_multiplier = noise_multiplier
        if adaptive is not None:
            sigma_b = adaptive.count_noise_std_for(expected_clients)
            self.update_noise_multiplier = effective_noise_multiplier(noise_multiplier, sigma_b)

    @property
    def clipping_norm(self) -> float:
        return self.adaptive.clipping_norm if self.adaptive else self.fixed_clipping_norm

    def aggregate(
        self, global_arrays: Arrays, client_arrays: list[Arrays], reported_unclipped: list[int] | None = None
    ) -> tuple[Arrays, RoundPrivacy]:
        """Return the new global arrays (global + noisy clipped mean delta) and what was done.

        ``reported_unclipped`` (client mode with adaptive clipping): each client's own report
        (1 or 0) of whether its update was within the clip norm before it clipped.
        """
        clip = self.clipping_norm
        clipped: list[Arrays] = []
        unclipped: list[int] = []  # per used update: 1 if it was within the clip norm
        rejected = 0
        for i, arrays in enumerate(client_arrays):
            delta = model_delta(arrays, global_arrays)
            if self.clip_on_server:
                delta, _, was_within = clip_update(delta, clip)
            elif update_norm(delta) > clip * (1 + CLIP_TOLERANCE):
                rejected += 1  # a client that did not clip: its update is not used
                continue
            else:
                was_within = int(reported_unclipped[i]) if reported_unclipped is not None else 1
            clipped.append(delta)
            unclipped.append(was_within)
        std = self.update_noise_multiplier * clip / self.expected_clients
        if clipped:
            mean = fixed_denominator_mean(clipped, self.expected_clients)
        else:  # an empty Poisson round still releases noise: zero sum + noise
            mean = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_arrays.items()}
        noisy = {k: v + n for (k, v), n in zip(mean.items(), gaussian_noise_like(mean, std, self.rng).values())}
        if self.adaptive is not None:
            self.adaptive.update(unclipped, self.expected_clients, self.rng)
        return apply_delta(global_arrays, noisy), RoundPrivacy(clip, std, len(unclipped) - sum(unclipped), rejected)
