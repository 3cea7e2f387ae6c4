#!/usr/bin/env python3
"""Benchmark 3: 1,000 / 10,000 / 100,000 simulated clients on MNIST-1D: seconds per round and memory.

Each federation runs through ``scripts/simulate.py`` (the user's path: a simulation SuperLink,
``flwr run``, Flower's simulation runtime with Ray) with ``dataset="mnist1d" model="cnn1d"``,
100 clients sampled per round, ``identify-clients=false`` (no start-up query to every client),
``fraction-evaluate=0``, one local epoch, ``val-fraction=0``, ``min-available-clients=N`` (the
first round waits until the engine has registered every client). The data grows with the
federation so every client holds about ``--per-client`` (10) training examples, and the
server's held-out split is kept at ``--test-examples`` (10,000) examples for every size, so
the central evaluation costs the same in every row: ``dataset-samples = N * per-client + test``,
``test-fraction = test / dataset-samples``.

Before each run the dataset and the partition table are generated into the on-disk cache by a
separate process (timed, reported as one-off preparation). During the run the memory of the
whole process tree (simulate.py, the SuperLink, flwr-simulation, Ray and its workers) is
sampled every 0.5 s from /proc: the peak of the summed RSS (shared pages counted once per
process) and of the summed PSS (shared pages split).

    .venv/bin/python benchmarks/scale.py                          # 1k, 10k, 100k
    .venv/bin/python benchmarks/scale.py --clients 1000 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


import benchlib as bench  # noqa: E402  (benchmarks/benchlib.py: this folder is on sys.path)

GOAL_CLIENTS, GOAL_GIB, GOAL_SECONDS = 100_000, 8.0, 5.0
PROBE_START, PROBE_END = "<!-- scale-probe:start -->", "<!-- scale-probe:end -->"
NOTES_START, NOTES_END = "<!-- scale-notes:start -->", "<!-- scale-notes:end -->"
PROBE_TEXT = """Flower's own per-client state, probed apart (a fresh process runs the simulation engine's real
`_register_nodes` and `_register_node_info_stores` for N clients; RSS growth): every simulated
client gets a LinkState node record and a `Context` holding the whole run config, fused from
the app's `pyproject.toml` once per client, whether it ever trains or not.

```bash
.venv/bin/python benchmarks/scale.py --clients "" --node-state 10000,100000   # the probe alone
```

{probe}"""


def settings(num_clients: int, per_client: int, test_examples: int) -> dict:
    samples = num_clients * per_client + test_examples
    return {"dataset-samples": samples, "test-fraction": round(test_examples / samples, 8)}


def run_config(num_clients: int, rounds: int, per_client: int, test_examples: int) -> str:
    s = settings(num_clients, per_client, test_examples)
    return (
        f'dataset="mnist1d" model="cnn1d" dataset-samples={s["dataset-samples"]} test-fraction={s["test-fraction"]} '
        f"val-fraction=0.0 clients-per-round=100 identify-clients=false index-idle-nodes=true fraction-evaluate=0.0 local-epochs=1 "
        f"num-server-rounds={rounds} min-available-clients={num_clients}"
    )


def prepare(num_clients: int, per_client: int, test_examples: int) -> None:
    """Generate the dataset and the partition table into the on-disk cache (runs in a child process)."""
    import tomllib

    from common.config import RunConfig
    from common.data.client_data import _cached_dataset, _partition_table

    defaults = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    overrides = tomllib.loads("\n".join(run_config(num_clients, 1, per_client, test_examples).split(" ")))
    config = RunConfig.from_run_config(defaults | overrides)
    t = time.monotonic()
    data = _cached_dataset(config)
    t_data = time.monotonic() - t
    t = time.monotonic()
    offsets, _ = _partition_table(config, num_clients)
    t_part = time.monotonic() - t
    sizes = offsets[1:] - offsets[:-1]
    print(json.dumps({"data_seconds": t_data, "partition_seconds": t_part, "examples": len(data),
                      "min_per_client": int(sizes.min()), "max_per_client": int(sizes.max())}))


def node_state_probe(num_clients: int) -> dict:
    """What Flower's simulation engine keeps per simulated client before any training (runs in a
    child process): the real ``_register_nodes`` (LinkState node records) and
    ``_register_node_info_stores`` (a Context per node, with the run config fused from the app's
    pyproject.toml for EVERY node) of ``flwr/server/superlink/fleet/vce/vce_api.py``."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores, _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager

    def rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    run = Run.create_empty(run_id=1)
    run.override_config = {"dataset": "mnist1d", "model": "cnn1d"}
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    r0, t0 = rss_mib(), time.monotonic()
    mapping = _register_nodes(num_clients, factory)
    r1, t1 = rss_mib(), time.monotonic()
    stores = _register_node_info_stores(mapping, run, app_dir=str(REPO_ROOT))
    r2, t2 = rss_mib(), time.monotonic()
    assert len(stores) == num_clients
    return {"clients": num_clients, "nodes_seconds": t1 - t0, "nodes_mib": r1 - r0,
            "contexts_seconds": t2 - t1, "contexts_mib": r2 - r1}


def run_one(num_clients: int, rounds: int, per_client: int, test_examples: int, workdir: Path,
            timeout: float, profile_seconds: float) -> dict:
    out_dir = workdir / f"clients-{num_clients}"
    log_path = workdir / f"clients-{num_clients}.log"
    command = [
        str(bench.VENV_PYTHON), str(REPO_ROOT / "scripts" / "simulate.py"), "--num-clients", str(num_clients),
        "--output-dir", str(out_dir), "--run-config", run_config(num_clients, rounds, per_client, test_examples),
    ]
    load_before = bench.load1()
    started = time.monotonic()
    marks: dict[str, float] = {}
    profile_note = ""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=bench.bench_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            with bench.TreeMemory(process.pid) as memory:
                import threading

                def pump():
                    for line in process.stdout:
                        now = time.monotonic() - started
                        log.write(f"{now:8.2f} {line}")
                        log.flush()
                        if "Writing results to" in line:
                            marks.setdefault("serverapp_started", now)
                        elif (match := re.search(r"round (\d+)/\d+ ", line)):
                            marks[f"round_{match.group(1)}"] = now

                reader = threading.Thread(target=pump, daemon=True)
                reader.start()
                profiled = False
                while process.poll() is None and time.monotonic() - started < timeout:
                    # Profile the simulation process once the first round is done (or late in round 1).
                    if profile_seconds and not profiled and ("round_1" in marks or time.monotonic() - started > timeout / 2):
                        profiled = True
                        profile_note = profile(process.pid, profile_seconds, workdir / f"profile-{num_clients}")
                    time.sleep(0.5)
                timed_out = process.poll() is None
        finally:
            bench.kill_tree(process)
            reader.join(timeout=5)
    wall = time.monotonic() - started
    result = {"clients": num_clients, "wall": wall, "returncode": process.returncode, "timed_out": timed_out,
              "peak_rss_gib": memory.peak_rss_gib, "peak_pss_gib": memory.peak_pss_gib,
              "peak_processes": memory.peak_processes, "marks": marks, "load_before": load_before,
              "load_after": bench.load1(), "log": str(log_path), "profile": profile_note, "round_seconds": []}
    metrics = out_dir / "metrics.json"
    if metrics.exists():
        result["round_seconds"] = [float(r["seconds"]) for r in json.loads(metrics.read_text())]
    return result


def profile(root: int, seconds: float, out_prefix: Path) -> str:
    """py-spy (if installed) on the tree's flwr-simulation process and its Ray ClientApp workers, all
    at once: raw stacks, one file per process (``<prefix>.txt``, ``<prefix>-worker-<pid>.txt``)."""
    pyspy = bench.VENV_PYTHON.parent / "py-spy"
    if not pyspy.exists():
        return ""
    targets = {}
    for pid in bench.tree_pids(root):
        try:
            if b"flwr-simulation" in Path(f"/proc/{pid}/cmdline").read_bytes():
                targets[pid] = out_prefix.with_suffix(".txt")
            elif Path(f"/proc/{pid}/comm").read_text().startswith("ray::ClientApp"):
                targets[pid] = out_prefix.with_name(f"{out_prefix.name}-worker-{pid}.txt")
        except OSError:
            continue
    spies = [subprocess.Popen([str(pyspy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format",
                               "raw", "--output", str(raw), "--rate", "50", "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid, raw in targets.items()]
    for spy in spies:
        try:
            spy.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    return ", ".join(f"`{raw}`" for raw in targets.values() if raw.exists())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1000,10000,100000", help="comma-separated federation sizes")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rounds-large", type=int, default=4, help="rounds for federations of 100,000 or more")
    parser.add_argument("--per-client", type=int, default=10, help="training examples per client")
    parser.add_argument("--test-examples", type=int, default=10_000, help="the server's held-out split")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per federation before giving up")
    parser.add_argument("--profile-seconds", type=float, default=0.0, help="py-spy the simulation for this long")
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--notes", default="",
                        help="a file whose text ends the section (with --clients '' it replaces the earlier notes)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--node-state", default="10000,100000",
                        help="federation sizes for the probe of Flower's per-client state ('' to skip)")
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.probe:
        print(json.dumps(node_state_probe(args.probe)))
        return 0
    if args.prepare:
        prepare(args.prepare, args.per_client, args.test_examples)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="scale-"))
    print(f"Working in {workdir}", flush=True)
    rows, failures, measured = [], [], []
    for num_clients in [int(c) for c in args.clients.split(",") if c]:
        t = time.monotonic()
        prep = subprocess.run([str(bench.VENV_PYTHON), __file__, "--prepare", str(num_clients), "--per-client",
                               str(args.per_client), "--test-examples", str(args.test_examples)],
                              cwd=REPO_ROOT, env=bench.bench_env(), capture_output=True, text=True)
        if prep.returncode != 0:
            failures.append(f"- {num_clients:,} clients: data preparation failed: {prep.stderr.strip()[-600:]}")
            print(failures[-1], flush=True)
            continue
        prepared = json.loads(prep.stdout.strip().splitlines()[-1]) | {"seconds": time.monotonic() - t}
        print(f"{num_clients:,} clients: prepared {prepared}", flush=True)
        load = bench.wait_for_quiet(args.max_load, args.max_wait)
        rounds = args.rounds_large if num_clients >= 100_000 else args.rounds
        result = run_one(num_clients, rounds, args.per_client, args.test_examples, workdir, args.timeout,
                         args.profile_seconds)
        result["prepared"], result["load_before"] = prepared, load
        seconds = result["round_seconds"]
        later = bench.median(seconds[1:]) if len(seconds) > 1 else float("nan")
        first_round_at = result["marks"].get("round_1", float("nan"))
        ok = result["returncode"] == 0 and len(seconds) == rounds
        print(f"{num_clients:,} clients: rc {result['returncode']}, rounds {['%.2f' % s for s in seconds]}, "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB, PSS {result['peak_pss_gib']:.2f} GiB, "
              f"wall {result['wall']:.0f}s, load {load:.1f}/{result['load_after']:.1f}", flush=True)
        if not ok:
            tail = Path(result["log"]).read_text().splitlines()[-15:]
            failures.append(f"- {num_clients:,} clients: {'timed out' if result['timed_out'] else 'failed'} "
                            f"after {result['wall']:.0f}s (exit {result['returncode']}), rounds done: {len(seconds)}; "
                            f"log tail:\n\n```\n" + "\n".join(tail) + "\n```")
        rows.append([
            f"{num_clients:,}", f"{prepared['min_per_client']}-{prepared['max_per_client']}", rounds,
            f"{prepared['examples']:,} ({prepared['data_seconds']:.0f} s + {prepared['partition_seconds']:.0f} s)",
            "yes" if ok else "NO", f"{first_round_at:.0f}", f"{seconds[0]:.1f}" if seconds else "",
            f"{later:.2f}", f"{result['peak_rss_gib']:.2f}", f"{result['peak_pss_gib']:.2f}",
            result["peak_processes"], f"{result['wall']:.0f}",
            f"{load:.1f} / {result['load_after']:.1f}",
        ])
        measured.append({"clients": num_clients, "ok": ok, "later": later, "rss": result["peak_rss_gib"],
                         "pss": result["peak_pss_gib"]})
        if result["profile"]:
            failures.append(f"- {num_clients:,} clients: py-spy profiles (flwr-simulation; `-worker-<pid>`: the Ray "
                            f"ClientApp workers): {result['profile']}")
    probe_rows = []
    for num_clients in [int(c) for c in args.node_state.split(",") if c]:
        load = bench.wait_for_quiet(args.max_load, args.max_wait)
        out = subprocess.run([str(bench.VENV_PYTHON), __file__, "--probe", str(num_clients)], cwd=REPO_ROOT,
                             env=bench.bench_env(), capture_output=True, text=True)
        if out.returncode != 0:
            failures.append(f"- probe of {num_clients:,} clients failed: {out.stderr.strip()[-400:]}")
            continue
        p = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"probe: {p}", flush=True)
        probe_rows.append([f"{num_clients:,}", f"{p['nodes_seconds']:.1f}", f"{p['nodes_mib']:.0f}",
                           f"{p['contexts_seconds']:.1f}", f"{p['contexts_mib']:.0f}",
                           f"{(p['nodes_mib'] + p['contexts_mib']) * 2**20 / num_clients / 1024:.1f}",
                           f"{load:.1f} / {bench.load1():.1f}"])
    probe = bench.table(["clients", "register nodes s", "MiB", "a Context per node s", "MiB", "KiB per client",
                         "load"], probe_rows) if probe_rows else ""
    probe_block = PROBE_START + "\n" + PROBE_TEXT.format(probe=probe) + "\n" + PROBE_END
    notes = Path(args.notes).read_text() if args.notes else ""
    if not measured:  # probe only: keep the federations' table already in results.md
        text = bench.RESULTS.read_text() if bench.RESULTS.exists() else ""
        start, end = text.find("<!-- scale:start -->"), text.find("<!-- scale:end -->")
        body = text[start:end] if 0 <= start < end else ""
        if not body:
            print("results.md has no scale section to add the probe to: run the federations too", file=sys.stderr)
            return 1
        body = body.split("\n", 3)[3]  # drop the start marker, the heading and the blank line
        if probe_rows:
            if PROBE_START in body:
                body = body[: body.index(PROBE_START)] + probe_block + body[body.index(PROBE_END) + len(PROBE_END):]
            else:  # an older section: the probe goes after the verdict
                anchor = body.index("\n\n", body.index("Goal (")) if "Goal (" in body else len(body)
                body = body[:anchor] + "\n\n" + probe_block + body[anchor:]
        if notes:  # --notes replaces the notes block (the analysis) at the end of the section
            block = NOTES_START + "\n" + notes.strip() + "\n" + NOTES_END
            if NOTES_START in body:
                body = body[: body.index(NOTES_START)] + block + body[body.index(NOTES_END) + len(NOTES_END):]
            else:
                body = body.rstrip() + "\n\n" + block + "\n"
        print(body)
        if not args.no_write:
            bench.write_section("scale", body)
        return 0
    big = [r for r in measured if r["clients"] >= GOAL_CLIENTS and r["ok"]]
    if big:
        r = big[0]
        speed = "met" if r["later"] <= GOAL_SECONDS else f"missed: {r['later'] / GOAL_SECONDS:.1f}x the goal"
        memory = ("met" if r["rss"] < GOAL_GIB else "met on PSS, not on the RSS sum" if r["pss"] < GOAL_GIB
                  else "missed")
        verdict = (f"Goal ({GOAL_CLIENTS:,} clients on 2 cores, < {GOAL_GIB:g} GiB, <= {GOAL_SECONDS:g} s per round): "
                   f"{r['later']:.2f} s per round ({speed}); peak memory {r['rss']:.2f} GiB summed RSS, "
                   f"{r['pss']:.2f} GiB summed PSS ({memory}).")
    else:
        verdict = f"Goal ({GOAL_CLIENTS:,} clients): not reached in this run (see below)."
    notes = NOTES_START + "\n" + notes.strip() + "\n" + NOTES_END if notes else ""
    text = f"""{bench.machine()}

MNIST-1D, `cnn1d`, 100 clients sampled per round (fixed-size, seeded), one local epoch (batch 16),
`identify-clients=false`, `fraction-evaluate=0`, `val-fraction=0`, `min-available-clients=N` (round 1
samples from the whole federation, not from the nodes registered so far), {args.rounds} rounds ({args.rounds_large} from 100,000 clients), through
`scripts/simulate.py` (1 CPU per client: 2 Ray workers). Every client holds ~{args.per_client} training
examples, the server's held-out split {args.test_examples:,} examples in every row
(`dataset-samples = N * {args.per_client} + {args.test_examples}`). Seconds per round: median of
rounds 2 and later (round 1 includes the simulation engine's start-up: a `Context` per client,
the Ray workers, the workers loading the data; see the notes). Memory: peak over the run of
the summed RSS / PSS of the whole process tree (simulate.py, SuperLink, flwr-simulation, Ray and
its workers), sampled every 0.5 s. Data preparation (MNIST-1D generation + partition table)
fills the shared on-disk cache the clients read, before the timed run (0-1 s when already warm);
the ServerApp reads its held-out split from that cache too (read-only: it writes only under
`output-dir`), so "round 1 done" holds no data generation.

```bash
{bench.command_line()}
```

{bench.table(["clients", "examples per client", "rounds", "dataset (generate + partition, one-off)", "completed",
              "round 1 done (s after launch)", "round 1 s", "s per round (median, rounds 2+)",
              "peak RSS sum GiB", "peak PSS sum GiB", "processes", "wall s", "load before / after"], rows)}

{verdict}

{probe_block}

{chr(10).join(failures)}

{notes}
"""
    print(text)
    if not args.no_write:
        bench.write_section("scale", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
