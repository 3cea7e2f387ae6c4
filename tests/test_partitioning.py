"""Partitions come from flwr-datasets partitioners: disjoint, deterministic, and never the central split."""

import numpy as np
import pytest

from common.config import NodeConfig, RunConfig
from common.data.client_data import _partition_table, central_test_set, load_client_data, partition_rows
from common.data.datasets import load_dataset
from common.data.files import DataFileError
from common.data.partitioning import central_split, partition_table

NUM_CLIENTS = 10


def _all_partitions(config: RunConfig):
    data = load_dataset(config)
    pool, test = central_split(len(data), config.test_fraction, config.seed)
    parts = [pool[p] for p in partition_table(data.y[pool], config, NUM_CLIENTS)]
    return data, pool, test, parts


def test_central_split_is_disjoint_complete_and_seeded():
    pool, test = central_split(1797, 0.2, seed=7)
    assert len(test) == round(0.2 * 1797)
    assert not set(pool) & set(test)
    assert sorted(np.concatenate([pool, test])) == list(range(1797))
    again_pool, again_test = central_split(1797, 0.2, seed=7)
    assert np.array_equal(test, again_test) and np.array_equal(pool, again_pool)
    assert not np.array_equal(test, central_split(1797, 0.2, seed=8)[1])


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_deterministic_and_outside_the_central_split(partitioner):
    config = RunConfig.from_run_config({"partitioner": partitioner, "dirichlet-alpha": 0.3})
    data, pool, test, parts = _all_partitions(config)
    seen = np.concatenate(parts)
    assert len(seen) == len(set(seen.tolist())), "a row is in two partitions"
    assert not set(seen.tolist()) & set(test.tolist()), "a client holds a central test row"
    assert all(len(p) > 0 for p in parts)
    _, _, _, again = _all_partitions(config)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if partitioner == "iid":
        assert len(seen) == len(pool)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    if partitioner == "pathological":
        assert all(len(np.unique(data.y[p])) <= config.classes_per_client for p in parts)


def test_dirichlet_is_skewed_and_depends_on_seed():
    config = RunConfig.from_run_config({"partitioner": "dirichlet", "dirichlet-alpha": 0.1})
    data, _, _, parts = _all_partitions(config)
    top_share = [np.bincount(data.y[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.4  # IID would give ~0.1
    other = RunConfig.from_run_config({"partitioner": "dirichlet", "dirichlet-alpha": 0.1, "seed": 1})
    assert not all(np.array_equal(a, b) for a, b in zip(parts, _all_partitions(other)[3]))


def test_client_split_and_feature_check():
    config = RunConfig()
    test = central_test_set(config)
    data = load_client_data(config, NodeConfig(0, NUM_CLIENTS), test.num_features, test.num_classes)
    assert len(data.y_val) == round(0.2 * (len(data.y_val) + len(data.y_train)))
    with pytest.raises(DataFileError, match="64 features per example, but the model .* expects 40"):
        load_client_data(config, NodeConfig(0, NUM_CLIENTS), 40, 10)


def test_mnist1d_is_generated_offline_at_the_requested_size():
    config = RunConfig.from_run_config({"dataset": "mnist1d", "dataset-samples": 1000})
    data = load_dataset(config)
    assert data.x.shape == (1000, 40) and set(np.unique(data.y)) == set(range(10))


def test_cached_partitions_equal_fresh_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_DP_CACHE", str(tmp_path))
    config = RunConfig.from_run_config({"partitioner": "dirichlet", "dirichlet-alpha": 0.3, "seed": 5})
    _, _, _, fresh = _all_partitions(config)
    for i in range(NUM_CLIENTS):
        assert np.array_equal(partition_rows(config, NUM_CLIENTS, i), fresh[i])
    written = {path: path.stat().st_mtime_ns for path in tmp_path.glob("*.npz")}
    assert written  # the partition table (and the digits arrays it was cut from)
    _partition_table.cache_clear()  # a new process: read back from disk
    assert all(np.array_equal(partition_rows(config, NUM_CLIENTS, i), fresh[i]) for i in range(NUM_CLIENTS))
    assert {path: path.stat().st_mtime_ns for path in tmp_path.glob("*.npz")} == written  # read, not rebuilt
