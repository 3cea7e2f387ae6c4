#!/usr/bin/env python3
"""Benchmark 6: simulation start-up, end to end, against a plain Flower app; and what a sweep pays per run.

Side by side in one run, as ratios (the machine is shared: compare within a repeat, A B A B):

(Q) ``fl-dp simulate``: the README's quick start (digits, mlp, 10 clients, 5 rounds, defaults): its own
    SuperLink and Ray head, started together; it returns once the run's results are final and stops
    every process it started before it exits.
(P) the same job as a plain Flower 1.41 app (``benchmarks/plain_flower_app``: Flower's FedAvg, the same
    MLP, data split and local training, federated and central evaluation every round), submitted with
    ``flwr run`` to a simulation SuperLink started the standard way: Flower's simulation process starts
    Ray itself (``ray.init()``). SuperLink start and stop are included, as in (Q).
(W) ``fl-dp simulate`` on a warm runtime (``fl-dp runtime start`` once before the repeats, not timed;
    ``fl-dp runtime stop`` after).
(S) ``fl-dp sweep`` of 1 non-private + ``--sweep-epsilons`` private runs (4 clients, 2 rounds, dp server)
    with its one shared runtime, against ``fl-dp sweep --separate-runtimes`` (a runtime per run: as before).

Every time is from launching the command: to the first round's line, and to its exit.

    .venv/bin/python benchmarks/startup.py                      # 3 repeats
    .venv/bin/python benchmarks/startup.py --repeats 1 --no-write   # a check
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bench

from fl_dp.run_config import to_flwr

PLAIN_APP = bench.REPO / "benchmarks" / "plain_flower_app"
SECTION = "startup"
HEADING = "## 6. Start-up and shared runtime (`benchmarks/startup.py`)"
SWEEP_CONFIG = {"num-server-rounds": 2, "sampling": "all", "local-epochs": 1}


def timed(command: list[str], env: dict, log: Path, first_round: str, timeout: float = 900) -> dict:
    """Run ``command``; seconds from launch to the first line matching ``first_round`` and to exit."""
    load, started, marks = bench.load1(), time.monotonic(), {}
    process = subprocess.Popen(command, cwd=bench.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        with open(log, "w") as handle:
            for line in process.stdout:
                now = time.monotonic() - started
                handle.write(f"{now:8.2f} {line}")
                if re.search(first_round, line):
                    marks.setdefault("first_round", now)
                if now > timeout:
                    break
        process.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    finally:
        if process.poll() is None:
            bench.kill_tree(process)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}; log: {log}")
    return {"wall": wall, "first_round": marks.get("first_round", float("nan")), "load_before": load,
            "load_after": bench.load1()}


def fl_dp(*args: str) -> list[str]:
    return [sys.executable, "-m", "fl_dp", *args]


def plain_flower(output: Path) -> int:
    """(P), in this (child) process: a standard simulation SuperLink, `flwr run --stream`, stop."""
    from fl_dp.runtime import Runtime, flwr_bin

    with Runtime(ray=False) as runtime:  # no Ray head: the simulation process runs Flower's own ray.init()
        done = subprocess.run([flwr_bin("flwr"), "run", str(PLAIN_APP), "sim", "--stream", "--federation-config",
                               "num-supernodes=10 client-resources-num-cpus=1"], env=runtime.env(), check=False)
        print("plain: flwr run exited; stopping the SuperLink", flush=True)  # the log's timestamps show the stop's cost
    return done.returncode


def report(rows: dict[str, list[dict]], sweep_runs: int) -> str:
    med = bench.median
    q, p, w = rows["Q"], rows["P"], rows["W"]
    s1, s0 = rows["S-shared"], rows["S-separate"]

    def pair_ratios(a: list[dict], b: list[dict], key: str = "wall") -> str:
        return ", ".join(f"{y[key] / x[key]:.2f}x" for x, y in zip(a, b))

    summary = bench.table(["figure", "value (medians)", "per repeat", "goal", "met?"], [
        ["(P) plain Flower app / (Q) `fl-dp simulate`, whole command",
         f"{med(r['wall'] for r in p):.1f} s / {med(r['wall'] for r in q):.1f} s = "
         f"{med(y['wall'] / x['wall'] for x, y in zip(q, p)):.2f}x", pair_ratios(q, p), ">= 2x",
         "yes" if med(y["wall"] / x["wall"] for x, y in zip(q, p)) >= 2 else "no"],
        ["(Q) command to first round", f"{med(r['first_round'] for r in q):.1f} s",
         ", ".join(f"{r['first_round']:.1f} s" for r in q), "<= 10 s",
         "yes" if med(r["first_round"] for r in q) <= 10 else "no"],
        ["(P) command to first round", f"{med(r['first_round'] for r in p):.1f} s",
         ", ".join(f"{r['first_round']:.1f} s" for r in p), "", ""],
        ["(W) warm runtime: command to first round / whole command",
         f"{med(r['first_round'] for r in w):.1f} s / {med(r['wall'] for r in w):.1f} s",
         ", ".join(f"{r['first_round']:.1f} / {r['wall']:.1f} s" for r in w), "", ""],
        ["(P) / (W), whole command", f"{med(y['wall'] / x['wall'] for x, y in zip(w, p)):.2f}x", pair_ratios(w, p), "", ""],
        [f"sweep of {sweep_runs} runs: separate runtimes / one shared runtime",
         f"{med(r['wall'] for r in s0):.1f} s / {med(r['wall'] for r in s1):.1f} s = "
         f"{med(y['wall'] / x['wall'] for x, y in zip(s1, s0)):.2f}x", pair_ratios(s1, s0), "", ""],
        ["sweep: seconds saved per run", f"{med((y['wall'] - x['wall']) / sweep_runs for x, y in zip(s1, s0)):.1f} s",
         ", ".join(f"{(y['wall'] - x['wall']) / sweep_runs:.1f} s" for x, y in zip(s1, s0)), "", ""],
    ])
    detail = bench.table(["repeat", "command", "to first round s", "whole command s", "load before / after"], [
        [i + 1, name, f"{r['first_round']:.1f}", f"{r['wall']:.1f}", f"{r['load_before']:.1f} / {r['load_after']:.1f}"]
        for i in range(len(q)) for name, r in (("(Q)", q[i]), ("(P)", p[i]), ("(W)", w[i]),
                                                ("(S) shared", s1[i]), ("(S) separate", s0[i]))
    ])
    return f"""{HEADING}

{bench.machine()}

(Q) `fl-dp simulate` (the quick start: digits, `mlp`, 10 clients, 5 rounds; its own SuperLink and Ray head,
started together; it returns once the results are final, every process it started stopped); (P) the same
job as a plain Flower 1.41 app (`benchmarks/plain_flower_app`: Flower's
FedAvg, the same MLP, split and training) through `flwr run` on a simulation SuperLink started the standard
way (Flower's simulation process starts Ray itself), SuperLink start and stop included; (W) `fl-dp simulate`
on a warm runtime (`fl-dp runtime start` before, not timed); (S) `fl-dp sweep --dp server --epsilons ...`
({sweep_runs} runs of 4 clients, `{to_flwr(SWEEP_CONFIG)}`) with one shared runtime vs `--separate-runtimes`.
Each repeat runs Q, P, W, S shared, S separate in turn: compare within a repeat.

```bash
{bench.command_line()}
```

{summary}

{detail}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-epsilons", default="2,8", help="the private runs of (S)")
    bench.results_arguments(parser)
    parser.add_argument("--plain-flower", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_flower:
        return plain_flower(Path(args.plain_flower))
    if bench.notes_only(SECTION, args):
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="startup-"))
    print(f"Working in {workdir}", flush=True)
    env = bench.bench_env(MPLBACKEND="Agg")
    env.pop("FL_DP_RUNTIME", None)
    sweep_runs = 1 + len([e for e in args.sweep_epsilons.split(",") if e.strip()])
    # Warm the on-disk data cache and the page cache once, outside the measurement.
    timed(fl_dp("simulate", "--output-dir", str(workdir / "warm-up"), "--run-config", "num-server-rounds=1"), env,
          workdir / "warm-up.log", r"round 1/")
    started = subprocess.run(fl_dp("runtime", "start"), env=env, capture_output=True, text=True, check=True)
    descriptor = started.stdout.strip().split("=", 1)[1]
    rows: dict[str, list[dict]] = {k: [] for k in ("Q", "P", "W", "S-shared", "S-separate")}
    try:
        for i in range(args.repeats):
            bench.wait_for_quiet(args.max_load, args.max_wait)
            tag = f"{i + 1}"
            rows["Q"].append(timed(fl_dp("simulate", "--output-dir", str(workdir / f"q{tag}")), env,
                                   workdir / f"q{tag}.log", r"round 1/"))
            rows["P"].append(timed([sys.executable, __file__, "--plain-flower", str(workdir / f"p{tag}")], env,
                                   workdir / f"p{tag}.log", r"round 1 central"))
            rows["W"].append(timed(fl_dp("simulate", "--output-dir", str(workdir / f"w{tag}")),
                                   env | {"FL_DP_RUNTIME": descriptor}, workdir / f"w{tag}.log", r"round 1/"))
            sweep = ["sweep", "--dp", "server", "--epsilons", args.sweep_epsilons, "--num-clients", "4",
                     "--run-config", to_flwr(SWEEP_CONFIG)]
            rows["S-shared"].append(timed(fl_dp(*sweep, "--output-dir", str(workdir / f"s1-{tag}")), env,
                                          workdir / f"s1-{tag}.log", r"round 1/"))
            rows["S-separate"].append(timed(fl_dp(*sweep, "--separate-runtimes", "--output-dir", str(workdir / f"s0-{tag}")),
                                            env, workdir / f"s0-{tag}.log", r"round 1/"))
            print(" ".join(f"{k} {v[-1]['first_round']:.1f}/{v[-1]['wall']:.1f}s" for k, v in rows.items()),
                  f"load {bench.load1():.1f}", flush=True)
    finally:
        subprocess.run(fl_dp("runtime", "stop", "--descriptor", descriptor), env=env, check=False)
    body = report(rows, sweep_runs)
    print(body)
    if not args.no_write:
        bench.write_section(SECTION, body)
    os.environ.pop("FL_DP_RUNTIME", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
