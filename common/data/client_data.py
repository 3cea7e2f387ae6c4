"""The data one client trains and validates on: its own file, or a demo partition."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.config import ConfigError, NodeConfig, RunConfig
from common.data.cache import cached_arrays
from common.data.datasets import Dataset, load_dataset, load_file
from common.data.files import DataFileError, load_table
from common.data.partitioning import central_split, local_split, partition_table
from common.data.scaling import FeatureScaling


@dataclass(frozen=True)
class ClientData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    def scaled(self, scaling: FeatureScaling) -> "ClientData":
        """The same examples with standardised features (see common/data/scaling.py)."""
        return ClientData(scaling.apply(self.x_train), self.y_train, scaling.apply(self.x_val), self.y_val)


@lru_cache(maxsize=4)
def _cached_dataset(config: RunConfig, cache_root: str | None = None) -> Dataset:
    # Simulated clients share one process: load and generate once per config.
    return load_dataset(config, cache_root)


def central_test_set(config: RunConfig, cache_root: str | None = None) -> Dataset:
    """The held-out data the server evaluates on; no client's partition overlaps it.

    With ``dataset = 'file'`` and ``central-data-path``, the whole file (the server's own data);
    otherwise the ``test-fraction`` split of the dataset (``dataset-path`` included).

    The server passes a ``cache_root`` inside its output directory: it writes nowhere else.
    """
    if config.dataset == "file" and config.central_data_path:
        return load_file(config.central_data_path, "central-data-path")  # all of it: it is held out as a whole
    data = _cached_dataset(config, cache_root)
    _, test = central_split(len(data), config.test_fraction, config.seed)
    return Dataset(data.x[test], data.y[test], data.num_classes)


def _partition_key(config: RunConfig, num_partitions: int) -> str:
    """Everything the partition table depends on (and a version, to invalidate old caches)."""
    key = (
        f"partitions-v1|{config.dataset}|{config.dataset_samples}|{config.seed}|{config.test_fraction}|"
        f"{config.partitioner}|{config.dirichlet_alpha}|{config.classes_per_client}|{num_partitions}"
    )
    if config.dataset_path:  # a user's table: the cache follows its content's identity too
        file_stat = os.stat(config.dataset_path)
        key += f"|{os.path.realpath(config.dataset_path)}|{file_stat.st_size}|{file_stat.st_mtime_ns}"
    return key


@lru_cache(maxsize=8)
def _partition_table(config: RunConfig, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """All clients' rows, flattened: client i owns rows[offsets[i]:offsets[i + 1]] (cached on disk)."""

    def build() -> dict[str, np.ndarray]:
        data = _cached_dataset(config)
        pool, _ = central_split(len(data), config.test_fraction, config.seed)
        parts = [pool[p] for p in partition_table(data.y[pool], config, num_partitions)]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return {"offsets": offsets, "rows": np.concatenate(parts).astype(np.int64)}

    table = cached_arrays(_partition_key(config, num_partitions), build)
    return table["offsets"], table["rows"]


def partition_rows(config: RunConfig, num_partitions: int, partition_id: int) -> np.ndarray:
    """Rows of the dataset (never of the central test split) that demo client ``partition_id`` holds."""
    offsets, rows = _partition_table(config, num_partitions)
    return rows[offsets[partition_id] : offsets[partition_id + 1]]


def load_client_data(config: RunConfig, node: NodeConfig, num_features: int, num_classes: int) -> ClientData:
    """This client's train/validation arrays, checked against the model's input and classes."""
    if node.data_path:
        x, y = load_table(node.data_path)
        seed = config.seed
    else:
        if config.dataset == "file" and not config.dataset_path:
            raise DataFileError(
                "dataset = 'file' without dataset-path has no demo partitions: start this client with "
                "--node-config \"data-path=<absolute path of its CSV/NPZ>\", or simulate with "
                "dataset-path=<absolute path of one table to partition>"
            )
        partition_id, num_partitions = node.partition_id, node.num_partitions
        if partition_id is None or num_partitions is None:  # NodeConfig.from_node_config refuses this too
            raise ConfigError("node config needs either data-path or both partition-id and num-partitions")
        data = _cached_dataset(config)
        rows = partition_rows(config, num_partitions, partition_id)
        x, y = data.x[rows], data.y[rows]
        seed = config.seed + 1 + partition_id
    where = node.data_path or f"partition {node.partition_id}"
    if x.shape[1] != num_features:
        raise DataFileError(
            f"{where}: {x.shape[1]} features per example, but the model for dataset "
            f"{config.dataset!r} expects {num_features}"
        )
    if y.max() >= num_classes:
        raise DataFileError(
            f"{where}: label {int(y.max())} is out of range; dataset {config.dataset!r} has "
            f"classes 0..{num_classes - 1}"
        )
    train, val = local_split(len(y), config.val_fraction, seed)
    return ClientData(x[train], y[train], x[val], y[val])
