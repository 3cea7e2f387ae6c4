#!/usr/bin/env python3
"""Benchmark 4: what the app's DP-SGD costs per local epoch and per call, next to non-private training.

One client of each registry model (digits/mlp, digits/logreg, mnist1d/cnn1d); the app's own calls as
the ClientApp makes them, ``train_dpsgd`` (in each Opacus grad-sample mode of ``--modes``; ``app`` =
the mode ``GRAD_SAMPLE_MODES`` picks) and ``train_locally``, each with 1 and ``--epochs`` local epochs,
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

from client_app.dpsgd import grad_sample_mode_for, train_dpsgd
from client_app.training import train_locally
from common.config import NodeConfig
from common.data.client_data import central_test_set, load_client_data
from common.models import build_model
from common.privacy.secret_random import SecretRandom
from fl_dp.run_config import validate

WORKLOADS = {"digits/mlp": {"dataset": "digits", "model": "mlp"},
             "digits/logreg": {"dataset": "digits", "model": "logreg"},
             "mnist1d/cnn1d": {"dataset": "mnist1d", "model": "cnn1d"}}


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def timed_call(mode: str | None, config, data, num_features: int, num_classes: int, seed: int) -> float:
    """One app call: ``train_locally`` (mode None) or ``train_dpsgd`` in grad-sample ``mode``."""
    model = build_model(config.model, num_features, num_classes, seed=seed)
    started = clock()
    if mode:
        train_dpsgd(model, data.x_train, data.y_train, config, [], SecretRandom(), 0.0, grad_sample_mode=mode)
    else:
        train_locally(model, data.x_train, data.y_train, config, 0.0, seed)
    return clock() - started


def measure(name: str, overrides: dict, args) -> tuple[list, str]:
    config = validate(overrides | {"dp": "dpsgd", "noise-multiplier": 1.0, "clipping-norm": 1.0})
    test = central_test_set(config)
    node = NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 10})
    data = load_client_data(config, node, test.num_features, test.num_classes)
    chosen = grad_sample_mode_for(config.model)
    modes = [None] + list(dict.fromkeys(chosen if m == "app" else m for m in args.modes.split(",")))
    plans = [(mode, epochs) for mode in modes for epochs in (1, args.epochs)]
    configs = {epochs: dataclasses.replace(config, local_epochs=epochs) for epochs in (1, args.epochs)}
    for mode, epochs in plans:  # warm-up: imports (Opacus), caches
        timed_call(mode, configs[epochs], data, test.num_features, test.num_classes, 0)
    load = bench.wait_for_quiet(args.max_load, args.max_wait)
    times: dict[tuple, list[float]] = {plan: [] for plan in plans}
    for r in range(args.repeats):  # interleaved, so a change in the machine's load hits all alike
        for mode, epochs in plans:
            times[mode, epochs].append(timed_call(mode, configs[epochs], data, test.num_features, test.num_classes,
                                                  42 + r))
    extra, loads, n = args.epochs - 1, f"{load:.1f} / {bench.load1():.1f}", len(data.y_train)
    epoch = {m: [(t - t1) / extra for t, t1 in zip(times[m, args.epochs], times[m, 1])] for m in modes}
    fixed = {m: [t1 - e for t1, e in zip(times[m, 1], epoch[m])] for m in modes}
    rows, ratios = [], {}
    for mode in modes:
        ratios[mode] = bench.median(d / b for d, b in zip(epoch[mode], epoch[None]))
        call_ratio = bench.median(d / b for d, b in zip(times[mode, args.epochs], times[None, args.epochs]))
        label = ("non-private (`train_locally`)" if mode is None else
                 f"DP-SGD (`train_dpsgd`), `{mode}`" + (" **(the app's)**" if mode == chosen else ""))
        rows.append([name if mode is None else "", f"{n} train examples, {math.ceil(n / config.batch_size)} steps/epoch"
                     if mode is None else "", label, f"{bench.median(epoch[mode]) * 1e3:.1f}", f"{ratios[mode]:.2f}x",
                     f"{bench.median(fixed[mode]) * 1e3:.1f}", f"{bench.median(times[mode, args.epochs]) * 1e3:.0f}",
                     f"{call_ratio:.2f}x", loads])
    ratio = ratios[chosen]
    others = ", ".join(f"`{m}` {ratios[m]:.2f}x" for m in modes[1:] if m != chosen)
    verdict = (f"- {name}: DP-SGD (`{chosen}`) {ratio:.2f}x non-private per epoch "
               f"({'meets' if ratio <= 2 else 'misses'} the 2x goal" + ("" if ratio <= 2 else f" by {ratio / 2:.2f}x")
               + ")" + (f"; {others}" if others else "") + ".")
    print(verdict, flush=True)
    return rows, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="local epochs of the longer call (>= 2)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--modes", default="app,hooks,ew", help="grad-sample modes to time (app: the app's choice)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from " + ", ".join(WORKLOADS))
    parser.add_argument("--clock", choices=CLOCKS, default="cpu",
                        help="cpu: this process's CPU time (one torch thread; other jobs' load counts little); wall")
    bench.results_arguments(parser)
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if bench.notes_only("dpsgd_cost", args):
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the per-epoch cost is t(epochs) - t(1))")
    torch.set_num_threads(1)  # as the ClientApp
    rows, verdicts = [], []
    for name in args.workloads.split(","):
        workload_rows, verdict = measure(name, WORKLOADS[name], args)
        rows += workload_rows
        verdicts.append(verdict)
    clock_note = ("this process's CPU time (`time.process_time`: with one torch thread, the work itself; wall\ntime "
                  "on this shared machine also counts the time other jobs hold the core)" if args.clock == "cpu" else "wall time")
    body = f"""{bench.machine()}

One client (partition 0 of the default 10-client IID split; 80% of it trains), the app's defaults
(batch 16, SGD lr 0.1 momentum 0.9), one torch thread (as the ClientApp); DP-SGD is the app's
`train_dpsgd` (noise multiplier 1, clip norm 1) in each Opacus grad-sample mode listed. Median over
{args.repeats} repeats, all calls (each training, 1 and {args.epochs} epochs) interleaved repeat by repeat; per
epoch = (t({args.epochs}) - t(1)) / {args.epochs - 1}, per call = t(1) - one epoch (DP-SGD: `make_private`, the
accountant's epsilon); ratios are medians of per-repeat ratios. Times are {clock_note}. `load` = 1-minute load before / after.

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
