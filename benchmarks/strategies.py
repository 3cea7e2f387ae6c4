"""Accuracy of every strategy after the same rounds, through the user's path (`flwr run`).

    .venv/bin/python benchmarks/strategies.py [--rounds 5] [--num-clients 10] [--partitioner iid]

Runs scripts/simulate.py once per strategy (digits, defaults otherwise; FedAdam, FedYogi and
FedAdagrad with server-learning-rate 0.1) and writes the table to
benchmarks/results_strategies.md. Prints each row as it finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common.names import STRATEGIES  # noqa: E402

import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).with_name("common.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
machine, table = bench.machine, bench.table

SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--partitioner", default="iid")
    args = parser.parse_args()
    rows, out_root = [], Path(tempfile.mkdtemp(prefix="strategies-"))
    for strategy in STRATEGIES:
        run_config = f"strategy='{strategy}' num-server-rounds={args.rounds} partitioner='{args.partitioner}'"
        if strategy in SERVER_OPTIMIZERS:
            run_config += " server-learning-rate=0.1"
        out = out_root / strategy
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts/simulate.py"), "--num-clients", str(args.num_clients),
             "--output-dir", str(out), "--run-config", run_config],
            capture_output=True, text=True, check=False,
        )
        wall = time.monotonic() - started
        if done.returncode != 0:
            rows.append([strategy, "failed", "", f"{wall:.0f}"])
        else:
            summary = json.loads((out / "summary.json").read_text())
            rows.append([strategy, f"{summary['final_central_accuracy']:.3f}",
                         f"{summary['best_central_accuracy']:.3f}", f"{wall:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    command = f".venv/bin/python benchmarks/strategies.py --rounds {args.rounds} --num-clients {args.num_clients} --partitioner {args.partitioner}"
    text = (
        f"# Accuracy per strategy\n\n{machine()}\n\nCommand: `{command}`\n\n"
        f"digits, {args.num_clients} clients, {args.partitioner} partitions, {args.rounds} rounds, defaults otherwise "
        "(local-epochs 5, batch 16, SGD lr 0.1 momentum 0.9; server-learning-rate 0.1 for the FedOpt family). "
        "Wall time is the whole `scripts/simulate.py` command, Ray start-up included.\n\n"
        + table(["strategy", "final central accuracy", "best", "wall s"], rows)
        + "\n"
    )
    (REPO / "benchmarks" / f"results_strategies_{args.partitioner}.md").write_text(text)
    return 0 if all(r[1] != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
