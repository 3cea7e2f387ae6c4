#!/usr/bin/env python3
"""Federated DP-SGD against the same model trained centrally with Opacus, at the same epsilon.

Issue 3, "Done when": on digits with 10 clients, ``dp='dpsgd'`` at target sample-level
epsilon 3 (delta 1e-5) over the planned rounds, next to the SAME model
(``common.models.build_model("mlp", 64, 10)``) trained centrally with Opacus DP-SGD at the same
(epsilon, delta) on the union of the clients' training data; goal: federated within 10 points.

Data, identical on both sides: the digits pool left after the central held-out split
(``common.data.partitioning.central_split``) is partitioned IID over the 10 clients exactly as
the app's clients do it (``common.data.client_data.load_client_data``); the central model trains
on the union of those clients' training arrays, and both are scored on the server's held-out
split (``common.data.client_data.central_test_set``). ``val-fraction`` is 0.0 by default: DP
modes never run federated evaluation, so the clients train on their whole partition and the
union is the whole pool (1,438 examples; 359 held out).

Federated side: ``scripts/simulate.py`` (the user's path: ``flwr run`` on the simulation
runtime), FedAvg, every client every round. Each client runs Opacus DP-SGD with Poisson
sampling and an RDP accountant that persists across rounds; the figure reported is the
maximum over clients of the cumulative sample-level epsilon (``sample_epsilon_max``).

Noise calibration (``--calibration``):
  * ``exact`` (default): this script solves the noise multiplier with Opacus's own
    ``get_noise_multiplier`` for the sampling Opacus really performs (its DPDataLoader uses
    q = 1/ceil(n/B) and ceil(n/B) steps per epoch), for every client's n, and passes the largest
    as ``noise-multiplier``: every client ends at epsilon <= target.
  * ``app``: passes ``target-epsilon`` and lets the client solve it (client_app/dpsgd.py assumes
    q = B/n and floor(n/B) steps per epoch, which can end above the target; see results_privacy.md).

Central side: Opacus ``make_private_with_epsilon`` (RDP accountant, Poisson sampling) in this
process, same model and initialisation seed, same test split.

    .venv/bin/python benchmarks/dpsgd_vs_central.py            # tuned settings, one run each
    .venv/bin/python benchmarks/dpsgd_vs_central.py --tune     # the small grids, then the best of each

Writes its section of ``benchmarks/results_privacy.md`` (``--results ''`` to skip).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(APP_DIR))

SIMULATE = APP_DIR / "scripts" / "simulate.py"
RESULTS = APP_DIR / "benchmarks" / "results_privacy.md"
SECTION = "dpsgd_vs_central"


@dataclass(frozen=True)
class CentralSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    clipping_norm: float
    momentum: float = 0.9


@dataclass(frozen=True)
class FederatedSettings:
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    clipping_norm: float
    momentum: float = 0.9


# Tuned with --tune (see results_privacy.md); the defaults of a plain run.
BEST_CENTRAL = CentralSettings(epochs=30, batch_size=64, learning_rate=0.1, clipping_norm=2.0, momentum=0.0)
BEST_FEDERATED = FederatedSettings(rounds=60, local_epochs=1, batch_size=16, learning_rate=0.2, clipping_norm=0.5,
                                   momentum=0.0)

# The small grids of --tune. Central: the ranges the notes give (epochs 30-60, batch 64-256,
# lr 0.1-0.5, clip 0.5-2). Federated: rounds, local epochs, batch, lr, clip.
CENTRAL_GRID = [
    CentralSettings(e, b, lr, c, m)
    for e, b, lr, c, m in itertools.product((30, 60), (64, 256), (0.1, 0.5), (0.5, 2.0), (0.0,))
]
FEDERATED_GRID = [
    FederatedSettings(60, 1, 16, 0.2, 0.5, 0.0),
    FederatedSettings(60, 1, 8, 0.1, 0.5, 0.0),
    FederatedSettings(20, 1, 48, 1.0, 1.0, 0.0),
    FederatedSettings(60, 1, 24, 0.1, 2.0, 0.0),
    FederatedSettings(20, 3, 16, 0.2, 0.5, 0.0),
]

# Pre-screened in-process with --explore (an emulated federation, see emulate_federated).
EXPLORE_GRID = [
    FederatedSettings(r, e, b, lr, c, m)
    for r, e, b, lr, c, m in [
        (10, 1, 32, 0.1, 1.0, 0.9), (20, 1, 32, 0.1, 1.0, 0.9), (20, 1, 32, 0.5, 1.0, 0.0), (20, 1, 16, 0.5, 1.0, 0.0),
        (20, 2, 32, 0.5, 1.0, 0.0), (40, 1, 32, 0.5, 1.0, 0.0), (20, 1, 32, 0.1, 2.0, 0.0), (20, 1, 48, 1.0, 1.0, 0.0),
        (20, 1, 48, 2.0, 1.0, 0.0), (20, 1, 48, 1.0, 2.0, 0.0), (40, 1, 48, 1.0, 1.0, 0.0), (20, 1, 72, 1.0, 1.0, 0.0),
        (20, 1, 144, 2.0, 1.0, 0.0), (20, 1, 144, 4.0, 1.0, 0.0), (40, 1, 144, 2.0, 1.0, 0.0),
        (40, 1, 144, 4.0, 1.0, 0.0), (80, 1, 144, 2.0, 1.0, 0.0), (30, 1, 24, 0.5, 0.5, 0.0),
        (60, 1, 24, 0.1, 2.0, 0.0), (60, 1, 8, 0.1, 0.5, 0.0), (60, 1, 8, 0.2, 0.5, 0.0), (60, 1, 8, 0.1, 1.0, 0.0),
        (60, 1, 16, 0.2, 0.5, 0.0), (100, 1, 8, 0.1, 0.5, 0.0), (60, 1, 8, 0.05, 0.5, 0.0),
    ]
]


# ----------------------------------------------------------------------------- data


def base_config(args) -> dict:
    return {"dataset": "digits", "partitioner": "iid", "seed": args.seed, "val-fraction": args.val_fraction}


def client_training_sets(args):
    """Each client's training arrays, exactly as the app's clients load them."""
    from common.config import NodeConfig, RunConfig
    from common.data.client_data import load_client_data

    config = RunConfig.from_run_config(base_config(args))
    sets = []
    for pid in range(args.num_clients):
        node = NodeConfig.from_node_config({"partition-id": pid, "num-partitions": args.num_clients})
        data = load_client_data(config, node, 64, 10)
        sets.append((data.x_train, data.y_train))
    return config, sets


def central_data(args):
    """(x_train, y_train, x_test, y_test): the union of the clients' training data, the held-out split."""
    import numpy as np

    from common.data.client_data import _cached_dataset, central_test_set
    from common.data.partitioning import central_split

    config, sets = client_training_sets(args)
    x = np.concatenate([s[0] for s in sets])
    y = np.concatenate([s[1] for s in sets])
    test = central_test_set(config)
    pool, _ = central_split(len(_cached_dataset(config)), config.test_fraction, config.seed)
    if args.val_fraction == 0.0:
        assert len(y) == len(pool), "the clients' training data should be the whole pool"
    return x, y, test.x, test.y, [len(s[1]) for s in sets], len(pool)


# ----------------------------------------------------------------------------- central


def train_central(s: CentralSettings, data, args) -> dict:
    """Opacus DP-SGD on the pooled data; returns accuracy, epsilon reached and noise."""
    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from common.evaluation import evaluate
    from common.models import build_model

    x, y, x_test, y_test = data[:4]
    started = time.monotonic()
    model = build_model("mlp", 64, 10, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=s.batch_size,
                        shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, private_loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon,
            target_delta=args.delta, epochs=s.epochs, max_grad_norm=s.clipping_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(args.seed + 1),
        )
    private.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus: full backward hook on inputs without grad
        for _ in range(s.epochs):
            for xb, yb in private_loader:
                optimizer.zero_grad()
                # Poisson sampling can draw an empty batch: a noise-only step, counted by the accountant.
                loss = nn.functional.cross_entropy(private(xb), yb, reduction="mean" if len(yb) else "sum")
                loss.backward()
                optimizer.step()
    _, accuracy = evaluate(model, x_test, y_test)
    return {
        "accuracy": accuracy,
        "epsilon": float(engine.accountant.get_epsilon(args.delta)),
        "noise_multiplier": float(optimizer.noise_multiplier),
        "sample_rate": 1 / len(loader),
        "steps": s.epochs * len(loader),
        "seconds": round(time.monotonic() - started, 1),
    }


# ----------------------------------------------------------------------------- federated


def exact_noise(s: FederatedSettings, client_sizes: list[int], args) -> float:
    """The noise multiplier for which EVERY client ends at epsilon <= target after all rounds,
    for the sampling Opacus's DPDataLoader really does (q = 1/ceil(n/B), ceil(n/B) steps/epoch)."""
    from opacus.accountants.utils import get_noise_multiplier

    sigmas = []
    for n in sorted(set(client_sizes)):
        batches = math.ceil(n / s.batch_size)
        sigmas.append(get_noise_multiplier(
            target_epsilon=args.epsilon, target_delta=args.delta, sample_rate=1 / batches,
            steps=batches * s.local_epochs * s.rounds, accountant="rdp",
        ))
    return float(max(sigmas))


def federated_run_config(s: FederatedSettings, client_sizes: list[int], args) -> str:
    pairs = {
        "dataset": '"digits"', "partitioner": '"iid"', "seed": args.seed, "val-fraction": float(args.val_fraction),
        "dp": '"dpsgd"', "target-delta": args.delta,
        "num-server-rounds": s.rounds, "local-epochs": s.local_epochs, "batch-size": s.batch_size,
        "learning-rate": float(s.learning_rate), "clipping-norm": float(s.clipping_norm),
        "momentum": float(s.momentum), "clients-per-round": 1.0,
    }
    if args.calibration == "exact":
        pairs["noise-multiplier"] = round(exact_noise(s, client_sizes, args), 6) + 1e-6  # round up: never below
    else:
        pairs["target-epsilon"] = float(args.epsilon)
    return " ".join(f"{k}={v}" for k, v in pairs.items())


def simulate_command(run_config: str, output_dir: Path, args) -> list[str]:
    return [sys.executable, str(SIMULATE), "--num-clients", str(args.num_clients),
            "--output-dir", str(output_dir), "--run-config", run_config]


def run_federated(s: FederatedSettings, client_sizes: list[int], args, name: str) -> dict:
    output_dir = Path(args.output_dir) / name
    run_config = federated_run_config(s, client_sizes, args)
    command = simulate_command(run_config, output_dir, args)
    log = Path(args.output_dir) / f"{name}.log"
    env = os.environ | {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    started = time.monotonic()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=APP_DIR, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - started
    try:
        summary = json.loads((output_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return {
        "ok": done.returncode == 0,
        "accuracy": summary.get("final_central_accuracy"),
        "best_accuracy": summary.get("best_central_accuracy"),
        "epsilon": summary.get("sample_epsilon_max"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "rounds": summary.get("rounds"),
        "wall_seconds": round(wall, 1),
        "app_seconds": summary.get("wall_seconds"),
        "command": " ".join(_quote(c) for c in command),
        "run_dir": str(output_dir),
        "log": str(log),
    }


def emulate_federated(s: FederatedSettings, args, client_sets, test) -> dict:
    """In-process stand-in for a federated run, ONLY to pre-screen settings quickly (--explore).

    The same client code (``client_app.dpsgd.train_dpsgd``, per-client accountant history carried
    across rounds, the app's per-round seeds) and FedAvg's aggregate of the app's dpsgd replies
    (each reply weighs 1: the plain mean of the client models); no Flower runtime, no messages.
    Numbers reported as federated come from real runs (``run_federated``), never from here.
    """
    import zlib

    import torch

    from client_app.dpsgd import train_dpsgd
    from common.privacy.secret_random import SecretRandom
    from common.config import RunConfig
    from common.evaluation import evaluate
    from common.models import build_model

    started = time.monotonic()
    sizes = [len(y) for _, y in client_sets]
    config = RunConfig.from_run_config(base_config(args) | {
        "dp": "dpsgd", "num-server-rounds": s.rounds, "local-epochs": s.local_epochs, "batch-size": s.batch_size,
        "learning-rate": float(s.learning_rate), "clipping-norm": float(s.clipping_norm),
        "momentum": float(s.momentum), "noise-multiplier": exact_noise(s, sizes, args) + 1e-6,
        "target-delta": args.delta,
    })
    model = build_model("mlp", 64, 10, seed=args.seed)
    histories = [[] for _ in client_sets]
    epsilon = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for server_round in range(1, s.rounds + 1):
            states = []
            for pid, (x, y) in enumerate(client_sets):
                local = build_model("mlp", 64, 10)
                local.load_state_dict(model.state_dict())
                seed = zlib.crc32(f"{args.seed}|{server_round}|{pid}|".encode())
                torch.manual_seed(seed)
                result, histories[pid] = train_dpsgd(local, x, y, config, histories[pid], SecretRandom(), config.max_epsilon)
                epsilon = max(epsilon, result.epsilon)
                states.append(local.state_dict())
            model.load_state_dict({k: torch.stack([st[k] for st in states]).mean(0) for k in states[0]})
    _, accuracy = evaluate(model, test[0], test[1])
    return {"accuracy": accuracy, "epsilon": epsilon, "noise_multiplier": config.noise_multiplier,
            "seconds": round(time.monotonic() - started, 1)}


def _display_command(command: str) -> str:
    """The recorded command, relative to the repository root and without this run's output dir."""
    import re

    command = command.replace(sys.executable, ".venv/bin/python").replace(str(APP_DIR) + "/", "")
    return re.sub(r" --output-dir \S+", "", command)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# ----------------------------------------------------------------------------- report


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _eps(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_section(path: Path, body: str) -> None:
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    text = path.read_text() if path.exists() else "# Privacy benchmarks: measured results\n\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--calibration", choices=("exact", "app"), default="exact")
    parser.add_argument("--tune", action="store_true", help="run the small grids (central, then federated)")
    parser.add_argument("--explore", action="store_true",
                        help="pre-screen EXPLORE_GRID in-process (emulated federation; not a reported result)")
    parser.add_argument("--central-only", action="store_true")
    parser.add_argument("--federated", default="", help="override federated settings: 'rounds=20 local_epochs=1 ...'")
    parser.add_argument("--central", default="", help="override central settings: 'epochs=60 batch_size=128 ...'")
    parser.add_argument("--output-dir", default="", help="federated run directories (default ./outputs/bench-dpsgd-<time>)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to write the section into ('' = no)")
    args = parser.parse_args(argv)
    args.output_dir = str(Path(args.output_dir or APP_DIR / "outputs" / time.strftime("bench-dpsgd-%Y%m%d-%H%M%S")).resolve())
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    data = central_data(args)
    client_sizes, pool = data[4], data[5]
    print(f"digits: {len(data[1])} training examples over {args.num_clients} clients {client_sizes}, "
          f"{len(data[3])} held out; target ({args.epsilon}, {args.delta})", flush=True)

    if args.explore:
        _, client_sets = client_training_sets(args)
        for k, s in enumerate(EXPLORE_GRID, 1):
            result = emulate_federated(s, args, client_sets, (data[2], data[3]))
            print(f"[explore {k}/{len(EXPLORE_GRID)}] {_settings(s)}: emulated accuracy {_pct(result['accuracy'])}, "
                  f"max epsilon {_eps(result['epsilon'])}, sigma {result['noise_multiplier']:.3f} "
                  f"({result['seconds']}s)", flush=True)
        return 0

    central_settings = [_override(BEST_CENTRAL, args.central)] if not args.tune else CENTRAL_GRID
    central_rows = []
    for k, s in enumerate(central_settings, 1):
        result = train_central(s, data, args)
        central_rows.append((s, result))
        print(f"[central {k}/{len(central_settings)}] {_settings(s)}: accuracy {_pct(result['accuracy'])}, "
              f"epsilon {_eps(result['epsilon'])}, sigma {result['noise_multiplier']:.3f} ({result['seconds']}s; "
              f"elapsed {time.monotonic() - started:.0f}s)", flush=True)
    best_central = max(central_rows, key=lambda r: r[1]["accuracy"])

    federated_rows = []
    if not args.central_only:
        fed_settings = [_override(BEST_FEDERATED, args.federated)] if not args.tune else FEDERATED_GRID
        for k, s in enumerate(fed_settings, 1):
            name = "fed-" + "-".join(f"{v}" for v in asdict(s).values())
            print(f"[federated {k}/{len(fed_settings)}] {_settings(s)} ... (elapsed {time.monotonic() - started:.0f}s)",
                  flush=True)
            result = run_federated(s, client_sizes, args, name)
            federated_rows.append((s, result))
            print(f"[federated {k}/{len(fed_settings)}] {'ok' if result['ok'] else 'FAILED, see ' + result['log']}: "
                  f"accuracy {_pct(result['accuracy'])} (best {_pct(result['best_accuracy'])}), "
                  f"max sample-level epsilon {_eps(result['epsilon'])}, sigma {result['noise_multiplier']}, "
                  f"{result['wall_seconds']}s", flush=True)

    ok_fed = [r for r in federated_rows if r[1]["ok"] and r[1]["accuracy"] is not None]
    best_fed = max(ok_fed, key=lambda r: r[1]["accuracy"]) if ok_fed else None
    print()
    cs, cr = best_central
    print(f"CENTRAL   (Opacus, pooled {len(data[1])} examples): accuracy {_pct(cr['accuracy'])} at epsilon "
          f"{_eps(cr['epsilon'])} (delta {args.delta}); {_settings(cs)}")
    if best_fed:
        fs, fr = best_fed
        gap = 100 * (cr["accuracy"] - fr["accuracy"])
        print(f"FEDERATED (dp=dpsgd, {args.num_clients} clients): accuracy {_pct(fr['accuracy'])} at max sample-level "
              f"epsilon {_eps(fr['epsilon'])}; {_settings(fs)}")
        print(f"gap: {gap:.1f} points ({'within' if gap <= 10 else 'NOT within'} 10)")
        print(f"reproduce the federated run: {fr['command']}")
    print(f"total {time.monotonic() - started:.0f}s")

    if args.results:
        write_section(Path(args.results), _report(args, data, central_rows, federated_rows, best_central, best_fed,
                                                 time.monotonic() - started))
        print(f"wrote section '{SECTION}' of {args.results}")
    return 0 if (args.central_only or best_fed) else 1


def _settings(s) -> str:
    return " ".join(f"{k}={v}" for k, v in asdict(s).items())


def _override(default, text: str):
    if not text.strip():
        return default
    values = asdict(default)
    for pair in text.split():
        key, value = pair.split("=", 1)
        key = key.replace("-", "_")
        if key not in values:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(values)}")
        values[key] = type(values[key])(value)
    return type(default)(**values)


def _report(args, data, central_rows, federated_rows, best_central, best_fed, seconds) -> str:
    cs, cr = best_central
    command = "python benchmarks/dpsgd_vs_central.py" + (" --tune" if args.tune else "")
    if not args.tune:
        if args.central:
            command += f" --central '{args.central}'"
        if args.federated:
            command += f" --federated '{args.federated}'"
    if args.calibration != "exact":
        command += f" --calibration {args.calibration}"
    lines = [
        f"## Federated DP-SGD vs central DP-SGD (digits, {args.num_clients} clients, epsilon {args.epsilon:g}, "
        f"delta {args.delta:g})",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `.venv/bin/{command}` "
        f"({seconds:.0f}s on 2 shared cores; other jobs were running, so times are noisy). "
        f"Both sides: `build_model(\"mlp\", 64, 10, seed={args.seed})`, the clients' training data "
        f"({len(data[1])} examples, union of {args.num_clients} IID partitions with val-fraction "
        f"{args.val_fraction:g}), scored on the server's held-out split ({len(data[3])} examples). "
        f"Noise calibration for the federated run: `{args.calibration}`.",
        "",
        "| | accuracy (final) | epsilon reached | noise multiplier | settings |",
        "|---|---|---|---|---|",
        f"| central Opacus DP-SGD | {_pct(cr['accuracy'])} | {_eps(cr['epsilon'])} (sample-level, RDP) | "
        f"{cr['noise_multiplier']:.3f} | {_settings(cs)} |",
    ]
    if best_fed:
        fs, fr = best_fed
        lines.append(
            f"| federated `dp=dpsgd` | {_pct(fr['accuracy'])} (best round {_pct(fr['best_accuracy'])}) | "
            f"{_eps(fr['epsilon'])} (max over clients, sample-level, RDP) | {fr['noise_multiplier']:.3f} | "
            f"{_settings(fs)} |"
        )
        gap = 100 * (cr["accuracy"] - fr["accuracy"])
        lines += ["", f"Gap: {gap:.1f} points ({'within' if gap <= 10 else 'not within'} the 10-point goal).",
                  "", "The federated run on its own (`noise-multiplier` is what this script solved for epsilon <= "
                  f"{args.epsilon:g} with Opacus's own sampling; scripts/simulate.py needs the venv's bin on PATH):",
                  "", "```", 'PATH="$PWD/.venv/bin:$PATH" ' + _display_command(fr["command"]), "```"]
    if len(central_rows) > 1:
        lines += ["", "Central grid:", "", "| epochs | batch | lr | clip | momentum | accuracy | epsilon | sigma | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s, r in central_rows:
            lines.append(f"| {s.epochs} | {s.batch_size} | {s.learning_rate} | {s.clipping_norm} | {s.momentum} | "
                         f"{_pct(r['accuracy'])} | {_eps(r['epsilon'])} | {r['noise_multiplier']:.3f} | {r['seconds']} |")
    if len(federated_rows) > 1:
        lines += ["", "Federated grid (each a real `flwr run` through scripts/simulate.py):", "",
                  "| rounds | local epochs | batch | lr | clip | momentum | final acc | best acc | max sample eps | sigma | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, r in federated_rows:
            lines.append(f"| {s.rounds} | {s.local_epochs} | {s.batch_size} | {s.learning_rate} | {s.clipping_norm} | "
                         f"{s.momentum} | {_pct(r['accuracy'])} | {_pct(r['best_accuracy'])} | {_eps(r['epsilon'])} | "
                         f"{r['noise_multiplier']} | {r['wall_seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
