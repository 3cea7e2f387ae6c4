#!/usr/bin/env python3
"""Benchmark 1: what a Flower simulation costs on top of the training it does.

The same federation (digits, mlp, 10 clients, all of them every round, the app's default
epochs/batch/learning rate, federated and central evaluation every round) is run

(a) through Flower: ``scripts/simulate.py`` (a private simulation SuperLink + ``flwr run``);
    its wall time is the whole command, and the sum of the per-round ``seconds`` from
    ``metrics.json`` is the wall time without start-up (and without the final teardown);
(b) as a plain loop in one fresh Python process: for each round, every client's data from
    ``common.data.client_data.load_client_data``, the global model loaded into a fresh model,
    ``client_app.training.train_locally`` with the seed the ClientApp uses, then FedAvg (the
    example-weighted mean, in the order the server aggregates), each client's validation
    evaluation and the central evaluation. Torch runs on one thread, as in the ClientApp.

Reported: wall(a)/wall(b) (whole processes), wall(a) excluding start-up / loop(b), start-up
seconds (wall(a) - sum of round seconds), the final central accuracies of both (they should
agree: same data, seeds and arithmetic), and the 1-minute load next to each run.

    .venv/bin/python benchmarks/sim_overhead.py                 # 3 runs of each, 5 rounds
    .venv/bin/python benchmarks/sim_overhead.py --repeats 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the app's packages (common, client_app, ...)


import benchlib as _bench  # noqa: E402  (benchmarks/benchlib.py: this folder is on sys.path)
REPO, VENV_PYTHON, bench_env, command_line, load1 = (
    _bench.REPO, _bench.VENV_PYTHON, _bench.bench_env, _bench.command_line, _bench.load1)
machine, median, table, wait_for_quiet, write_section = (
    _bench.machine, _bench.median, _bench.table, _bench.wait_for_quiet, _bench.write_section)

NUM_CLIENTS = 10


def run_config_text(rounds: int) -> str:
    return f'dataset="digits" model="mlp" num-server-rounds={rounds}'


# ----------------------------------------------------------------------------- (a) Flower


def run_flower(rounds: int, workdir: Path, profile: Path | None = None, rate: int = 20) -> dict:
    """scripts/simulate.py, timed from launch to exit, with a timestamp on every output line
    (under ``py-spy record --subprocesses`` when ``profile`` is given)."""
    out_dir = workdir / f"flower-{time.strftime('%H%M%S')}"
    spy = [str(VENV_PYTHON.parent / "py-spy"), "record", "--subprocesses", "--format", "raw", "--rate", str(rate),
           "--output", str(profile), "--"] if profile else []
    command = spy + [
        str(VENV_PYTHON), str(REPO / "scripts" / "simulate.py"), "--num-clients", str(NUM_CLIENTS),
        "--output-dir", str(out_dir), "--run-config", run_config_text(rounds),
    ]
    load_before = load1()
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=bench_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    marks: dict[str, float] = {}
    log_lines = []
    for line in process.stdout:
        now = time.monotonic() - started
        log_lines.append(f"{now:8.2f} {line.rstrip()}")
        if "Successfully started run" in line:
            marks.setdefault("run_submitted", now)
        elif "Writing results to" in line:
            marks.setdefault("serverapp_started", now)
        elif (match := re.search(r"round (\d+)/\d+ ", line)):
            marks[f"round_{match.group(1)}"] = now
        elif line.startswith("Done ("):
            marks.setdefault("serverapp_done", now)
    process.wait()
    wall = time.monotonic() - started
    (workdir / f"{out_dir.name}.log").write_text("\n".join(log_lines) + "\n")
    if process.returncode != 0:
        raise SystemExit(f"simulate.py failed ({process.returncode}); log: {workdir / (out_dir.name + '.log')}")
    rows = json.loads((out_dir / "metrics.json").read_text())
    seconds = [float(r["seconds"]) for r in rows]
    return {
        "wall": wall,
        "round_seconds": seconds,
        "rounds_sum": sum(seconds),
        "startup": wall - sum(seconds),
        "marks": marks,
        "final_accuracy": rows[-1]["central_accuracy"],
        "load_before": load_before,
        "load_after": load1(),
        "output_dir": str(out_dir),
    }


# ----------------------------------------------------------------------------- (b) plain loop


def plain_loop(rounds: int) -> dict:
    """The federation as a plain loop (runs inside a fresh interpreter: see --plain-loop)."""
    t0 = time.monotonic()
    import tomllib
    import zlib

    import numpy as np
    import torch

    from client_app.privacy_store import client_identity
    from client_app.training import local_optimizer, train_locally
    from common.config import NodeConfig, RunConfig
    from common.data.client_data import central_test_set, load_client_data
    from common.evaluation import evaluate
    from common.models import build_model

    torch.set_num_threads(1)  # as the ClientApp does
    imports = time.monotonic() - t0

    t1 = time.monotonic()
    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    overrides = tomllib.loads("\n".join(run_config_text(rounds).split(" ")))
    config = RunConfig.from_run_config(defaults | overrides)
    test_set = central_test_set(config)
    nf, nc = test_set.num_features, test_set.num_classes
    model = build_model(config.model, nf, nc, seed=config.seed)
    nodes = [NodeConfig.from_node_config({"partition-id": i, "num-partitions": NUM_CLIENTS}) for i in range(NUM_CLIENTS)]
    # The server aggregates replies ordered by the clients' stable identities.
    nodes.sort(key=lambda node: client_identity(config, node))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    round_seconds, accuracy = [], None
    for server_round in range(1, rounds + 1):
        r0 = time.monotonic()
        updates, weights = [], []
        for node in nodes:  # train (each client loads its data, as each ClientApp call does)
            data = load_client_data(config, node, nf, nc)
            local = build_model(config.model, nf, nc)
            local.load_state_dict(global_state)
            seed = zlib.crc32(f"{config.seed}|{server_round}|{node.partition_id}|{node.data_path}".encode())
            torch.manual_seed(seed)
            train_locally(local, data.x_train, data.y_train, config, 0.0, seed)
            updates.append({k: v.detach().numpy() for k, v in local.state_dict().items()})
            weights.append(float(len(data.y_train)))
        total = sum(weights)  # FedAvg: example-weighted mean, accumulated as Flower does
        mean: dict[str, np.ndarray] = {}
        for update, weight in zip(updates, weights):
            for key, value in update.items():
                mean[key] = value * (weight / total) if key not in mean else mean[key] + value * (weight / total)
        global_state = {k: torch.from_numpy(np.asarray(v)) for k, v in mean.items()}
        for node in nodes:  # federated evaluation on every client's validation split
            data = load_client_data(config, node, nf, nc)
            local = build_model(config.model, nf, nc)
            local.load_state_dict(global_state)
            evaluate(local, data.x_val, data.y_val)
        model.load_state_dict(global_state)  # central evaluation
        _, accuracy = evaluate(model, test_set.x, test_set.y)
        round_seconds.append(time.monotonic() - r0)
    loop = time.monotonic() - t1
    return {"imports": imports, "loop": loop, "round_seconds": round_seconds, "final_accuracy": accuracy}


def cold_client() -> dict:
    """What a fresh client process (a Ray worker's first message, or a deployment message) pays
    before and around its training, step by step (runs inside a fresh interpreter: see --cold)."""
    import sys as _sys

    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import client_app.app  # noqa: F401  (what the ClientApp module pulls in beyond torch)

    t2 = time.perf_counter()
    import tomllib

    from client_app.training import local_optimizer, train_locally
    from common.config import NodeConfig, RunConfig
    from common.data.client_data import load_client_data
    from common.models import build_model

    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config = RunConfig.from_run_config(defaults | {"dataset": "digits", "model": "mlp"})
    node = NodeConfig.from_node_config({"partition-id": 0, "num-partitions": NUM_CLIENTS})
    t3 = time.perf_counter()
    data = load_client_data(config, node, 64, 10)
    t4 = time.perf_counter()
    model = build_model(config.model, 64, 10)
    t5 = time.perf_counter()
    local_optimizer(model, config)  # torch.optim.SGD here imported torch._dynamo + sympy (~1 s)
    t6 = time.perf_counter()
    train_locally(model, data.x_train, data.y_train, config, 0.0, 1)
    t7 = time.perf_counter()
    train_locally(model, data.x_train, data.y_train, config, 0.0, 2)
    t8 = time.perf_counter()
    return {"import torch": t1 - t0, "import client_app.app (beyond torch)": t2 - t1,
            "first load_client_data (digits)": t4 - t3, "first optimizer (local_optimizer)": t6 - t5,
            "first train_locally (5 epochs)": t7 - t6, "second train_locally": t8 - t7,
            "modules": {m: m in _sys.modules for m in ("sklearn", "scipy", "dp_accounting", "sympy", "opacus")}}


def run_cold(repeats: int, workdir: Path) -> list[dict]:
    results = []
    for i in range(repeats):
        out = workdir / f"cold-{i}.json"
        subprocess.run([str(VENV_PYTHON), __file__, "--cold", str(out)], cwd=REPO, env=bench_env(), check=True)
        results.append(json.loads(out.read_text()))
    return results


def run_plain(rounds: int, workdir: Path) -> dict:
    out = workdir / f"plain-{time.strftime('%H%M%S')}.json"
    load_before = load1()
    started = time.monotonic()
    subprocess.run([str(VENV_PYTHON), __file__, "--plain-loop", str(out), "--rounds", str(rounds)],
                   cwd=REPO, env=bench_env(), check=True)
    wall = time.monotonic() - started
    result = json.loads(out.read_text())
    return result | {"wall": wall, "load_before": load_before, "load_after": load1()}


# ----------------------------------------------------------------------------- report


def report(rounds: int, flower: list[dict], plain: list[dict], notes: str) -> str:
    rows = []
    for i, f in enumerate(flower, 1):
        m = f["marks"]
        rows.append([
            f"(a) Flower #{i}", f"{f['wall']:.1f}", f"{f['rounds_sum']:.1f}", f"{f['startup']:.1f}",
            " / ".join(f"{s:.2f}" for s in f["round_seconds"]),
            f"{m.get('run_submitted', float('nan')):.1f} / {m.get('serverapp_started', float('nan')):.1f} / "
            f"{m.get('round_1', float('nan')):.1f}",
            f"{f['final_accuracy']:.4f}", f"{f['load_before']:.1f} / {f['load_after']:.1f}",
        ])
    for i, p in enumerate(plain, 1):
        rows.append([
            f"(b) plain loop #{i}", f"{p['wall']:.1f}", f"{p['loop']:.1f}", f"{p['wall'] - p['loop']:.1f}",
            " / ".join(f"{s:.2f}" for s in p["round_seconds"]), f"imports {p['imports']:.1f}",
            f"{p['final_accuracy']:.4f}", f"{p['load_before']:.1f} / {p['load_after']:.1f}",
        ])
    pairs = []  # each Flower run with the plain loop run right after it
    for i, (f, p) in enumerate(zip(flower, plain), 1):
        pairs.append([i, f"{f['wall'] / p['wall']:.1f}x", f"{f['rounds_sum'] / p['loop']:.2f}x", f"{f['startup']:.1f}",
                      f"{median(f['round_seconds'][1:]) / median(p['round_seconds'][1:]):.1f}x",
                      f"{max(f['load_before'], f['load_after'], p['load_before'], p['load_after']):.1f}"])
    wall_a, sum_a, start_a = (median(f[k] for f in flower) for k in ("wall", "rounds_sum", "startup"))
    wall_b, loop_b = median(p["wall"] for p in plain), median(p["loop"] for p in plain)
    later_a = median(s for f in flower for s in f["round_seconds"][1:])
    later_b = median(s for p in plain for s in p["round_seconds"][1:])
    ratio_ex = sum_a / loop_b
    summary = table(
        ["figure (medians)", "value", "goal", "met?"],
        [
            ["wall(a) / wall(b), whole commands", f"{wall_a:.1f} s / {wall_b:.1f} s = {wall_a / wall_b:.1f}x", "", ""],
            ["wall(a) excluding start-up / loop(b)", f"{sum_a:.1f} s / {loop_b:.1f} s = {ratio_ex:.2f}x", "<= 1.5x",
             "yes" if ratio_ex <= 1.5 else f"no ({ratio_ex / 1.5:.1f}x over)"],
            ["start-up of (a) (wall - sum of rounds)", f"{start_a:.1f} s", "<= 10 s",
             "yes" if start_a <= 10 else f"no (+{start_a - 10:.1f} s)"],
            ["a later round (rounds 2..n): (a) vs (b)", f"{later_a:.2f} s vs {later_b:.2f} s = {later_a / later_b:.1f}x", "", ""],
        ],
    )
    runs = table(
        ["run", "wall s", "rounds s (a: sum of metrics.json seconds; b: loop)", "start-up s (b: interpreter + imports)",
         "seconds per round", "(a) submitted / ServerApp up / round 1 done, s after launch", "final central acc.",
         "load before / after"],
        rows,
    )
    paired = table(["pair", "wall(a)/wall(b)", "rounds(a)/loop(b)", "start-up of (a) s", "later round (a)/(b)",
                    "highest load seen"], pairs)
    return f"""{machine()}

Digits, `mlp`, {NUM_CLIENTS} clients, all {NUM_CLIENTS} every round, {rounds} rounds, the app's defaults otherwise
(5 local epochs, batch 16, SGD lr 0.1 momentum 0.9, federated evaluation on every client, central evaluation);
(a) `scripts/simulate.py` (real `flwr run`, 1 CPU per client: 2 clients side by side), (b) the same
training as a plain loop in one process on one torch thread (`train_locally`, FedAvg, the same evaluations).

```bash
{command_line()}
```

{summary}

Run by run (each Flower run with the plain loop run right after it; the machine's load differed
between pairs, so compare within a pair):

{paired}

{runs}

{notes}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=2.5, help="wait for a 1-minute load below this")
    parser.add_argument("--max-wait", type=float, default=600.0, help="...but at most this many seconds per run")
    parser.add_argument("--notes", default="", help="a file whose text is appended to the section")
    parser.add_argument("--profile", action="store_true",
                        help="after the measured runs, run (a) once more under py-spy (all processes) and add the profile")
    parser.add_argument("--notes-only", metavar="FILE",
                        help="only replace the analysis notes of this section in results.md with FILE (no measurement)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results.md alone")
    parser.add_argument("--plain-loop", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--cold", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.notes_only:
        _bench.update_notes("sim_overhead", Path(args.notes_only).read_text())
        return 0

    if args.cold:  # a child: one cold client
        Path(args.cold).write_text(json.dumps(cold_client()))
        return 0
    if args.plain_loop:  # the child process of (b)
        Path(args.plain_loop).write_text(json.dumps(plain_loop(args.rounds)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="sim-overhead-"))
    print(f"Working in {workdir}", flush=True)
    # Warm the on-disk caches (dataset, partition table) once, outside the measurement.
    json.loads(json.dumps(run_plain(1, workdir)))
    flower, plain = [], []
    for i in range(args.repeats):
        wait_for_quiet(args.max_load, args.max_wait)
        flower.append(run_flower(args.rounds, workdir))
        f = flower[-1]
        print(f"(a) #{i + 1}: wall {f['wall']:.1f}s, rounds {f['rounds_sum']:.1f}s, start-up {f['startup']:.1f}s, "
              f"rounds {['%.2f' % s for s in f['round_seconds']]}, acc {f['final_accuracy']:.4f}, "
              f"load {f['load_before']:.1f}/{f['load_after']:.1f}", flush=True)
        wait_for_quiet(args.max_load, 60.0)  # (b) follows (a) at once unless the load jumped
        plain.append(run_plain(args.rounds, workdir))
        p = plain[-1]
        print(f"(b) #{i + 1}: wall {p['wall']:.1f}s, loop {p['loop']:.1f}s, imports {p['imports']:.1f}s, "
              f"acc {p['final_accuracy']:.4f}, load {p['load_before']:.1f}/{p['load_after']:.1f}", flush=True)
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.profile:
        raw = workdir / "profile.txt"
        load = wait_for_quiet(args.max_load, args.max_wait)
        profiled = run_flower(args.rounds, workdir, raw, rate=20)
        summary = _bench.pyspy_summary(raw, 20)
        total = sum(item["seconds"] for item in summary)
        imports = sum(item["import_seconds"] for item in summary)
        notes += f"""
Profile of (a): one more run under `py-spy record --subprocesses --rate 20` (every process of the tree;
on-CPU samples only, so waiting is not counted), wall {profiled['wall']:.1f} s (py-spy slows it),
load {load:.1f} / {profiled['load_after']:.1f}. {total:.0f} s of CPU in all, {imports:.0f} s of it importing modules.
Raw profile: `{raw}`.

{_bench.pyspy_table(summary)}
"""
    load = wait_for_quiet(args.max_load, args.max_wait)
    cold = run_cold(3, workdir)
    steps = [k for k in cold[0] if k != "modules"]
    cold_rows = [[k, f"{median(c[k] for c in cold):.2f}", " / ".join(f"{c[k]:.2f}" for c in cold)] for k in steps]
    loaded = ", ".join(f"{m} {'yes' if v else 'no'}" for m, v in cold[0]["modules"].items())
    notes = f"""A cold client, step by step: a fresh interpreter does what a Ray worker does for its first
message (and a deployment `flwr-clientapp` process for every message), timed in place (3 runs,
load {load:.1f} / {load1():.1f}). Loaded at the end: {loaded}.

{table(["step", "median s", "runs s"], cold_rows)}
""" + notes
    text = report(args.rounds, flower, plain, notes)
    print(text)
    if not args.no_write:
        write_section("sim_overhead", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
