"""The user's path: `fl-dp simulate` submits the app with `flwr run`, cleans up, and its exit code
says how the run ended (0 completed, 1 failed, 2 usage, 3 budget, 4 clients).

The first test runs on a runtime of its own, as a single `fl-dp simulate` does, and checks that
nothing of it is left; the exit-code runs share one runtime (as a sweep's runs do), so the suite
pays Ray's start once for them, not once per run."""

import json
import os
import re
import subprocess
import sys

import pytest

from fl_dp.runtime import DESCRIPTOR, RUNTIME_ENV, Runtime

pytestmark = pytest.mark.e2e


def _simulate(*args: str, runtime: Runtime | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(RUNTIME_ENV, None)
    if runtime is not None:
        env[RUNTIME_ENV] = str(runtime.home / DESCRIPTOR)
    return subprocess.run(
        [sys.executable, "-m", "fl_dp", "simulate", *args], capture_output=True, text=True, timeout=600, check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def shared_runtime():
    with Runtime() as runtime:
        yield runtime


def _flower_processes_using(home_marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if home_marker in line and "ps -eo" not in line]


def test_flwr_run_finishes_writes_results_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "run"
    done = _simulate("--num-clients", "4", "--output-dir", str(out), "--run-config", "num-server-rounds=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 2/2" in done.stdout and f"Results: {out}" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_central_accuracy"] > 0.3
    home = re.search(r"(/\S*flwr-home-[^/\s]+)/app", done.stdout).group(1)  # this run's private FLWR_HOME
    assert not _flower_processes_using(home), "a Flower process of this run outlived it"


def test_a_run_that_fails_in_the_runtime_exits_1(tmp_path, shared_runtime):
    missing = tmp_path / "no-such-file.csv"  # valid config, fails when the ServerApp reads it
    done = _simulate("--num-clients", "2", "--output-dir", str(tmp_path / "run"), "--run-config",
                     f"dataset='file' central-data-path='{missing}' dataset-path='{missing}'", runtime=shared_runtime)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "did not complete" in done.stderr


def test_a_bad_value_exits_2_before_anything_starts(tmp_path):
    done = _simulate("--num-clients", "2", "--output-dir", str(tmp_path), "--run-config", "strategy='fedsgd'")
    assert done.returncode == 2 and done.stdout == ""
    assert "strategy = 'fedsgd' is not valid; choose one of: fedavg" in done.stderr


def test_a_budget_stop_exits_3(tmp_path, shared_runtime):
    out = tmp_path / "run"
    done = _simulate("--num-clients", "3", "--output-dir", str(out), "--run-config",
                     "dp='server' sampling='all' noise-multiplier=1.0 max-epsilon=10.0 num-server-rounds=6 local-epochs=1",
                     runtime=shared_runtime)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_kind"] == "budget" and summary["rounds"] == 3 and summary["epsilon"] <= 10.0


def test_a_run_starved_of_clients_exits_4(tmp_path, shared_runtime):
    out = tmp_path / "run"
    done = _simulate("--num-clients", "2", "--output-dir", str(out), "--run-config",
                     "min-available-clients=5 wait-timeout=2.0", runtime=shared_runtime)
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["stop_kind"] == "clients"
