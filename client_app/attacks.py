"""Byzantine clients for robustness experiments (simulation only).

With ``attack`` != "none", the demo partitions with ``partition-id < malicious-clients``
replace their honest update delta by an attack before replying:

* ``sign-flip``: -attack-scale * delta (pushes the model the other way);
* ``scale``: attack-scale * delta (boosts its own update);
* ``noise``: Gaussian noise with attack-scale times the update's own per-coordinate spread.

A client on its own file (``data-path``) never attacks: this is a test switch, not a mode.
"""

from __future__ import annotations

import numpy as np

from common.config import NodeConfig, RunConfig
from common.privacy.clipping import Arrays, apply_delta, model_delta


def is_malicious(config: RunConfig, node: NodeConfig) -> bool:
    return config.attack != "none" and node.partition_id is not None and node.partition_id < config.malicious_clients


def attack_update(new: Arrays, old: Arrays, config: RunConfig, rng: np.random.Generator) -> Arrays:
    delta = model_delta(new, old)
    if config.attack == "sign-flip":
        bad = {k: -config.attack_scale * v for k, v in delta.items()}
    elif config.attack == "scale":
        bad = {k: config.attack_scale * v for k, v in delta.items()}
    else:
        bad = {k: rng.normal(0.0, config.attack_scale * (float(v.std()) or 1e-3), v.shape) for k, v in delta.items()}
    return apply_delta(old, bad)
