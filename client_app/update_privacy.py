"""What a client does to its model update before it leaves the machine, per privacy mode.

* ``client``: clip the update (delta from the global model) to the L2 norm the server sent,
  and report whether it was unclipped (the adaptive-clipping bit). The server adds the noise
  (user-level DP-FedAvg; see server_app/user_level_dp.py). Flower's ``fixedclipping_mod``
  does the same clip but divides by zero on an all-zero update (tests/test_flower_dp_audit.py),
  so the zero-safe :func:`common.privacy.clipping.clip_update` is used instead.
* ``local``: the client trusts no one: it clips (L2 for Gaussian, L1 for Laplace) and adds the
  noise itself, and its own ledger (common/privacy/local_dp.py) composes every release.
"""

from __future__ import annotations

import math

import numpy as np

from common.config import RunConfig
from common.privacy.clipping import Arrays, apply_delta, clip_update, model_delta
from common.privacy.secret_random import SecretRandom

# common.privacy.local_dp pulls in dp-accounting and scipy (~0.7 s): imported only in local mode,
# since every deployment message starts a fresh process.


def clip_for_server(new: Arrays, old: Arrays, clipping_norm: float) -> tuple[Arrays, int]:
    """``client`` mode: the clipped new model and the bit 1 = 'was within the norm'."""
    clipped, _, unclipped = clip_update(model_delta(new, old), clipping_norm)
    return apply_delta(old, clipped), unclipped


def _clip_l1(delta: Arrays, bound: float) -> Arrays:
    norm = float(sum(np.abs(v).sum(dtype=np.float64) for v in delta.values()))
    scale = bound / norm if norm > bound else 1.0
    return {k: v * scale for k, v in delta.items()}


def local_noise_multiplier(config: RunConfig) -> float:
    """As configured, or solved so that every planned round together reaches target-epsilon."""
    if not config.target_epsilon:
        return config.noise_multiplier
    from common.privacy.calibration import solve_local_noise_multiplier

    return solve_local_noise_multiplier(
        config.target_epsilon, config.target_delta, config.num_server_rounds, config.local_mechanism
    )


# Laplace noise is added on a power-of-two grid of about 2^-20 clip norms, in integers (see _laplace_on_grid).
LAPLACE_GRID_BITS = 20


def randomize_locally(new: Arrays, old: Arrays, config: RunConfig, z: float, rng: SecretRandom) -> Arrays:
    """``local`` mode: clip the update and add Gaussian (L2) or Laplace (L1) noise to it.

    ``rng`` is this client's own CSPRNG, so every release, a repeated request included, gets
    fresh noise that nobody else can regenerate.
    """
    from common.privacy.local_dp import gaussian_noise_std

    delta = model_delta(new, old)
    if config.local_mechanism == "gaussian":
        delta, _, _ = clip_update(delta, config.clipping_norm)
        std = gaussian_noise_std(config.clipping_norm, z)
        noisy = {k: v + rng.gaussian(v.shape, std) for k, v in delta.items()}
    else:
        noisy = _laplace_on_grid(delta, config.clipping_norm, z, rng)
    return apply_delta(old, noisy)


def _laplace_on_grid(delta: Arrays, clipping_norm: float, z: float, rng: SecretRandom) -> Arrays:
    """Discrete Laplace on a grid: the floating-point-safe form of the L1 Laplace mechanism.

    Textbook float Laplace leaks its input through the low-order bits of the output (Mironov,
    CCS 2012). Here the grid step g is the power of two 2^(floor(log2 C) - 20), so K = floor(C/g)
    lies in [2^20, 2^21). The update is clipped to L1 norm C, rounded to the grid, and clipped
    again in integers so its L1 norm is at most K steps; integer noise P(k) ~ exp(-|k| / t)
    with t = z*C/g is added, and the result times g is released. Any two such integer vectors
    differ by at most 2K in L1, so one release is 2K/t = 2Kg/(zC) <= 2/z pure DP: at most what
    the ledger (common/privacy/local_dp.py) charges for the continuous mechanism. Outputs are
    integers times a power of two (exact in float64), so no low-order bits carry the input.
    """
    from common.privacy.local_dp import laplace_noise_scale

    grid = 2.0 ** (math.floor(math.log2(clipping_norm)) - LAPLACE_GRID_BITS)
    steps = math.floor(clipping_norm / grid)
    clipped = _clip_l1(delta, clipping_norm)
    ints = {k: np.rint(np.asarray(v, dtype=np.float64) / grid).astype(np.int64) for k, v in clipped.items()}
    norm = int(sum(np.abs(v).sum() for v in ints.values()))
    if norm > steps:  # rounding may push the norm just above K: shrink in exact integer arithmetic
        ints = {k: np.sign(v) * (np.abs(v) * steps // norm) for k, v in ints.items()}
    scale_in_steps = laplace_noise_scale(clipping_norm, z) / grid  # t = z*C/g
    return {k: (v + rng.discrete_laplace(v.shape, scale_in_steps)) * grid for k, v in ints.items()}


def local_ledger(config: RunConfig, z: float, saved: dict | None):
    from common.privacy.local_dp import LocalDpLedger

    if saved:
        return LocalDpLedger.from_state_dict(saved["ledger"])
    return LocalDpLedger(config.local_mechanism, z, config.target_delta)
