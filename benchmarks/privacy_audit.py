#!/usr/bin/env python3
"""Measured lower bounds (fl-dp audit) against the ledger's epsilon, at three noise levels.

* ``--part server``: user-level DP-FedAvg (dp = 'server'), 1,000 real clients + canary clients,
  Poisson sampling at q = 0.05, on digits, IN PROCESS (tests/inprocess.py: the real ServerApp
  and ClientApp without Ray; Ray with 1,500 SuperNodes on 2 cores is too slow to repeat), at
  noise multipliers 0.5, 1, 2, then the same at z = 1 with a debug-noise-key (the audit should
  call it broken), then the same run without canaries (the cost of the audit).
* ``--part dpsgd``: DP-SGD on digits, 10 clients, canary examples in client 0's data, each through
  `fl-dp audit` (Flower's runtime, Ray) at noise multipliers 1, 1.5, 3, then the same run through
  `fl-dp simulate` without canaries (the cost).

Prints one JSON line per run and a markdown table. Usage:
    .venv/bin/python benchmarks/privacy_audit.py --part server
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SERVER = {"dataset": "digits", "model": "mlp", "local-epochs": 1, "val-fraction": 0.0, "fraction-evaluate": 0.0,
          "dp": "server", "sampling": "poisson", "clipping-norm": 1.0, "momentum": 0.0, "seed": 42}
DPSGD = ("dp='dpsgd' num-server-rounds={rounds} local-epochs=1 batch-size=16 learning-rate=0.2 clipping-norm=0.5 "
         "momentum=0.0 val-fraction=0.0 noise-multiplier={z}")


def server_run(out: Path, real: int, canaries: int, rounds: int, z: float, debug: bool = False) -> dict:
    from inprocess import run_inprocess

    from client_app.canary import AUDIT_KEY_ENV
    from fl_dp.audit import analyse, write_audit

    key = os.urandom(32)
    os.environ[AUDIT_KEY_ENV] = key.hex()
    nodes = real + canaries
    overrides = SERVER | {
        "output-dir": str(out), "num-server-rounds": rounds, "noise-multiplier": z, "audit-canaries": canaries,
        "clients-per-round": round(0.05 * nodes), "min-available-clients": nodes, "identify-clients": True,
    } | ({"debug-noise-key": "benchmark"} if debug else {})
    started = time.monotonic()
    run_inprocess(overrides, num_clients=nodes)
    run_seconds = time.monotonic() - started
    if not canaries:
        return {"run_seconds": run_seconds, **_summary(out)}
    started = time.monotonic()
    report, details = analyse(out, key)
    analysis = time.monotonic() - started
    report["cost"] = {"run_seconds": round(run_seconds, 1), "analysis_seconds": round(analysis, 1)}
    write_audit(out, report, details)
    return {"run_seconds": run_seconds, "analysis_seconds": analysis, **_summary(out), **_report(report)}


def dpsgd_run(out: Path, clients: int, canaries: int, rounds: int, z: float) -> dict:
    fl_dp = str(REPO / ".venv" / "bin" / "fl-dp")
    config = DPSGD.format(rounds=rounds, z=z)
    command = ([fl_dp, "audit", "--canaries", str(canaries)] if canaries else [fl_dp, "simulate"]) + [
        "--num-clients", str(clients), "--output-dir", str(out), "--run-config", config]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if result.returncode not in (0, 1) or (canaries and not (out / "audit.json").exists()):
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    row = {"command_seconds": wall, **_summary(out)}
    if canaries:
        report = json.loads((out / "audit.json").read_text())
        row |= _report(report) | {"analysis_seconds": report["cost"]["analysis_seconds"],
                                  "run_seconds": report["cost"]["run_seconds"]}
    return row


def _summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {"accuracy": summary["final_central_accuracy"], "wall_seconds": summary["wall_seconds"],
            "ledger_epsilon": summary.get("epsilon") or summary.get("sample_epsilon_max")}


def _report(report: dict) -> dict:
    scores = report["canary_scores"]
    estimates = {name: s.get("epsilon_estimate") for name, s in scores.items() if isinstance(s, dict)}
    aucs = {name: s.get("auc") for name, s in scores.items() if isinstance(s, dict)}
    return {"lower": report["epsilon_lower_bound"], "upper": report["epsilon_upper_bound"],
            "canaries": report["canaries"], "inserted": report["canaries_inserted"], "verdict": report["verdict"],
            "estimates": estimates, "aucs": aucs, "method": report["method"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("server", "dpsgd"), required=True)
    parser.add_argument("--out", default=str(REPO / "outputs" / "privacy-audit"), help="where the runs go")
    parser.add_argument("--rounds", type=int, default=0, help="default: 30 (server), 10 (dpsgd)")
    parser.add_argument("--canaries", type=int, default=0, help="default: 500 (server), 100 (dpsgd)")
    args = parser.parse_args()
    root = Path(args.out) / f"{args.part}-{time.strftime('%H%M%S')}"
    rows = []
    if args.part == "server":
        rounds, canaries = args.rounds or 30, args.canaries or 500
        plan = [(z, False, canaries) for z in (0.5, 1.0, 2.0)] + [(1.0, True, canaries), (1.0, False, 0)]
        for z, debug, k in plan:
            row = {"z": z, "debug": debug, "k": k} | server_run(root / f"z{z}-d{int(debug)}-k{k}", 1000, k, rounds, z, debug)
            print(json.dumps(row), flush=True)
            rows.append(row)
    else:
        rounds, canaries = args.rounds or 10, args.canaries or 100
        # z = 0.5 would pass a simulated client's own epsilon cap (10) in round 1: it refuses
        for z, k in [(1.0, canaries), (1.5, canaries), (3.0, canaries), (1.5, 0)]:
            row = {"z": z, "k": k} | dpsgd_run(root / f"z{z}-k{k}", 10, k, rounds, z)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| z | canaries (inserted) | ledger epsilon | lower bound (95%) | Gaussian-fit estimates | AUC | accuracy | run s | analysis s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if not row["k"]:
            print(f"| {row['z']} | none | {row['ledger_epsilon']:.3f} | - | - | - | {row['accuracy']:.3f} | "
                  f"{row.get('run_seconds', row.get('command_seconds')):.0f} | - |")
            continue
        estimates = ", ".join(f"{v:.2f}" for v in row["estimates"].values() if v is not None)
        aucs = ", ".join(f"{v:.2f}" for v in row["aucs"].values() if v is not None)
        print(f"| {row['z']}{' (debug key)' if row.get('debug') else ''} | {row['k']} ({row['inserted']}) | "
              f"{row['upper']:.3f} | {row['lower']:.3f} | {estimates} | {aucs} | {row['accuracy']:.3f} | "
              f"{row['run_seconds']:.0f} | {row['analysis_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
