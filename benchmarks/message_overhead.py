#!/usr/bin/env python3
"""Benchmark 2: the time a deployment spends per message outside training, next to its floor.

A real deployment on loopback: ``flower-superlink --insecure`` plus two ``flower-supernode``s
(partition 0 and 1 of 2), the app submitted with ``flwr run`` through a private FLWR_HOME
connection. One client is sampled per round (``clients-per-round=1``) and federated evaluation is
off, so every round is exactly one train message; digits, ``mlp``, the app's defaults otherwise.
In deployment Flower starts a fresh ``flwr-clientapp`` process for every message.

Per message (rounds 2..n; round 1 also carries the one-off identity query to both clients):

* ``round``: the round's ``seconds`` from metrics.json (push, wait, reply, aggregate, central eval);
* ``clientapp``: the lifetime of the message's ``flwr-clientapp`` process (sampled from /proc every
  50 ms): interpreter start, imports, loading the app and data, training, replying;
* ``train``: the training alone: ``train_locally`` on that client's partition with the same config
  and seed, timed in this process (median of 5), plus the central evaluation (median of 5);
* overhead outside training = ``round - train - central eval``; of it, ``clientapp - train`` is
  spent in the ClientApp process, the rest in Flower's polling (SuperNode pulls every 3 s when
  idle, SuperExec looks for tasks every 1 s, the ServerApp pulls replies every 3 s).

Floor, measured the same way (a fresh process, wall time, median of 5): ``python -c "import flwr,
torch"``, ``import torch`` alone, an empty interpreter, and ``import client_app.app`` (the app's own
import, from the repository). Every process started here is stopped at the end (process groups).

    .venv/bin/python benchmarks/message_overhead.py
    .venv/bin/python benchmarks/message_overhead.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


sys.path.insert(1, str(REPO_ROOT / "scripts" / "deploy"))
import benchlib as bench  # noqa: E402  (benchmarks/benchlib.py: this folder is on sys.path)
import flwr_cli  # noqa: E402

NUM_NODES = 2
# As the README and docker-compose.yml run SuperNodes: their SuperExec looks for new ClientApp
# tasks every 0.1 s instead of Flower's default 1 s.
SUPERNODE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config_text(rounds: int, output_dir: Path) -> str:
    return (f'output-dir="{output_dir}" dataset="digits" model="mlp" num-server-rounds={rounds} '
            f"clients-per-round=1 fraction-evaluate=0.0 min-available-clients={NUM_NODES}")


# ----------------------------------------------------------------------------- floors


def time_command(args: list[str], repeats: int, cwd: Path) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.monotonic()
        subprocess.run(args, cwd=cwd, env=bench.bench_env(), check=True, capture_output=True)
        times.append(time.monotonic() - t)
    return times


def import_breakdown(cwd: Path) -> list[tuple[str, float]]:
    """Where `import client_app.app` spends its time: the SELF import time (-X importtime, one run)
    summed by top-level package (torch, flwr, opacus, sklearn, ...); the sums add up to the total."""
    out = subprocess.run([str(bench.VENV_PYTHON), "-X", "importtime", "-c", "import client_app.app"],
                         cwd=cwd, env=bench.bench_env(), capture_output=True, text=True, check=True)
    totals: dict[str, float] = {}
    for line in out.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if match:
            top = match.group(3).split(".")[0]
            totals[top] = totals.get(top, 0.0) + int(match.group(1)) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])


# ----------------------------------------------------------------------------- training time


def training_seconds(rounds: int, repeats: int = 5) -> dict:
    """Per partition, the training one message does (and the server's central evaluation)."""
    import tomllib
    import zlib

    import torch

    from client_app.training import train_locally
    from common.config import NodeConfig, RunConfig
    from common.data.client_data import central_test_set, load_client_data
    from common.evaluation import evaluate
    from common.models import build_model

    torch.set_num_threads(1)  # as the ClientApp
    defaults = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    overrides = tomllib.loads("\n".join(run_config_text(rounds, Path("/tmp")).split(" ")))
    config = RunConfig.from_run_config(defaults | overrides)
    test = central_test_set(config)
    result = {}
    for pid in range(NUM_NODES):
        node = NodeConfig.from_node_config({"partition-id": pid, "num-partitions": NUM_NODES})
        data = load_client_data(config, node, test.num_features, test.num_classes)
        times = []
        for r in range(repeats):
            model = build_model(config.model, test.num_features, test.num_classes, seed=config.seed)
            seed = zlib.crc32(f"{config.seed}|{r + 2}|{pid}|".encode())
            torch.manual_seed(seed)
            t = time.perf_counter()
            train_locally(model, data.x_train, data.y_train, config, 0.0, seed)
            times.append(time.perf_counter() - t)
        result[f"train_{pid}"] = bench.median(times)
    model = build_model(config.model, test.num_features, test.num_classes, seed=config.seed)
    evals = []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate(model, test.x, test.y)
        evals.append(time.perf_counter() - t)
    result["central_eval"] = bench.median(evals)
    return result


# ----------------------------------------------------------------------------- the deployment


class Stamped:
    """A child process whose output lines are timestamped into a log file."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path, started: float):
        self.name, self.started = name, started
        self.log_path = log_dir / f"{name}.log"
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                now = time.monotonic() - self.started
                self.lines.append((now, line.rstrip()))
                log.write(f"{now:8.2f} {line}")
                log.flush()


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class ClientAppWatcher:
    """Start and end (monotonic seconds) of every flwr-clientapp process under the given roots."""

    def __init__(self, roots: list[int], interval: float = 0.05):
        self.roots, self.interval = roots, interval
        self.seen: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._offset = time.monotonic() - _boottime()  # monotonic = boottime + offset

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            alive = set()
            for root in self.roots:
                for pid in bench.tree_pids(root):
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    if b"flwr-clientapp" not in cmdline or stat[0] == "Z":
                        continue
                    alive.add(pid)
                    if pid not in self.seen:
                        start = int(stat[19]) / CLK_TCK + self._offset  # field 22: starttime
                        self.seen[pid] = {"start": start, "last": now, "root": root}
                    self.seen[pid]["last"] = now
            for pid, info in self.seen.items():
                if pid not in alive and "end" not in info:
                    info["end"] = (info["last"] + now) / 2
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def lifetimes(self) -> list[dict]:
        return sorted(({"pid": p, **i, "seconds": i["end"] - i["start"]} for p, i in self.seen.items() if "end" in i),
                      key=lambda i: i["start"])


def supernode_messages(lines: list[tuple[float, str]], node: int) -> list[dict]:
    """Per message a SuperNode handled: when it was received, its flwr-clientapp started, the reply
    was ready (``Sending``) and sent (seconds since the benchmark's start), from the SuperNode's log."""
    messages, current = [], None
    for t, line in lines:
        if (match := re.search(r"Receiving: (\w+) message", line)):
            current = {"node": node, "type": match.group(1), "received": t}
            messages.append(current)
        elif current is None:
            continue
        elif "Start `flwr-clientapp` process" in line:
            current.setdefault("app_start", t)
        elif "Sending:" in line:
            current.setdefault("sending", t)
        elif "Sent successfully" in line:
            current.setdefault("sent", t)
    return messages


def run_deployment(rounds: int, workdir: Path, timeout: float, profile: Path | None = None) -> dict:
    home = workdir / "flwr-home"
    home.mkdir()
    port = free_port()
    flwr_cli.write_connection(home, "loopback", f"127.0.0.1:{port}", insecure=True)
    env = bench.bench_env(FLWR_HOME=str(home))
    venv_bin = bench.VENV_PYTHON.parent
    started = time.monotonic()
    processes: list[Stamped] = []
    output_dir = workdir / "run"
    try:
        processes.append(Stamped("superlink", [
            str(venv_bin / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(workdir / "superlink.db"),
        ], env, workdir, started))
        for i in range(NUM_NODES):
            # With a profile, SuperNode 0 and everything it starts (its flwr-clientapp processes) run under py-spy.
            spy = [str(venv_bin / "py-spy"), "record", "--subprocesses", "--format", "raw", "--rate", "50",
                   "--output", str(profile), "--"] if profile and i == 0 else []
            processes.append(Stamped(f"supernode-{i}", spy + [
                str(venv_bin / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={NUM_NODES}",
            ], env | SUPERNODE_ENV, workdir, started))
        flwr_cli.wait_for_nodes("loopback", env, NUM_NODES, timeout=120)
        ready = time.monotonic() - started
        with ClientAppWatcher([p.process.pid for p in processes[1:]]) as watcher:
            submitted = time.monotonic()
            run_id = flwr_cli.submit(str(REPO_ROOT), "loopback", env, run_config_text(rounds, output_dir))
            status = flwr_cli.wait_for_run("loopback", run_id, env, timeout=timeout, poll=1.0)
            run_wall = time.monotonic() - submitted
            time.sleep(0.5)
        rows = json.loads((output_dir / "metrics.json").read_text()) if (output_dir / "metrics.json").exists() else []
        apps = [a | {"start": a["start"] - started, "end": a["end"] - started} for a in watcher.lifetimes()]
        messages = []
        for stamped in processes[1:]:
            messages += supernode_messages(stamped.lines, stamped.process.pid)
        for message in messages:  # the flwr-clientapp process that served it (by overlap in time)
            overlapping = [a for a in apps if a["root"] == message["node"] and a["start"] <= message.get("sending", 1e9)
                           and a["end"] >= message.get("app_start", -1e9)]
            if overlapping:
                message["proc_start"], message["proc_end"] = overlapping[0]["start"], overlapping[0]["end"]
        result = {"status": status, "ready": ready, "run_wall": run_wall, "node0": processes[1].process.pid,
                  "round_seconds": [float(r["seconds"]) for r in rows], "clientapps": apps,
                  "messages": sorted(messages, key=lambda m: m.get("received", 0)), "logs": str(workdir)}
        (workdir / "deployment.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        if profile and len(processes) > 1:  # py-spy writes its profile when interrupted (SIGINT), not on SIGTERM
            spy = processes[1].process
            try:
                os.kill(spy.pid, signal.SIGINT)
                spy.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for stamped in reversed(processes):
            bench.kill_tree(stamped.process)
        leftovers = [p for s in processes for p in bench.tree_pids(s.process.pid) if bench._alive(p)]
        if leftovers:
            print(f"WARNING: processes still alive after cleanup: {leftovers}", file=sys.stderr)


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="floor measurements")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--notes", default="", help="a file whose text is appended to the section")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, one more deployment with SuperNode 0 under py-spy: profile its ClientApp processes")
    parser.add_argument("--notes-only", metavar="FILE",
                        help="only replace the analysis notes of this section in results.md with FILE (no measurement)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--training", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.notes_only:
        bench.update_notes("message_overhead", Path(args.notes_only).read_text())
        return 0
    if args.training:  # child: training time in a fresh process
        Path(args.training).write_text(json.dumps(training_seconds(args.rounds)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="message-overhead-"))
    print(f"Working in {workdir}", flush=True)
    py = str(bench.VENV_PYTHON)

    load_floor = bench.wait_for_quiet(args.max_load, args.max_wait)
    time_command([py, "-c", "import flwr, torch"], 1, Path("/tmp"))  # warm the page cache once
    floors = {
        "empty interpreter (`python -c pass`)": time_command([py, "-c", "pass"], args.repeats, Path("/tmp")),
        "`python -c \"import torch\"`": time_command([py, "-c", "import torch"], args.repeats, Path("/tmp")),
        "`python -c \"import flwr, torch\"` (the floor)": time_command([py, "-c", "import flwr, torch"], args.repeats, Path("/tmp")),
        "`python -c \"import client_app.app\"` (the app's imports)": time_command(
            [py, "-c", "import client_app.app"], args.repeats, REPO_ROOT),
    }
    load_floor_after = bench.load1()
    breakdown = import_breakdown(REPO_ROOT)
    floor = bench.median(floors["`python -c \"import flwr, torch\"` (the floor)"])
    for name, times in floors.items():
        print(f"{name}: median {bench.median(times):.2f}s of {['%.2f' % t for t in times]}", flush=True)

    subprocess.run([py, __file__, "--training", str(workdir / "training.json"), "--rounds", str(args.rounds)],
                   cwd=REPO_ROOT, env=bench.bench_env(), check=True)
    training = json.loads((workdir / "training.json").read_text())
    print(f"training per message: {training}", flush=True)

    load_run = bench.wait_for_quiet(args.max_load, args.max_wait)
    result = run_deployment(args.rounds, workdir, args.timeout)
    load_run_after = bench.load1()
    print(f"deployment: {result['status']}, rounds {result['round_seconds']}, "
          f"clientapps {[round(c['seconds'], 2) for c in result['clientapps']]}", flush=True)

    train = max(training["train_0"], training["train_1"])  # the sampled client is either; bound by the slower
    central = training["central_eval"]
    nan = float("nan")
    train_messages = [m for m in result["messages"] if m["type"] == "train"]  # one per round, in order
    rows, overhead, in_app, polling = [], [], [], []
    for i, s in enumerate(result["round_seconds"], 1):
        m = train_messages[i - 1] if i - 1 < len(train_messages) else {}
        spawn = m.get("proc_start", nan) - m.get("received", nan)
        work = m.get("sending", nan) - m.get("proc_start", nan)
        upload = m.get("sent", nan) - m.get("sending", nan)
        linger = m.get("proc_end", nan) - m.get("sent", nan)
        rest = s - central - spawn - work - upload
        rows.append([i, f"{s:.2f}", f"{spawn:.2f}", f"{work:.2f}", f"{train:.3f}", f"{work - train:.2f}",
                     f"{upload:.2f}", f"{rest:.2f}", f"{s - train - central:.2f}", f"{linger:.2f}",
                     "identity query (both) + train" if i == 1 else "train"])
        if i > 1:
            overhead.append(s - train - central)
            in_app.append(work - train)
            polling.append(s - central - work)
    med_overhead, med_in_app, med_polling = bench.median(overhead), bench.median(in_app), bench.median(polling)
    goal = floor + 0.5

    floor_rows = [[name, f"{bench.median(t):.2f}", " / ".join(f"{x:.2f}" for x in t)] for name, t in floors.items()]
    total_import = sum(sec for _, sec in breakdown)
    imports = ", ".join(f"{name} {sec:.2f}" for name, sec in breakdown[:10])
    verdict = (f"Overhead per message outside training: median **{med_overhead:.2f} s** (rounds 2..{args.rounds}): "
               f"{med_in_app:.2f} s inside the ClientApp process (process start, imports, app and data loading, "
               f"reply; the SuperNode checks for the reply every 0.5 s) and {med_polling:.2f} s outside it (delivery, "
               f"task pick-up, Flower's polling). Floor (`import flwr, torch`) {floor:.2f} s; goal <= floor + 0.5 = "
               f"{goal:.2f} s: " + ("met." if med_overhead <= goal else f"missed by {med_overhead - goal:.2f} s; "
               f"the ClientApp process alone is {med_in_app:.2f} s, "
               + ("within the goal." if med_in_app <= goal else f"{med_in_app - goal:.2f} s over it."))
               )
    notes = Path(args.notes).read_text() if args.notes else ""
    if args.profile:
        raw = workdir / "profile.txt"
        profile_dir = workdir / "profiled"
        profile_dir.mkdir()
        load = bench.wait_for_quiet(args.max_load, args.max_wait)
        profiled = run_deployment(args.rounds, profile_dir, args.timeout, profile=raw)
        time.sleep(2)
        apps = [p for p in bench.pyspy_summary(raw, 50) if p["process"] == "flwr-clientapp"] if raw.exists() else []
        served = len([m for m in profiled["messages"] if m["node"] == profiled.get("node0")]) or "?"
        notes += f"""
Profile: one more deployment ({profiled['status']}) with SuperNode 0 and the flwr-clientapp processes it
starts under `py-spy record --subprocesses --rate 50` (on-CPU samples), load {load:.1f} / {bench.load1():.1f}.
The flwr-clientapp processes of SuperNode 0, summed over the messages it served ({served}):

{bench.pyspy_table(apps, 0.0)}

Raw profile: `{raw}`.
"""
    text = f"""{bench.machine()}

Loopback deployment: `flower-superlink --insecure` + {NUM_NODES} `flower-supernode`s (partition i of {NUM_NODES}),
digits, `mlp`, `clients-per-round=1` (one train message per round), `fraction-evaluate=0`, the app's
defaults otherwise (5 local epochs, batch 16), {args.rounds} rounds, submitted with `flwr run` through a
private FLWR_HOME. Training per message ({train * 1e3:.0f} ms, the slower partition) and the central
evaluation ({central * 1e3:.0f} ms) are timed in-process with the same code and config. Floors: wall
time of a fresh process, median of {args.repeats} (load {load_floor:.1f} / {load_floor_after:.1f}).
Deployment load {load_run:.1f} / {load_run_after:.1f}; nodes online {result['ready']:.1f} s after start;
run status `{result['status']}`, {result['run_wall']:.1f} s from submission to finished.

```bash
{bench.command_line()}
```

{bench.table(["floor", "median s", "runs s"], floor_rows)}

Where `import client_app.app` spends its time (self import time summed by top-level package, s,
`-X importtime`, one run, total {total_import:.2f} s): {imports}.

Per round: `received`, `reply ready` (`Sending`) and `sent` from the SuperNode's log, the
flwr-clientapp process's start and exit from /proc (sampled every 50 ms); `rest` = the round minus
all of these and the central evaluation: the ServerApp's push, the SuperNode's pull wait and the
ServerApp's reply pull wait.

{bench.table(["round", "round s (metrics.json)", "received -> flwr-clientapp process started s",
              "process started -> reply ready s", "of it training s", "of it outside training s",
              "reply upload s", "rest (polling) s", "overhead outside training s",
              "process exits after the reply s", "messages"], rows)}

{verdict}

The part outside the ClientApp process is Flower's polling, fixed in Flower 1.41 and not
configurable from the app: the SuperNode sleeps 3 s between pulls when it has no message
(`flwr/supernode/start_client_internal.py`), the SuperExec looks for tasks every 1 s
(`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`), the ServerApp's grid sleeps 3 s between reply pulls
(`flwr/superlink/grid/http_grid.py`); on average ~1.5 + 0.5 + 1.5 s per round.

{notes}
"""
    print(text)
    if not args.no_write:
        bench.write_section("message_overhead", text)
    return 0 if result["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
