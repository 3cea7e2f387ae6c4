"""Which clients take part in a round.

Sampling lives here rather than inside each Flower strategy so that it is seeded (the same
run picks the same clients), the same for every strategy, and so the privacy accountant
can be told exactly how clients were sampled.
"""

from __future__ import annotations

import random
from typing import Sequence


class ClientSampler:
    """Fixed-size sampling without replacement: a count (int >= 1) or a share (float <= 1)."""

    def __init__(self, clients_per_round: float, seed: int):
        self.clients_per_round = clients_per_round
        self.rng = random.Random(seed)

    def sample_size(self, num_available: int) -> int:
        if isinstance(self.clients_per_round, float):
            return max(1, int(round(self.clients_per_round * num_available)))
        return min(int(self.clients_per_round), num_available)

    def sample(self, node_ids: Sequence[int]) -> list[int]:
        """``node_ids`` in a stable order (by client identity): the seed alone decides who is chosen."""
        return self.rng.sample(list(node_ids), self.sample_size(len(node_ids)))


class OfferedNodes:
    """Stands in for the Grid inside a strategy's ``configure_*``: it offers only the sampled nodes.

    Flower's strategies ask the grid for node ids and sample from them; with fraction 1.0
    and no minimum, they take exactly these.
    """

    def __init__(self, node_ids: Sequence[int]):
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


class PoissonSampler:
    """Poisson sampling: every connected client takes part independently with rate q.

    The round's size varies (it may be zero). This is the sampling the privacy accountant
    assumes for amplification by sampling with the add/remove-one-client relation, so DP
    runs with ``sampling = "poisson"`` must sample exactly like this, never a fixed count.
    """

    def __init__(self, sample_rate: float, seed: int):
        self.sample_rate = sample_rate
        self.rng = random.Random(seed)

    def sample(self, node_ids: Sequence[int]) -> list[int]:
        return [node for node in node_ids if self.rng.random() < self.sample_rate]


class EveryoneSampler:
    """Every connected client, every round (no amplification by sampling)."""

    def sample(self, node_ids: Sequence[int]) -> list[int]:
        return list(node_ids)
