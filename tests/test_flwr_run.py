"""The user's path: `python scripts/simulate.py` submits the app with `flwr run` and cleans up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "simulate.py"


def _simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, check=False
    )


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
    assert not _flower_processes_using("flwr-home-"), "a Flower process outlived the run"


def test_flwr_run_reports_a_failed_run_with_nonzero_exit(tmp_path):
    done = _simulate("--num-clients", "2", "--output-dir", str(tmp_path), "--run-config", "strategy='fedsgd'")
    assert done.returncode == 1
    assert "did not complete" in done.stderr
    assert "strategy = 'fedsgd' is not valid; choose one of: fedavg" in done.stdout
    assert not _flower_processes_using("flwr-home-")
