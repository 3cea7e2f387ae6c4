"""The `fl-dp` launchers check the whole run config before any runtime starts, say what is wrong
in one line, and share one exit-code contract."""

import json
import os
import subprocess
import sys
import time

import pytest

from fl_dp import outcome
from fl_dp.run_config import RunConfigError, parse_overrides, to_flwr
from fl_dp.runtime import free_port
from fl_dp.simulate import plan_run


@pytest.mark.parametrize("run_config, expected", [
    ("strategy='fedsgd'", "strategy = 'fedsgd' is not valid; choose one of: fedavg"),
    ("strategy=fedprox", "write strategy='fedprox'"),
    ("num-server-rounds=3 num-server-rounds=4", "num-server-rounds is given twice"),
    ("num-server-rounds=3 oops", "cannot read 'oops'"),
    ("learning-rate=-1.0", "learning-rate = -1.0 is out of range"),
    ("num-server-round=3", "unknown run-config key(s): num-server-round"),
])
def test_a_bad_run_config_stops_the_launcher_before_any_runtime_starts(monkeypatch, capsys, run_config, expected):
    from fl_dp import simulate

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(simulate.subprocess, "Popen", no_process)
    assert simulate.main(["--run-config", run_config]) == outcome.USAGE
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_the_console_script_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fl_dp", "simulate", "--run-config", "strategy=fedprox"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == outcome.USAGE and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_output_dir_may_come_from_the_run_config(tmp_path):
    """It used to be added a second time by the launcher, which made every such run fail."""
    chosen, run_config = plan_run(f"output-dir='{tmp_path}' num-server-rounds=2", "", 3)
    assert chosen == tmp_path and parse_overrides(run_config) == {"output-dir": str(tmp_path), "num-server-rounds": 2}
    assert plan_run("", str(tmp_path), 3)[0] == tmp_path
    with pytest.raises(RunConfigError, match="disagree"):
        plan_run(f"output-dir='{tmp_path}'", str(tmp_path / "other"), 3)


def test_values_survive_the_round_trip_to_flwr():
    values = {"strategy": "fedprox", "resume": True, "target-delta": 1e-5, "num-server-rounds": 3, "output-dir": "/a b"}
    assert parse_overrides(to_flwr(values)) == values


@pytest.mark.parametrize("status, stop_kind, code", [
    ("finished:completed", "completed", 0),
    ("finished:completed", "budget", 3),
    ("finished:completed", "clients", 4),
    ("finished:completed", "failed", 1),
    ("finished:completed", None, 1),  # cannot tell that every round ran: not a success
    ("finished:failed", "completed", 1),
])
def test_one_exit_code_contract(status, stop_kind, code):
    assert outcome.exit_code(status, stop_kind) == code


def test_the_stop_kind_is_read_from_the_servers_log():
    log = "INFO : round 1/5 ...\nINFO : fl-dp stop-kind: budget\n"
    assert outcome.stop_kind_in_log(log) == "budget" and outcome.stop_kind_in_log("nothing") is None


def test_a_used_output_dir_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(RunConfigError, match="already holds a run .summary.json.; add resume=true"):
        plan_run("", str(tmp_path), 3)
    assert plan_run("overwrite=true", str(tmp_path), 3)[0] == tmp_path



# --- the simulation runtime (fl_dp/runtime.py): stopping what was started, by process group --------


def test_stopping_a_group_leaves_none_of_its_processes(tmp_path):
    """Runtime.stop's primitive: the leader and every process it started in its session are gone,
    the ones that ignore SIGTERM too (SIGKILL after the grace)."""
    from fl_dp.runtime import group_pids, stop_group

    script = "trap '' TERM; sleep 60 & sleep 60 & bash -c \"trap '' TERM; sleep 60\" & wait"
    leader = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_pids(leader.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    members = group_pids(leader.pid)
    assert len(members) >= 4
    stop_group(leader, grace=0.5)
    assert not group_pids(leader.pid) and leader.poll() is not None


def test_sigterm_becomes_an_exception_so_cleanup_runs():
    import os
    import signal

    from fl_dp.runtime import sigterm_as_exit

    before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: an in-process Ray run earlier in this process installs its own
    cleaned = []
    with pytest.raises(SystemExit):
        with sigterm_as_exit():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                cleaned.append(True)
    assert cleaned and signal.getsignal(signal.SIGTERM) is before


def test_a_stale_or_disabled_shared_runtime_is_not_used(tmp_path, monkeypatch):
    from fl_dp.runtime import RUNTIME_ENV, attached

    descriptor = tmp_path / "runtime.json"
    descriptor.write_text(json.dumps({"home": str(tmp_path), "http_port": free_port(), "ray_address": "",
                                      "process_groups": []}))
    monkeypatch.setenv(RUNTIME_ENV, str(descriptor))
    assert attached() is None  # nothing answers on that port
    for value in ("none", "", str(tmp_path / "missing.json")):
        monkeypatch.setenv(RUNTIME_ENV, value)
        assert attached() is None


def test_an_audit_never_uses_a_shared_runtime(tmp_path, monkeypatch):
    """Its secret key reaches the simulation's processes through their environment: only processes the
    audit starts itself may have it, so it refuses the sweep's or a warm runtime."""
    from fl_dp import audit, simulate
    from fl_dp.runtime import RUNTIME_ENV

    monkeypatch.setenv(RUNTIME_ENV, str(tmp_path / "shared" / "runtime.json"))
    seen = []
    monkeypatch.setattr(simulate, "main", lambda argv: seen.append(os.environ[RUNTIME_ENV]) or outcome.FAILED)
    code = audit.main(["--num-clients", "3", "--canaries", "2", "--output-dir", str(tmp_path / "run"),
                       "--run-config", "dp='server' noise-multiplier=1.0 num-server-rounds=1"])
    assert code == outcome.FAILED and seen == ["none"]


def test_runtime_commands_without_a_warm_runtime(tmp_path):
    env = os.environ | {"FL_DP_CACHE": str(tmp_path)}
    env.pop("FL_DP_RUNTIME", None)
    status = subprocess.run([sys.executable, "-m", "fl_dp", "runtime", "status"], env=env, capture_output=True, text=True)
    stop = subprocess.run([sys.executable, "-m", "fl_dp", "runtime", "stop"], env=env, capture_output=True, text=True)
    assert status.returncode == 1 and "no warm runtime" in status.stdout
    assert stop.returncode == 0 and "no warm runtime is running" in stop.stderr
