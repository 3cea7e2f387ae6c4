#!/usr/bin/env python3
"""Submit the app to a running SuperLink with `flwr run` and wait: exit 0 only if the run completed.

`flwr run --stream` exits 0 even when the run fails. This script submits the run, follows its
logs, polls `flwr ls --run-id` until the run is finished, and exits non-zero unless the final
status is ``finished:completed`` (1: failed/stopped, 2: timed out (the run is stopped), 3: not started).

Connection: either a SuperLink address (TLS with the CA certificate by default; plain text only
with an explicit --insecure), or the name of a connection in your $FLWR_HOME/config.toml.

    python scripts/deploy/run_and_wait.py --superlink fl.example.org:9093 --root-certificates certs/ca.crt \\
        --results-root /srv/fl-dp/results --run-config "num-server-rounds=10"
    python scripts/deploy/run_and_wait.py --connection my-superlink --run-config "output-dir='/abs/dir'"

--results-root DIR adds output-dir='DIR/run-<date>-<time>' to the run config (unless you give
output-dir yourself). It is a path on the SuperLink's machine (or in its container): the
ServerApp runs there and writes the results there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flwr_cli  # noqa: E402

APP_DIR = Path(__file__).resolve().parents[2]


def build_run_config(run_config: str, results_root: str | None) -> tuple[str, str | None]:
    """Add output-dir under results_root unless the run config already names one."""
    if not results_root or "output-dir" in run_config:
        return run_config, None
    output_dir = os.path.join(results_root, time.strftime("run-%Y%m%d-%H%M%S"))
    return f"output-dir='{output_dir}' {run_config}".strip(), output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app", nargs="?", default=str(APP_DIR), help="app directory (default: this project)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--superlink", help="SuperLink address HOST:PORT")
    where.add_argument("--connection", help="a connection name from $FLWR_HOME/config.toml")
    parser.add_argument("--root-certificates", help="CA certificate that signed the SuperLink's certificate")
    parser.add_argument("--insecure", action="store_true", help="plain-text connection (local experiments only)")
    parser.add_argument("--run-config", default="", help='run-config overrides, e.g. "num-server-rounds=3"')
    parser.add_argument("--results-root", help="directory ON THE SUPERLINK for output-dir=<root>/run-<time>")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    parser.add_argument("--no-logs", action="store_true", help="do not stream the run's logs")
    args = parser.parse_args(argv)

    home = None
    if args.superlink:
        if bool(args.insecure) == bool(args.root_certificates):
            parser.error("with --superlink give either --root-certificates CA (TLS) or --insecure")
        if args.root_certificates:
            problem = flwr_cli.ca_file_problem(args.root_certificates)
            if problem:
                parser.error(f"--root-certificates {args.root_certificates}: {problem}")
        home = tempfile.mkdtemp(prefix="flwr-home-")
        flwr_cli.write_connection(home, "target", args.superlink, args.root_certificates, args.insecure)
        connection, env = "target", flwr_cli.cli_env(home)
    else:
        connection, env = args.connection, flwr_cli.cli_env()

    run_config, output_dir = build_run_config(args.run_config, args.results_root)
    logs = None
    try:
        try:
            run_id = flwr_cli.submit(args.app, connection, env, run_config)
        except flwr_cli.FlwrCliError as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        print(f"Started run {run_id} ({run_config or 'default run config'})", flush=True)
        if not args.no_logs:
            logs = subprocess.Popen([flwr_cli.flwr_bin(), "log", str(run_id), connection, "--stream"], env=env)
        status = flwr_cli.wait_for_run(connection, run_id, env, args.timeout)
        if not status.startswith("finished"):
            print(f"Run {run_id} still {status} after {args.timeout:.0f}s: stopping it", file=sys.stderr)
            flwr_cli.stop_run(connection, run_id, env)
            return 2
    finally:
        if logs is not None:
            time.sleep(1.0)  # let the last log lines arrive
            logs.terminate()
            try:
                logs.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logs.kill()
        if home:
            shutil.rmtree(home, ignore_errors=True)

    print(f"Run {run_id}: {status}", flush=True)
    if status != flwr_cli.FINISHED:
        print(f"The run did not complete ({status}). See the SuperLink's log.", file=sys.stderr)
        return 1
    if output_dir:
        print(f"Results (on the SuperLink): {output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
