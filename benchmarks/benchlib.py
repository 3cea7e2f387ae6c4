"""What the benchmark scripts share: the machine and its load, process trees, one whole run, results files.

Scripts run as ``.venv/bin/python benchmarks/<name>.py``: Python puts the script's folder first on
``sys.path``, so ``import benchlib`` finds this file; the app's packages come from the editable install.
:func:`write_section` rewrites ONE section of a results file in one locked read-modify-write, so
scripts can run in any order and at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from fl_dp.run_config import to_flwr
from fl_dp.simulate import QUIET_ENV

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results.md"

# The headings of the sections of results.md that scripts write.
SECTIONS = {
    "sim_overhead": "1. Simulation overhead (`benchmarks/sim_overhead.py`)",
    "message_overhead": "2. Deployment message overhead (`benchmarks/message_overhead.py`)",
    "scale": "3. Scale (`benchmarks/scale.py`)",
    "dpsgd_cost": "4. DP-SGD cost (`benchmarks/dpsgd_cost.py`)",
}


def machine() -> str:
    """One sentence: CPU, cores, memory, system and the versions that matter."""
    cpu = next((line.split(":", 1)[1].strip() for line in _proc("cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    mem = next((int(line.split()[1]) / 2**20 for line in _proc("meminfo") if line.startswith("MemTotal:")), float("nan"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(f"{name} {version(name)}" for name in ("torch", "flwr", "opacus", "ray"))
    return (f"Machine: {cpu}, {cores} cores usable ({os.cpu_count()} online), {mem:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}, {versions}.")


def _proc(name: str) -> list[str]:
    try:
        return Path("/proc", name).read_text().splitlines()
    except OSError:
        return []


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float = 2.5, max_wait: float = 600.0, poll: float = 20.0, quiet: bool = False) -> float:
    """Wait until the 1-minute load is <= ``threshold``, at most ``max_wait`` s (then measure anyway); return it."""
    deadline = time.monotonic() + max_wait
    while (load := load1()) > threshold and time.monotonic() < deadline:
        if not quiet:
            print(f"  load {load:.2f} > {threshold}: waiting (up to {deadline - time.monotonic():.0f}s more)", flush=True)
        time.sleep(poll)
    return load1()


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def tree_pids(root: int) -> list[int]:
    """``root`` and every process descended from it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:  # the command may hold spaces or ')': the parent pid follows the LAST ')'
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        found.append(pid := todo.pop())
        todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``process`` (started with ``start_new_session=True``) and every descendant: SIGTERM, then SIGKILL."""
    pids = [p for p in tree_pids(process.pid) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill, target in [(os.killpg, process.pid)] + [(os.kill, pid) for pid in pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(target, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (process.poll() is None or any(alive(p) for p in pids)):
            time.sleep(0.2)
        if process.poll() is not None and not any(alive(p) for p in pids):
            return


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for Flower processes: quiet logs and this interpreter's bin dir first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return os.environ | QUIET_ENV | {"PATH": path} | extra


def command_line() -> str:
    """The command that ran this script, as typed from the repository root (without where it wrote)."""
    args = " ".join(map(shell_quote, sys.argv[1:]))
    args = re.sub(r" ?--(output-dir|results)[ =]\S+", "", args)
    return f".venv/bin/python benchmarks/{Path(sys.argv[0]).name} {args}".strip()


def shell_quote(arg: str) -> str:
    """``arg`` for a shell; a run config with single quotes goes in double quotes, if that is safe."""
    return f'"{arg}"' if "'" in arg and not set(arg) & set('"$`\\!') else shlex.quote(arg)


def simulate(num_clients: int, overrides: dict[str, Any], output_dir: Path,
             on_line: Callable[[float, str], None] | None = None, timeout: float | None = None,
             memory: bool = False, cpus_per_client: int | None = None) -> dict[str, Any]:
    """One run through ``fl-dp simulate`` (``python -m fl_dp simulate``), timed from launch to exit; every output
    line goes to ``<output_dir>.log`` and ``on_line(seconds since launch, line)``. Returns the wall time, exit code,
    metrics.json rows, summary.json, the load before and after, the command as typed, and with ``memory`` the
    process tree's peak memory. After ``timeout`` s the tree is stopped."""
    output_dir = Path(output_dir)
    extra = ["--cpus-per-client", str(cpus_per_client)] if cpus_per_client else []
    args = ["simulate", "--num-clients", str(num_clients), *extra, "--run-config", to_flwr(overrides)]
    log = output_dir.parent / f"{output_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"load_before": load1(), "log": str(log),
                              "command": " ".join([".venv/bin/fl-dp", *map(shell_quote, args)])}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "fl_dp", *args, "--output-dir", str(output_dir)], cwd=REPO,
                               env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    peak, done = {"Rss:": 0, "Pss:": 0, "processes": 0}, threading.Event()

    def sample_memory() -> None:  # the whole tree every 0.5 s: summed RSS (shared pages once per process), PSS (split)
        while not done.wait(0.5):
            pids, sizes = tree_pids(process.pid), {"Rss:": 0, "Pss:": 0}
            for line in (line for pid in pids for line in _proc(f"{pid}/smaps_rollup")):
                if line[:4] in sizes:
                    sizes[line[:4]] += int(line.split()[1])
            peak.update({k: max(v, len(pids) if k == "processes" else sizes[k]) for k, v in peak.items()})

    watchdog, sampler = threading.Timer(timeout or 1e9, kill_tree, [process]), threading.Thread(target=sample_memory)
    for thread in [watchdog, sampler] if memory else [watchdog]:
        thread.start()
    try:
        with open(log, "w") as handle:
            for line in process.stdout:
                handle.write(f"{(now := time.monotonic() - started):8.2f} {line}")
                handle.flush()
                if on_line:
                    on_line(now, line)
            process.wait()
    finally:
        watchdog.cancel()
        done.set()
        if process.poll() is None:
            kill_tree(process)
        if memory:
            sampler.join()
    wall = time.monotonic() - started
    metrics = read_json(output_dir / "metrics.json", [])
    return result | {
        "wall": wall, "returncode": process.returncode, "timed_out": bool(timeout and wall >= timeout),
        "metrics": metrics, "round_seconds": [float(row["seconds"]) for row in metrics],
        "summary": read_json(output_dir / "summary.json", {}), "load_after": load1(),
        "peak_rss_gib": peak["Rss:"] / 2**20, "peak_pss_gib": peak["Pss:"] / 2**20, "peak_processes": peak["processes"],
    }


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str | None, notes: str | None = None, path: Path = RESULTS) -> None:
    """Rewrite section ``name`` of ``path`` (between ``<!-- name:start -->`` and ``<!-- name:end -->``).

    ``body`` replaces what was measured (in results.md after the heading from SECTIONS; elsewhere the
    body brings its own); ``notes`` replaces the notes block (``<!-- name-notes:start/end -->``: the
    analysis, written by hand). None keeps the old one: notes survive a re-measurement. A section
    not in the file yet is appended. The file is locked from the read to the write.
    """
    start, end = _markers(name)
    notes_start, notes_end = _markers(f"{name}-notes")

    def edit(text: str) -> str:
        text = text or ("# Performance benchmarks\n" if path == RESULTS else "")
        found = start in text and end in text
        if body is None and not found:
            raise SystemExit(f"{path} has no section '{name}' to add notes to")
        old = text[text.index(start) + len(start):text.index(end)] if found else ""
        old_notes = old[old.index(notes_start):old.index(notes_end) + len(notes_end)] if notes_end in old else ""
        heading = f"## {SECTIONS[name]}\n\n" if path == RESULTS and name in SECTIONS else ""
        new = heading + body.strip() if body is not None else old.replace(old_notes, "").strip()
        block = f"{notes_start}\n{notes.strip()}\n{notes_end}" if notes is not None else old_notes
        section = f"{start}\n{new}\n" + (f"\n{block}\n" if block else "") + end
        if found:
            return text[:text.index(start)] + section + text[text.index(end) + len(end):]
        return text.rstrip("\n") + "\n\n" + section + "\n"

    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        handle.seek(0)
        text = edit(handle.read())
        handle.seek(0)
        handle.truncate()
        handle.write(text)
    print(f"Wrote {'section' if body is not None else 'the notes of section'} '{name}' of {path}", flush=True)


def results_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every results.md script takes: the load to wait for, notes, and not writing."""
    parser.add_argument("--max-load", type=float, default=2.5, help="wait for a 1-minute load below this")
    parser.add_argument("--max-wait", type=float, default=600.0, help="...but at most this many seconds")
    parser.add_argument("--notes-only", metavar="FILE", help="replace the section's notes with FILE; measure nothing")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results.md alone")


def notes_only(name: str, args: argparse.Namespace) -> bool:
    """With --notes-only FILE: replace the section's notes with FILE and say so (the script then stops)."""
    if args.notes_only:
        write_section(name, None, Path(args.notes_only).read_text())
    return bool(args.notes_only)


def publish(name: str, body: str, args: argparse.Namespace) -> None:
    """Print the section and (unless --no-write) write it; its notes stay."""
    print(body)
    if not args.no_write:
        write_section(name, body)
