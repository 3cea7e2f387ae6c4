#!/usr/bin/env python3
"""Benchmark 2: the time a deployment spends per message outside training, next to its floor.

A loopback deployment (``flower-superlink`` + two ``flower-supernode``s, ``flwr run`` through a
private FLWR_HOME with ``fl_dp.flwr_cli``), one train message per round; per message the
SuperNode's log and the ``flwr-clientapp`` process's lifetime (/proc) split the round into
delivery, the ClientApp process, training (``train_locally``, timed apart) and Flower's polling.
The floor is a fresh ``python -c "import flwr, torch"``.

    .venv/bin/python benchmarks/message_overhead.py
    .venv/bin/python benchmarks/message_overhead.py --rounds 2 --repeats 1 --no-write   # a check

``--warm-compare`` instead measures the warm launcher (``fl_dp/warm_client.py``, SuperNodes with
``--isolation process``) against Flower's default isolation: deployments A (default) and B (warm)
alternately, A B A B (``--pairs``), each the same run; per-round times from metrics.json, ratios
B/A within each pair, final accuracy and epsilons side by side (section "warm_client")::

    .venv/bin/python benchmarks/message_overhead.py --warm-compare --rounds 6 --pairs 2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib as bench

from fl_dp import flwr_cli
from fl_dp.run_config import to_flwr
from fl_dp.simulate import FAST_POLL_ENV, flwr_bin, free_port

NUM_NODES = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")
FLOOR = '`python -c "import flwr, torch"` (the floor)'
OUTSIDE = Path(tempfile.gettempdir())  # a working directory outside the repository


def overrides(rounds: int) -> dict:
    return {"dataset": "digits", "model": "mlp", "num-server-rounds": rounds, "clients-per-round": 1,
            "fraction-evaluate": 0.0, "min-available-clients": NUM_NODES}


def time_command(code: str, repeats: int, cwd: Path) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=cwd, env=bench.bench_env(), check=True, capture_output=True)
        times.append(time.monotonic() - started)
    return times


def training_seconds(rounds: int, repeats: int = 5) -> dict:
    """Per partition, the training one message does (``train_locally``), and the server's central evaluation."""
    import torch

    from client_app.training import train_locally
    from common.config import NodeConfig
    from common.data.client_data import central_test_set, load_client_data
    from common.evaluation import evaluate
    from common.models import build_model
    from fl_dp.run_config import validate

    torch.set_num_threads(1)  # as the ClientApp
    config = validate(overrides(rounds))
    test = central_test_set(config)
    nf, nc = test.num_features, test.num_classes

    def timed(call) -> float:
        times = []
        for r in range(repeats):
            model = build_model(config.model, nf, nc, seed=config.seed)
            started = time.perf_counter()
            call(model, r)
            times.append(time.perf_counter() - started)
        return bench.median(times)

    result = {"central_eval": timed(lambda model, _: evaluate(model, test.x, test.y))}
    for pid in range(NUM_NODES):
        node = NodeConfig.from_node_config({"partition-id": pid, "num-partitions": NUM_NODES})
        data = load_client_data(config, node, nf, nc)
        result[f"train_{pid}"] = timed(lambda model, r: train_locally(model, data.x_train, data.y_train, config, 0.0, r))
    return result


class Stamped:
    """A child process whose output lines are kept with their time since ``started`` (and logged)."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path, started: float):
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        threading.Thread(target=self._pump, args=(log_dir / f"{name}.log", started), daemon=True).start()

    def _pump(self, path: Path, started: float) -> None:
        with open(path, "w") as log:
            for line in self.process.stdout:
                self.lines.append((now := time.monotonic() - started, line.rstrip()))
                log.write(f"{now:8.2f} {line}")


def clientapp_lifetimes(roots: list[int], stop: threading.Event, seen: dict, interval: float = 0.05) -> None:
    """Fill ``seen[pid]`` with the start and end (monotonic s) of every flwr-clientapp process under ``roots``
    (with the warm launcher as a root: also its forked children, which keep its command line)."""
    offset = time.monotonic() - time.clock_gettime(time.CLOCK_BOOTTIME)
    while not stop.is_set():
        now, running = time.monotonic(), set()
        for root in roots:
            for pid in bench.tree_pids(root):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                clientapp = b"flwr-clientapp" in cmdline or (pid != root and b"fl_dp.warm_client" in cmdline)
                if clientapp and stat[0] != "Z":
                    running.add(pid)  # stat field 22: the process's start, in clock ticks since boot
                    seen.setdefault(pid, {"start": int(stat[19]) / CLK_TCK + offset, "root": root})["last"] = now
        for pid, info in seen.items():
            if pid not in running and "end" not in info:
                info["end"] = (info["last"] + now) / 2
        stop.wait(interval)


def train_messages(lines: list[tuple[float, str]], node: int) -> list[dict]:
    """Per train message a SuperNode handled: received, flwr-clientapp started, reply ready (``Sending``), sent."""
    messages, current = [], None
    for t, line in lines:
        if match := re.search(r"Receiving: (\w+) message", line):
            current = {"node": node, "type": match.group(1), "received": t}
            messages.append(current)
        elif current is not None:
            for key, text in (("app_start", "Start `flwr-clientapp` process"), ("sending", "Sending:"),
                              ("sent", "Sent successfully")):
                if text in line:
                    current.setdefault(key, t)
    return [m for m in messages if m["type"] == "train"]


def run_deployment(rounds: int, workdir: Path, timeout: float, warm: bool = False, extra: dict | None = None,
                   node_config: str = "") -> dict:
    """One run on a fresh loopback deployment; ``warm``: SuperNodes with ``--isolation process``, each
    served by a warm launcher (``python -m fl_dp.warm_client``) instead of Flower's SuperExec."""
    workdir.mkdir(parents=True, exist_ok=True)
    home, port, output_dir = workdir / "flwr-home", free_port(), workdir / "run"
    flwr_cli.write_connection(home, "loopback", f"127.0.0.1:{port}", insecure=True)
    env = bench.bench_env(FLWR_HOME=str(home))
    started = time.monotonic()
    processes: list[Stamped] = []
    try:
        processes.append(Stamped("superlink", [
            flwr_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(workdir / "superlink.db")],
            env, workdir, started))
        launchers: dict[int, Stamped] = {}  # SuperNode pid -> its warm launcher
        for i in range(NUM_NODES):
            runtime_port = free_port()
            processes.append(Stamped(f"supernode-{i}", [
                flwr_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(runtime_port), "--node-config",
                f"partition-id={i} num-partitions={NUM_NODES} {node_config}".strip()]
                + (["--isolation", "process"] if warm else []),
                env | FAST_POLL_ENV, workdir, started))  # polling every 0.1 s, as the README runs them
            if warm:
                launchers[processes[-1].process.pid] = Stamped(f"warm-client-{i}", [
                    sys.executable, "-m", "fl_dp.warm_client", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
                    "--insecure"], env | FAST_POLL_ENV, workdir, started)
        nodes = processes[1:]
        processes.extend(launchers.values())
        flwr_cli.wait_for_nodes("loopback", env, NUM_NODES, timeout=120)
        ready = time.monotonic() - started
        seen: dict[int, dict] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=clientapp_lifetimes, args=([p.process.pid for p in processes[1:]], stop, seen))
        owner = {launcher.process.pid: node for node, launcher in launchers.items()}  # a launcher's apps: its node's
        watcher.start()
        try:
            submitted = time.monotonic()
            config = to_flwr(overrides(rounds) | (extra or {}) | {"output-dir": str(output_dir)})
            run_id = flwr_cli.submit(str(bench.REPO), "loopback", env, config)
            status = flwr_cli.wait_for_run("loopback", run_id, env, timeout=timeout, poll=1.0)
            run_wall = time.monotonic() - submitted
            time.sleep(0.5)
        finally:
            stop.set()
            watcher.join()
        apps = [i | {"start": i["start"] - started, "end": i["end"] - started, "root": owner.get(i["root"], i["root"])}
                for i in seen.values() if "end" in i]
        messages = sorted((m for p in nodes for m in train_messages(
            sorted(p.lines + (launchers[p.process.pid].lines if p.process.pid in launchers else [])), p.process.pid)),
            key=lambda m: m["received"])
        for m in messages:  # the flwr-clientapp process that served it (by overlap in time)
            served = [a for a in apps if a["root"] == m["node"] and a["start"] <= m.get("sending", 1e9)
                      and a["end"] >= m.get("app_start", -1e9)]
            if served:
                m["proc_start"], m["proc_end"] = served[0]["start"], served[0]["end"]
        metrics = bench.read_json(output_dir / "metrics.json", [])
        served = {"warm": sum("served warm in forked process" in line for p in launchers.values() for _, line in p.lines),
                  "cold": sum("runs in a fresh flwr-clientapp process" in line
                              for p in launchers.values() for _, line in p.lines)}
        return {"status": status, "ready": ready, "run_wall": run_wall, "messages": messages, "metrics": metrics,
                "round_seconds": [float(r["seconds"]) for r in metrics], "served": served}
    finally:
        for stamped in reversed(processes):
            bench.kill_tree(stamped.process)


def report(args, floors: dict, loads: dict, training: dict, result: dict) -> str:
    train, central, nan = max(training["train_0"], training["train_1"]), training["central_eval"], float("nan")
    rows, overhead, in_app, polling = [], [], [], []
    for i, s in enumerate(result["round_seconds"], 1):
        m = result["messages"][i - 1] if i - 1 < len(result["messages"]) else {}
        spawn = m.get("proc_start", nan) - m.get("received", nan)
        work = m.get("sending", nan) - m.get("proc_start", nan)
        upload = m.get("sent", nan) - m.get("sending", nan)
        rows.append([i, f"{s:.2f}", f"{spawn:.2f}", f"{work:.2f}", f"{train:.3f}", f"{work - train:.2f}",
                     f"{upload:.2f}", f"{s - central - spawn - work - upload:.2f}", f"{s - train - central:.2f}",
                     f"{m.get('proc_end', nan) - m.get('sent', nan):.2f}",
                     "identity query (both) + train" if i == 1 else "train"])
        if i > 1:
            overhead.append(s - train - central)
            in_app.append(work - train)
            polling.append(s - central - work)
    med, med_app, med_poll = bench.median(overhead), bench.median(in_app), bench.median(polling)
    floor = bench.median(floors[FLOOR])
    goal = floor + 0.5
    verdict = (f"Overhead per message outside training: median **{med:.2f} s** (rounds 2..{args.rounds}): "
               f"{med_app:.2f} s inside the ClientApp process (process start, imports, app and data loading, reply; "
               f"the SuperNode checks for the reply every 0.5 s) and {med_poll:.2f} s outside it (delivery, task "
               f"pick-up, Flower's polling). Floor (`import flwr, torch`) {floor:.2f} s; goal <= floor + 0.5 = "
               f"{goal:.2f} s: " + ("met." if med <= goal else f"missed by {med - goal:.2f} s; the ClientApp process "
               f"alone is {med_app:.2f} s, "
               + ("within the goal." if med_app <= goal else f"{med_app - goal:.2f} s over it.")))
    floor_rows = [[name, f"{bench.median(t):.2f}", " / ".join(f"{x:.2f}" for x in t)] for name, t in floors.items()]
    return f"""{bench.machine()}

Loopback deployment: `flower-superlink --insecure` + {NUM_NODES} `flower-supernode`s (partition i of {NUM_NODES}),
digits, `mlp`, `clients-per-round=1` (one train message per round), `fraction-evaluate=0`, the app's
defaults otherwise, {args.rounds} rounds, submitted with `flwr run` through a private FLWR_HOME. Training
per message ({train * 1e3:.0f} ms, the slower partition) and the central evaluation ({central * 1e3:.0f} ms)
are timed in-process with the same code and config. Floors: wall time of a fresh process,
median of {args.repeats} (load {loads['floor'][0]:.1f} / {loads['floor'][1]:.1f}). Deployment load
{loads['run'][0]:.1f} / {loads['run'][1]:.1f}; nodes online {result['ready']:.1f} s after start; run status
`{result['status']}`, {result['run_wall']:.1f} s from submission to finished.

```bash
{bench.command_line()}
```

{bench.table(["floor", "median s", "runs s"], floor_rows)}

Per round: `received`, `reply ready` (`Sending`) and `sent` from the SuperNode's log, the
flwr-clientapp process's start and exit from /proc (sampled every 50 ms); `rest` = the round minus
all of these and the central evaluation: the ServerApp's push, the SuperNode's pull wait and the
ServerApp's reply pull wait.

{bench.table(["round", "round s (metrics.json)", "received -> flwr-clientapp process started s",
              "process started -> reply ready s", "of it training s", "of it outside training s",
              "reply upload s", "rest (polling) s", "overhead outside training s",
              "process exits after the reply s", "messages"], rows)}

{verdict}
"""


WARM_EXTRA = {"dp": "dpsgd", "noise-multiplier": 1.0}  # DP-SGD: Opacus imported per message, epsilons reported
WARM_NODE_CONFIG = "debug-noise-key='bench'"  # the clients' DP noise reproducible, so accuracies compare exactly


def warm_compare(args) -> int:
    """A (Flower's default isolation) and B (the warm launcher), alternately, ``--pairs`` times."""
    workdir = Path(tempfile.mkdtemp(prefix="warm-compare-"))
    print(f"Working in {workdir}", flush=True)
    runs = []
    for pair in range(args.pairs):
        for warm in (False, True):
            load = bench.wait_for_quiet(args.max_load, args.max_wait)
            name = f"{'B-warm' if warm else 'A-default'}-{pair + 1}"
            result = run_deployment(args.rounds, workdir / name, args.timeout, warm=warm, extra=WARM_EXTRA,
                                    node_config=WARM_NODE_CONFIG)
            result |= {"name": name, "warm": warm, "pair": pair + 1, "load": (load, bench.load1())}
            print(f"{name}: {result['status']} rounds {result['round_seconds']} served {result['served']}", flush=True)
            runs.append(result)

    def later(r):  # rounds 2..n: round 1 also carries the identity query and every node's first message
        return bench.median(r["round_seconds"][1:]) if len(r["round_seconds"]) > 1 else float("nan")

    def last(r, key):
        value = r["metrics"][-1].get(key) if r["metrics"] else None
        return "-" if value is None else f"{value:.6g}"

    rows = [[r["name"], r["status"], " / ".join(f"{x:.2f}" for x in r["round_seconds"]), f"{later(r):.2f}",
             f"{r['run_wall']:.1f}", f"{r['served']['warm']} / {r['served']['cold']}" if r["warm"] else "-",
             last(r, "central_accuracy"), last(r, "epsilon"), last(r, "sample_epsilon_max"),
             f"{r['load'][0]:.1f} / {r['load'][1]:.1f}"] for r in runs]
    ratios = []
    for pair in range(1, args.pairs + 1):
        a, b = (next(r for r in runs if r["pair"] == pair and r["warm"] == w) for w in (False, True))
        ratios.append([pair, f"{later(b) / later(a):.2f}", f"{sum(b['round_seconds']) / sum(a['round_seconds']):.2f}",
                       f"{b['run_wall'] / a['run_wall']:.2f}",
                       "yes" if [m.get("central_accuracy") for m in a["metrics"]] == [m.get("central_accuracy") for m in b["metrics"]]
                       else "NO",
                       "yes" if [(m.get("epsilon"), m.get("sample_epsilon_max")) for m in a["metrics"]]
                       == [(m.get("epsilon"), m.get("sample_epsilon_max")) for m in b["metrics"]] else "NO"])
    median_ratio = bench.median([float(r[1]) for r in ratios])
    body = f"""## 2b. Warm ClientApp launcher vs Flower's default isolation (`benchmarks/message_overhead.py --warm-compare`)

{bench.machine()}

The loopback deployment of section 2 ({NUM_NODES} SuperNodes, digits, `mlp`, one train message per
round, SuperExec polling every 0.1 s), with `dp="dpsgd"` and `noise-multiplier=1.0` (so Opacus is
imported per message and epsilons are reported) and the clients' `debug-noise-key` (their DP noise
reproducible, so the accuracies compare exactly), {args.rounds} rounds. A: Flower's default
isolation (a fresh `flwr-clientapp` process per message). B: SuperNodes with `--isolation process`,
each served by `python -m fl_dp.warm_client` (fl_dp/warm_client.py). A and B alternate (A B A B ...);
compare within a pair. Round times from metrics.json (`seconds`); "later rounds" = median of rounds
2..n. Served warm / cold: the launchers' messages forked from their imports / sent to a fresh process.

```bash
{bench.command_line()}
```

{bench.table(["run", "status", "round s", "later rounds s (median)", "submit to finished s", "served warm / cold",
              "final central accuracy", "final epsilon", "final sample epsilon (max)", "load before / after"], rows)}

{bench.table(["pair", "B/A later rounds", "B/A sum of rounds", "B/A submit to finished", "same accuracy every round",
              "same epsilons every round"], ratios)}

Median B/A for later rounds: **{median_ratio:.2f}x** (goal <= 0.5x).
"""
    bench.publish("warm_client", body, args)
    return 0 if all(r["status"] == flwr_cli.FINISHED for r in runs) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warm-compare", action="store_true", help="A/B the warm launcher against the default")
    parser.add_argument("--pairs", type=int, default=2, help="A B pairs for --warm-compare")
    parser.add_argument("--repeats", type=int, default=5, help="floor measurements")
    parser.add_argument("--timeout", type=float, default=900.0)
    bench.results_arguments(parser)
    args = parser.parse_args()
    if bench.notes_only("warm_client" if args.warm_compare else "message_overhead", args):
        return 0
    if args.warm_compare:
        return warm_compare(args)

    workdir = Path(tempfile.mkdtemp(prefix="message-overhead-"))
    print(f"Working in {workdir}", flush=True)
    loads = {"floor": [bench.wait_for_quiet(args.max_load, args.max_wait)]}
    time_command("import flwr, torch", 1, OUTSIDE)  # warm the page cache once
    floors = {"empty interpreter (`python -c pass`)": time_command("pass", args.repeats, OUTSIDE),
              '`python -c "import torch"`': time_command("import torch", args.repeats, OUTSIDE),
              FLOOR: time_command("import flwr, torch", args.repeats, OUTSIDE),
              '`python -c "import client_app.app"` (the app\'s imports)':
                  time_command("import client_app.app", args.repeats, bench.REPO)}
    loads["floor"].append(bench.load1())
    training = training_seconds(args.rounds)
    print(f"floors {floors}\ntraining per message: {training}", flush=True)
    loads["run"] = [bench.wait_for_quiet(args.max_load, args.max_wait)]
    result = run_deployment(args.rounds, workdir, args.timeout)
    loads["run"].append(bench.load1())
    print(f"deployment: {result['status']}, rounds {result['round_seconds']}", flush=True)
    bench.publish("message_overhead", report(args, floors, loads, training, result), args)
    return 0 if result["status"] == flwr_cli.FINISHED else 1


if __name__ == "__main__":
    sys.exit(main())
