"""The privacy-utility sweep (`fl-dp sweep`, fl_dp/sweep.py): a real small sweep through `flwr run`, and its
bookkeeping (failed runs keep earlier results, exit code, the run-config it builds)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _load_sweep():
    from fl_dp import sweep

    return sweep


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


class FakeRuntime:
    """Stands in for the sweep's shared runtime in the bookkeeping tests (no SuperLink, no Ray)."""

    def __init__(self, home: Path):
        self.home, self.failed = home, False


def _fake_shared_runtime(sweep, monkeypatch, tmp_path) -> FakeRuntime:
    import contextlib

    fake = FakeRuntime(tmp_path / "runtime-home")

    @contextlib.contextmanager
    def shared_runtime(needed, started):
        yield fake if needed else None

    monkeypatch.setattr(sweep, "shared_runtime", shared_runtime)
    return fake


def _groups_alive(pgids: list[int]) -> list[int]:
    from fl_dp.runtime import group_pids

    return [pid for pgid in pgids for pid in group_pids(pgid)]


@pytest.mark.e2e
def test_small_real_sweep_writes_csv_rows_within_target_and_plot(tmp_path):
    out = tmp_path / "sweep"
    done = subprocess.run(
        [
            sys.executable, "-m", "fl_dp", "sweep", "--dp", "server", "--epsilons", "5", "--num-clients", "4",
            "--run-config", "num-server-rounds=2 sampling='all' local-epochs=1",
            "--output-dir", str(out),
        ],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[sweep 1/2 nonprivate]" in done.stdout and "[sweep 2/2 server-eps5]" in done.stdout
    # Both runs went to ONE runtime the sweep started, and nothing of it outlives the command.
    groups = [int(g) for g in re.search(r"shared runtime up .*process groups ([\d ]+)\)", done.stdout).group(1).split()]
    assert len(groups) == 2 and not _groups_alive(groups), "a process of the shared runtime outlived the sweep"
    homes = {re.search(r"Using the shared runtime in (\S+) ", (out / "logs" / f"{name}.log").read_text()).group(1)
             for name in ("nonprivate", "server-eps5")}
    assert len(homes) == 1 and not Path(homes.pop()).exists()

    rows = _rows(out / "sweep.csv")
    for column in ("dp", "target_epsilon", "epsilon_reached", "delta", "noise_multiplier",
                   "final_central_accuracy", "best_central_accuracy", "rounds", "wall_seconds", "run_dir"):
        assert column in rows[0]
    assert [(r["dp"], r["target_epsilon"]) for r in rows] == [("none", ""), ("server", "5.0")]
    assert all(r["status"] == "ok" and r["rounds"] == "2" for r in rows)

    nonprivate, private = rows
    assert nonprivate["epsilon_reached"] == "" and float(nonprivate["final_central_accuracy"]) > 0.3
    assert 0 < float(private["epsilon_reached"]) <= 5.0
    assert float(private["delta"]) == 1e-5 and float(private["noise_multiplier"]) > 0
    # The row agrees with the run's own ledger.
    summary = json.loads((Path(private["run_dir"]) / "summary.json").read_text())
    assert summary["dp"] == "server" and summary["epsilon"] == pytest.approx(float(private["epsilon_reached"]))
    png = out / "privacy_utility.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_run_keeps_earlier_rows_and_exits_nonzero(tmp_path, monkeypatch):
    sweep = _load_sweep()

    runtime = _fake_shared_runtime(sweep, monkeypatch, tmp_path)
    descriptors = []

    def fake_run_one(run, args, output_dir, prefix, descriptor=None):
        descriptors.append(descriptor)
        run_dir = output_dir / "runs" / run["name"]
        log = output_dir / "logs" / f"{run['name']}.log"
        log.write_text("fake\n")
        if run["dp"] == "none":
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps(
                {"final_central_accuracy": 0.9, "best_central_accuracy": 0.92, "rounds": 3, "dp": "none",
                 "epsilon": None, "sample_epsilon_max": None, "delta": None}
            ))
            return 0, run_dir, log, 1.0
        if run["target_epsilon"] == 1.0:  # dies after one round: its finished round is kept
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.json").write_text(json.dumps(
                [{"round": 1, "central_accuracy": 0.4, "epsilon": None, "sample_epsilon_max": 0.7, "delta": 1e-5}]
            ))
        return 1, run_dir, log, 2.0

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    code = sweep.main(["--dp", "dpsgd", "--epsilons", "3,1", "--output-dir", str(tmp_path)])
    assert code == 1
    rows = _rows(tmp_path / "sweep.csv")
    assert [r["name"] for r in rows] == ["nonprivate", "dpsgd-eps1", "dpsgd-eps3"]
    assert rows[0]["status"] == "ok" and rows[0]["final_central_accuracy"] == "0.9"
    assert rows[1]["status"] == "failed (exit 1)" and rows[1]["rounds"] == "1"
    assert float(rows[1]["epsilon_reached"]) == 0.7 and rows[1]["epsilon_level"].startswith("sample")
    assert rows[2]["status"] == "failed (exit 1)" and rows[2]["final_central_accuracy"] == ""
    assert (tmp_path / "privacy_utility.png").exists()
    # Every run was given the one shared runtime, which keeps its logs because a run failed.
    assert descriptors == [runtime.home / "runtime.json"] * 3 and runtime.failed


def test_separate_runtimes_gives_each_run_its_own(tmp_path, monkeypatch):
    sweep = _load_sweep()
    _fake_shared_runtime(sweep, monkeypatch, tmp_path)
    envs = []

    def fake_run_one(run, args, output_dir, prefix, descriptor=None):
        envs.append(sweep.subprocess_env(descriptor).get("FL_DP_RUNTIME"))
        return 1, output_dir / "runs" / run["name"], output_dir / "logs" / f"{run['name']}.log", 0.0

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    sweep.main(["--dp", "server", "--epsilons", "3", "--separate-runtimes", "--output-dir", str(tmp_path / "out")])
    assert envs == ["none", "none"]  # "none": fl-dp simulate starts (and stops) a runtime of its own


def test_run_configs_per_run():
    sweep = _load_sweep()
    overrides = sweep.parse_run_config("num-server-rounds=3 sampling='poisson' max-epsilon=9.0 clipping-norm=0.5")
    runs = sweep.plan_runs("server", sweep.parse_epsilons("8, 2"), overrides)
    assert [r["name"] for r in runs] == ["nonprivate", "server-eps2", "server-eps8"]
    # The non-private run drops keys the app refuses without a privacy mode.
    assert runs[0]["config"] == {"num-server-rounds": 3, "sampling": "poisson", "clipping-norm": 0.5, "dp": "none"}
    assert runs[1]["config"]["target-epsilon"] == 2.0 and runs[1]["config"]["max-epsilon"] == 9.0
    # What the sweep passes to flwr run parses back to the same values.
    from flwr.common.config import parse_config_args

    assert parse_config_args([sweep.run_config_text(runs[2]["config"])]) == runs[2]["config"]
    with pytest.raises(SystemExit, match="must not set dp"):
        sweep.parse_run_config("dp='server'")


def test_an_audited_sweep_runs_fl_dp_audit_and_reports_the_lower_bound(tmp_path, monkeypatch):
    """With --audit every private run goes through `fl-dp audit`; its audit.json's lower bound
    lands in sweep.csv beside the ledger's epsilon, and on the plot."""
    sweep = _load_sweep()
    runtime = _fake_shared_runtime(sweep, monkeypatch, tmp_path)
    commands, envs = [], []

    class Finished:
        def __init__(self, command, **kwargs):
            commands.append(command)
            envs.append(kwargs["env"].get("FL_DP_RUNTIME"))
            run_dir = Path(command[command.index("--output-dir") + 1])
            run_dir.mkdir(parents=True)
            private = "audit" in command
            (run_dir / "summary.json").write_text(json.dumps(
                {"final_central_accuracy": 0.8, "best_central_accuracy": 0.8, "rounds": 2, "delta": 1e-5,
                 "epsilon": 2.9 if private else None, "sample_epsilon_max": None}))
            if private:
                (run_dir / "audit.json").write_text(json.dumps({"epsilon_lower_bound": 0.4}))
            self.stdout = iter(["round 2/2\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", Finished)
    assert sweep.main(["--dp", "server", "--epsilons", "3", "--audit", "--output-dir", str(tmp_path)]) == 0
    assert [c[3] for c in commands] == ["simulate", "audit"]  # python -m fl_dp <command>
    # fl-dp audit is handed the runtime too, but starts its own (tests/test_cli.py): its key reaches only its processes
    assert envs == [str(runtime.home / "runtime.json")] * 2
    rows = _rows(tmp_path / "sweep.csv")
    assert rows[0]["epsilon_lower_bound"] == "" and float(rows[1]["epsilon_lower_bound"]) == 0.4
    assert float(rows[1]["epsilon_reached"]) == 2.9 and (tmp_path / "privacy_utility.png").exists()
