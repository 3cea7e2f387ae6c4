"""Shared helpers for the performance benchmarks (sim_overhead, message_overhead, scale, dpsgd_cost).

* :func:`machine` describes the machine (CPU, cores, memory, versions) for the results file;
* :func:`wait_for_quiet` waits (bounded) until the 1-minute load average is low enough to
  measure, and returns the load so that every figure can be recorded next to it;
* :class:`TreeMemory` samples the memory of a whole process tree every 0.5 s (from /proc);
* :func:`write_section` rewrites ONE benchmark's section of ``benchmarks/results.md``
  (between ``<!-- name:start -->`` and ``<!-- name:end -->``), leaving the others alone, so
  the scripts can run independently (and concurrently: the file is locked while rewritten).
"""

from __future__ import annotations

import fcntl
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results.md"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
}

# Section order in results.md (the numbering) and their headings.
SECTIONS = {
    "sim_overhead": "1. Simulation overhead (`benchmarks/sim_overhead.py`)",
    "message_overhead": "2. Deployment message overhead (`benchmarks/message_overhead.py`)",
    "scale": "3. Scale (`benchmarks/scale.py`)",
    "dpsgd_cost": "4. DP-SGD cost (`benchmarks/dpsgd_cost.py`)",
    "privacy_utility": "5. Privacy-utility",
}

PRIVACY_UTILITY = """The privacy-utility tables (the sweep from the privacy issue on digits and MNIST-1D, and the
DP-SGD-vs-central and user-level MNIST-1D comparisons) are kept by their owner in
[`results_privacy.md`](results_privacy.md). The sweep is reproduced with `scripts/sweep.py`, e.g.

```bash
.venv/bin/python scripts/sweep.py --num-clients 10 \\
  --run-config "num-server-rounds=20 local-epochs=1 batch-size=48 learning-rate=1.0 momentum=0.0 val-fraction=0.0"
.venv/bin/python scripts/sweep.py --dp server --epsilons 2,4,8 --num-clients 100 \\
  --run-config "sampling='poisson' clients-per-round=10 num-server-rounds=50 local-epochs=1"
```

See [`README.md`](README.md) in this folder for what each writes."""

HEADER = """# Performance benchmarks

Measured on this machine by the scripts in this folder; each script rewrites only its own
section (run them in any order). The machine has 2 cores and is shared with other jobs
(docker builds, long simulations): every figure carries the 1-minute load average measured
next to it (`load`); figures taken at a load above ~2.5 are slowed by other work and are
upper bounds. Issue: #5.
"""


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a description must never fail
        return "?"


def machine() -> str:
    """One paragraph describing the machine and the software versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"Machine: {_cpu_model()}, {cores} cores usable ({os.cpu_count()} online), "
        f"{_mem_total_gib():.1f} GiB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {_version('torch')}, flwr {_version('flwr')}, "
        f"opacus {_version('opacus')}, ray {_version('ray')}."
    )


# ----------------------------------------------------------------------------- load


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float = 2.5, max_wait: float = 600.0, poll: float = 20.0, quiet: bool = False) -> float:
    """Wait until the 1-minute load is <= ``threshold`` (at most ``max_wait`` s); return the load then.

    The machine is shared: when other jobs keep it busy past ``max_wait`` the measurement goes
    ahead anyway and the (high) load is recorded next to the figure.
    """
    deadline = time.monotonic() + max_wait
    while (load := load1()) > threshold and time.monotonic() < deadline:
        if not quiet:
            print(f"  load {load:.2f} > {threshold}: waiting (up to {deadline - time.monotonic():.0f}s more)", flush=True)
        time.sleep(poll)
    return load1()


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- processes


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces or parentheses: ppid follows the LAST ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_pids(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children = _children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeMemory:
    """Peak memory of a process tree, sampled every ``interval`` seconds in a thread.

    ``peak_rss`` is the peak of the SUM of the processes' resident set sizes (what the brief
    asks for; it counts pages shared between processes, e.g. torch's libraries or Ray's
    object store, once per process); ``peak_pss`` is the peak of the sum of proportional set
    sizes (shared pages split between the processes that map them: closer to the real use).
    """

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0  # KiB
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree_pids(self.root)
            rss = pss = 0
            for pid in pids:
                r, p = _rss_pss_kib(pid)
                rss, pss = rss + r, pss + p
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_rss_gib(self) -> float:
        return self.peak_rss / 2**20

    @property
    def peak_pss_gib(self) -> float:
        return self.peak_pss / 2**20


def kill_tree(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``process`` and everything it started: SIGTERM its process group (start it with
    ``start_new_session=True``) and every descendant found under it, then SIGKILL what lingers."""
    pids = [p for p in tree_pids(process.pid) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
        if not pids and process.poll() is not None:
            return


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for Flower processes: quiet logs and this venv's bin dir first on PATH."""
    path = os.pathsep.join([str(VENV_PYTHON.parent), os.environ.get("PATH", "")])
    return os.environ | QUIET_ENV | {"PATH": path} | extra


def command_line() -> str:
    """The command that ran this script, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    return " ".join([".venv/bin/python", script_text, *map(shlex.quote, sys.argv[1:])])


# ----------------------------------------------------------------------------- results.md


def _marker(name: str, end: bool = False) -> str:
    return f"<!-- {name}:{'end' if end else 'start'} -->"


def _skeleton() -> str:
    parts = [HEADER]
    for name, title in SECTIONS.items():
        body = PRIVACY_UTILITY if name == "privacy_utility" else "Not measured yet."
        parts.append(f"{_marker(name)}\n## {title}\n\n{body}\n{_marker(name, end=True)}\n")
    return "\n".join(parts)


def _edit_results(edit) -> None:
    """Rewrite results.md as ``edit(old text)`` under an exclusive lock (benchmarks may run at once)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            text = edit(handle.read())
            handle.seek(0)
            handle.truncate()
            handle.write(text)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _with_section(text: str, name: str, body: str) -> str:
    text = text or _skeleton()
    # Sections missing from an older file are added in their place (before the next one present).
    for missing in [n for n in SECTIONS if _marker(n) not in text]:
        block = f"{_marker(missing)}\n## {SECTIONS[missing]}\n\nNot measured yet.\n{_marker(missing, end=True)}\n"
        later = [n for n in list(SECTIONS)[list(SECTIONS).index(missing) + 1:] if _marker(n) in text]
        if later:
            at = text.index(_marker(later[0]))
            text = text[:at] + block + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block
    start = text.index(_marker(name))
    end = text.index(_marker(name, end=True)) + len(_marker(name, end=True))
    return text[:start] + f"{_marker(name)}\n## {SECTIONS[name]}\n\n{body.strip()}\n{_marker(name, end=True)}" + text[end:]


def write_section(name: str, body: str) -> None:
    """Replace section ``name`` of results.md with its heading and ``body`` (others untouched)."""
    assert name in SECTIONS, name
    _edit_results(lambda text: _with_section(text, name, body))
    print(f"Wrote section '{name}' of {RESULTS}", flush=True)


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- profiles


def pyspy_summary(raw_path: str | os.PathLike, rate: int, top: int = 6) -> list[dict]:
    """Summarise a ``py-spy record --subprocesses --format raw`` profile, process by process.

    For each process: its sampled (on-CPU, py-spy's default excludes idle threads) seconds, the
    seconds spent importing each top-level package (stacks inside a module's top-level code,
    attributed to the INNERMOST module being executed, so torch's own import counts as torch
    whoever imports it), and the seconds spent running each package otherwise (the package of
    the innermost frame).
    """
    processes: dict[str, dict] = {}
    for line in Path(raw_path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        label = "?"
        while frames and frames[0].startswith("process "):
            label = frames.pop(0)  # the innermost process label wins (py-spy nests parents)
        name = _process_name(label)
        info = processes.setdefault(name, {"process": name, "samples": 0, "imports": {}, "running": {}, "pids": set()})
        info["samples"] += int(count)
        info["pids"].add(label.split(":")[0])
        imported = None
        for frame in reversed(frames[1:]):  # frames[0] is the process's own script (or -c string)
            if frame.startswith("<module> ("):
                package = _frame_package(frame)
                if package and package not in ("<string>", "__main__"):
                    imported = package  # the innermost module being executed: its package's own import cost
                    break
        if imported:
            info["imports"][imported] = info["imports"].get(imported, 0) + int(count)
        elif frames:
            package = _frame_package(frames[-1]) or "?"
            info["running"][package] = info["running"].get(package, 0) + int(count)
    summary = []
    for info in sorted(processes.values(), key=lambda i: -i["samples"]):
        summary.append({
            "process": info["process"], "count": len(info["pids"]), "seconds": info["samples"] / rate,
            "import_seconds": sum(info["imports"].values()) / rate,
            "imports": [(k, v / rate) for k, v in sorted(info["imports"].items(), key=lambda kv: -kv[1])[:top]],
            "running": [(k, v / rate) for k, v in sorted(info["running"].items(), key=lambda kv: -kv[1])[:top]],
        })
    return summary


def _process_name(label: str) -> str:
    """'process 123:"/venv/bin/python3 /venv/bin/flwr-simulation --x"' -> 'flwr-simulation'."""
    if ":" not in label:
        return label
    command = label.split(":", 1)[1].strip('"').split()
    if not command:
        return "ray worker (renamed ray::ClientAppActor)"  # Ray rewrites its workers' command line
    words = [Path(w).name for w in command]
    if words[0].startswith("python"):
        rest = words[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
            rest = rest[1:]  # interpreter flags such as -u
        if not rest:
            return words[0]
        if rest[0] == "-m" and len(rest) > 1:
            return rest[1]
        if rest[0] == "-c":
            return "python -c"
        return "ray worker" if rest[0] == "default_worker.py" else rest[0]
    return words[0]


def _frame_package(frame: str) -> str:
    """'f (torch/nn/modules/module.py:12)' -> 'torch'; absolute paths keep their last folder."""
    if "(" not in frame:
        return ""
    location = frame.rsplit("(", 1)[1].split(":")[0]
    if location.startswith("<"):
        return location
    parts = Path(location).parts
    if location.startswith("/"):
        for marker in ("site-packages", "lib"):
            if marker in parts:
                rest = parts[parts.index(marker) + 1:]
                if marker == "lib" and rest and rest[0].startswith("python"):
                    return "stdlib:" + (rest[1] if len(rest) > 1 else rest[0]).removesuffix(".py")
                if rest:
                    return rest[0].removesuffix(".py")
        return parts[-2] if len(parts) > 1 else location
    return parts[0].removesuffix(".py") if len(parts) > 1 else "stdlib:" + parts[0].removesuffix(".py")


def pyspy_table(summary: list[dict], min_seconds: float = 0.5) -> str:
    rows = []
    for item in summary:
        if item["seconds"] < min_seconds:
            continue
        rows.append([
            item["process"] + (f" (x{item['count']})" if item["count"] > 1 else ""), f"{item['seconds']:.1f}",
            f"{item['import_seconds']:.1f}: " + ", ".join(f"{k} {v:.1f}" for k, v in item["imports"]),
            ", ".join(f"{k} {v:.1f}" for k, v in item["running"]),
        ])
    return table(["process", "on-CPU s (sampled)", "importing s: by package (its own module code)", "running s: by innermost package"], rows)


def update_notes(name: str, notes: str) -> None:
    """Replace (or add) the analysis notes at the end of section ``name`` without re-measuring:
    the block between ``<!-- name-notes:start -->`` and ``<!-- name-notes:end -->``."""
    start_mark, end_mark = f"<!-- {name}-notes:start -->", f"<!-- {name}-notes:end -->"
    block = f"{start_mark}\n{notes.strip()}\n{end_mark}"

    def edit(text: str) -> str:
        if start_mark in text:
            s, e = text.index(start_mark), text.index(end_mark) + len(end_mark)
            return text[:s] + block + text[e:]
        end = text.index(_marker(name, end=True))
        return text[:end].rstrip("\n") + "\n\n" + block + "\n" + text[end:]

    _edit_results(edit)
    print(f"Updated the notes of section '{name}' in {RESULTS}", flush=True)
