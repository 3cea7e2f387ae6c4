"""Split a dataset into a central held-out test set and per-client partitions.

The central test split is carved off first (seeded), so no client ever sees it; the
rest is divided among clients with flwr-datasets partitioners (IID, Dirichlet over labels,
pathological classes-per-client). Everything is deterministic for the run's seed, so the
server and every client compute the same split independently without exchanging data.
"""

from __future__ import annotations

import numpy as np

from common.config import RunConfig


def central_split(num_examples: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (pool indices for clients, central test indices), disjoint and seeded."""
    order = np.random.default_rng(seed).permutation(num_examples)
    num_test = max(1, int(round(test_fraction * num_examples)))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _partitioner(config: RunConfig, num_partitions: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if config.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if config.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=config.dirichlet_alpha,
            min_partition_size=2,
            self_balancing=True,
            seed=config.seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=config.classes_per_client,
        class_assignment_mode="first-deterministic",
        seed=config.seed,
    )


def partition_table(labels: np.ndarray, config: RunConfig, num_partitions: int) -> list[np.ndarray]:
    """Indices (into ``labels``) of every client's partition, from a flwr-datasets partitioner.

    All partitions are computed in one pass (the partitioners assign every row at once), so
    a federation of N clients costs one partitioning, not N.
    """
    from datasets import Dataset as HFDataset

    table = HFDataset.from_dict({"label": labels.tolist(), "index": np.arange(len(labels)).tolist()})
    partitioner = _partitioner(config, num_partitions)
    partitioner.dataset = table
    return [
        np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)
    ]


def local_split(num_examples: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's examples into (train, validation) positions; train keeps >= 1."""
    order = np.random.default_rng(seed).permutation(num_examples)
    num_val = min(int(round(val_fraction * num_examples)), num_examples - 1)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
