#!/usr/bin/env python3
"""Submit the app to a running SuperLink with `flwr run` and wait: exit 0 only if the run completed.

`flwr run --stream` exits 0 even when the run fails. This script submits the run, follows its
logs, polls `flwr ls --run-id` until the run is finished, reads how the ServerApp ended from the
run's log, and exits 0 only when every planned round ran (the codes are listed below).

Connection: either a SuperLink address (TLS with the CA certificate by default; plain text only
with an explicit --insecure), or the name of a connection in your $FLWR_HOME/config.toml.

    fl-dp submit --superlink fl.example.org:9093 --root-certificates certs/ca.crt \\
        --results-root /srv/fl-dp/results --run-config "num-server-rounds=10"
    fl-dp submit --connection my-superlink --run-config "output-dir='/abs/dir'"

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

from fl_dp import flwr_cli, outcome
from fl_dp.help import HelpFormatter
from fl_dp.run_config import RunConfigError, parse_overrides, to_flwr, validate

APP_DIR = Path(__file__).resolve().parent.parent


def build_run_config(run_config: str, results_root: str | None) -> tuple[str, str | None]:
    """Check the overrides; add output-dir under results_root unless the run config names one."""
    overrides = parse_overrides(run_config)
    output_dir = None
    if results_root and "output-dir" not in overrides:
        output_dir = os.path.join(results_root, time.strftime("run-%Y%m%d-%H%M%S"))
        overrides = {"output-dir": output_dir} | overrides
    validate(overrides)
    return to_flwr(overrides), output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-dp submit", description=__doc__, formatter_class=HelpFormatter, epilog=outcome.__doc__
    )
    parser.add_argument("app", nargs="?", default=str(APP_DIR), help="app directory (default: this project)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--superlink", help="SuperLink address HOST:PORT")
    where.add_argument("--connection", help="a connection name from $FLWR_HOME/config.toml")
    parser.add_argument("--root-certificates", help="CA certificate that signed the SuperLink's certificate")
    parser.add_argument("--insecure", action="store_true", help="plain-text connection (local experiments only)")
    parser.add_argument("--run-config", default="", help='run-config overrides, e.g. "num-server-rounds=3"')
    parser.add_argument("--results-root", help="directory ON THE SUPERLINK for output-dir=<root>/run-<time>")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    parser.add_argument("--no-logs", action="store_true", help="do not stream the run's logs")
    args = parser.parse_args(argv)

    try:  # checked here, before anything is submitted
        run_config, output_dir = build_run_config(args.run_config, args.results_root)
    except RunConfigError as error:
        print(f"fl-dp submit: error: {error}", file=sys.stderr)
        return outcome.USAGE
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

    logs = None
    try:
        try:
            run_id = flwr_cli.submit(args.app, connection, env, run_config)
        except flwr_cli.FlwrCliError as error:
            print(f"fl-dp submit: error: the run was not started: {error}", file=sys.stderr)
            return outcome.FAILED
        print(f"Started run {run_id} ({run_config or 'default run config'})", flush=True)
        if not args.no_logs:
            logs = subprocess.Popen([flwr_cli.flwr_bin(), "log", str(run_id), connection, "--stream"], env=env)
        status = flwr_cli.wait_for_run(connection, run_id, env, args.timeout)
        if not status.startswith("finished"):
            print(f"Run {run_id} still {status} after {args.timeout:.0f}s: stopping it", file=sys.stderr)
            flwr_cli.stop_run(connection, run_id, env)
            return outcome.TIMEOUT
        stop_kind = outcome.stop_kind_in_log(flwr_cli.run_logs(connection, run_id, env))
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

    code = outcome.exit_code(status, stop_kind)
    print(f"Run {run_id}: {status}, {outcome.describe(code)}", flush=True)
    if code != outcome.COMPLETED:
        print(f"The run did not complete all rounds (exit code {code}). See its log: flwr log {run_id}",
              file=sys.stderr)
    if output_dir:
        print(f"Results (on the SuperLink): {output_dir}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
