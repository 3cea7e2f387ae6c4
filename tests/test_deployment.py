"""Deployment without Docker: a SuperLink and SuperNodes as separate processes over TLS on loopback.

This is the separate-machines setup of docs/deploy.md squeezed onto one host: every SuperNode
has its own data file (``--node-config "data-path=... state-dir=..."``), the CLI submits with
scripts/deploy/run_and_wait.py, and the certificates and keys come from scripts/deploy/make_certs.sh.
Every process is started in its own session and killed in a finalizer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "scripts" / "deploy"
from operator_files import round_counts  # noqa: E402

from fl_dp import flwr_cli  # noqa: E402

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Flower processes of one test: started in new sessions, logged to files, always killed."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.ports: list[int] = []

    def env(self, name: str) -> dict[str, str]:
        return flwr_cli.cli_env(self.workdir / f"home-{name}") | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                env=self.env(name), cwd=self.workdir, start_new_session=True,
            )
        self.started.append((name, process))
        return process

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def superlink(self, certs: Path, auth: bool = False) -> int:
        port = free_port()
        self.ports.append(port)
        args = [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"), "--disable-runtime-dependency-installation",
            "--database", str(self.workdir / "superlink.db"),
        ]
        process = self.start("superlink", args + (["--enable-supernode-auth"] if auth else []))
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, f"SuperLink exited:\n{self.log('superlink')[-3000:]}"
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=context) as r:
                    if r.status == 200:
                        return port
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"SuperLink not ready over TLS in 60 s:\n{self.log('superlink')[-3000:]}")

    def supernode(self, name: str, superlink_port: int, certs: Path, node_config: str, key: Path | None = None):
        port = free_port()
        self.ports.append(port)
        args = [
            "flower-supernode", "--superlink", f"127.0.0.1:{superlink_port}",
            "--root-certificates", str(certs / "ca.crt"), "--port", str(port), "--node-config", node_config,
        ]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        return self.start(name, args)

    def stop_all(self) -> None:
        for _, process in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for _, process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)
        # SuperExec and app processes run in sessions of their own; they name our ports.
        for pid in self.stragglers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stragglers(self) -> list[int]:
        ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
        markers = [f"127.0.0.1:{port}" for port in self.ports] + [str(self.workdir)]
        found = []
        for line in ps.splitlines():
            pid, _, args = line.strip().partition(" ")
            if ("flwr" in args or "flower" in args) and any(m in args for m in markers) and "ps -eo" not in args:
                found.append(int(pid))
        return found


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
    assert not procs.stragglers(), "a Flower process outlived the test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(DEPLOY / "make_certs.sh"), "--out", str(out), "--clients", "3"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def client_files(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("data")
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "make_demo_data.py"), "--out", str(out), "--num-clients", "3"],
        capture_output=True, text=True, check=True,
    )
    files = [Path(line) for line in done.stdout.split()]
    assert [f.name for f in files] == ["client-0.npz", "client-1.npz", "client-2.npz"]
    return files


def test_certificates_cover_every_name_clients_dial(certs):
    sans = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink"):
        assert name in sans
    subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")], check=True,
                   capture_output=True)
    for i in range(3):
        public = (certs / f"client-{i}.pub").read_text()
        assert public.startswith("ecdsa-sha2-nistp384 ")
        assert (certs / f"client-{i}.key").stat().st_mode & 0o077 == 0, "private keys must not be readable by others"


def test_run_and_wait_refuses_a_connection_without_tls_or_explicit_insecure():
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "run_and_wait.py"), "--superlink", "127.0.0.1:9"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 2 and "--root-certificates CA (TLS) or --insecure" in done.stderr


def test_tls_federation_of_three_supernodes_each_with_its_own_data_file(processes, certs, client_files, tmp_path):
    port = processes.superlink(certs)
    with pytest.raises((OSError, urllib.error.URLError)):  # TLS only: plain HTTP gets no answer
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3).read()

    states = []
    for i, data in enumerate(client_files):
        state = tmp_path / f"state-{i}"
        state.mkdir()
        states.append(state)
        processes.supernode(f"supernode-{i}", port, certs, f"data-path='{data}' state-dir='{state}'")

    home = tmp_path / "cli-home"
    flwr_cli.write_connection(home, "fl", f"127.0.0.1:{port}", str(certs / "ca.crt"))
    flwr_cli.wait_for_nodes("fl", flwr_cli.cli_env(home), 3, timeout=90)

    results = tmp_path / "results"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, str(DEPLOY / "run_and_wait.py"), "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(certs / "ca.crt"), "--results-root", str(results), "--timeout", "600",
            # The README's DP-SGD recipe (logreg, lr 1.0, no momentum): 0.67-0.85 after these two rounds in
            # process (5 draws of the clients' noise); the default mlp gave 0.33-0.52 and once 0.26 here.
            "--run-config", "num-server-rounds=2 min-available-clients=3 local-epochs=1 dp='dpsgd' "
            "noise-multiplier=0.8 model='logreg' learning-rate=1.0 momentum=0.0",
        ],
        capture_output=True, text=True, timeout=700, check=False,
    )
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:] + processes.log("superlink")[-3000:]
    assert "finished:completed" in done.stdout

    (run_dir,) = list(results.iterdir())
    assert f"Results (on the SuperLink): {run_dir}" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert summary["rounds"] == 2 and len(rows) == 2
    assert summary["final_central_accuracy"] > 0.3, summary  # 10 classes: chance is 0.1
    for counts in round_counts(run_dir):  # exact counts of a DP run: operator-only, not in metrics.json
        assert counts["num_replies"] == 3 and counts["num_failures"] == 0, counts
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3
    # Each SuperNode kept its DP-SGD privacy ledger in its own state directory.
    for state in states:
        assert list(state.glob("ledger-*.json")), f"no privacy ledger in {state}"
    seconds = [row["seconds"] for row in rows]
    print(f"deployment (processes, TLS): wall {wall:.1f}s, per-round seconds {seconds}")


def test_supernode_authentication_admits_registered_keys_only(processes, certs, client_files, tmp_path):
    port = processes.superlink(certs, auth=True)
    home = tmp_path / "cli-home"
    flwr_cli.write_connection(home, "fl", f"127.0.0.1:{port}", str(certs / "ca.crt"))
    env = flwr_cli.cli_env(home)
    flwr_cli.register_supernode(str(certs / "client-0.pub"), "fl", env)
    registered = flwr_cli.supernodes("fl", env)
    assert len(registered) == 1

    config = f"data-path='{client_files[0]}'"
    member = processes.supernode("registered", port, certs, config, key=certs / "client-0.key")
    stranger = processes.supernode("unregistered", port, certs, config, key=certs / "client-1.key")
    keyless = processes.supernode("keyless", port, certs, config)

    online = flwr_cli.wait_for_nodes("fl", env, 1, timeout=90)
    assert [n["node-id"] for n in online] == [registered[0]["node-id"]]
    for refused in (stranger, keyless):
        try:
            refused.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
    assert stranger.returncode not in (None, 0), processes.log("unregistered")[-2000:]
    assert keyless.returncode not in (None, 0), processes.log("keyless")[-2000:]
    assert "Failed to activate SuperNode" in processes.log("unregistered")
    assert member.poll() is None, processes.log("registered")[-2000:]
    # Still exactly the one registered node, and it is online.
    assert [n["node-id"] for n in flwr_cli.online_nodes("fl", env)] == [registered[0]["node-id"]]


def test_a_dead_client_that_leaves_too_few_ends_the_run_within_the_wait_limit(processes, certs, client_files, tmp_path):
    """Two SuperNodes, both required; one is killed after round 1. Flower would wait forever;
    the ServerApp stops within wait-timeout after the node is gone, with the results saved."""
    port = processes.superlink(certs)
    nodes = [
        processes.supernode(f"supernode-{i}", port, certs, f"data-path='{client_files[i]}'") for i in range(2)
    ]
    home = tmp_path / "cli-home"
    flwr_cli.write_connection(home, "fl", f"127.0.0.1:{port}", str(certs / "ca.crt"))
    flwr_cli.wait_for_nodes("fl", flwr_cli.cli_env(home), 2, timeout=90)

    results = tmp_path / "results"
    submit = subprocess.Popen(
        [
            sys.executable, str(DEPLOY / "run_and_wait.py"), "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(certs / "ca.crt"), "--results-root", str(results), "--timeout", "600",
            "--run-config", "num-server-rounds=5 min-available-clients=2 wait-timeout=5 local-epochs=1",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not list(results.glob("*/metrics.json")):
        assert submit.poll() is None, submit.stdout.read()[-3000:]
        time.sleep(0.5)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # the client dies for good
    killed = time.monotonic()
    output = submit.communicate(timeout=600)[0]
    assert submit.returncode == 4, output[-4000:]  # stopped waiting for clients: not a success

    (run_dir,) = list(results.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "wait-timeout = 5s" in summary["stop_reason"] and summary["rounds"] < 5, summary
    assert summary["stop_kind"] == "clients"
    assert (run_dir / "model.pt").exists() and json.loads((run_dir / "metrics.json").read_text())
    # Flower notices the dead node after its heartbeats lapse (~60 s); then 5 s of waiting.
    print(f"stopped {time.monotonic() - killed:.0f}s after the kill: {summary['stop_reason']}")
