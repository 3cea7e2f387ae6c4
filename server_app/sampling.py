"""Which clients take part in a round.

Sampling lives here rather than inside each Flower strategy so that it is the same for every
strategy and so the privacy accountant can be told exactly how clients were sampled.

Where the randomness comes from depends on what it protects:

* user-level DP (``dp = 'server'`` or ``'client'``): amplification by sampling holds only if
  no one can predict who takes part, so the sampler draws from the server's secret CSPRNG
  (:class:`common.privacy.secret_random.SecretRandom`, keyed from the OS's entropy);
* every other mode: sampling protects nothing, so it is seeded (:class:`SeededChoices`) and a
  run is reproduced exactly from its ``seed``.

Both sources offer ``bernoulli(p, n)`` and ``choice_without_replacement(items, k)``.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence, TypeVar, cast

import numpy as np
from flwr.serverapp import Grid

T = TypeVar("T")


class Choices(Protocol):
    def bernoulli(self, p: float, size: int) -> np.ndarray: ...

    def choice_without_replacement(self, items: Sequence[T], k: int) -> list[T]: ...


class Sampler(Protocol):
    def sample(self, node_ids: Sequence[int]) -> list[int]: ...


class SeededChoices:
    """Reproducible choices from a public seed: for sampling that no guarantee rests on."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def bernoulli(self, p: float, size: int) -> np.ndarray:
        return np.array([self.rng.random() < p for _ in range(size)], dtype=bool)

    def choice_without_replacement(self, items: Sequence[T], k: int) -> list[T]:
        return self.rng.sample(list(items), k)


class ClientSampler:
    """Fixed-size sampling without replacement: a count (int >= 1) or a share (float <= 1)."""

    def __init__(self, clients_per_round: float, rng: Choices):
        self.clients_per_round = clients_per_round
        self.rng = rng

    def sample_size(self, num_available: int) -> int:
        if isinstance(self.clients_per_round, float):
            return max(1, int(round(self.clients_per_round * num_available)))
        return min(int(self.clients_per_round), num_available)

    def sample(self, node_ids: Sequence[int]) -> list[int]:
        """``node_ids`` in a stable order (by client identity), so a seeded run picks the same clients."""
        return self.rng.choice_without_replacement(list(node_ids), self.sample_size(len(node_ids)))


class OfferedNodes:
    """Stands in for the Grid inside a strategy's ``configure_*``: it offers only the sampled nodes.

    Flower's strategies ask the grid for node ids and sample from them; with fraction 1.0
    and no minimum, they take exactly these.
    """

    def __init__(self, node_ids: Sequence[int]):
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


def offered(node_ids: Sequence[int]) -> Grid:
    """The stand-in typed as the Grid a strategy's ``configure_*`` expects: those methods call
    only ``get_node_ids`` on it (Flower 1.41's ``sample_nodes``), which is all it offers."""
    return cast(Grid, OfferedNodes(node_ids))


class PoissonSampler:
    """Poisson sampling: every connected client takes part independently with rate q.

    The round's size varies (it may be zero). This is the sampling the privacy accountant
    assumes for amplification by sampling with the add/remove-one-client relation, so DP
    runs with ``sampling = "poisson"`` must sample exactly like this, never a fixed count.
    A client that is not connected takes part with probability 0 <= q, so dropouts do not
    weaken the accounted rate.
    """

    def __init__(self, sample_rate: float, rng: Choices):
        self.sample_rate = sample_rate
        self.rng = rng

    def sample(self, node_ids: Sequence[int]) -> list[int]:
        chosen = self.rng.bernoulli(self.sample_rate, len(node_ids))
        return [node for node, keep in zip(node_ids, chosen) if keep]


class EveryoneSampler:
    """Every connected client, every round (no amplification by sampling)."""

    def sample(self, node_ids: Sequence[int]) -> list[int]:
        return list(node_ids)
