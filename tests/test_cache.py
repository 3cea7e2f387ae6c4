"""The on-disk data cache: a private root (the ServerApp's, under output-dir) reads the shared
cache when it holds the entry, and writes only under its own root."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
from common.data import client_data
from common.data.cache import cached_arrays
from common.data.client_data import central_test_set
from common.data.datasets import load_dataset


def files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def shared(tmp_path, monkeypatch):
    root = tmp_path / "shared"
    monkeypatch.setenv("FL_DP_CACHE", str(root))
    return root


def test_private_root_reads_a_warm_shared_cache_and_writes_nothing(tmp_path, shared):
    arrays = {"x": np.arange(6.0).reshape(2, 3)}
    cached_arrays("entry", lambda: arrays)  # the shared cache (e.g. a client) writes it
    before = files(shared)
    assert len(before) == 1

    def must_not_build():
        raise AssertionError("rebuilt although the shared cache holds the entry")

    private = tmp_path / "out" / "cache"
    got = cached_arrays("entry", must_not_build, root=str(private))
    assert np.array_equal(got["x"], arrays["x"])
    assert files(shared) == before and not (tmp_path / "out").exists()


def test_private_root_builds_and_writes_only_under_itself_when_the_shared_cache_is_cold(tmp_path, shared):
    private = tmp_path / "out" / "cache"
    calls = []

    def build():
        calls.append(1)
        return {"y": np.arange(4)}

    first = cached_arrays("entry", build, root=str(private))
    again = cached_arrays("entry", build, root=str(private))  # read back from the private root
    assert calls == [1] and np.array_equal(first["y"], again["y"])
    assert len(files(private)) == 1 and not shared.exists()


def test_read_also_empty_ignores_the_shared_cache(tmp_path, shared):
    cached_arrays("entry", lambda: {"z": np.zeros(2)})
    got = cached_arrays("entry", lambda: {"z": np.ones(2)}, root=str(tmp_path / "own"), read_also=())
    assert np.array_equal(got["z"], np.ones(2)) and len(files(tmp_path / "own")) == 1


def test_server_central_test_set_reuses_the_clients_mnist1d_and_writes_only_under_output_dir(
    tmp_path, shared, monkeypatch
):
    config = RunConfig.from_run_config({"dataset": "mnist1d", "dataset-samples": 600})
    client_data._cached_dataset.cache_clear()
    fresh = load_dataset(config)  # a client's process: generates into the shared cache
    before = files(shared)
    output_dir = tmp_path / "run"
    cache_root = str(output_dir / "cache")  # as server_app/app.py passes it

    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("the server regenerated MNIST-1D although the shared cache holds it")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    client_data._cached_dataset.cache_clear()
    test = central_test_set(config, cache_root=cache_root)
    assert len(test) == 120 and test.x.dtype == fresh.x.dtype
    assert files(shared) == before and not output_dir.exists()

    # A cold shared cache: the server generates, and writes under output-dir only.
    monkeypatch.undo()
    cold = tmp_path / "cold-shared"
    monkeypatch.setenv("FL_DP_CACHE", str(cold))
    client_data._cached_dataset.cache_clear()
    again = central_test_set(config, cache_root=cache_root)
    client_data._cached_dataset.cache_clear()
    assert np.array_equal(again.x, test.x) and np.array_equal(again.y, test.y)
    assert not cold.exists() and len(files(output_dir)) == 1
