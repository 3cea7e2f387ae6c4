#!/usr/bin/env python3
"""Accuracy of every strategy after the same rounds, through the user's path (``fl-dp simulate``);
optionally each one clean and under a Byzantine attack.

    .venv/bin/python benchmarks/strategies.py [--rounds 5] [--num-clients 10] [--partitioner iid]
    .venv/bin/python benchmarks/strategies.py --attack sign-flip --malicious-clients 2 --num-clients 11 \\
        --rounds 8 --strategies fedavg,fedmedian,fedtrimmedavg,krum,multikrum,bulyan
    .venv/bin/python benchmarks/strategies.py --rounds 1 --num-clients 2 --strategies fedavg --no-write  # a check

Runs once per strategy (and attack) on digits with the defaults otherwise (FedAdam, FedYogi and
FedAdagrad with server-learning-rate 0.1; robust strategies told num-malicious-nodes =
malicious-clients) and writes the table to benchmarks/results_strategies[_<attack>].md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import benchlib as bench

from common.names import STRATEGIES

SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad")


def run(strategy: str, args, out: Path, attack: bool) -> tuple[str, float]:
    values = {"strategy": strategy, "num-server-rounds": args.rounds, "partitioner": args.partitioner}
    if strategy in SERVER_OPTIMIZERS:
        values["server-learning-rate"] = 0.1
    if args.attack:
        values["num-malicious-nodes"] = args.malicious_clients
    if attack:
        values |= {"attack": args.attack, "malicious-clients": args.malicious_clients, "attack-scale": args.attack_scale}
    result = bench.simulate(args.num_clients, values, out)
    if result["returncode"] != 0:
        return "failed", result["wall"]
    return f"{result['summary']['final_central_accuracy']:.3f}", result["wall"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--partitioner", default="iid")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attack", default="", help="sign-flip, scale or noise: run each strategy clean and attacked")
    parser.add_argument("--malicious-clients", type=int, default=2)
    parser.add_argument("--attack-scale", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    out_root = Path(tempfile.mkdtemp(prefix="strategies-"))
    rows = []
    for strategy in args.strategies.split(","):
        clean, wall = run(strategy, args, out_root / strategy, attack=False)
        row = [strategy, clean]
        if args.attack:
            attacked, wall_attacked = run(strategy, args, out_root / f"{strategy}-attacked", attack=True)
            row, wall = row + [attacked], wall + wall_attacked
        rows.append(row + [f"{wall:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    header = ["strategy", "final central accuracy"] + ([f"under {args.attack}"] if args.attack else []) + ["wall s"]
    setting = (f"digits, {args.num_clients} clients, {args.partitioner} partitions, {args.rounds} rounds, defaults "
               "otherwise (local-epochs 5, batch 16, SGD lr 0.1 momentum 0.9; server-learning-rate 0.1 for FedOpt)")
    if args.attack:
        setting += (f"; attacked: clients 0..{args.malicious_clients - 1} send `{args.attack}` updates with attack-scale "
                    f"{args.attack_scale}, robust strategies told num-malicious-nodes={args.malicious_clients}")
    text = (f"# Accuracy per strategy\n\n{bench.machine()}\n\nCommand: `{bench.command_line()}`\n\n{setting}. Wall time "
            "is the whole `fl-dp simulate` command (per run), Ray start-up included.\n\n" + bench.table(header, rows) + "\n")
    print(text)
    if not args.no_write:
        name = f"results_strategies_{args.attack}.md" if args.attack else "results_strategies.md"
        (bench.REPO / "benchmarks" / name).write_text(text)
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
