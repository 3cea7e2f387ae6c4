#!/usr/bin/env python3
"""Run a simulated federation through Flower's own runtime (`flwr run`) and clean up after it.

Flower's managed local SuperLink keeps running in the background after `flwr run`, on a
machine-wide port. This script instead starts a private simulation SuperLink on free
loopback ports with a private FLWR_HOME, submits the app with `flwr run --stream`, checks
the run's final status (`flwr run --stream` exits 0 even when the run failed), and always
stops the SuperLink it started. Exit code 0 only when every planned round ran (see below).

    fl-dp simulate --num-clients 10 --run-config "num-server-rounds=5"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fl_dp import outcome
from fl_dp.help import HelpFormatter
from fl_dp.run_config import RunConfigError, parse_overrides, to_flwr, validate
from server_app.output_dir import run_files

APP_DIR = Path(__file__).resolve().parent.parent
APP_PARTS = ("pyproject.toml", "common", "client_app", "server_app")
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
}
# The SuperLink's SuperExec looks for the submitted run every 0.1 s instead of every 1 s.
FAST_POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flwr_bin(name: str) -> str:
    """The Flower executables of this interpreter's environment (works without activating a venv)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def wait_healthy(port: int, process: subprocess.Popen, log_file: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"flower-superlink did not become ready within {timeout:.0f}s; see {log_file}")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started (its session), then SIGKILL what lingers."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stage_app(home: Path) -> Path:
    """A copy of just the app under ``home``: what `flwr run` bundles.

    Flower 1.41 builds the bundle by walking every file under the app directory (the
    ~47,000 files of a local `.venv/` included) before applying `.gitignore`: ~2.5 s per
    submission. The copy holds only what the bundle would contain anyway.
    """
    staged = home / "app"
    staged.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in APP_PARTS:
        source = APP_DIR / part
        if source.is_dir():
            shutil.copytree(source, staged / part, ignore=skip)
        else:
            shutil.copy2(source, staged / part)
    return staged


def run_status(env: dict, run_id: str) -> str:
    out = subprocess.run(
        [flwr_bin("flwr"), "ls", "sim", "--run-id", run_id, "--format", "json"],
        env=env, capture_output=True, text=True, check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
        return runs[0]["status"]
    except (ValueError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"


def plan_run(run_config: str, output_dir: str, num_clients: int) -> tuple[Path, str]:
    """The results directory and the checked ``--run-config`` for `flwr run`.

    Everything is checked here, before any SuperLink or Ray starts (RunConfigError: one line,
    exit code 2). ``output-dir`` may come from ``--output-dir`` or from the run config, not
    from both with different values.
    """
    overrides = parse_overrides(run_config)
    given = overrides.get("output-dir")
    if given and output_dir and Path(given).resolve() != Path(output_dir).resolve():
        raise RunConfigError(f"--output-dir {output_dir} and output-dir={given!r} disagree; give one")
    chosen = Path(given or output_dir or APP_DIR / "outputs" / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    overrides["output-dir"] = str(chosen)
    config = validate(overrides)
    used = run_files(str(chosen))
    if used and not (config.resume or config.overwrite):
        raise RunConfigError(
            f"output-dir {chosen} already holds a run ({', '.join(used[:3])}); add resume=true to continue it, "
            "overwrite=true to move it aside, or choose another --output-dir"
        )
    if num_clients < 1:
        raise RunConfigError(f"--num-clients {num_clients}: give a whole number >= 1")
    return chosen, to_flwr(overrides)


def add_run_options(parser: argparse.ArgumentParser, clients: str, example: str) -> None:
    """The options every command that runs a simulated federation shares (simulate, audit)."""
    parser.add_argument("--num-clients", type=int, default=10, help=clients)
    parser.add_argument("--run-config", default="", help=f'overrides, e.g. "{example}"')
    parser.add_argument("--output-dir", default="", help="results directory (default: ./outputs/run-<time>)")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray reserves per simulated client")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-dp simulate", description=__doc__, formatter_class=HelpFormatter, epilog=outcome.__doc__
    )
    add_run_options(parser, "simulated clients (SuperNodes)", "strategy='fedprox' num-server-rounds=3")
    args = parser.parse_args(argv)

    try:
        output_dir, run_config = plan_run(args.run_config, args.output_dir, args.num_clients)
    except RunConfigError as error:
        print(f"fl-dp simulate: error: {error}", file=sys.stderr)
        return outcome.USAGE

    home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
    http_port, control_port = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    # The SuperLink starts `flower-superexec`/`flwr-simulation` by name: put this environment's bin first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = os.environ | QUIET_ENV | FAST_POLL_ENV | {"FLWR_HOME": str(home), "PATH": path}
    log_file = home / "superlink.log"
    superlink = subprocess.Popen(
        [
            flwr_bin("flower-superlink"), "--insecure", "--simulation",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(http_port),
            "--control-api-address", f"127.0.0.1:{control_port}",
            "--database", str(home / "state.db"), "--log-file", str(log_file),
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    code = outcome.FAILED
    try:
        wait_healthy(http_port, superlink, log_file)
        federation = f"num-supernodes={args.num_clients} client-resources-num-cpus={args.cpus_per_client}"
        command = [
            flwr_bin("flwr"), "run", str(stage_app(home)), "sim", "--stream",
            "--run-config", run_config, "--federation-config", federation,
        ]
        print("$ " + " ".join(command), flush=True)
        streamed = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id = None
        for line in streamed.stdout:
            print(line, end="", flush=True)
            match = re.search(r"Successfully started run (\d+)", line)
            run_id = run_id or (match.group(1) if match else None)
        streamed.wait()
        if run_id is None:
            print("flwr run did not start a run", file=sys.stderr)
            return code
        status = run_status(env, run_id)
        code = outcome.exit_code(status, outcome.stop_kind_in_summary(output_dir))
        print(f"Run {run_id}: {status}, {outcome.describe(code)}", flush=True)
        if code != outcome.COMPLETED:
            print(f"The run did not complete all rounds (exit code {code}). SuperLink log, kept: {log_file}",
                  file=sys.stderr)
        print(f"Results: {output_dir}")
        return code
    finally:
        stop_process_group(superlink)
        stopped_cleanly = superlink.returncode in (0, -signal.SIGTERM, -signal.SIGKILL)
        if stopped_cleanly and code == outcome.COMPLETED:
            shutil.rmtree(home, ignore_errors=True)
