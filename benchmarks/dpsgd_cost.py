#!/usr/bin/env python3
"""Benchmark 4: what the app's DP-SGD costs per local epoch and per call, next to non-private training.

One client of each registry model (digits/mlp, digits/logreg, mnist1d/cnn1d); the app's own calls as
the ClientApp makes them, ``train_dpsgd`` (in each Opacus grad-sample mode of ``--modes``; ``app`` =
the mode ``GRAD_SAMPLE_MODES`` picks; and the app's mode at sigma 0, where no noise is drawn) and
``train_locally``, each with 1 and ``--epochs`` local epochs, interleaved repeat by repeat: per epoch =
(t(epochs) - t(1)) / (epochs - 1), per call = the rest.

The noise floor, timed in the same repeats: the app's noise draw for ``--epochs`` epochs of steps
(``_noise_rows``: d coordinates per step, each the sum of 4 secure normals, as ``train_dpsgd`` draws
them), and the AES-256-CTR keystream alone that those 4d normals consume (32/pi bytes per normal:
two 8-byte words per polar candidate pair, pi/4 of pairs kept, two normals per pair; read in the
polar method's passes of 16 * NORMAL_BLOCK bytes), per epoch.

    .venv/bin/python benchmarks/dpsgd_cost.py
    .venv/bin/python benchmarks/dpsgd_cost.py --repeats 1 --epochs 2 --no-write   # a check
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings

import benchlib as bench
import torch

from client_app.dpsgd import _noise_rows, grad_sample_mode_for, train_dpsgd
from client_app.training import train_locally
from common.config import NodeConfig
from common.data.client_data import central_test_set, load_client_data
from common.models import build_model
from common.privacy.secret_random import NORMAL_BLOCK, SecretRandom
from fl_dp.run_config import validate

WORKLOADS = {"digits/mlp": {"dataset": "digits", "model": "mlp"},
             "digits/logreg": {"dataset": "digits", "model": "logreg"},
             "mnist1d/cnn1d": {"dataset": "mnist1d", "model": "cnn1d"}}


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


# At sigma 0 the RDP accountant's epsilon is infinite and Opacus warns about its orders on every call.
warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
NO_NOISE = "/sigma0"  # suffix of a mode: train_dpsgd at sigma 0 (the whole DP-SGD step but the noise draw)
BYTES_PER_NORMAL = 32 / math.pi  # keystream per polar-method normal: 16 bytes per candidate pair, pi/4 kept, 2 normals


def timed_call(mode: str | None, config, data, num_features: int, num_classes: int, seed: int) -> float:
    """One app call: ``train_locally`` (mode None) or ``train_dpsgd`` in grad-sample ``mode`` (NO_NOISE: sigma 0)."""
    model = build_model(config.model, num_features, num_classes, seed=seed)
    started = clock()
    if mode:
        grad_mode, no_noise = mode.removesuffix(NO_NOISE), mode.endswith(NO_NOISE)
        train_dpsgd(model, data.x_train, data.y_train, config, [], SecretRandom(), 0.0,
                    sigma=0.0 if no_noise else None, grad_sample_mode=grad_mode)
    else:
        train_locally(model, data.x_train, data.y_train, config, 0.0, seed)
    return clock() - started


def measure(name: str, overrides: dict, args) -> tuple[list, list, str]:
    config = validate(overrides | {"dp": "dpsgd", "noise-multiplier": 1.0, "clipping-norm": 1.0})
    test = central_test_set(config)
    node = NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 10})
    data = load_client_data(config, node, test.num_features, test.num_classes)
    chosen = grad_sample_mode_for(config.model)
    modes = [None] + list(dict.fromkeys(chosen if m == "app" else m for m in args.modes.split(","))) + [chosen + NO_NOISE]
    plans = [(mode, epochs) for mode in modes for epochs in (1, args.epochs)]
    configs = {epochs: dataclasses.replace(config, local_epochs=epochs) for epochs in (1, args.epochs)}
    for mode, epochs in plans:  # warm-up: imports (Opacus), caches
        timed_call(mode, configs[epochs], data, test.num_features, test.num_classes, 0)
    dim = sum(p.numel() for p in build_model(config.model, test.num_features, test.num_classes).parameters())
    steps = math.ceil(len(data.y_train) / config.batch_size) * args.epochs
    keystream_bytes, chunk = round(4 * dim * steps * BYTES_PER_NORMAL), 16 * NORMAL_BLOCK  # as the polar passes read it
    floor_calls = {"noise": lambda rng: list(_noise_rows(rng, steps, dim, lambda: 1.0, torch.float32)),
                   "keystream": lambda rng: [rng.random_bytes(min(chunk, keystream_bytes - start))
                                             for start in range(0, keystream_bytes, chunk)]}
    load = bench.wait_for_quiet(args.max_load, args.max_wait)
    times: dict[tuple, list[float]] = {plan: [] for plan in plans}
    floor: dict[str, list[float]] = {part: [] for part in floor_calls}
    for r in range(args.repeats):  # interleaved, so a change in the machine's load hits all alike
        for mode, epochs in plans:
            times[mode, epochs].append(timed_call(mode, configs[epochs], data, test.num_features, test.num_classes,
                                                  42 + r))
        for part, call in floor_calls.items():
            rng = SecretRandom()
            started = clock()
            call(rng)
            floor[part].append((clock() - started) / args.epochs)
    extra, loads, n = args.epochs - 1, f"{load:.1f} / {bench.load1():.1f}", len(data.y_train)
    epoch = {m: [(t - t1) / extra for t, t1 in zip(times[m, args.epochs], times[m, 1])] for m in modes}
    fixed = {m: [t1 - e for t1, e in zip(times[m, 1], epoch[m])] for m in modes}
    rows, ratios = [], {}
    for mode in modes:
        ratios[mode] = bench.median(d / b for d, b in zip(epoch[mode], epoch[None]))
        call_ratio = bench.median(d / b for d, b in zip(times[mode, args.epochs], times[None, args.epochs]))
        label = ("non-private (`train_locally`)" if mode is None else
                 f"DP-SGD (`train_dpsgd`), `{mode.removesuffix(NO_NOISE)}` at sigma 0: no noise drawn"
                 if mode.endswith(NO_NOISE) else
                 f"DP-SGD (`train_dpsgd`), `{mode}`" + (" **(the app's)**" if mode == chosen else ""))
        rows.append([name if mode is None else "", f"{n} train examples, {math.ceil(n / config.batch_size)} steps/epoch"
                     if mode is None else "", label, f"{bench.median(epoch[mode]) * 1e3:.1f}", f"{ratios[mode]:.2f}x",
                     f"{bench.median(fixed[mode]) * 1e3:.1f}", f"{bench.median(times[mode, args.epochs]) * 1e3:.0f}",
                     f"{call_ratio:.2f}x", loads])
    noise_ratio = {part: bench.median(f / b for f, b in zip(floor[part], epoch[None])) for part in floor}
    floor_row = [name, f"{dim:,}", f"{4 * dim:,}", f"{bench.median(epoch[None]) * 1e3:.2f}",
                 f"{bench.median(floor['noise']) * 1e3:.2f}", f"{noise_ratio['noise']:.2f}",
                 f"{bench.median(floor['keystream']) * 1e3:.2f}", f"{noise_ratio['keystream']:.2f}",
                 f"{1 + noise_ratio['noise']:.2f}x", f"{ratios[chosen + NO_NOISE]:.2f}x"]
    ratio = ratios[chosen]
    others = ", ".join(f"`{m}` {ratios[m]:.2f}x" for m in modes[1:] if m != chosen and not m.endswith(NO_NOISE))
    verdict = (f"- {name}: DP-SGD (`{chosen}`) {ratio:.2f}x non-private per epoch "
               f"({'meets' if ratio <= 2 else 'misses'} the 2x goal" + ("" if ratio <= 2 else f" by {ratio / 2:.2f}x")
               + ")" + (f"; {others}" if others else "") + f"; without the noise draw (sigma 0) "
               f"{ratios[chosen + NO_NOISE]:.2f}x; the secure noise alone is {noise_ratio['noise']:.2f} non-private "
               f"epochs (its AES keystream {noise_ratio['keystream']:.2f}).")
    print(verdict, flush=True)
    return rows, floor_row, verdict


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
    rows, floor_rows, verdicts = [], [], []
    for name in args.workloads.split(","):
        workload_rows, floor_row, verdict = measure(name, WORKLOADS[name], args)
        rows += workload_rows
        floor_rows.append(floor_row)
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

The noise floor (same repeats, per epoch): d parameters, so 4d secure normals per step; *noise* = the app's
draw (`_noise_rows`, {args.epochs} epochs' steps, float32 rows as `train_dpsgd` adds them), *keystream* = the
AES-256-CTR bytes alone those normals use (32/pi per normal); *in epochs* = per-repeat ratio to the
non-private epoch. *Best possible* = 1 + noise in epochs: DP-SGD's ratio if everything but the noise
(per-example gradients, clipping, Opacus's hooks and optimizer) cost nothing more than a non-private epoch.
*At sigma 0* is the row above of that name: the same DP-SGD step without the noise draw (its fixed cost per
call is not comparable: at sigma 0 the accountant's epsilon is infinite at once).

{bench.table(["workload", "parameters d", "normals per step", "non-private ms per epoch", "noise ms per epoch",
              "in epochs", "keystream ms per epoch", "in epochs", "best possible with this noise",
              "DP-SGD at sigma 0 (measured)"], floor_rows)}

{chr(10).join(verdicts)}
"""
    bench.publish("dpsgd_cost", body, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
