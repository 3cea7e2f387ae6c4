"""A warm ClientApp launcher for pinned deployments: `flower-supernode --isolation process` plus this.

Opt-in. In Flower 1.41 every ClientApp message runs in a fresh ``flwr-clientapp`` process (both
isolation modes); importing torch, Flower, Opacus and the app costs seconds per message. This
launcher takes the place of ``flower-superexec`` next to a SuperNode started with
``--isolation process``: it imports torch, Flower, Opacus and the app ONCE, then, for every
ClientApp message, forks a child that runs Flower's own ``flwr-clientapp`` entry point
(``flwr.supernode.cli.flwr_clientapp``, with the message's token), so each message still runs in a
process of its own::

    flower-supernode --isolation process --port 9094 ...   # the SuperNode starts no SuperExec
    fl-dp-warm-client --runtime-api-address 127.0.0.1:9094 --insecure   # or python -m fl_dp.warm_client

Stale code check: a child is forked only when the code it would run is the code submitted.
Flower installs each submitted bundle (FAB) under ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>``
and a fresh ``flwr-clientapp`` imports the app from there. The launcher hashes the ``.py`` files of
the app packages it imported (``client_app/``, ``common/``, ... under the directory they were
imported from) at start, and per message compares them, path by path, with the same packages of
the installed FAB of the message's run (located by the task's FAB hash) and with the files on disk
now. Any difference (a changed, missing or extra file, another ClientApp reference in the FAB's
pyproject.toml, a FAB this node has not installed yet, or a run that asks for runtime dependency
installation) sends that message to a FRESH ``flwr-clientapp`` process, started exactly as
``flower-superexec`` starts it (Flower's ``SubprocessExecutor``), and logs one WARNING line saying
why. Fallback rather than refusal: the run then behaves exactly as under Flower's default
isolation (the submitted code runs, at the old cost) instead of its server waiting for a reply that
never comes. The first message of a FAB this node has never installed therefore runs cold (it
installs the FAB); the following ones run warm.

Fork safety: the launcher forks from its single main thread before any torch operation (importing
torch and the app starts no torch thread pool; ``OPENBLAS_NUM_THREADS`` defaults to 1 so NumPy's
and SciPy's OpenBLAS start no pool either), and logs a WARNING if native threads exist at a fork.
In the child it drops the exit handlers and signal handlers inherited from the launcher's
SuperExec loop (so the child never closes the launcher's connection) and reseeds torch's and
NumPy's global generators from the OS (Python's ``random`` reseeds itself at fork), as a fresh
process would have them; the app's secret DP noise keys come from ``os.urandom`` in the child.
What is shared: everything the launcher imported, as it was at import time (module-level state of
torch, Flower, Opacus and the app); a child's changes die with it.

Private Flower API, confined to this module and checked on flwr 1.41.0 only (on any other version
the launcher logs a warning and runs plain ``flower-superexec`` with the same arguments; and
tests/test_warm_client.py fails until someone re-checks it against the new source): the SuperExec
loop ``flwr.supercore.superexec.run_superexec`` (its ``get_executor`` is replaced), its executor
types, the exit-handler registry ``flwr.supercore.exit.exit_handler.registered_exit_handlers``,
and the FAB install layout (``APP_DIR``, ``FAB_HASH_TRUNCATION``).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

FLOWER_VERSION = "1.41.0"
DEFAULT_APP = "client_app.app:app"
DEFAULT_PRELOAD = ("opacus", "client_app.dpsgd")  # the DP-SGD path's imports (Opacus, ~1-2 s cold)
NOT_BUNDLED = ("test_*.py", "*_test.py")  # .py files Flower never puts in a FAB (FAB_EXCLUDE_PATTERNS)
PREFIX = "warm_client:"


def _log(level: int, msg: str, *args) -> None:
    from flwr.supercore import log

    log(level, f"{PREFIX} {msg}", *args)


# ---- the app's code: what was imported, what a FAB holds -------------------------------------------


def _bundled(path: Path) -> bool:
    return path.suffix == ".py" and "__pycache__" not in path.parts and not any(
        fnmatch.fnmatch(path.name, pattern) for pattern in NOT_BUNDLED)


def manifest(root: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every ``.py`` file of ``packages`` (directories or ``name.py`` modules) under ``root``."""
    files: dict[str, str] = {}
    for name in packages:
        module = root / f"{name}.py"
        paths = [module] if module.is_file() else sorted(p for p in (root / name).rglob("*.py") if p.is_file())
        for path in paths:
            relative = path.relative_to(root)
            if _bundled(relative):
                files[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def differences(expected: dict[str, str], found: dict[str, str], limit: int = 5) -> list[str]:
    """What differs between two manifests, e.g. ``['changed common/models.py', 'missing in the FAB: x.py']``."""
    out = [f"changed {p}" for p in sorted(expected.keys() & found.keys()) if expected[p] != found[p]]
    out += [f"missing in the FAB: {p}" for p in sorted(expected.keys() - found.keys())]
    out += [f"only in the FAB: {p}" for p in sorted(found.keys() - expected.keys())]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def clientapp_ref(project_dir: Path) -> str:
    """The ``[tool.flwr.app.components] clientapp`` of a project's pyproject.toml ('' if absent)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    try:
        config = tomllib.loads((project_dir / "pyproject.toml").read_text())
        return str(config["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@dataclass
class WarmApp:
    """The ClientApp this launcher imported, and the code it was imported from."""

    ref: str
    root: Path
    packages: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, ref: str, preload: tuple[str, ...] = ()) -> WarmApp:
        """Import the app (``module:attribute``) and ``preload``; record the app packages' code."""
        before = set(sys.modules)
        module_name, _, attribute = ref.partition(":")
        module = importlib.import_module(module_name)
        for name in attribute.split(".") if attribute else ():
            module = getattr(module, name)
        for name in preload:
            try:
                importlib.import_module(name)
            except ImportError as error:
                _log(30, "could not preload %s (%s); it will be imported per message", name, error)
        top = sys.modules[module_name.split(".")[0]]
        if top.__file__ is None:
            raise RuntimeError(f"{top.__name__} is a namespace package: the launcher cannot tell which files it imported")
        top_file = Path(top.__file__).resolve()
        root = top_file.parent.parent if top_file.name == "__init__.py" else top_file.parent
        if root.name in ("site-packages", "dist-packages"):  # a non-editable install: ask its metadata
            packages = _distribution_packages(ref)
        else:
            packages = tuple(sorted(cls._imported_from(root, set(sys.modules) - before)))
        return cls(ref, root, packages, manifest(root, packages))

    @staticmethod
    def _imported_from(root: Path, imported: set[str]) -> set[str]:
        """Top-level packages/modules of the ``imported`` modules that were imported from ``root``
        (not this launcher's own package, imported before the app)."""
        names = set()
        for name in imported:
            file = getattr(sys.modules.get(name), "__file__", None)
            if not file:
                continue
            top = name.split(".")[0]
            try:
                first = Path(file).resolve().relative_to(root).parts[0]
            except (ValueError, IndexError):
                continue
            if first in (top, f"{top}.py"):  # not e.g. root/.venv/.../torch
                names.add(top)
        return names

    def stale_reason(self, fab_dir: Path | None) -> str:
        """Why ``fab_dir`` (an installed FAB) must not be served from this process's imports; '' if it may."""
        if fab_dir is None:
            return "its FAB is not installed on this node yet (a fresh process installs it)"
        now = manifest(self.root, self.packages)
        if now != self.files:
            return (f"the installed app under {self.root} changed on disk since the launcher imported it "
                    f"({'; '.join(differences(self.files, now))}); restart the launcher")
        ref = clientapp_ref(fab_dir)
        if ref != self.ref:
            return f"the FAB's ClientApp is {ref!r}, the launcher imported {self.ref!r}"
        fab = manifest(fab_dir, self.packages)
        if fab != self.files:
            return f"the FAB's code differs from the imported app: {'; '.join(differences(self.files, fab))}"
        return ""


def _distribution_packages(ref: str) -> tuple[str, ...]:
    """Top-level names of the distribution that provides ``ref``'s top-level package (non-editable installs)."""
    from importlib.metadata import packages_distributions

    mapping = packages_distributions()
    top = ref.partition(":")[0].split(".")[0]
    dists = set(mapping.get(top, ()))
    return tuple(sorted(name for name, owners in mapping.items() if dists & set(owners) and name in sys.modules))


def installed_fab_dir(fab_hash: str | None) -> Path | None:
    """The directory Flower installed the FAB with this hash into, under this process's FLWR_HOME."""
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home

    if not fab_hash:
        return None
    found = [p for p in (get_flwr_home() / APP_DIR).glob(f"*.{fab_hash[:FAB_HASH_TRUNCATION]}") if p.is_dir()]
    return found[0] if len(found) == 1 else None


# ---- the executor: fork warm, or start Flower's own fresh process -------------------------------------


def _native_threads() -> int:
    """OS threads of this process that Python did not start (BLAS/OpenMP pools, gRPC, ...)."""
    try:
        return len(os.listdir("/proc/self/task")) - threading.active_count()
    except OSError:
        return 0


def clientapp_argv(spec) -> list[str]:
    """``flwr-clientapp``'s command line for a task, as Flower's SubprocessExecutor builds it."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND

    argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    return argv


def _run_child(spec) -> None:
    """In the forked child: become a ``flwr-clientapp`` process for ``spec``'s token; never returns."""
    code = 1
    try:
        from flwr.supercore.exit import exit_handler

        exit_handler.registered_exit_handlers.clear()  # the launcher's: closing its connection, ...
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        if "torch" in sys.modules:
            sys.modules["torch"].seed()  # a fresh process seeds torch's generator from the OS
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # and NumPy's legacy global one
        from flwr.supernode.cli import flwr_clientapp

        sys.argv = clientapp_argv(spec)
        flwr_clientapp()  # Flower's `flwr-clientapp` entry point; ends in sys.exit
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must never return into the launcher's loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class WarmExecutor:
    """A SuperExec executor: ClientApp tasks of the imported app in forked children, the rest cold."""

    def __init__(self, app: WarmApp, cold=None):
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self.app = app
        self.cold = cold if cold is not None else SubprocessExecutor()
        self.children: dict[int, int] = {}  # pid -> task id
        self.served = {"warm": 0, "cold": 0}
        self._warned_threads = False

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return self.cold.get_eligible_capacity(supported_task_types, insecure=insecure,
                                               root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        del task_type, fab_hash, insecure, root_certificates_path

    def reason_for_cold(self, spec) -> str:
        from flwr.supercore.constant import TaskType

        if spec.task_type != TaskType.CLIENT_APP:
            return f"a {spec.task_type} task"
        if spec.runtime_dependency_install:
            return "runtime dependency installation is enabled"
        return self.app.stale_reason(installed_fab_dir(spec.fab_hash))

    def launch(self, spec):
        from logging import INFO, WARNING

        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        reason = self.reason_for_cold(spec)
        if reason:
            if spec.task_type == TaskType.CLIENT_APP:
                _log(WARNING, "task %d (FAB %s) runs in a fresh flwr-clientapp process, not from the launcher's "
                     "imports: %s", spec.task_id, (spec.fab_hash or "?")[:12], reason)
            self.served["cold"] += 1
            return self.cold.launch(spec)
        if (threads := _native_threads()) > 0 and not self._warned_threads:
            self._warned_threads = True
            _log(WARNING, "%d native thread(s) run in the launcher at fork time; a child inherits none of them, "
                 "and a lock one of them holds would stay held in the child", threads)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(spec)  # never returns
        self.children[pid] = spec.task_id
        self.served["warm"] += 1
        _log(INFO, "task %d (FAB %s) served warm in forked process %d", spec.task_id, (spec.fab_hash or "?")[:12], pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (called by Flower's SuperExec loop between polls)."""
        from logging import WARNING

        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                task = self.children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    _log(WARNING, "forked process %d for task %d exited with %d", pid, task, code)

    def close(self) -> None:
        self.cold.close()


# ---- the command -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fl-dp-warm-client",
        description="Serve a SuperNode's ClientApp messages (flower-supernode --isolation process) from "
        "one process that imported torch, Flower, Opacus and the app once: a forked child per message, "
        "running Flower's flwr-clientapp entry point. Messages of any other app code run in a fresh "
        "flwr-clientapp process. Takes the place of flower-superexec.")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, e.g. 127.0.0.1:9094")
    parser.add_argument("--insecure", action="store_true", help="connect to the Runtime API without TLS")
    parser.add_argument("--root-certificates", default=None, help="CA certificate of the Runtime API's TLS")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    parser.add_argument("--app", default=DEFAULT_APP, help=f"the ClientApp to import (default {DEFAULT_APP})")
    parser.add_argument("--preload", action="append", default=None, metavar="MODULE",
                        help=f"also import MODULE at start (repeatable; default {' '.join(DEFAULT_PRELOAD)})")
    args = parser.parse_args(argv)
    args.preload = tuple(DEFAULT_PRELOAD if args.preload is None else args.preload)
    return args


def superexec_argv(args: argparse.Namespace) -> list[str]:
    """The plain ``flower-superexec`` command with the same connection arguments."""
    argv = ["flower-superexec", "--runtime-api-address", args.runtime_api_address]
    if args.insecure:
        argv.append("--insecure")
    if args.root_certificates:
        argv += ["--root-certificates", args.root_certificates]
    if args.parent_pid is not None:
        argv += ["--parent-pid", str(args.parent_pid)]
    return argv


def flower_is_known() -> bool:
    import flwr

    return flwr.__version__ == FLOWER_VERSION


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy: no BLAS thread pool in the launcher
    from logging import INFO, WARNING

    import flwr

    if not flower_is_known():
        _log(WARNING, "flwr %s is not %s, the version this launcher was checked against; running plain "
             "flower-superexec (a fresh process per message) instead", flwr.__version__, FLOWER_VERSION)
        command = superexec_argv(args)
        os.execvp(command[0], command)

    import torch  # noqa: F401 - imported once, here
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as superexec_loop
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supercore.utils import disable_process_dumping
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401 - the children's entry point, imported once

    disable_process_dumping(strict=False)  # as flower-superexec: the tokens stay out of core dumps
    validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    app = WarmApp.load(args.app, args.preload)
    _log(INFO, "imported %s from %s (packages %s, %d files hashed); serving ClientApp messages of the "
         "Runtime API at %s in forked processes", app.ref, app.root, ", ".join(app.packages), len(app.files),
         args.runtime_api_address)
    executor = WarmExecutor(app)
    superexec_loop.get_executor = lambda *_, **__: executor  # Flower's loop, our executor
    superexec_loop.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        executor_type=ExecutorType.SUBPROCESS,
    )


if __name__ == "__main__":
    main()
