"""fl_dp/warm_client.py: the warm ClientApp launcher for `flower-supernode --isolation process`.

Without a runtime: the Flower version guard, the command line each forked child hands to Flower's
``flwr-clientapp`` entry point (the one Flower's own SubprocessExecutor builds), the stale code
check (a changed, missing or extra file, another ClientApp, an app edited on disk after start), and
one real fork through the executor. e2e (a SuperLink and two SuperNodes on loopback): the warm
launcher serves an unchanged app with the same results as Flower's default isolation, and a run
whose bundle changes one app file runs that file in fresh processes, never the launcher's imports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

from fl_dp import flwr_cli, warm_client
from fl_dp.run_config import to_flwr

ROOT = Path(__file__).resolve().parent.parent
APP_PARTS = ("pyproject.toml", "common", "client_app", "server_app")
PACKAGES = ("client_app", "common")


def stage(target: Path, source: Path = ROOT) -> Path:
    """A copy of the app (what a FAB holds), so files edited elsewhere meanwhile do not matter."""
    target.mkdir(parents=True)
    for part in APP_PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source / part, target / part)
    return target


def spec(tmp_path: Path, **fields) -> ExecutionSpec:
    values = dict(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="tok", insecure=True,
                  root_certificates_path=None, runtime_dependency_install=False, parent_pid=4242,
                  suppress_output=False, task_id=7, fab_hash="ab" * 32)
    return ExecutionSpec(**(values | fields))


# ---- without a runtime ---------------------------------------------------------------------------


def test_the_launcher_is_checked_against_the_installed_flower():
    """Fails loudly on an upgrade: re-read flwr/supercore/superexec (run_superexec, executor/), the
    exit-handler registry, flwr/supernode/cli/flwr_clientapp.py and the FAB install layout, re-run this
    file (with -m e2e), then update warm_client.FLOWER_VERSION."""
    import flwr

    assert flwr.__version__ == warm_client.FLOWER_VERSION, (
        f"fl_dp/warm_client.py uses private API of flwr {warm_client.FLOWER_VERSION}; flwr {flwr.__version__} "
        "is installed: re-check it (it falls back to plain flower-superexec meanwhile)"
    )


def test_another_flower_version_runs_plain_superexec(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))  # main() sets it
    ran = []
    monkeypatch.setattr(os, "execvp", lambda file, argv: ran.append(argv) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        warm_client.main(["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--parent-pid", "12"])
    assert ran == [["flower-superexec", "--runtime-api-address", "127.0.0.1:9094", "--insecure", "--parent-pid", "12"]]


@pytest.mark.parametrize("insecure, certs", [(True, None), (False, "/ca.crt"), (False, None)])
def test_a_child_gets_the_command_line_flowers_superexec_would_start(monkeypatch, tmp_path, insecure, certs):
    from flwr.supercore.superexec.executor import subprocess_executor

    started = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **_: started.append(args))
    task = spec(tmp_path, insecure=insecure, root_certificates_path=certs)
    assert subprocess_executor.SubprocessExecutor().launch(task) == LaunchResult.accepted()
    assert started == [warm_client.clientapp_argv(task)]
    assert started[0][0] == "flwr-clientapp" and "--token" in started[0]


def test_the_stale_code_check(tmp_path):
    installed = stage(tmp_path / "installed")
    app = warm_client.WarmApp(warm_client.DEFAULT_APP, installed, PACKAGES,
                              warm_client.manifest(installed, PACKAGES))
    assert len(app.files) > 20 and all(p.split("/")[0] in PACKAGES for p in app.files)
    fab = stage(tmp_path / "fab")
    assert app.stale_reason(fab) == ""
    assert "not installed" in app.stale_reason(None)

    (fab / "common" / "models.py").write_text((fab / "common" / "models.py").read_text() + "\n# changed\n")
    assert app.stale_reason(fab) == "the FAB's code differs from the imported app: changed common/models.py"
    shutil.copy2(installed / "common" / "models.py", fab / "common" / "models.py")
    (fab / "client_app" / "extra.py").write_text("X = 1\n")
    assert "only in the FAB: client_app/extra.py" in app.stale_reason(fab)
    (fab / "client_app" / "extra.py").unlink()
    (fab / "client_app" / "attacks.py").unlink()
    assert "missing in the FAB: client_app/attacks.py" in app.stale_reason(fab)
    shutil.copy2(installed / "client_app" / "attacks.py", fab / "client_app" / "attacks.py")
    (fab / "client_app" / "test_local.py").write_text("")  # never bundled by Flower: ignored
    assert app.stale_reason(fab) == ""

    toml = fab / "pyproject.toml"
    toml.write_text(toml.read_text().replace('clientapp = "client_app.app:app"', 'clientapp = "client_app.other:app"'))
    assert "client_app.other:app" in app.stale_reason(fab)
    shutil.copy2(installed / "pyproject.toml", toml)

    (installed / "common" / "names.py").write_text((installed / "common" / "names.py").read_text() + "\n")
    reason = app.stale_reason(fab)  # the installed copy edited after the launcher imported it
    assert "changed on disk since the launcher imported it" in reason and "common/names.py" in reason


def test_the_installed_fab_is_found_by_its_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "apps" / "fl-dp.fl-dp.0.1.0.abcdef12").mkdir(parents=True)
    assert warm_client.installed_fab_dir("abcdef12" + "0" * 56) == tmp_path / "apps" / "fl-dp.fl-dp.0.1.0.abcdef12"
    assert warm_client.installed_fab_dir("12345678" + "0" * 56) is None
    assert warm_client.installed_fab_dir(None) is None


def test_only_matching_clientapp_tasks_are_forked_and_the_child_runs_flowers_entry_point(tmp_path, monkeypatch):
    """A real fork: the child drops the launcher's exit handlers, reseeds torch, and calls
    ``flwr.supernode.cli.flwr_clientapp`` (replaced here by a stub that records what it saw)."""
    import flwr.supernode.cli as flwr_cli_entry
    import torch
    from flwr.supercore.exit import exit_handler

    record = tmp_path / "child.txt"

    def stub() -> None:
        record.write_text(repr((sys.argv, len(exit_handler.registered_exit_handlers), torch.initial_seed())))
        sys.exit(0)

    monkeypatch.setattr(flwr_cli_entry, "flwr_clientapp", stub)
    monkeypatch.setattr(exit_handler, "registered_exit_handlers", [object()])

    class Cold:
        def __init__(self):
            self.launched = []

        def launch(self, task):
            self.launched.append(task.task_id)
            return LaunchResult.accepted()

    class App:
        reason = ""

        def stale_reason(self, fab_dir):
            return self.reason

    cold, app = Cold(), App()
    executor = warm_client.WarmExecutor(app, cold)
    monkeypatch.setattr(warm_client, "installed_fab_dir", lambda fab_hash: tmp_path)

    app.reason = "the FAB's code differs"
    assert executor.launch(spec(tmp_path, task_id=1)) == LaunchResult.accepted()
    assert executor.launch(spec(tmp_path, task_id=2, task_type=TaskType.SERVER_APP)) == LaunchResult.accepted()
    assert cold.launched == [1, 2] and not executor.children

    app.reason = ""
    task = spec(tmp_path, task_id=3)
    assert executor.launch(task) == LaunchResult.accepted()
    assert cold.launched == [1, 2] and list(executor.children.values()) == [3]
    deadline = time.monotonic() + 60
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children, "the forked child was not reaped"
    argv, handlers, seed = eval(record.read_text())  # noqa: S307 - written by the stub above
    assert argv == warm_client.clientapp_argv(task) and handlers == 0 and seed != torch.initial_seed()
    assert executor.served == {"warm": 1, "cold": 2}


# ---- e2e: a SuperLink and two SuperNodes on loopback -------------------------------------------------

NUM_NODES = 2
BIN = Path(sys.executable).parent
FAST_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """A SuperLink and two SuperNodes (``warm``: ``--isolation process`` + a warm launcher each, which
    imports the app from ``app_dir``), each in a session of its own, logged to files, always killed."""

    def __init__(self, workdir: Path, app_dir: Path, warm: bool):
        self.workdir, self.processes, self.warm = workdir, [], warm
        workdir.mkdir(parents=True)
        self.env = flwr_cli.cli_env(workdir / "cli-home") | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        port = free_port()
        flwr_cli.write_connection(workdir / "cli-home", "loopback", f"127.0.0.1:{port}", insecure=True)
        self.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation"], workdir / "superlink-home")
        for i in range(NUM_NODES):
            runtime = free_port()
            home = workdir / f"node-{i}-home"  # a node's own FLWR_HOME: it installs each FAB itself
            self.start(f"supernode-{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                          "--port", str(runtime), "--node-config",
                                          f"partition-id={i} num-partitions={NUM_NODES}"]
                       + (["--isolation", "process"] if warm else []), home)
            if warm:
                self.start(f"warm-{i}", [sys.executable, "-m", "fl_dp.warm_client", "--runtime-api-address",
                                         f"127.0.0.1:{runtime}", "--insecure"], home, PYTHONPATH=str(app_dir))
        flwr_cli.wait_for_nodes("loopback", self.env, NUM_NODES, timeout=180)

    def start(self, name: str, args: list[str], home: Path, **extra: str) -> None:
        env = self.env | FAST_POLL | {"FLWR_HOME": str(home), "OMP_NUM_THREADS": "1"} | extra
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   cwd=self.workdir, start_new_session=True))

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def launcher_logs(self, since: list[int] | None = None) -> str:
        """The launchers' logs (after the lengths in ``since``: see ``log_sizes``)."""
        logs = [self.log(f"warm-{i}") for i in range(NUM_NODES)] if self.warm else []
        return "".join(log[since[i]:] if since else log for i, log in enumerate(logs))

    def log_sizes(self) -> list[int]:
        return [len(self.log(f"warm-{i}")) for i in range(NUM_NODES)]

    def run(self, app_dir: Path, name: str, rounds: int) -> list[dict]:
        output = self.workdir / name
        config = {"num-server-rounds": rounds, "min-available-clients": NUM_NODES, "fraction-evaluate": 0.0,
                  "local-epochs": 2, "seed": 7, "output-dir": str(output)}
        run_id = flwr_cli.submit(str(app_dir), "loopback", self.env, to_flwr(config))
        status = flwr_cli.wait_for_run("loopback", run_id, self.env, timeout=420, poll=1.0)
        assert status == flwr_cli.FINISHED, f"{status}\n{self.log('superlink')[-3000:]}\n{self.launcher_logs()[-3000:]}"
        import json

        return json.loads((output / "metrics.json").read_text())

    def stop(self) -> None:
        for process in self.processes:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory):
    return stage(tmp_path_factory.mktemp("warm-app") / "app")


@pytest.fixture(scope="module")
def warm_deployment(tmp_path_factory, app_copy):
    deployment = Deployment(tmp_path_factory.mktemp("warm") / "deploy", app_copy, warm=True)
    yield deployment
    deployment.stop()


RESULTS = ("central_accuracy", "central_loss", "train_loss", "num_replies", "num_failures")


@pytest.mark.e2e
def test_the_warm_launcher_serves_an_unchanged_app_with_the_default_isolations_results(
        warm_deployment, app_copy, tmp_path):
    warm = warm_deployment.run(app_copy, "same-app", rounds=2)
    logs = warm_deployment.launcher_logs()
    assert logs.count("served warm in forked process") >= 2, logs[-3000:]  # round 2's train messages at least
    assert "Traceback" not in logs, logs[-3000:]

    default = Deployment(tmp_path / "default", app_copy, warm=False)
    try:
        cold = default.run(app_copy, "same-app", rounds=2)
    finally:
        default.stop()
    assert [{k: r[k] for k in RESULTS} for r in warm] == [{k: r[k] for k in RESULTS} for r in cold]
    assert len(warm) == 2 and warm[-1]["num_failures"] == 0


@pytest.mark.e2e
def test_a_changed_app_file_is_never_served_from_the_launchers_imports(warm_deployment, app_copy, tmp_path):
    changed = stage(tmp_path / "changed", app_copy)
    app_py = changed / "client_app" / "app.py"
    app_py.write_text(app_py.read_text() + '\nprint("FL-DP-CHANGED-CLIENT-APP imported", flush=True)\n')
    before = warm_deployment.log_sizes()
    metrics = warm_deployment.run(changed, "changed-app", rounds=1)
    logs = warm_deployment.launcher_logs(since=before)
    assert metrics[-1]["num_failures"] == 0
    assert "served warm" not in logs, logs[-3000:]
    assert "runs in a fresh flwr-clientapp process" in logs and "changed client_app/app.py" in logs, logs[-3000:]
    # every ClientApp message of the run (an identity query and a train message per node) ran the new file
    assert logs.count("FL-DP-CHANGED-CLIENT-APP imported") == logs.count("runs in a fresh flwr-clientapp") >= 2 * NUM_NODES
