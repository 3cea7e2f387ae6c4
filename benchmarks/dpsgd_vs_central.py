#!/usr/bin/env python3
"""Federated DP-SGD against the same model trained centrally with DP-SGD, at the same epsilon.

Issue 3, "Done when": digits, 10 clients, ``dp='dpsgd'`` at sample-level epsilon 3 (delta 1e-5)
over the planned rounds (``fl-dp simulate``; the maximum over clients of the cumulative epsilon),
next to the same model trained centrally with the app's ``train_dpsgd`` at the same (epsilon,
delta) on the union of the clients' training data (``load_client_data``); both scored on the
server's held-out split. Goal: federated within 10 points.

    .venv/bin/python benchmarks/dpsgd_vs_central.py            # the tuned settings, one run each
    .venv/bin/python benchmarks/dpsgd_vs_central.py --tune     # the small grids, then the best of each
    .venv/bin/python benchmarks/dpsgd_vs_central.py --quick --results ''   # a check

Writes its section of ``benchmarks/results_privacy.md`` (``--results ''``: print only).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import benchlib as bench
import numpy as np
import torch

from client_app.dpsgd import train_dpsgd
from common.config import NodeConfig
from common.data.client_data import central_test_set, load_client_data
from common.evaluation import evaluate
from common.models import build_model
from common.privacy.secret_random import SecretRandom
from fl_dp.run_config import validate

RESULTS = bench.REPO / "benchmarks" / "results_privacy.md"
KEYS = ("rounds", "local_epochs", "batch_size", "learning_rate", "clipping_norm", "momentum")
BEST_CENTRAL = dict(zip(KEYS, (1, 30, 64, 0.1, 2.0, 0.0)))  # central: one "round" of 30 epochs on the pooled data
BEST_FEDERATED = dict(zip(KEYS, (60, 1, 16, 0.2, 0.5, 0.0)))
# --tune. Central: epochs 30-60, batch 64-256, lr 0.1-0.5, clip 0.5-2. Federated: five settings.
CENTRAL_GRID = [dict(BEST_CENTRAL, local_epochs=e, batch_size=b, learning_rate=lr, clipping_norm=c)
                for e, b, lr, c in itertools.product((30, 60), (64, 256), (0.1, 0.5), (0.5, 2.0))]
FEDERATED_GRID = [dict(zip(KEYS, values)) for values in [
    (60, 1, 16, 0.2, 0.5, 0.0), (60, 1, 8, 0.1, 0.5, 0.0), (20, 1, 48, 1.0, 1.0, 0.0), (60, 1, 24, 0.1, 2.0, 0.0),
    (20, 3, 16, 0.2, 0.5, 0.0)]]


def run_config(settings: dict, args) -> dict:
    """The app's run config for these settings (the same keys on both sides)."""
    return {"dataset": "digits", "partitioner": "iid", "seed": args.seed, "val-fraction": 0.0, "dp": "dpsgd",
            "target-epsilon": args.epsilon, "target-delta": args.delta, "num-server-rounds": settings["rounds"],
            "local-epochs": settings["local_epochs"], "batch-size": settings["batch_size"],
            "learning-rate": float(settings["learning_rate"]), "clipping-norm": float(settings["clipping_norm"]),
            "momentum": float(settings["momentum"]), "clients-per-round": 1.0}


def central_data(args):
    """The union of the clients' training arrays, as the app's clients load them, and the held-out split."""
    config = validate(run_config(BEST_CENTRAL, args))
    sets = [load_client_data(config, NodeConfig.from_node_config({"partition-id": i, "num-partitions": args.num_clients}),
                             64, 10) for i in range(args.num_clients)]
    test = central_test_set(config)
    return np.concatenate([s.x_train for s in sets]), np.concatenate([s.y_train for s in sets]), test


def train_central(settings: dict, data, args) -> dict:
    x, y, test = data
    config = validate(run_config(settings, args))
    started = time.monotonic()
    model = build_model("mlp", 64, 10, seed=args.seed)
    result, _ = train_dpsgd(model, x, y, config, [], SecretRandom(), 0.0)
    _, accuracy = evaluate(model, test.x, test.y)
    return {"accuracy": accuracy, "epsilon": result.epsilon, "noise_multiplier": result.noise_multiplier,
            "seconds": round(time.monotonic() - started, 1)}


def run_federated(settings: dict, args, name: str) -> dict:
    run = bench.simulate(args.num_clients, run_config(settings, args), Path(args.output_dir) / name)
    s = run["summary"]
    return {"ok": run["returncode"] == 0, "accuracy": s.get("final_central_accuracy"),
            "best_accuracy": s.get("best_central_accuracy"), "epsilon": s.get("sample_epsilon_max"),
            "noise_multiplier": s.get("noise_multiplier"), "wall_seconds": round(run["wall"], 1),
            "command": run["command"], "log": run["log"]}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _eps(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _settings(s: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in s.items())


def report(args, data, central_rows, federated_rows, seconds: float) -> str:
    cs, cr = max(central_rows, key=lambda r: r[1]["accuracy"])
    lines = [
        f"## Federated DP-SGD vs central DP-SGD (digits, {args.num_clients} clients, epsilon {args.epsilon:g}, "
        f"delta {args.delta:g})",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `{bench.command_line()}` ({seconds:.0f}s on 2 shared cores; "
        f"other jobs were running, so times are noisy). Both sides: `build_model(\"mlp\", 64, 10, seed={args.seed})`, "
        f"the app's `train_dpsgd` with `target-epsilon`, the clients' training data ({len(data[1])} examples, union of "
        f"{args.num_clients} IID partitions), scored on the server's held-out split ({len(data[2].y)} examples).",
        "", "| | accuracy (final) | epsilon reached | noise multiplier | settings |", "|---|---|---|---|---|",
        f"| central DP-SGD (`train_dpsgd` on the pooled data) | {_pct(cr['accuracy'])} | {_eps(cr['epsilon'])} "
        f"(sample-level, RDP) | {cr['noise_multiplier']:.3f} | {_settings(cs)} |",
    ]
    ok = [r for r in federated_rows if r[1]["ok"] and r[1]["accuracy"] is not None]
    if ok:
        fs, fr = max(ok, key=lambda r: r[1]["accuracy"])
        gap = 100 * (cr["accuracy"] - fr["accuracy"])
        lines += [f"| federated `dp=dpsgd` | {_pct(fr['accuracy'])} (best round {_pct(fr['best_accuracy'])}) | "
                  f"{_eps(fr['epsilon'])} (max over clients, sample-level, RDP) | {fr['noise_multiplier']:.3f} | "
                  f"{_settings(fs)} |", "",
                  f"Gap: {gap:.1f} points ({'within' if gap <= 10 else 'not within'} the 10-point goal).", "",
                  "The federated run on its own:", "", "```", fr["command"], "```"]
    if len(central_rows) > 1:
        lines += ["", "Central grid:", "", bench.table(["epochs", "batch", "lr", "clip", "momentum", "accuracy", "epsilon",
                                                         "sigma", "s"], [
            [s["local_epochs"], s["batch_size"], s["learning_rate"], s["clipping_norm"], s["momentum"], _pct(r["accuracy"]),
             _eps(r["epsilon"]), f"{r['noise_multiplier']:.3f}", r["seconds"]] for s, r in central_rows])]
    if len(federated_rows) > 1:
        lines += ["", "Federated grid (each a real `flwr run` through `fl-dp simulate`):", "", bench.table(
            ["rounds", "local epochs", "batch", "lr", "clip", "momentum", "final acc", "best acc", "max sample eps",
             "sigma", "wall s"],
            [[*(s[k] for k in KEYS), _pct(r["accuracy"]), _pct(r["best_accuracy"]), _eps(r["epsilon"]),
              r["noise_multiplier"], r["wall_seconds"]] for s, r in federated_rows])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tune", action="store_true", help="run the small grids (central, then federated)")
    parser.add_argument("--central-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a check: 1 central epoch, 1 federated round")
    parser.add_argument("--output-dir", default="", help="federated run directories (default ./outputs/bench-dpsgd-<time>)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to write the section into ('' = no)")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or str(bench.REPO / "outputs" / time.strftime("bench-dpsgd-%Y%m%d-%H%M%S"))
    torch.set_num_threads(1)
    started = time.monotonic()
    data = central_data(args)
    print(f"digits: {len(data[1])} training examples over {args.num_clients} clients, {len(data[2].y)} held out; "
          f"target ({args.epsilon}, {args.delta})", flush=True)
    central = CENTRAL_GRID if args.tune else [BEST_CENTRAL]
    federated = [] if args.central_only else FEDERATED_GRID if args.tune else [BEST_FEDERATED]
    if args.quick:
        central = [dict(s, local_epochs=1) for s in central]
        federated = [dict(s, rounds=1) for s in federated]
    central_rows, federated_rows = [], []
    for k, s in enumerate(central, 1):
        central_rows.append((s, r := train_central(s, data, args)))
        print(f"[central {k}/{len(central)}] {_settings(s)}: accuracy {_pct(r['accuracy'])}, epsilon "
              f"{_eps(r['epsilon'])}, sigma {r['noise_multiplier']:.3f} ({r['seconds']}s)", flush=True)
    for k, s in enumerate(federated, 1):
        federated_rows.append((s, r := run_federated(s, args, "fed-" + "-".join(str(v) for v in s.values()))))
        print(f"[federated {k}/{len(federated)}] {_settings(s)}: {'ok' if r['ok'] else 'FAILED, see ' + r['log']}: "
              f"accuracy {_pct(r['accuracy'])}, max sample-level epsilon {_eps(r['epsilon'])}, {r['wall_seconds']}s",
              flush=True)
    text = report(args, data, central_rows, federated_rows, time.monotonic() - started)
    print(text)
    if args.results:
        bench.write_section("dpsgd_vs_central", text, path=Path(args.results))
    return 0 if args.central_only or any(r["ok"] for _, r in federated_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
