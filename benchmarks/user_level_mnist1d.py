#!/usr/bin/env python3
"""User-level DP-FedAvg (``dp='server'``) on MNIST-1D with 1,000 simulated clients, next to the
non-private run with the same settings (issue 3: Poisson sampling, user-level epsilon <= 4, delta
1e-5, over the planned rounds). Both runs through ``fl-dp simulate``; settings in ``common_config``.

    .venv/bin/python benchmarks/user_level_mnist1d.py              # both runs, 100 rounds
    .venv/bin/python benchmarks/user_level_mnist1d.py --num-clients 20 --clients-per-round 5 --samples 2000 \\
        --rounds 2 --results ''                                    # a check

Writes its section of ``benchmarks/results_privacy.md`` (``--results ''``: print only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import benchlib as bench

RESULTS = bench.REPO / "benchmarks" / "results_privacy.md"


def common_config(args) -> dict:
    return {"dataset": "mnist1d", "model": "cnn1d", "dataset-samples": args.samples, "val-fraction": 0.0,
            "fraction-evaluate": 0.0, "num-server-rounds": args.rounds, "clients-per-round": args.clients_per_round,
            "local-epochs": 1, "batch-size": 10, "learning-rate": 0.05, "momentum": 0.0, "strategy": "fedavg",
            "seed": args.seed}


def private_config(args) -> dict:
    return common_config(args) | {"dp": "server", "sampling": "poisson", "clipping-norm": args.clipping_norm,
                                  "target-epsilon": args.target_epsilon, "target-delta": args.delta, "accountant": "rdp"}


def report(args, results: list[dict], seconds: float) -> str:
    lines = [
        f"## User-level DP-FedAvg on MNIST-1D, {args.num_clients} simulated clients (Poisson sampling)", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on 2 shared cores (other jobs were running: times are noisy), "
        f"{seconds / 60:.0f} min in all. {args.samples} MNIST-1D examples ({args.samples // 5} held out), "
        f"{args.num_clients} clients x {args.samples * 4 // 5 // args.num_clients}, {args.clients_per_round} expected "
        f"clients per round, {args.rounds} rounds, cnn1d, 1 local epoch, batch 10, lr 0.05, momentum 0, FedAvg.", "",
    ]
    rows = []
    for r in results:
        s, later = r["summary"], r["round_seconds"][1:]
        eps = s.get("epsilon")
        rows.append([
            r["name"] + ("" if r["returncode"] == 0 else " (FAILED)"),
            *("n/a" if s.get(k) is None else f"{100 * s[k]:.1f}%"
              for k in ("final_central_accuracy", "best_central_accuracy")),
            "none (non-private)" if s.get("dp") == "none" else "n/a" if eps is None
            else f"{eps:.3f} ({s.get('delta'):g}, {s.get('accountant')})",
            "-" if s.get("noise_multiplier") is None else f"{s['noise_multiplier']:.4f}",
            args.clipping_norm if s.get("dp") == "server" else "-", s.get("sampling", "-"),
            s.get("rounds", len(r["metrics"])), f"{r['wall']:.0f}", f"{bench.median(later):.1f}" if later else "n/a"])
    lines.append(bench.table(["run", "final central acc", "best central acc", "user-level epsilon (delta)",
                              "noise multiplier z", "clip C", "sampling", "rounds", "wall (s)",
                              "median s/round (after round 1)"], rows))
    private = next((r for r in results if r["summary"].get("dp") == "server"), None)
    if private and private["summary"].get("guarantee"):
        lines += ["", f"Guarantee (summary.json): {private['summary']['guarantee']}"]
    lines += ["", "Commands (from the repository root):", "", "```", *(r["command"] for r in results), "```", "",
              f"Both at once: `{bench.command_line()}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--samples", type=int, default=60000, help="dataset-samples")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--target-epsilon", type=float, default=4.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clipping-norm", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", choices=("both", "private", "nonprivate"), default="both")
    parser.add_argument("--output-dir", default="")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to write the section into ('' = no)")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir or bench.REPO / "outputs" / time.strftime("bench-mnist1d-%Y%m%d-%H%M%S")).resolve()
    started = time.monotonic()
    plan = [("server-dp", private_config(args))] if args.only in ("both", "private") else []
    plan += [("non-private", common_config(args) | {"dp": "none"})] if args.only in ("both", "nonprivate") else []
    results = []
    for k, (name, config) in enumerate(plan, 1):
        print(f"run {k}/{len(plan)}: {name} (elapsed {time.monotonic() - started:.0f}s)", flush=True)

        def show(_: float, line: str, name: str = name) -> None:
            if line.startswith(("round ", "Done ")) or "Calibrated noise" in line:
                print(f"[{name}] {line.strip()}", flush=True)

        results.append(r := bench.simulate(args.num_clients, config, output_dir / name, on_line=show, cpus_per_client=1)
                       | {"name": name})
        print(f"[{name}] {'ok' if r['returncode'] == 0 else 'FAILED, see ' + r['log']}: final central accuracy "
              f"{r['summary'].get('final_central_accuracy')}, epsilon {r['summary'].get('epsilon')}, {r['wall']:.0f}s",
              flush=True)
        text = report(args, results, time.monotonic() - started)
        if args.results:
            bench.write_section("user_level_mnist1d", text, path=Path(args.results))
    print(text)
    print(f"done in {time.monotonic() - started:.0f}s; runs in {output_dir}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
