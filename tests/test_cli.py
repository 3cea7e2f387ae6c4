"""The `fl-dp` launchers check the whole run config before any runtime starts, say what is wrong
in one line, and share one exit-code contract."""

import subprocess
import sys

import pytest

from fl_dp import outcome
from fl_dp.run_config import RunConfigError, parse_overrides, to_flwr
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

