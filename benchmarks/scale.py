#!/usr/bin/env python3
"""Benchmark 3: 1,000 / 10,000 / 100,000 simulated clients on MNIST-1D: seconds per round and memory.

Each federation runs through ``fl-dp simulate`` (settings in ``overrides``; ~``--per-client`` examples
per client, a held-out split of ``--test-examples`` for every size), after the app's own
``central_test_set`` and ``partition_rows`` have filled the shared on-disk cache; the whole process
tree's memory is sampled every 0.5 s.

    .venv/bin/python benchmarks/scale.py                                              # 1k, 10k, 100k
    .venv/bin/python benchmarks/scale.py --clients 20 --rounds 2 --test-examples 200 --no-write   # a check
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bench

GOAL_CLIENTS, GOAL_GIB, GOAL_SECONDS = 100_000, 8.0, 5.0


def overrides(num_clients: int, rounds: int, per_client: int, test_examples: int) -> dict:
    samples = num_clients * per_client + test_examples
    return {"dataset": "mnist1d", "model": "cnn1d", "dataset-samples": samples,
            "test-fraction": round(test_examples / samples, 8), "val-fraction": 0.0,
            "clients-per-round": min(100, num_clients), "identify-clients": False, "index-idle-nodes": True,
            "fraction-evaluate": 0.0, "local-epochs": 1, "num-server-rounds": rounds,
            "min-available-clients": num_clients}


def prepare(num_clients: int, values: dict) -> dict:
    """Generate the dataset and the partition table into the on-disk cache, as the clients will read them."""
    from common.data.client_data import central_test_set, partition_rows
    from fl_dp.run_config import validate

    config = validate(values)
    started = time.monotonic()
    central_test_set(config)
    data_seconds = time.monotonic() - started
    started = time.monotonic()
    sizes = [len(partition_rows(config, num_clients, i)) for i in range(num_clients)]
    return {"data_seconds": data_seconds, "partition_seconds": time.monotonic() - started,
            "examples": config.dataset_samples, "min_per_client": min(sizes), "max_per_client": max(sizes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000,10000,100000", help="comma-separated federation sizes")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rounds-large", type=int, default=4, help="rounds for federations of 100,000 or more")
    parser.add_argument("--per-client", type=int, default=10, help="training examples per client")
    parser.add_argument("--test-examples", type=int, default=10_000, help="the server's held-out split")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per federation before giving up")
    bench.results_arguments(parser)
    args = parser.parse_args()
    if bench.notes_only("scale", args):
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="scale-"))
    print(f"Working in {workdir}", flush=True)
    rows, failures, measured = [], [], []
    for num_clients in [int(c) for c in args.clients.split(",") if c]:
        rounds = args.rounds_large if num_clients >= 100_000 else args.rounds
        values = overrides(num_clients, rounds, args.per_client, args.test_examples)
        prepared = prepare(num_clients, values)
        load = bench.wait_for_quiet(args.max_load, args.max_wait)
        marks: dict[str, float] = {}

        def mark(now: float, line: str) -> None:
            if match := re.search(r"round (\d+)/\d+ ", line):
                marks.setdefault(f"round_{match.group(1)}", now)

        run = bench.simulate(num_clients, values, workdir / f"clients-{num_clients}", on_line=mark,
                             timeout=args.timeout, memory=True)
        seconds = run["round_seconds"]
        later = bench.median(seconds[1:])
        ok = run["returncode"] == 0 and len(seconds) == rounds
        print(f"{num_clients:,} clients: exit {run['returncode']}, rounds {seconds}, peak RSS "
              f"{run['peak_rss_gib']:.2f} GiB, PSS {run['peak_pss_gib']:.2f} GiB, wall {run['wall']:.0f}s", flush=True)
        if not ok:
            failures.append(f"- {num_clients:,} clients: {'timed out' if run['timed_out'] else 'failed'} after "
                            f"{run['wall']:.0f}s (exit {run['returncode']}), {len(seconds)} rounds done; log ends:\n\n"
                            "```\n" + "\n".join(Path(run["log"]).read_text().splitlines()[-15:]) + "\n```")
        rows.append([f"{num_clients:,}", f"{prepared['min_per_client']}-{prepared['max_per_client']}", rounds,
                     f"{prepared['examples']:,} ({prepared['data_seconds']:.0f} s + {prepared['partition_seconds']:.0f} s)",
                     "yes" if ok else "NO", f"{marks.get('round_1', float('nan')):.0f}",
                     f"{seconds[0]:.1f}" if seconds else "", f"{later:.2f}", f"{run['peak_rss_gib']:.2f}",
                     f"{run['peak_pss_gib']:.2f}", run["peak_processes"], f"{run['wall']:.0f}",
                     f"{load:.1f} / {run['load_after']:.1f}"])
        measured.append((num_clients, ok, later, run["peak_rss_gib"], run["peak_pss_gib"]))
    big = [m for m in measured if m[0] >= GOAL_CLIENTS and m[1]]
    verdict = f"Goal ({GOAL_CLIENTS:,} clients on 2 cores, < {GOAL_GIB:g} GiB, <= {GOAL_SECONDS:g} s per round): "
    if big:
        _, _, later, rss, pss = big[0]
        speed = "met" if later <= GOAL_SECONDS else f"missed: {later / GOAL_SECONDS:.1f}x the goal"
        memory = "met" if rss < GOAL_GIB else "met on PSS, not on the RSS sum" if pss < GOAL_GIB else "missed"
        verdict += (f"{later:.2f} s per round ({speed}); peak memory {rss:.2f} GiB summed RSS, "
                    f"{pss:.2f} GiB summed PSS ({memory}).")
    else:
        verdict += "not reached in this run."
    body = f"""{bench.machine()}

MNIST-1D, `cnn1d`, 100 clients sampled per round (fixed-size, seeded), one local epoch, `identify-clients=false`,
`index-idle-nodes=true`, `fraction-evaluate=0`, `val-fraction=0`, `min-available-clients=N` (round 1
samples from the whole federation, not from the nodes registered so far), {args.rounds} rounds
({args.rounds_large} from 100,000 clients), through `fl-dp simulate` (1 CPU per client: 2 Ray workers). Every
client holds ~{args.per_client} training examples, the server's held-out split {args.test_examples:,} examples in
every row (`dataset-samples = N * {args.per_client} + {args.test_examples}`). Seconds per round: median of
rounds 2 and later (round 1 includes the simulation engine's start-up: a `Context` per client, the Ray
workers, the workers loading the data). Memory: peak over the run of the summed RSS / PSS of the
whole process tree (fl-dp simulate, SuperLink, flwr-simulation, Ray and its workers), sampled every
0.5 s. Data preparation (MNIST-1D generation + partition table) fills the shared on-disk cache the
clients and the ServerApp read, before the timed run (0-1 s when already warm).

```bash
{bench.command_line()}
```

{bench.table(["clients", "examples per client", "rounds", "dataset (generate + partition, one-off)", "completed",
              "round 1 done (s after launch)", "round 1 s", "s per round (median, rounds 2+)", "peak RSS sum GiB",
              "peak PSS sum GiB", "processes", "wall s", "load before / after"], rows)}

{verdict}

{chr(10).join(failures)}
"""
    bench.publish("scale", body, args)
    return 0 if all(m[1] for m in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
