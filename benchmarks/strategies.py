"""Accuracy of every strategy after the same rounds, through the user's path (`flwr run`);
optionally each one clean and under a Byzantine attack.

    .venv/bin/python benchmarks/strategies.py [--rounds 5] [--num-clients 10] [--partitioner iid]
    .venv/bin/python benchmarks/strategies.py --attack sign-flip --malicious-clients 2 --num-clients 11 \\
        --rounds 8 --strategies fedavg,fedmedian,fedtrimmedavg,krum,multikrum,bulyan

Runs scripts/simulate.py once per strategy (and attack) on digits with the defaults otherwise
(FedAdam, FedYogi and FedAdagrad with server-learning-rate 0.1; robust strategies told
num-malicious-nodes = malicious-clients) and writes the table to
benchmarks/results_strategies[_<attack>].md. Prints each row as it finishes.
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

import benchlib as bench  # noqa: E402  (benchmarks/benchlib.py: this folder is on sys.path)

SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad")


def run(strategy: str, args, out: Path, attack: bool) -> tuple[str, float]:
    run_config = f"strategy='{strategy}' num-server-rounds={args.rounds} partitioner='{args.partitioner}'"
    if strategy in SERVER_OPTIMIZERS:
        run_config += " server-learning-rate=0.1"
    if args.attack:
        run_config += f" num-malicious-nodes={args.malicious_clients}"
    if attack:
        run_config += f" attack='{args.attack}' malicious-clients={args.malicious_clients} attack-scale={args.attack_scale}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/simulate.py"), "--num-clients", str(args.num_clients),
         "--output-dir", str(out), "--run-config", run_config],
        capture_output=True, text=True, check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        return "failed", wall
    return f"{json.loads((out / 'summary.json').read_text())['final_central_accuracy']:.3f}", wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--partitioner", default="iid")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attack", default="", help="sign-flip, scale or noise: run each strategy clean and attacked")
    parser.add_argument("--malicious-clients", type=int, default=2)
    parser.add_argument("--attack-scale", type=float, default=10.0)
    args = parser.parse_args()
    out_root = Path(tempfile.mkdtemp(prefix="strategies-"))
    rows = []
    for strategy in args.strategies.split(","):
        clean, wall = run(strategy, args, out_root / strategy, attack=False)
        row = [strategy, clean]
        if args.attack:
            attacked, wall_attacked = run(strategy, args, out_root / f"{strategy}-attacked", attack=True)
            row += [attacked]
            wall += wall_attacked
        rows.append(row + [f"{wall:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    header = ["strategy", "final central accuracy"] + ([f"under {args.attack}"] if args.attack else []) + ["wall s"]
    setting = (
        f"digits, {args.num_clients} clients, {args.partitioner} partitions, {args.rounds} rounds, defaults otherwise "
        "(local-epochs 5, batch 16, SGD lr 0.1 momentum 0.9; server-learning-rate 0.1 for the FedOpt family)"
    )
    if args.attack:
        setting += (
            f"; attacked: clients 0..{args.malicious_clients - 1} send `{args.attack}` updates with attack-scale "
            f"{args.attack_scale}, robust strategies told num-malicious-nodes={args.malicious_clients}"
        )
    command = "`.venv/bin/python benchmarks/strategies.py " + " ".join(sys.argv[1:]) + "`"
    text = (
        f"# Accuracy per strategy\n\n{bench.machine()}\n\nCommand: {command}\n\n{setting}. Wall time is the whole "
        "`scripts/simulate.py` command (per run), Ray start-up included.\n\n" + bench.table(header, rows) + "\n"
    )
    name = f"results_strategies_{args.attack}.md" if args.attack else "results_strategies.md"
    (REPO / "benchmarks" / name).write_text(text)
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
