"""A client that trusts no one enforces its own privacy policy (``dpsgd`` and ``local`` modes).

The run config comes from the server's operator, the very party a ``local``/``dpsgd`` client
does not trust. So what the server asks (noise multiplier or target epsilon, delta, rounds,
even the ``dp`` mode) is checked against the client's own :class:`common.config.ClientPolicy`
from its node config, and a request that breaks it is refused with the reason in the reply.
The client's noise comes from its own CSPRNG, keyed from its machine's entropy.
"""

from __future__ import annotations

import math

from common.config import ClientPolicy, RunConfig
from common.privacy.secret_random import SecretRandom


def mode_refusal(config: RunConfig, policy: ClientPolicy) -> str:
    """Why this run's ``dp`` mode is refused ("" if it is accepted)."""
    if policy.require_dp and config.dp != policy.require_dp:
        return (
            f"this client's policy requires dp = {policy.require_dp!r} (node config require-dp), "
            f"but the run asks for dp = {config.dp!r}"
        )
    return ""


def noise_refusal(config: RunConfig, policy: ClientPolicy, noise_multiplier: float) -> str:
    """Why releasing with this noise and delta breaks the policy ("" if it does not)."""
    if noise_multiplier < policy.min_noise_multiplier:
        return (
            f"the run asks for noise multiplier {noise_multiplier:.4g}, below this client's minimum "
            f"{policy.min_noise_multiplier:g} (node config min-noise-multiplier)"
        )
    if config.target_delta > policy.max_delta:
        return (
            f"the run accounts at delta {config.target_delta:g}, above this client's maximum "
            f"{policy.max_delta:g} (node config max-delta)"
        )
    return ""


def epsilon_cap(config: RunConfig, policy: ClientPolicy) -> float:
    """The tighter of the client's own cap and the server's max-epsilon (0 = none)."""
    return min(policy.max_epsilon, config.max_epsilon or math.inf)


def client_rng(policy: ClientPolicy, server_round: int) -> SecretRandom:
    """Fresh secret randomness for one release; a debug key (node config only) makes it reproducible."""
    if policy.debug_noise_key:
        return SecretRandom.from_debug_key(f"{policy.debug_noise_key}|{server_round}")
    return SecretRandom()
