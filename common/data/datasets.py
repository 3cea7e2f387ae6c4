"""Dataset registry: a name from the run config -> features and labels, all offline.

Every dataset is a pair of arrays: ``x`` float32 of shape (n, features) and ``y`` int64
of shape (n,) with labels 0..num_classes-1. Splitting and partitioning happen elsewhere
(:mod:`common.data.partitioning`), the same way for every dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from common.config import RunConfig
from common.data.cache import cached_arrays
from common.data.files import load_table


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _digits(config: RunConfig, cache_root: str | None) -> Dataset:
    """sklearn's bundled 8x8 handwritten digits (1,797 images): no download, ever.

    Read from the on-disk cache after the first time: importing scikit-learn (and scipy)
    costs ~1 s, paid by every deployment message and every simulation worker otherwise.
    """

    def load() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return {"x": (bunch.data / 16.0).astype(np.float32), "y": bunch.target.astype(np.int64)}

    data = cached_arrays("digits-v1", load, cache_root)
    return Dataset(data["x"], data["y"], 10)


def _mnist1d(config: RunConfig, cache_root: str | None) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated offline from its templates (never downloaded).

    The generator is deterministic for a seed; ``dataset-samples`` sets the size, so a
    federation of thousands of clients gets enough data.
    """

    def generate() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = config.dataset_samples
        args.seed = config.seed
        # make_dataset splits train/test itself (80/20); we split centrally ourselves.
        data = make_dataset(args)
        x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
        return {"x": x, "y": np.concatenate([data["y"], data["y_test"]]).astype(np.int64)}

    # Generation takes ~0.25 ms per example: done once per machine, then read from the cache.
    data = cached_arrays(f"mnist1d-v1|{config.dataset_samples}|{config.seed}", generate, cache_root)
    return Dataset(data["x"], data["y"], 10)


def _file(config: RunConfig, cache_root: str | None) -> Dataset:
    """A user's own data: one table to split like a built-in dataset (``dataset-path``, e.g. in
    simulation), or else the server's held-out file (deployed clients bring their own files)."""
    if config.dataset_path:
        return load_file(config.dataset_path, "dataset-path")
    return load_file(config.central_data_path, "central-data-path")


def load_file(path: str, key: str) -> Dataset:
    x, y = load_table(path, key=key)
    return Dataset(x, y, int(y.max()) + 1)


LOADERS: dict[str, Callable[[RunConfig, str | None], Dataset]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "file": _file,
}


def load_dataset(config: RunConfig, cache_root: str | None = None) -> Dataset:
    """The named dataset; generated data is cached under ``cache_root`` (default: FL_DP_CACHE)."""
    return LOADERS[config.dataset](config, cache_root)
