"""`fl-dp runtime`: a warm simulation runtime kept between commands (opt in, started and stopped by you).

    fl-dp runtime start          # a SuperLink + a Ray head in the background; prints the line to export
    export FL_DP_RUNTIME=...     # commands in this shell now submit to it
    fl-dp simulate ...           # no SuperLink or Ray start-up
    fl-dp runtime status
    fl-dp runtime stop           # stops it and everything it started

Only commands that see ``FL_DP_RUNTIME`` use it (``fl-dp simulate``, ``fl-dp sweep``); ``fl-dp
audit`` always starts its own (its secret key must reach only its own processes). Every run
still gets its own simulation process, Ray job and client contexts; the runtime keeps only the
SuperLink's run list and the Ray processes. The Ray head uses the CPUs Ray detects. It holds no
data and listens on loopback only. One warm runtime per user: its descriptor path is kept in
``$FL_DP_CACHE/warm-runtime`` (default ``~/.cache/fl-dp``), so ``stop`` finds it from any shell.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fl_dp import runtime as runtimes
from fl_dp.help import HelpFormatter


def pointer_file() -> Path:
    root = os.environ.get("FL_DP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fl-dp")
    return Path(root) / "warm-runtime"


def _descriptor(args: argparse.Namespace) -> Path | None:
    if getattr(args, "descriptor", ""):
        return Path(args.descriptor)
    try:
        return Path(pointer_file().read_text().strip())
    except OSError:
        env = os.environ.get(runtimes.RUNTIME_ENV, "")
        return Path(env) if env and env != "none" else None


def _read(descriptor: Path | None) -> dict | None:
    try:
        return json.loads(descriptor.read_text()) if descriptor else None
    except (OSError, ValueError):
        return None


def serve(ready: Path) -> int:
    """The background process of a warm runtime: start it, write ``ready``, stop it on SIGTERM/SIGINT."""
    stop = {"now": False}

    def handler(signum, _frame):
        stop["now"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)
    runtime = runtimes.Runtime()
    try:
        runtime.start()
        info = runtime.describe() | {"server_pid": os.getpid(), "descriptor": str(runtime.home / runtimes.DESCRIPTOR)}
        (runtime.home / runtimes.DESCRIPTOR).write_text(json.dumps(info, indent=2) + "\n")
        ready.write_text(str(runtime.home / runtimes.DESCRIPTOR))
        while not stop["now"] and runtime.check() is None:
            time.sleep(0.5)
        return 0
    finally:
        runtime.stop()


def start(args: argparse.Namespace) -> int:
    descriptor = _descriptor(args)
    info = _read(descriptor)
    if info and runtimes.pid_alive(int(info.get("server_pid", 0))):
        print(f"fl-dp runtime: already running (pid {info['server_pid']}); stop it first with `fl-dp runtime stop`",
              file=sys.stderr)
        print(f"export {runtimes.RUNTIME_ENV}={descriptor}")
        return 1
    pointer = pointer_file()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    ready = pointer.with_name(f"warm-runtime.starting-{os.getpid()}")
    ready.unlink(missing_ok=True)
    log = pointer.with_name("warm-runtime.log")
    started = time.monotonic()
    with open(log, "wb") as handle:  # detached: outlives this command until `fl-dp runtime stop`
        server = subprocess.Popen([sys.executable, "-m", "fl_dp", "runtime", "serve", "--ready-file", str(ready)],
                                  stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    while not ready.exists():
        if server.poll() is not None or time.monotonic() - started > args.timeout:
            runtimes.stop_group(server)
            print(f"fl-dp runtime: the runtime did not start; see {log}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    descriptor = Path(ready.read_text())
    ready.unlink(missing_ok=True)
    pointer.write_text(str(descriptor))
    info = _read(descriptor) or {}
    print(f"fl-dp runtime: up in {time.monotonic() - started:.1f}s (pid {server.pid}; SuperLink "
          f"{info.get('superlink')}, Ray head {info.get('ray_address')}); the Ray head is still starting "
          "in the background. Commands use it when they see:", file=sys.stderr)
    print(f"export {runtimes.RUNTIME_ENV}={descriptor}")
    return 0


def stop(args: argparse.Namespace) -> int:
    descriptor = _descriptor(args)
    info = _read(descriptor)
    if not info:
        print("fl-dp runtime: no warm runtime is running", file=sys.stderr)
        pointer_file().unlink(missing_ok=True)
        return 0
    server_pid = int(info.get("server_pid", 0))
    groups = [server_pid, *info.get("process_groups", [])]
    if server_pid and runtimes.pid_alive(server_pid):
        runtimes.stop_group(server_pid, grace=30.0)  # the server stops its SuperLink and Ray head first
    for group in info.get("process_groups", []):  # whatever the server left (it was killed, say)
        runtimes.stop_group(group)
    left = [pid for group in groups for pid in runtimes.group_pids(group)]
    pointer_file().unlink(missing_ok=True)
    if left:
        print(f"fl-dp runtime: processes {left} are still running", file=sys.stderr)
        return 1
    print(f"fl-dp runtime: stopped (pid {server_pid}); unset {runtimes.RUNTIME_ENV}", file=sys.stderr)
    return 0


def status(args: argparse.Namespace) -> int:
    descriptor = _descriptor(args)
    info = _read(descriptor)
    if not info or not runtimes.pid_alive(int(info.get("server_pid", 0))):
        print("no warm runtime")
        return 1
    healthy = runtimes.superlink_healthy(int(info["http_port"]))
    print(f"warm runtime pid {info['server_pid']}: SuperLink {info['superlink']} "
          f"({'healthy' if healthy else 'NOT answering'}), Ray head {info['ray_address']}; "
          f"export {runtimes.RUNTIME_ENV}={descriptor}")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-dp runtime", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    begin = sub.add_parser("start", help="start a warm runtime in the background")
    begin.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for its SuperLink")
    for name, text in (("stop", "stop the warm runtime and everything it started"), ("status", "is it up?")):
        sub.add_parser(name, help=text).add_argument("--descriptor", default="", help=argparse.SUPPRESS)
    server = sub.add_parser("serve", help=argparse.SUPPRESS)
    server.add_argument("--ready-file", required=True)
    args = parser.parse_args(argv)
    if args.action == "serve":
        return serve(Path(args.ready_file))
    return {"start": start, "stop": stop, "status": status}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
