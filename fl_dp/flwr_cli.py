"""Small wrappers around the `flwr` CLI for deployments: connections, submit, status, nodes.

Used by run_and_wait.py and by the deployment tests. Flower 1.41 keeps CLI connections in
``$FLWR_HOME/config.toml``; these helpers write a private FLWR_HOME so nothing touches ``~/.flwr``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
FINISHED = "finished:completed"


class FlwrCliError(RuntimeError):
    """A `flwr` command failed or printed something unexpected."""


def flwr_bin() -> str:
    """The `flwr` executable of this interpreter's environment (works without activating a venv)."""
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else "flwr"


def ca_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be the CA certificate a connection trusts, or None if it looks right."""
    if not os.path.isfile(path):
        return "no such file; pass the ca.crt written by fl-dp certs"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if b"PRIVATE KEY-----" in head:
        return "this is a private key, not a certificate; pass the CA certificate (ca.crt), and keep keys private"
    if b"-----BEGIN CERTIFICATE-----" not in head:
        return "not a PEM certificate (no BEGIN CERTIFICATE line); pass the ca.crt written by fl-dp certs"
    return None


def write_connection(
    flwr_home: str | os.PathLike,
    name: str,
    address: str,
    root_certificates: str | None = None,
    insecure: bool = False,
) -> None:
    """Add connection ``name`` to ``flwr_home/config.toml`` (TLS unless ``insecure``)."""
    if insecure:
        security = "insecure = true"
    elif root_certificates:
        security = f'root-certificates = "{Path(root_certificates).resolve()}"'
    else:
        raise ValueError("give the CA certificate (root_certificates) or opt into insecure=True explicitly")
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = [f'[superlink.{name}]', f'address = "{address}"', security]
    config = home / "config.toml"
    existing = config.read_text() if config.exists() else f'[superlink]\ndefault = "{name}"\n'
    config.write_text(existing.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


def cli_env(flwr_home: str | os.PathLike | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base) | QUIET_ENV
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flwr(args: list[str], env: Mapping[str, str], timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [flwr_bin(), *args], env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and out.returncode != 0:
        raise FlwrCliError(f"flwr {' '.join(args)} exited {out.returncode}: {out.stdout.strip()} {out.stderr.strip()}")
    return out


def _json(out: subprocess.CompletedProcess, what: str) -> Any:
    text = out.stdout.strip()
    try:
        return json.loads(text[text.index("{"):] if "{" in text else text)
    except ValueError:
        raise FlwrCliError(f"{what}: no JSON in the output: {text!r} {out.stderr.strip()!r}") from None


def submit(app_dir: str, connection: str, env: Mapping[str, str], run_config: str = "") -> int:
    """Start a run of the app in ``app_dir``; return its run id."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    payload = _json(flwr(args, env, check=False), "flwr run")
    if not payload.get("success") or not payload.get("run-id"):
        raise FlwrCliError(f"flwr run did not start a run: {payload}")
    return int(payload["run-id"])


def run_status(connection: str, run_id: int, env: Mapping[str, str]) -> str:
    """The run's status, e.g. ``running``, ``finished:completed``, ``finished:failed``."""
    out = flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env, check=False)
    try:
        return str(_json(out, "flwr ls")["runs"][0]["status"])
    except (FlwrCliError, KeyError, IndexError) as error:
        return f"unknown ({error})"


def wait_for_run(
    connection: str, run_id: int, env: Mapping[str, str], timeout: float, poll: float = 2.0
) -> str:
    """Poll until the run's status starts with ``finished`` (or ``timeout`` s pass); return it."""
    deadline = time.monotonic() + timeout
    status = run_status(connection, run_id, env)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(poll)
        status = run_status(connection, run_id, env)
    return status


def stop_run(connection: str, run_id: int, env: Mapping[str, str]) -> None:
    flwr(["stop", str(run_id), connection], env, check=False)


def run_logs(connection: str, run_id: int, env: Mapping[str, str]) -> str:
    return flwr(["log", str(run_id), connection, "--show"], env, check=False).stdout


def supernodes(connection: str, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every SuperNode the SuperLink knows (``flwr supernode ls --format json``)."""
    payload = _json(flwr(["supernode", "ls", connection, "--format", "json"], env, check=False), "flwr supernode ls")
    return list(payload.get("nodes", []))


def online_nodes(connection: str, env: Mapping[str, str]) -> list[dict[str, Any]]:
    return [node for node in supernodes(connection, env) if str(node.get("status", "")).lower() == "online"]


def wait_for_nodes(connection: str, env: Mapping[str, str], count: int, timeout: float) -> list[dict[str, Any]]:
    """Wait until at least ``count`` SuperNodes are online; raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            nodes = online_nodes(connection, env)
        except FlwrCliError:
            nodes = []
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {count} SuperNodes online after {timeout:.0f}s")
        time.sleep(1.0)


def register_supernode(public_key: str, connection: str, env: Mapping[str, str]) -> None:
    flwr(["supernode", "register", str(public_key), connection], env)
