#!/usr/bin/env python3
"""Benchmark 1: what a Flower simulation costs on top of the training it does.

Digits, mlp, 10 clients, all of them every round, the app's defaults otherwise, run (a) through
``fl-dp simulate`` (wall time of the whole command; the sum of metrics.json's round seconds is
the time without start-up) and (b) as a plain loop in a fresh interpreter, built from the app's
functions (``load_client_data``, ``train_locally``, Flower's FedAvg ``aggregate_arrayrecords`` in
the server's order, ``evaluate``; one torch thread).

    .venv/bin/python benchmarks/sim_overhead.py                 # 3 runs of each, 5 rounds
    .venv/bin/python benchmarks/sim_overhead.py --repeats 1 --rounds 2 --no-write   # a check
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bench

NUM_CLIENTS = 10
OVERRIDES = {"dataset": "digits", "model": "mlp"}


def run_flower(rounds: int, workdir: Path) -> dict:
    """(a): ``fl-dp simulate``, with the times at which the run was submitted, the ServerApp started, rounds ended."""
    marks: dict[str, float] = {}

    def mark(now: float, line: str) -> None:
        if "Successfully started run" in line:
            marks.setdefault("run_submitted", now)
        elif "Writing results to" in line:
            marks.setdefault("serverapp_started", now)
        elif match := re.search(r"round (\d+)/\d+ ", line):
            marks[f"round_{match.group(1)}"] = now

    run = bench.simulate(NUM_CLIENTS, OVERRIDES | {"num-server-rounds": rounds},
                         workdir / f"flower-{time.strftime('%H%M%S')}", on_line=mark)
    if run["returncode"] != 0:
        raise SystemExit(f"fl-dp simulate failed ({run['returncode']}); log: {run['log']}")
    seconds = run["round_seconds"]
    return run | {"rounds_sum": sum(seconds), "startup": run["wall"] - sum(seconds), "marks": marks,
                  "final_accuracy": run["metrics"][-1]["central_accuracy"]}


def plain_loop(rounds: int) -> dict:
    """(b), inside a fresh interpreter (see --plain-loop)."""
    t0 = time.monotonic()
    import torch
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from client_app.privacy_store import client_identity
    from client_app.training import train_locally
    from common.config import NodeConfig
    from common.data.client_data import central_test_set, load_client_data
    from common.evaluation import evaluate
    from common.models import build_model
    from common.protocol import NUM_EXAMPLES
    from fl_dp.run_config import validate

    torch.set_num_threads(1)  # as the ClientApp
    imports = time.monotonic() - t0
    t1 = time.monotonic()
    config = validate(OVERRIDES | {"num-server-rounds": rounds})
    test = central_test_set(config)
    nf, nc = test.num_features, test.num_classes
    model = build_model(config.model, nf, nc, seed=config.seed)
    nodes = [NodeConfig.from_node_config({"partition-id": i, "num-partitions": NUM_CLIENTS}) for i in range(NUM_CLIENTS)]
    nodes.sort(key=lambda node: client_identity(config, node))  # the server aggregates in this order
    state = model.state_dict()
    round_seconds, accuracy = [], None
    for server_round in range(1, rounds + 1):
        r0 = time.monotonic()
        replies = []
        for node in nodes:  # each client loads its data, as each ClientApp call does
            data = load_client_data(config, node, nf, nc)
            local = build_model(config.model, nf, nc)
            local.load_state_dict(state)
            train_locally(local, data.x_train, data.y_train, config, 0.0, server_round * 1000 + node.partition_id)
            replies.append(RecordDict({"arrays": ArrayRecord(local.state_dict()),
                                       "metrics": MetricRecord({NUM_EXAMPLES: len(data.y_train)})}))
        state = aggregate_arrayrecords(replies, NUM_EXAMPLES).to_torch_state_dict()
        for node in nodes:  # federated evaluation on every client's validation split
            data = load_client_data(config, node, nf, nc)
            local = build_model(config.model, nf, nc)
            local.load_state_dict(state)
            evaluate(local, data.x_val, data.y_val)
        model.load_state_dict(state)
        _, accuracy = evaluate(model, test.x, test.y)
        round_seconds.append(time.monotonic() - r0)
    return {"imports": imports, "loop": time.monotonic() - t1, "round_seconds": round_seconds, "final_accuracy": accuracy}


def run_plain(rounds: int, workdir: Path) -> dict:
    """(b) in a fresh interpreter: its result, wall time and the load around it."""
    out, load, started = workdir / f"plain-{time.monotonic_ns()}.json", bench.load1(), time.monotonic()
    subprocess.run([sys.executable, __file__, "--plain-loop", str(out), "--rounds", str(rounds)], cwd=bench.REPO,
                   env=bench.bench_env(), check=True)
    wall = time.monotonic() - started
    return json.loads(out.read_text()) | {"wall": wall, "load_before": load, "load_after": bench.load1()}


def report(rounds: int, flower: list[dict], plain: list[dict]) -> str:
    median = bench.median
    rows, pairs = [], []
    for i, f in enumerate(flower, 1):
        m = f["marks"]
        rows.append([f"(a) Flower #{i}", f"{f['wall']:.1f}", f"{f['rounds_sum']:.1f}", f"{f['startup']:.1f}",
                     " / ".join(f"{s:.2f}" for s in f["round_seconds"]),
                     " / ".join(f"{m.get(k, float('nan')):.1f}" for k in ("run_submitted", "serverapp_started", "round_1")),
                     f"{f['final_accuracy']:.4f}", f"{f['load_before']:.1f} / {f['load_after']:.1f}"])
    for i, p in enumerate(plain, 1):
        rows.append([f"(b) plain loop #{i}", f"{p['wall']:.1f}", f"{p['loop']:.1f}", f"{p['wall'] - p['loop']:.1f}",
                     " / ".join(f"{s:.2f}" for s in p["round_seconds"]), f"imports {p['imports']:.1f}",
                     f"{p['final_accuracy']:.4f}", f"{p['load_before']:.1f} / {p['load_after']:.1f}"])
    for i, (f, p) in enumerate(zip(flower, plain), 1):
        later = median(f["round_seconds"][1:]) / median(p["round_seconds"][1:])
        pairs.append([i, f"{f['wall'] / p['wall']:.1f}x", f"{f['rounds_sum'] / p['loop']:.2f}x", f"{f['startup']:.1f}",
                      f"{later:.1f}x", f"{max(f['load_before'], f['load_after'], p['load_before'], p['load_after']):.1f}"])
    wall_a, sum_a, start_a = (median(f[k] for f in flower) for k in ("wall", "rounds_sum", "startup"))
    wall_b, loop_b = median(p["wall"] for p in plain), median(p["loop"] for p in plain)
    later_a = median(s for f in flower for s in f["round_seconds"][1:])
    later_b = median(s for p in plain for s in p["round_seconds"][1:])
    ratio = sum_a / loop_b
    summary = bench.table(["figure (medians)", "value", "goal", "met?"], [
        ["wall(a) / wall(b), whole commands", f"{wall_a:.1f} s / {wall_b:.1f} s = {wall_a / wall_b:.1f}x", "", ""],
        ["wall(a) excluding start-up / loop(b)", f"{sum_a:.1f} s / {loop_b:.1f} s = {ratio:.2f}x", "<= 1.5x",
         "yes" if ratio <= 1.5 else f"no ({ratio / 1.5:.1f}x over)"],
        ["start-up of (a) (wall - sum of rounds)", f"{start_a:.1f} s", "<= 10 s",
         "yes" if start_a <= 10 else f"no (+{start_a - 10:.1f} s)"],
        ["a later round (rounds 2..n): (a) vs (b)",
         f"{later_a:.2f} s vs {later_b:.2f} s = {later_a / later_b:.1f}x", "", ""],
    ])
    return f"""{bench.machine()}

Digits, `mlp`, {NUM_CLIENTS} clients, all {NUM_CLIENTS} every round, {rounds} rounds, the app's defaults otherwise
(federated evaluation on every client, central evaluation); (a) `fl-dp simulate` (real `flwr run`, 1 CPU
per client: 2 clients side by side), (b) the same training as a plain loop in one process on one torch
thread (`load_client_data`, `train_locally`, Flower's `aggregate_arrayrecords`, the same evaluations).

```bash
{bench.command_line()}
```

{summary}

Run by run (each Flower run with the plain loop run right after it; the machine's load differed
between pairs, so compare within a pair):

{bench.table(["pair", "wall(a)/wall(b)", "rounds(a)/loop(b)", "start-up of (a) s", "later round (a)/(b)",
              "highest load seen"], pairs)}

{bench.table(["run", "wall s", "rounds s (a: sum of metrics.json seconds; b: loop)",
              "start-up s (b: interpreter + imports)", "seconds per round",
              "(a) submitted / ServerApp up / round 1 done, s after launch", "final central acc.",
              "load before / after"], rows)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    bench.results_arguments(parser)
    parser.add_argument("--plain-loop", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if bench.notes_only("sim_overhead", args):
        return 0
    if args.plain_loop:  # the child of run_plain
        Path(args.plain_loop).write_text(json.dumps(plain_loop(args.rounds)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="sim-overhead-"))
    print(f"Working in {workdir}", flush=True)
    run_plain(1, workdir)  # warm the on-disk caches once, outside the measurement
    flower, plain = [], []
    for i in range(args.repeats):
        bench.wait_for_quiet(args.max_load, args.max_wait)
        flower.append(f := run_flower(args.rounds, workdir))
        print(f"(a) #{i + 1}: wall {f['wall']:.1f}s, rounds {f['rounds_sum']:.1f}s, start-up {f['startup']:.1f}s, "
              f"acc {f['final_accuracy']:.4f}, load {f['load_before']:.1f}/{f['load_after']:.1f}", flush=True)
        bench.wait_for_quiet(args.max_load, min(60.0, args.max_wait))  # (b) follows (a) at once unless the load jumped
        plain.append(p := run_plain(args.rounds, workdir))
        print(f"(b) #{i + 1}: wall {p['wall']:.1f}s, loop {p['loop']:.1f}s, imports {p['imports']:.1f}s, "
              f"acc {p['final_accuracy']:.4f}, load {p['load_before']:.1f}/{p['load_after']:.1f}", flush=True)
    bench.publish("sim_overhead", report(args.rounds, flower, plain), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
