#!/usr/bin/env python3
"""Write one data file per client from a built-in dataset, so each SuperNode mounts only its own file.

In a real federation every client already holds its own CSV/NPZ (see common/data/files.py). For a
demo, this splits a built-in dataset exactly as the app does (the central held-out test split is
carved off first with the run's seed, the rest is divided with the configured partitioner) and writes

    OUT/client-0.npz ... OUT/client-<N-1>.npz   arrays x (n, features) float32, y (n,) int64
    OUT/central.npz                             the held-out split (only for dataset='file' runs)

Start client i with  --node-config "data-path='/abs/OUT/client-i.npz' state-dir='/abs/state-i'".
The server keeps using the same built-in dataset (with the same seed and test-fraction) for its
central evaluation, so no client row is in the server's test set.

    python scripts/deploy/make_demo_data.py --out outputs/deploy/data --num-clients 3
    python scripts/deploy/make_demo_data.py --out DIR --num-clients 5 --run-config "partitioner='dirichlet'"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2]
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from flwr.common.config import parse_config_args  # noqa: E402

from common.config import RunConfig  # noqa: E402
from common.data.client_data import central_test_set, partition_rows  # noqa: E402
from common.data.datasets import load_dataset  # noqa: E402
from common.data.files import save_table  # noqa: E402


def write_partitions(out_dir: str, num_clients: int, config: RunConfig, fmt: str = "npz") -> list[str]:
    """Write the client files and central.<fmt>; return the client files' absolute paths."""
    if config.dataset == "file":
        raise SystemExit("dataset='file' is your own data already: nothing to partition")
    os.makedirs(out_dir, exist_ok=True)
    data = load_dataset(config)
    paths = []
    for client in range(num_clients):
        rows = partition_rows(config, num_clients, client)
        path = os.path.abspath(os.path.join(out_dir, f"client-{client}.{fmt}"))
        save_table(path, data.x[rows], data.y[rows])
        paths.append(path)
    test = central_test_set(config)
    save_table(os.path.join(out_dir, f"central.{fmt}"), test.x, test.y)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for client-<i>.npz and central.npz")
    parser.add_argument("--num-clients", type=int, default=3)
    parser.add_argument("--format", choices=("npz", "csv"), default="npz")
    parser.add_argument(
        "--run-config", default="",
        help="the run-config values the split depends on (dataset, seed, test-fraction, partitioner...), "
        "in `flwr run --run-config` syntax; use the same values for the run",
    )
    args = parser.parse_args(argv)
    if args.num_clients < 1:
        parser.error("--num-clients must be >= 1")
    config = RunConfig.from_run_config(parse_config_args([args.run_config]) if args.run_config else {})
    paths = write_partitions(args.out, args.num_clients, config, args.format)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
