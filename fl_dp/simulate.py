#!/usr/bin/env python3
"""Run a simulated federation through Flower's own runtime (`flwr run`) and clean up after it.

Flower's managed local SuperLink keeps running in the background after `flwr run`, on a
machine-wide port. This script instead starts a private simulation SuperLink on free
loopback ports with a private FLWR_HOME, submits the app with `flwr run --stream`, checks
the run's final status (`flwr run --stream` exits 0 even when the run failed), and always
stops the SuperLink it started. Exit code 0 only when the run finished:completed.

    python scripts/simulate.py --num-clients 10 --run-config "num-server-rounds=5"
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10, help="simulated clients (SuperNodes)")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "strategy=\'fedprox\' num-server-rounds=3"')
    parser.add_argument("--output-dir", default="", help="results directory (default: ./outputs/run-<time>)")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    args = parser.parse_args()

    output_dir = Path(args.output_dir or APP_DIR / "outputs" / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    run_config = f'output-dir="{output_dir}" {args.run_config}'.strip()

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
            return 1
        status = run_status(env, run_id)
        print(f"Run {run_id}: {status}")
        if status != "finished:completed":
            print(f"The run did not complete. SuperLink log: {log_file}", file=sys.stderr)
            return 1
        print(f"Results: {output_dir}")
        return 0
    finally:
        stop_process_group(superlink)
        if superlink.returncode in (0, -signal.SIGTERM, -signal.SIGKILL):
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
