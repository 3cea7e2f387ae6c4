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

import numpy as np

from common.config import RunConfig
from common.privacy.clipping import Arrays, apply_delta, clip_update, model_delta

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


def randomize_locally(new: Arrays, old: Arrays, config: RunConfig, z: float, rng: np.random.Generator) -> Arrays:
    """``local`` mode: clip the update and add Gaussian (L2) or Laplace (L1) noise to it."""
    from common.privacy.local_dp import gaussian_noise_std, laplace_noise_scale

    delta = model_delta(new, old)
    if config.local_mechanism == "gaussian":
        delta, _, _ = clip_update(delta, config.clipping_norm)
        std = gaussian_noise_std(config.clipping_norm, z)
        noisy = {k: v + rng.normal(0.0, std, v.shape) for k, v in delta.items()}
    else:
        delta = _clip_l1(delta, config.clipping_norm)
        scale = laplace_noise_scale(config.clipping_norm, z)
        noisy = {k: v + rng.laplace(0.0, scale, v.shape) for k, v in delta.items()}
    return apply_delta(old, noisy)


def local_ledger(config: RunConfig, z: float, saved: dict | None):
    from common.privacy.local_dp import LocalDpLedger

    if saved:
        return LocalDpLedger.from_state_dict(saved["ledger"])
    return LocalDpLedger(config.local_mechanism, z, config.target_delta)
