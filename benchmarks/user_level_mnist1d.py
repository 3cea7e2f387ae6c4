#!/usr/bin/env python3
"""User-level DP-FedAvg (``dp='server'``) on MNIST-1D with 1,000 simulated clients, next to the
non-private run with the same settings.

Issue 3, "Done when": MNIST-1D, at least 1,000 simulated clients, Poisson sampling, ``server``
mode reaching user-level epsilon <= 4 (delta 1e-5) over the planned rounds, reported next to
the non-private run.

Setup (the notes' anchor, ../shared/notes/dp-facts.md): 60,000 generated MNIST-1D examples,
20% held out by the server, the rest IID over 1,000 clients (48 each; ``val-fraction=0``: DP
modes run no federated evaluation, so clients train on all their data), the 1-D CNN with
GroupNorm, 1 local epoch of SGD with batch 10, lr 0.05, momentum 0, FedAvg (server lr 1).
Private run: Poisson sampling of clients with q = 50/1000 = 0.05, server-side clipping at
C = 0.5, unweighted mean over the expected 50 clients, Gaussian noise with the multiplier the app
solves for ``target-epsilon`` over the planned rounds (dp-accounting RDP). Non-private run:
``dp='none'``, 50 clients per round (fixed-size sampling), everything else the same.

Every run goes through ``scripts/simulate.py`` (``flwr run`` on Flower's simulation runtime,
1,000 SuperNodes, one CPU per client actor).

    .venv/bin/python benchmarks/user_level_mnist1d.py                 # both runs, 100 rounds
    .venv/bin/python benchmarks/user_level_mnist1d.py --rounds 5      # a quick check

Writes its section of ``benchmarks/results_privacy.md`` (``--results ''`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
SIMULATE = APP_DIR / "scripts" / "simulate.py"
RESULTS = APP_DIR / "benchmarks" / "results_privacy.md"
SECTION = "user_level_mnist1d"


def common_config(args) -> dict:
    return {
        "dataset": '"mnist1d"',
        "model": '"cnn1d"',
        "dataset-samples": args.samples,
        "val-fraction": 0.0,
        "fraction-evaluate": 0.0,
        "num-server-rounds": args.rounds,
        "clients-per-round": args.clients_per_round,
        "local-epochs": 1,
        "batch-size": 10,
        "learning-rate": 0.05,
        "momentum": 0.0,
        "strategy": '"fedavg"',
        "seed": args.seed,
    }


def private_config(args) -> dict:
    config = common_config(args) | {
        "dp": '"server"',
        "sampling": '"poisson"',
        "clipping-norm": args.clipping_norm,
        "target-delta": args.delta,
        "accountant": f'"{args.accountant}"',
    }
    if args.noise_multiplier:
        config["noise-multiplier"] = args.noise_multiplier
    else:
        config["target-epsilon"] = args.target_epsilon
    return config


def text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def run(name: str, config: dict, args) -> dict:
    out = Path(args.output_dir) / name
    log = Path(args.output_dir) / f"{name}.log"
    command = [sys.executable, str(SIMULATE), "--num-clients", str(args.num_clients), "--cpus-per-client", "1",
               "--output-dir", str(out), "--run-config", text(config)]
    # flower-superlink starts flower-superexec by name: the venv's bin must be on PATH.
    env = os.environ | {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    print(f"[{name}] {' '.join(shlex.quote(c) for c in command)}", flush=True)
    started = time.monotonic()
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=APP_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        for line in process.stdout:
            handle.write(line)
            handle.flush()
            if line.startswith(("round ", "Done ")) or "Calibrated noise" in line:
                print(f"[{name}] {line.strip()}", flush=True)
        code = process.wait()
    wall = time.monotonic() - started
    summary, metrics = {}, []
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        pass
    round_seconds = [r["seconds"] for r in metrics]
    return {
        "name": name, "ok": code == 0, "summary": summary, "metrics": metrics, "wall": wall,
        "round_seconds": round_seconds, "command": command, "log": str(log),
    }


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def report(args, results: list[dict], seconds: float) -> str:
    lines = [
        f"## User-level DP-FedAvg on MNIST-1D, {args.num_clients} simulated clients (Poisson sampling)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on 2 shared cores (other jobs were running: times are "
        f"noisy), {seconds / 60:.0f} min in all. {args.samples} MNIST-1D examples ({args.samples // 5} held out), "
        f"{args.num_clients} clients x {args.samples * 4 // 5 // args.num_clients}, "
        f"{args.clients_per_round} expected clients per round, {args.rounds} rounds, cnn1d, 1 local epoch, "
        "batch 10, lr 0.05, momentum 0, FedAvg.",
        "",
        "| run | final central acc | best central acc | user-level epsilon (delta) | noise multiplier z | clip C "
        "| sampling | rounds | wall (s) | median s/round (after round 1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        eps = s.get("epsilon")
        eps_text = "none (non-private)" if s.get("dp") == "none" else (
            "n/a" if eps is None else f"{eps:.3f} ({s.get('delta'):g}, {s.get('accountant')})")
        z = s.get("noise_multiplier")
        later = r["round_seconds"][1:]
        lines.append(
            f"| {r['name']}{'' if r['ok'] else ' (FAILED)'} | {_pct(s.get('final_central_accuracy'))} | "
            f"{_pct(s.get('best_central_accuracy'))} | {eps_text} | {'-' if z is None else f'{z:.4f}'} | "
            f"{args.clipping_norm if s.get('dp') == 'server' else '-'} | {s.get('sampling', '-')} | "
            f"{s.get('rounds', len(r['metrics']))} | {r['wall']:.0f} | "
            f"{'n/a' if not later else f'{_median(later):.1f}'} |"
        )
    private = next((r for r in results if r["summary"].get("dp") == "server"), None)
    if private and private["summary"].get("guarantee"):
        lines += ["", f"Guarantee (summary.json): {private['summary']['guarantee']}"]
    lines += ["", "Commands (from the repository root):", "", "```"]
    for r in results:
        cmd = [".venv/bin/python" if c == sys.executable else c.replace(str(APP_DIR) + "/", "") for c in r["command"]]
        at = cmd.index("--output-dir")
        cmd = cmd[:at] + cmd[at + 2:]  # this run's directory: the default ./outputs/run-<time> will do
        # PATH: scripts/simulate.py needs the venv's bin on PATH (flower-superlink starts flower-superexec by name).
        lines.append('PATH="$PWD/.venv/bin:$PATH" ' + " ".join(shlex.quote(c) for c in cmd))
    lines += ["```", "", f"Both at once: `.venv/bin/python benchmarks/user_level_mnist1d.py"
              + (f" --rounds {args.rounds}" if args.rounds != 100 else "") + "`"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    start, end = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
    content = path.read_text() if path.exists() else "# Privacy benchmarks: measured results\n\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in content and end in content:
        head, rest = content.split(start, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=50)
    parser.add_argument("--samples", type=int, default=60000, help="dataset-samples")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--target-epsilon", type=float, default=4.0)
    parser.add_argument("--noise-multiplier", type=float, default=0.0, help="use this z instead of target-epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clipping-norm", type=float, default=0.5)
    parser.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", choices=("both", "private", "nonprivate"), default="both")
    parser.add_argument("--output-dir", default="")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to write the section into ('' = no)")
    args = parser.parse_args(argv)
    args.output_dir = str(Path(args.output_dir or APP_DIR / "outputs" / time.strftime("bench-mnist1d-%Y%m%d-%H%M%S")).resolve())
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    plan = []
    if args.only in ("both", "private"):
        plan.append(("server-dp", private_config(args)))
    if args.only in ("both", "nonprivate"):
        plan.append(("non-private", common_config(args) | {"dp": '"none"'}))
    results = []
    for k, (name, config) in enumerate(plan, 1):
        print(f"run {k}/{len(plan)}: {name} (elapsed {time.monotonic() - started:.0f}s)", flush=True)
        results.append(run(name, config, args))
        r = results[-1]
        s = r["summary"]
        print(f"[{name}] {'ok' if r['ok'] else 'FAILED, see ' + r['log']}: final central accuracy "
              f"{_pct(s.get('final_central_accuracy'))}, epsilon {s.get('epsilon')}, {r['wall']:.0f}s", flush=True)
        if args.results:
            write_section(Path(args.results), report(args, results, time.monotonic() - started))
    print(f"done in {time.monotonic() - started:.0f}s; runs in {args.output_dir}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
