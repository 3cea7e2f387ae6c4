#!/usr/bin/env python3
"""Privacy-utility sweep: the same federation at several target epsilons, and non-private.

Runs ``fl-dp simulate`` (the real ``flwr run`` path) once without privacy (``dp='none'``)
and once per target epsilon (``dp=<mode> target-epsilon=<e>``;
the app solves the noise multiplier for the planned rounds), every run with the same
``--num-clients`` and ``--run-config``. The runs share one simulation runtime (a SuperLink and
a Ray head, started once and stopped at the end, also on Ctrl-C or an error; see
fl_dp/runtime.py), so Ray starts once per sweep, not once per run; each run still has its own
simulation process, Ray job and client contexts. With ``--audit`` the private runs each start
their own runtime (the audit's secret key must reach only that run's processes). After EVERY
run it rewrites, in ``--output-dir``:

- ``sweep.csv``: one row per run (failed runs too, with ``status``), columns ``dp``,
  ``target_epsilon``, ``epsilon_reached`` (user-level epsilon for server/client/local, the
  maximum over clients of the sample-level epsilon for dpsgd; see ``epsilon_level``),
  ``delta``, ``noise_multiplier``, ``final_central_accuracy``, ``best_central_accuracy``,
  ``rounds``, ``wall_seconds`` (the whole ``fl-dp simulate`` call; the shared runtime's start is not in it),
  ``run_dir`` and more;
- ``privacy_utility.png``: final central accuracy against the epsilon reached, with the
  non-private accuracy as a horizontal line.

Each run's own results (metrics.json, summary.json, ...) are in ``<output-dir>/runs/<name>/``
and its console output in ``<output-dir>/logs/<name>.log``. Exit code 0 only if every run
completed.

    fl-dp sweep --dp dpsgd --epsilons 1,3,8 --num-clients 10 \\
        --run-config "num-server-rounds=10 local-epochs=1 batch-size=32"

    fl-dp sweep --dp server --epsilons 2,4,8 --num-clients 100 \\
        --run-config "sampling='poisson' clients-per-round=10 num-server-rounds=50"
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.privacy.modes import MODES
from fl_dp import runtime as runtimes
from fl_dp.help import HelpFormatter
from fl_dp.run_config import RunConfigError, parse_overrides, to_flwr

APP_DIR = Path(__file__).resolve().parent.parent

DP_MODES = tuple(name for name, mode in MODES.items() if mode.private)  # the sweep's private runs
# Keys the sweep sets itself for every run.
SWEEP_KEYS = ("dp", "target-epsilon", "output-dir")
# Keys that only make sense with a privacy mode: the non-private run drops them
# (the app refuses e.g. max-epsilon or adaptive clipping with dp = 'none').
DP_ONLY_KEYS = ("max-epsilon", "clipping", "local-mechanism")

COLUMNS = [
    "name",
    "status",
    "dp",
    "target_epsilon",
    "epsilon_reached",
    "epsilon_level",
    "epsilon_lower_bound",
    "delta",
    "noise_multiplier",
    "final_central_accuracy",
    "best_central_accuracy",
    "rounds",
    "wall_seconds",
    "app_seconds",
    "num_clients",
    "accountant",
    "sampling",
    "stop_reason",
    "run_config",
    "run_dir",
    "log",
]


def parse_epsilons(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--epsilons: {part!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"--epsilons: {part!r} must be a positive finite number")
        values.append(value)
    return sorted(set(values))


def parse_run_config(text: str) -> dict[str, Any]:
    """The user's overrides as a dict, read and checked as ``fl-dp simulate`` reads them."""
    try:
        overrides = parse_overrides(text)
    except RunConfigError as error:
        raise SystemExit(f"fl-dp sweep: error: {error}") from None
    taken = [key for key in SWEEP_KEYS if key in overrides]
    if taken:
        raise SystemExit(
            f"--run-config must not set {', '.join(taken)}: the sweep sets dp and target-epsilon per run "
            "(use --dp and --epsilons) and output-dir per run (use --output-dir)"
        )
    return overrides


def run_config_text(overrides: dict[str, Any]) -> str:
    return to_flwr(overrides)


def plan_runs(dp: str, epsilons: list[float], overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Non-private first, then each target epsilon in increasing order."""
    nonprivate = {k: v for k, v in overrides.items() if k not in DP_ONLY_KEYS} | {"dp": "none"}
    runs: list[dict[str, Any]] = [{"name": "nonprivate", "dp": "none", "target_epsilon": None, "config": nonprivate}]
    for eps in epsilons:
        runs.append({
            "name": f"{dp}-eps{eps:g}",
            "dp": dp,
            "target_epsilon": eps,
            "config": overrides | {"dp": dp, "target-epsilon": float(eps)},
        })
    return runs


def subprocess_env(descriptor: Path | str | None = None) -> dict[str, str]:
    # simulate.py starts `flower-superlink`, which itself starts `flower-superexec` BY NAME from
    # PATH: put this interpreter's bin directory first so a non-activated venv works too.
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "MPLBACKEND": "Agg"}
    if descriptor is not None:  # the run submits to the sweep's shared runtime
        env[runtimes.RUNTIME_ENV] = str(descriptor)
    return env


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def result_row(run: dict[str, Any], run_dir: Path, log: Path, returncode: int, wall: float) -> dict[str, Any]:
    summary = read_json(run_dir / "summary.json") or {}
    metrics = read_json(run_dir / "metrics.json") or []
    last = metrics[-1] if metrics else {}
    if not summary and metrics:  # a run that died mid-way: what it finished is still a result
        accuracies = [r.get("central_accuracy") for r in metrics if r.get("central_accuracy") is not None]
        summary = {
            "final_central_accuracy": accuracies[-1] if accuracies else None,
            "best_central_accuracy": max(accuracies) if accuracies else None,
            "rounds": len(metrics),
        }
    user_eps = summary.get("epsilon", last.get("epsilon"))
    sample_eps = summary.get("sample_epsilon_max", last.get("sample_epsilon_max"))
    if run["dp"] == "none":
        reached, level = None, "none"
    elif user_eps is not None:
        reached, level = user_eps, "user" if run["dp"] in ("server", "client") else "local"
    else:
        reached, level = sample_eps, "sample (max over clients)"
    return {
        "name": run["name"],
        "status": "ok" if returncode == 0 else f"failed (exit {returncode})",
        "dp": run["dp"],
        "target_epsilon": run["target_epsilon"],
        "epsilon_reached": reached,
        "epsilon_level": level,
        "delta": summary.get("delta", last.get("delta")),
        "noise_multiplier": summary.get("noise_multiplier", last.get("noise_multiplier")),
        "final_central_accuracy": summary.get("final_central_accuracy"),
        "best_central_accuracy": summary.get("best_central_accuracy"),
        "rounds": summary.get("rounds"),
        "wall_seconds": round(wall, 1),
        "app_seconds": summary.get("wall_seconds"),
        "num_clients": summary.get("num_clients"),
        "accountant": summary.get("accountant", last.get("accountant")),
        "sampling": summary.get("sampling", last.get("sampling")),
        "stop_reason": summary.get("stop_reason"),
        # fl-dp audit (--audit): the measured lower bound on epsilon, beside the ledger's epsilon_reached
        "epsilon_lower_bound": (read_json(run_dir / "audit.json") or {}).get("epsilon_lower_bound"),
        "run_config": run_config_text(run["config"]),
        "run_dir": str(run_dir),
        "log": str(log),
    }


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [r for r in rows if r["dp"] != "none" and r["epsilon_reached"] is not None
               and r["final_central_accuracy"] is not None]
    private.sort(key=lambda r: r["epsilon_reached"])
    baseline = next((r for r in rows if r["dp"] == "none" and r["final_central_accuracy"] is not None), None)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.grid(alpha=0.3)
    if private:
        xs = [r["epsilon_reached"] for r in private]
        ax.plot(xs, [r["final_central_accuracy"] for r in private], marker="o", label="final central accuracy")
        ax.plot(xs, [r["best_central_accuracy"] for r in private], marker="^", linestyle=":", alpha=0.6,
                label="best central accuracy")
        audited = [r for r in private if r.get("epsilon_lower_bound")]
        if audited:  # the audit's lower bound sits left of the ledger's epsilon when the mechanism is sound
            ax.scatter([r["epsilon_lower_bound"] for r in audited], [r["final_central_accuracy"] for r in audited],
                       marker="<", color="tab:red", label="measured lower bound (fl-dp audit)", zorder=3)
        for r in private:
            label = f"target {r['target_epsilon']:g}" + ("" if r["status"] == "ok" else " (failed)")
            ax.annotate(label, (r["epsilon_reached"], r["final_central_accuracy"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7)
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        level = private[0]["epsilon_level"]
        delta = private[0]["delta"]
        ax.set_xlabel(f"epsilon reached ({level}, delta {delta:g})" if delta else f"epsilon reached ({level})")
    else:
        ax.set_xlabel("epsilon reached")
    if baseline is not None:
        ax.axhline(baseline["final_central_accuracy"], color="black", linestyle="--",
                   label=f"non-private ({baseline['final_central_accuracy']:.3f})")
    ax.set_ylabel("central accuracy (held-out split)")
    ax.set_ylim(0, 1)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=8)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_one(run: dict[str, Any], args: argparse.Namespace, output_dir: Path, prefix: str,
            descriptor: Path | str | None = None) -> tuple[int, Path, Path, float]:
    run_dir = output_dir / "runs" / run["name"]
    log = output_dir / "logs" / f"{run['name']}.log"
    # --audit: the private runs go through fl-dp audit (the same run, with canaries) for a lower bound;
    # fl-dp audit starts a runtime of its own, whatever it is given.
    audited = args.audit and run["dp"] != "none"
    command = [
        sys.executable, "-m", "fl_dp", "audit" if audited else "simulate",
        "--num-clients", str(args.num_clients),
        "--cpus-per-client", str(args.cpus_per_client),
        "--output-dir", str(run_dir),
        "--run-config", run_config_text(run["config"]),
    ]
    started = time.monotonic()
    with log.open("w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=APP_DIR, env=subprocess_env(descriptor), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None  # started with stdout=PIPE
        for line in process.stdout:
            handle.write(line)
            handle.flush()
            # Echo the app's own progress lines; the full output is in the log.
            if line.startswith(("round ", "Calibrated", "Done ", "budget stop")) or "Calibrated noise" in line:
                print(f"{prefix} {line.strip()}", flush=True)
        returncode = process.wait()
    return returncode, run_dir, log, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-dp sweep", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dp", default="dpsgd", choices=DP_MODES, help="privacy mode of the private runs")
    parser.add_argument("--epsilons", type=parse_epsilons, default=parse_epsilons("1,3,8"),
                        help="comma-separated target epsilons")
    parser.add_argument("--num-clients", type=int, default=10, help="simulated clients (SuperNodes)")
    parser.add_argument("--run-config", default="", help="overrides passed to EVERY run (not dp/target-epsilon)")
    parser.add_argument("--output-dir", default="", help="sweep directory (default ./outputs/sweep-<time>)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray reserves per simulated client")
    parser.add_argument("--no-nonprivate", action="store_true", help="skip the non-private reference run")
    parser.add_argument("--audit", action="store_true",
                        help="run each private run through fl-dp audit: adds epsilon_lower_bound to sweep.csv and the plot")
    parser.add_argument("--separate-runtimes", action="store_true",
                        help="start and stop a runtime (SuperLink + Ray) for every run instead of sharing one (slower)")
    args = parser.parse_args(argv)
    if not args.epsilons:
        parser.error("--epsilons: give at least one target epsilon")

    overrides = parse_run_config(args.run_config)
    output_dir = Path(args.output_dir or APP_DIR / "outputs" / time.strftime("sweep-%Y%m%d-%H%M%S")).resolve()
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    runs = plan_runs(args.dp, args.epsilons, overrides)
    if args.no_nonprivate:
        runs = runs[1:]
    title = f"dp={args.dp}, {args.num_clients} clients; {run_config_text(overrides) or 'defaults'}"
    if len(title) > 280:
        title = title[:277] + "..."

    print(f"[sweep] {len(runs)} runs into {output_dir}", flush=True)
    started = time.monotonic()
    # Audited runs start their own runtime; --separate-runtimes: every run does.
    needed = not args.separate_runtimes and not all(args.audit and run["dp"] != "none" for run in runs)
    with runtimes.sigterm_as_exit(), shared_runtime(needed, started) as runtime:
        descriptor = None if runtime is None else runtime.home / runtimes.DESCRIPTOR
        code = sweep_runs(runs, args, output_dir, title, started, descriptor)
        if runtime is not None and code:
            runtime.failed = True  # keep the SuperLink's log of the failed run
        return code


@contextlib.contextmanager
def shared_runtime(needed: bool, started: float):
    """The runtime the sweep's runs share: started here and stopped on the way out (error, Ctrl-C and
    SIGTERM included); None when no run needs one, or a warm runtime (fl-dp runtime start) is up,
    which the runs find themselves."""
    if not needed or runtimes.attached() is not None:
        yield None
        return
    # In memory (nothing on it outlives the sweep) and, once every run's results are final, stopped at
    # once, as `fl-dp simulate` stops its own: a graceful stop only keeps the logs of a failed run.
    runtime = runtimes.Runtime(in_memory=True)
    try:
        runtime.start()
        print(f"[sweep] shared runtime up in {time.monotonic() - started:.1f}s: SuperLink 127.0.0.1:{runtime.http_port}, "
              f"Ray head {runtime.ray_address} (process groups {' '.join(map(str, runtime.process_groups()))})", flush=True)
        yield runtime
    except BaseException:
        runtime.failed = True
        raise
    finally:
        runtime.stop(now=not runtime.failed)
        kept = f"; its logs are kept in {runtime.home}" if runtime.failed else ""
        print(f"[sweep] shared runtime stopped{kept}", flush=True)


def sweep_runs(runs: list[dict[str, Any]], args: argparse.Namespace, output_dir: Path, title: str, started: float,
               descriptor: Path | None) -> int:
    """Every run in turn (submitted to the runtime ``descriptor`` names, if any); 0 if all completed."""
    rows: list[dict[str, Any]] = []
    failed = []
    for k, run in enumerate(runs, 1):
        prefix = f"[sweep {k}/{len(runs)} {run['name']}]"
        print(f"{prefix} starting (sweep elapsed {time.monotonic() - started:.0f}s): "
              f"{run_config_text(run['config'])}", flush=True)
        # None: each run starts its own runtime (a warm one if FL_DP_RUNTIME names one, unless --separate-runtimes)
        returncode, run_dir, log, wall = run_one(run, args, output_dir, prefix,
                                                 "none" if args.separate_runtimes else descriptor)
        row = result_row(run, run_dir, log, returncode, wall)
        rows.append(row)
        if returncode != 0:
            failed.append(run["name"])
        write_csv(output_dir / "sweep.csv", rows)
        try:
            plot(output_dir / "privacy_utility.png", rows, title)
        except Exception as error:  # a plotting problem must not lose the table
            print(f"{prefix} could not draw privacy_utility.png: {error}", file=sys.stderr)
        acc = row["final_central_accuracy"]
        eps = row["epsilon_reached"]
        print(
            f"{prefix} {row['status']} in {wall:.0f}s: final central accuracy "
            f"{'n/a' if acc is None else f'{acc:.4f}'}, epsilon reached {'n/a' if eps is None else f'{eps:.3f}'}"
            f" (sweep elapsed {time.monotonic() - started:.0f}s)" + ("" if returncode == 0 else f"; see {log}"),
            flush=True,
        )

    print(f"[sweep] done in {time.monotonic() - started:.0f}s: {output_dir / 'sweep.csv'}, "
          f"{output_dir / 'privacy_utility.png'}", flush=True)
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
