"""The simulation runtime: one simulation SuperLink and one Ray head, started and stopped together.

Flower's simulation process (`flwr-simulation`, one per `flwr run`) calls ``ray.init()``, which
starts a whole Ray instance when none is given: 7-15 s on 2 cores, in every run. Here the app
starts a Ray head itself (`ray start --head --block`, Ray's documented CLI, on free loopback
ports and in a private temp dir) AT THE SAME TIME as the SuperLink, and gives the SuperLink
``RAY_ADDRESS`` (Ray's documented variable for "connect to this cluster"): every
`flwr-simulation` the SuperLink starts then connects to that head (under 1 s) instead of starting
one, and Ray's start overlaps the SuperLink's start, the submission and the simulation process's
imports. Flower's own init arguments are unchanged (``flwr run`` passes no ``num_cpus``).

One :class:`Runtime` can serve several `flwr run` submissions in turn (``fl-dp sweep``): each run
still gets its own `flwr-simulation` process, its own Ray job (its own actors, which Flower
terminates when the run ends) and its own ClientApp contexts, so no state passes between runs;
what is shared is the SuperLink's run database and the Ray processes themselves.

Everything a Runtime starts is in two process groups (the SuperLink's and the Ray head's, each
in its own session); :meth:`Runtime.stop` stops both groups and waits until no process of either
is left. On Linux the two leaders also get SIGTERM if the command that started them dies
(``PR_SET_PDEATHSIG``), so even a killed ``fl-dp`` leaves nothing behind.

Commands find a runtime to share through ``FL_DP_RUNTIME`` (the path of its ``runtime.json``),
which ``fl-dp sweep`` sets for its runs and ``fl-dp runtime start`` (a warm runtime kept between
commands, see :mod:`fl_dp.runtime_cli`) writes to a known place.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# The SuperLink's SuperExec looks for the submitted run every 0.1 s instead of every 1 s.
FAST_POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
RUNTIME_ENV = "FL_DP_RUNTIME"  # path of a shared runtime's runtime.json
DESCRIPTOR = "runtime.json"
# Ray's head ports, each given explicitly (free loopback ports): several heads on one machine never collide.
RAY_PORT_OPTIONS = ("--port", "--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                    "--node-manager-port", "--object-manager-port")


class RuntimeError_(RuntimeError):
    """The runtime could not be started (the message says which part and where its log is)."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` DIFFERENT free loopback ports (all held open while choosing: the OS may hand a just-closed
    port out again)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def flwr_bin(name: str) -> str:
    """The executables of this interpreter's environment (works without activating a venv)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def base_env(home: Path) -> dict[str, str]:
    # The SuperLink starts `flower-superexec`/`flwr-simulation` by name: put this environment's bin first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return os.environ | QUIET_ENV | FAST_POLL_ENV | {"FLWR_HOME": str(home), "PATH": path}


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(command: list[str], env: dict, log_file: Path) -> subprocess.Popen:
    # preexec_fn with PDEATHSIG ties the child to the thread that forks it: always spawn from the main thread.
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def _live_processes():
    """(pid, parent pid, process group) of every live (not zombie) process, from /proc (nothing elsewhere)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:  # the command may hold spaces or ')': the fields follow the LAST ')'
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                yield int(entry.name), int(fields[1]), int(fields[2])


def group_pids(pgid: int) -> list[int]:
    """Every live (not zombie) process in process group ``pgid`` (from /proc; empty elsewhere)."""
    return [pid for pid, _, group in _live_processes() if group == pgid]


def descendant_groups(roots: list[int]) -> list[int]:
    """The process groups of every live descendant of ``roots`` other than the roots' own (from /proc).

    Flower's SuperLink starts its SuperExec in a session of its own, and that one the simulation
    process and, through ``ray.init()``, Ray's processes: found while the SuperLink is still their ancestor."""
    parents: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for pid, parent, group in _live_processes():
        parents.setdefault(parent, []).append(pid)
        groups[pid] = group
    found, todo = set(), list(roots)
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(groups[child])
            todo.append(child)
    return sorted(found - set(roots))


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        if not Path("/proc").is_dir():  # no /proc (macOS): ask the kernel
            try:
                os.kill(pid, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return False


def stop_group(leader: subprocess.Popen | int, grace: float = 10.0) -> None:
    """SIGTERM process group ``leader`` (its session), then SIGKILL whatever is left after ``grace`` s;
    return once no process of the group is alive."""
    pgid = leader.pid if isinstance(leader, subprocess.Popen) else leader

    def left() -> bool:
        if isinstance(leader, subprocess.Popen):
            leader.poll()
        members = group_pids(pgid)
        return bool(members) if Path("/proc").is_dir() else pid_alive(pgid)

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not left():
                return
            time.sleep(0.05)
    if isinstance(leader, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=1)


def superlink_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return response.status == 200
    except OSError:
        return False


class Runtime:
    """A simulation SuperLink whose `flwr-simulation` processes use a Ray head started with it.

    Use as a context manager (``with Runtime() as runtime:``); :meth:`stop` runs on any exit,
    Ctrl-C and SIGTERM included (the command's handler turns SIGTERM into an exception).
    ``env_extra`` goes into the environment of every process the runtime starts (the SuperLink,
    the simulation processes, the Ray workers).
    """

    def __init__(self, env_extra: dict[str, str] | None = None, ray: bool = True, home: Path | None = None,
                 in_memory: bool = False):
        self.env_extra = dict(env_extra or {})
        self.use_ray_head = ray
        self.in_memory = in_memory  # the SuperLink's state in memory (Flower's default) instead of <home>/state.db
        self.home = Path(home) if home else Path(tempfile.mkdtemp(prefix="flwr-home-"))
        self.superlink: subprocess.Popen | None = None
        self.ray_head: subprocess.Popen | None = None
        self.http_port = self.control_port = 0
        self.ray_address = ""
        self.failed = False  # a run on it failed: its logs are kept
        self.results_final = False  # its one run's results are written: stop() need not wait for anything
        self._runs = 0

    # -- starting --------------------------------------------------------------------------

    @property
    def log_file(self) -> Path:
        return self.home / "superlink.log"

    @property
    def ray_log(self) -> Path:
        return self.home / "ray-head.log"

    def env(self) -> dict[str, str]:
        """The environment for `flwr` commands against this runtime (and what its processes get)."""
        env = base_env(self.home) | self.env_extra
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def start(self, timeout: float = 60.0) -> "Runtime":
        self.home.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 + len(RAY_PORT_OPTIONS))
        self.http_port, self.control_port = ports[:2]
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{self.http_port}"\ninsecure = true\n'
        )
        try:
            if self.use_ray_head:
                self._start_ray_head(dict(zip(RAY_PORT_OPTIONS, ports[2:])))
            self.superlink = _spawn([
                flwr_bin("flower-superlink"), "--insecure", "--simulation",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.http_port),
                "--control-api-address", f"127.0.0.1:{self.control_port}", "--log-file", str(self.log_file),
                *([] if self.in_memory else ["--database", str(self.home / "state.db")]),
            ], self.env(), self.home / "superlink.out")
            self._wait_superlink(timeout)
            self._write_descriptor()
        except BaseException:
            self.failed = True
            self.stop()
            raise
        return self

    def _start_ray_head(self, ports: dict[str, int]) -> None:
        self.ray_address = f"127.0.0.1:{ports['--port']}"
        temp_dir = self.home / "ray"  # Ray's sockets live here: keep the path short (Unix sockets: 107 bytes)
        command = [flwr_bin("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                   "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp_dir),
                   # Workers (and the connecting driver) bind ports the OS picks: Ray's default range starts at
                   # 10002 for every head, and two heads side by side once gave a driver the other's port.
                   "--min-worker-port", "0", "--max-worker-port", "0"]
        for option, port in ports.items():
            command += [option, str(port)]
        self.ray_head = _spawn(command, base_env(self.home) | self.env_extra, self.ray_log)

    def _wait_superlink(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        superlink = self.superlink
        if superlink is None:
            raise RuntimeError_("the SuperLink was not started")
        while time.monotonic() < deadline:
            if superlink.poll() is not None:
                raise RuntimeError_(f"flower-superlink exited with code {superlink.returncode}; see {self.log_file}")
            if self.ray_head is not None and self.ray_head.poll() is not None:
                raise RuntimeError_(f"the Ray head exited with code {self.ray_head.returncode}; see {self.ray_log}")
            if superlink_healthy(self.http_port):
                return
            time.sleep(0.1)
        raise RuntimeError_(f"flower-superlink did not become ready within {timeout:.0f}s; see {self.log_file}")

    def _write_descriptor(self) -> None:
        (self.home / DESCRIPTOR).write_text(json.dumps(self.describe(), indent=2) + "\n")

    def describe(self) -> dict:
        return {
            "home": str(self.home),
            "superlink": f"127.0.0.1:{self.http_port}",
            "http_port": self.http_port,
            "ray_address": self.ray_address,
            "process_groups": self.process_groups(),
            "env_extra": sorted(self.env_extra),  # names only: values (an audit key) stay out of files
            "started_by": os.getpid(),
        }

    def process_groups(self) -> list[int]:
        return [p.pid for p in (self.superlink, self.ray_head) if p is not None]

    # -- using -----------------------------------------------------------------------------

    def check(self) -> str | None:
        """None while both parts run; otherwise what stopped (with the log to read)."""
        if self.superlink is not None and self.superlink.poll() is not None:
            return f"the SuperLink stopped (exit code {self.superlink.returncode}); see {self.log_file}"
        if self.ray_head is not None and self.ray_head.poll() is not None:
            return f"the Ray head stopped (exit code {self.ray_head.returncode}); see {self.ray_log}"
        return None

    def stage_dir(self) -> Path:
        """A fresh directory for one submission's copy of the app (``<home>/app``, then ``app-2``, ...)."""
        self._runs += 1
        return self.home / ("app" if self._runs == 1 else f"app-{self._runs}")

    # -- stopping --------------------------------------------------------------------------

    def stop(self, now: bool = False) -> None:
        """Stop both process groups and the groups their descendants started (in parallel) and wait until
        none of their processes is left; the runtime's directory goes too unless a run on it failed (then
        its logs are kept there). ``now``: no grace (the run's results are final, nothing is left to save)."""
        # The SuperLink gets time to stop its simulation process; Ray's processes keep nothing worth a
        # graceful stop (its state lives in memory and in the temp dir under home): 1 s, then SIGKILL.
        leaders: list[tuple[subprocess.Popen | int, float]] = [
            (p, 0.0 if now else grace) for p, grace in ((self.superlink, 10.0), (self.ray_head, 1.0)) if p is not None]
        started = [p.pid for p, _ in leaders if isinstance(p, subprocess.Popen)]
        leaders += [(group, 0.0 if now else 10.0) for group in descendant_groups(started)]
        threads = [threading.Thread(target=stop_group, args=leader) for leader in leaders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if not self.failed:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> "Runtime":
        return self.start() if self.superlink is None else self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and not issubclass(exc[0], SystemExit):
            self.failed = True
        self.stop()


class AttachedRuntime:
    """A runtime another command started (``FL_DP_RUNTIME``): used, never stopped."""

    def __init__(self, descriptor: Path):
        info = json.loads(Path(descriptor).read_text())
        self.home = Path(info["home"])
        self.http_port = int(info["http_port"])
        self.ray_address = info.get("ray_address", "")
        self.process_groups_ = list(info.get("process_groups", []))
        self.env_extra_names = list(info.get("env_extra", []))
        self.failed = False
        self.log_file = self.home / "superlink.log"

    def env(self) -> dict[str, str]:
        env = base_env(self.home)
        if self.ray_address:
            env["RAY_ADDRESS"] = self.ray_address
        return env

    def check(self) -> str | None:
        if not superlink_healthy(self.http_port):
            return f"the shared runtime's SuperLink does not answer; see {self.log_file}"
        dead = [pgid for pgid in self.process_groups_ if not pid_alive(pgid)]
        return f"the shared runtime lost process(es) {dead}" if dead else None

    def stage_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="app-", dir=self.home))


def attached() -> AttachedRuntime | None:
    """The runtime named by ``FL_DP_RUNTIME`` if it is up, else None (unset, ``none`` or a stale name)."""
    descriptor = os.environ.get(RUNTIME_ENV)
    if not descriptor or descriptor == "none":
        return None
    try:
        runtime = AttachedRuntime(Path(descriptor))
    except (OSError, ValueError, KeyError):
        return None
    return runtime if runtime.check() is None else None


@contextlib.contextmanager
def sigterm_as_exit():
    """Within the block, SIGTERM (and SIGHUP) raise SystemExit in the main thread, so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
