#!/usr/bin/env python3
"""Benchmark 4: what the app's DP-SGD costs per local epoch and per call, next to non-private training.

One client of each workload (digits/mlp, mnist1d/cnn1d); the app's own calls as the ClientApp
makes them, ``train_dpsgd`` and ``train_locally``, each with 1 and ``--epochs`` local epochs,
interleaved repeat by repeat: per epoch = (t(epochs) - t(1)) / (epochs - 1), per call = the rest.

    .venv/bin/python benchmarks/dpsgd_cost.py
    .venv/bin/python benchmarks/dpsgd_cost.py --repeats 1 --epochs 2 --no-write   # a check
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import benchlib as bench
import torch

from client_app.dpsgd import train_dpsgd
from client_app.training import train_locally
from common.config import NodeConfig
from common.data.client_data import central_test_set, load_client_data
from common.models import build_model
from common.privacy.secret_random import SecretRandom
from fl_dp.run_config import validate

WORKLOADS = {"digits/mlp": {"dataset": "digits", "model": "mlp"},
             "mnist1d/cnn1d": {"dataset": "mnist1d", "model": "cnn1d"}}


def timed_call(private: bool, config, data, num_features: int, num_classes: int, seed: int) -> float:
    model = build_model(config.model, num_features, num_classes, seed=seed)
    started = time.perf_counter()
    if private:
        train_dpsgd(model, data.x_train, data.y_train, config, [], SecretRandom(), 0.0)
    else:
        train_locally(model, data.x_train, data.y_train, config, 0.0, seed)
    return time.perf_counter() - started


def measure(name: str, overrides: dict, args) -> tuple[list, str]:
    config = validate(overrides | {"dp": "dpsgd", "noise-multiplier": 1.0, "clipping-norm": 1.0})
    test = central_test_set(config)
    node = NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 10})
    data = load_client_data(config, node, test.num_features, test.num_classes)
    plans = [(private, epochs) for private in (False, True) for epochs in (1, args.epochs)]
    configs = {epochs: dataclasses.replace(config, local_epochs=epochs) for epochs in (1, args.epochs)}
    for private, epochs in plans:  # warm-up: imports (Opacus), caches
        timed_call(private, configs[epochs], data, test.num_features, test.num_classes, 0)
    load = bench.wait_for_quiet(args.max_load, args.max_wait)
    times: dict[tuple, list[float]] = {plan: [] for plan in plans}
    for r in range(args.repeats):  # interleaved, so a change in the machine's load hits all alike
        for private, epochs in plans:
            times[private, epochs].append(timed_call(private, configs[epochs], data, test.num_features,
                                                     test.num_classes, 42 + r))
    extra = args.epochs - 1
    epoch = {p: [(t - t1) / extra for t, t1 in zip(times[p, args.epochs], times[p, 1])] for p in (False, True)}
    fixed = {p: [t1 - e for t1, e in zip(times[p, 1], epoch[p])] for p in (False, True)}
    ratio = bench.median(d / n for d, n in zip(epoch[True], epoch[False]))
    call_ratio = bench.median(d / n for d, n in zip(times[True, args.epochs], times[False, args.epochs]))
    loads = f"{load:.1f} / {bench.load1():.1f}"
    n = len(data.y_train)
    rows = [[name, f"{n} train examples, {math.ceil(n / config.batch_size)} steps/epoch", "non-private (`train_locally`)",
             f"{bench.median(epoch[False]) * 1e3:.1f}", "1.00x", f"{bench.median(fixed[False]) * 1e3:.1f}",
             f"{bench.median(times[False, args.epochs]) * 1e3:.0f}", "1.00x", loads],
            [name, "", "DP-SGD (`train_dpsgd`)", f"{bench.median(epoch[True]) * 1e3:.1f}", f"{ratio:.2f}x",
             f"{bench.median(fixed[True]) * 1e3:.1f}", f"{bench.median(times[True, args.epochs]) * 1e3:.0f}",
             f"{call_ratio:.2f}x", loads]]
    verdict = (f"- {name}: DP-SGD {ratio:.2f}x non-private per epoch ({'meets' if ratio <= 2 else 'misses'} the 2x goal"
               + ("" if ratio <= 2 else f" by {ratio / 2:.2f}x") + f"), {call_ratio:.2f}x per {args.epochs}-epoch call.")
    print(verdict, flush=True)
    return rows, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="local epochs of the longer call (>= 2)")
    parser.add_argument("--repeats", type=int, default=15)
    bench.results_arguments(parser)
    args = parser.parse_args()
    if bench.notes_only("dpsgd_cost", args):
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the per-epoch cost is t(epochs) - t(1))")
    torch.set_num_threads(1)  # as the ClientApp
    rows, verdicts = [], []
    for name, overrides in WORKLOADS.items():
        workload_rows, verdict = measure(name, overrides, args)
        rows += workload_rows
        verdicts.append(verdict)
    body = f"""{bench.machine()}

One client (partition 0 of the default 10-client IID split; 80% of it trains), the app's defaults
(batch 16, SGD lr 0.1 momentum 0.9), one torch thread (as the ClientApp); DP-SGD is the app's
`train_dpsgd` (noise multiplier 1, clip norm 1). Median over {args.repeats} repeats, the four calls (each
training, 1 and {args.epochs} epochs) interleaved repeat by repeat; per epoch =
(t({args.epochs}) - t(1)) / {args.epochs - 1}, per call = t(1) - one epoch (DP-SGD: `make_private`, the
accountant's epsilon); ratios are medians of per-repeat ratios. `load` = 1-minute load before / after.

```bash
{bench.command_line()}
```

{bench.table(["workload", "client data", "training", "ms per epoch", "vs non-private", "fixed ms per call",
              f"ms per {args.epochs}-epoch call", "vs non-private", "load"], rows)}

{chr(10).join(verdicts)}
"""
    bench.publish("dpsgd_cost", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
