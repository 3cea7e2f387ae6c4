"""`fl-dp simulate`'s start-up and teardown pieces (issue 16.1), without a runtime: when a run's
results count as final, that stopping a runtime also stops the process groups its processes
started in sessions of their own, and that a Ray head's workers take ports the OS picks."""

import json
import subprocess
import sys
import time

from fl_dp import outcome
from fl_dp.runtime import Runtime, descendant_groups, group_pids
from fl_dp.simulate import results_final


def test_results_are_final_only_when_the_last_line_and_the_summary_agree(tmp_path):
    line = "INFO :      fl-dp stop-kind: completed\n"
    assert results_final(line, tmp_path) is None  # no summary.json yet
    (tmp_path / "summary.json").write_text(json.dumps({"stop_kind": "budget"}))
    assert results_final(line, tmp_path) is None  # the summary says otherwise
    (tmp_path / "summary.json").write_text(json.dumps({"stop_kind": "completed"}))
    assert results_final(line, tmp_path) == "completed"
    assert results_final("round 5/5 central accuracy 0.95\n", tmp_path) is None
    for kind in ("budget", "clients"):
        (tmp_path / "summary.json").write_text(json.dumps({"stop_kind": kind}))
        assert results_final(f"fl-dp stop-kind: {kind}\n", tmp_path) == kind
        assert outcome.EXIT_CODES[kind] != outcome.COMPLETED
    # A failed run waits for Flower's own status (and its log: the traceback comes after).
    (tmp_path / "summary.json").write_text(json.dumps({"stop_kind": "failed"}))
    assert results_final("fl-dp stop-kind: failed\n", tmp_path) is None


def test_stopping_a_runtime_stops_the_sessions_its_processes_started(tmp_path):
    """Flower's SuperLink starts its SuperExec in a session of its own (and that one the simulation
    process and Ray): stopping the runtime, at once, leaves no process of either session."""
    grandchild = ("import subprocess, sys, time; "
                  "subprocess.Popen(['sleep', '60'], start_new_session=True); time.sleep(60)")
    leader = subprocess.Popen([sys.executable, "-c", grandchild], start_new_session=True)
    deadline = time.monotonic() + 20
    while not descendant_groups([leader.pid]) and time.monotonic() < deadline:
        time.sleep(0.05)
    groups = descendant_groups([leader.pid])
    assert len(groups) == 1 and groups[0] != leader.pid and group_pids(groups[0])

    runtime = Runtime(ray=False, home=tmp_path / "home")
    runtime.superlink = leader
    runtime.stop(now=True)
    assert leader.poll() is not None and not group_pids(leader.pid) and not group_pids(groups[0])
    assert not (tmp_path / "home").exists()


def test_a_ray_head_lets_the_os_pick_its_worker_ports(tmp_path, monkeypatch):
    """Two heads side by side once handed two drivers the same default port (10002): one run failed."""
    from fl_dp import runtime as runtimes

    started: list[list[str]] = []
    monkeypatch.setattr(runtimes, "_spawn", lambda command, env, log: started.append(command))
    runtime = Runtime(home=tmp_path)
    runtime._start_ray_head({option: 1 for option in runtimes.RAY_PORT_OPTIONS})
    (command,) = started
    for option in ("--min-worker-port", "--max-worker-port"):
        assert command[command.index(option) + 1] == "0"
