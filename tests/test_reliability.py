"""Faults and attacks: a killed server resumes to the same result, missing clients end the run
within the wait limit with results saved, malformed updates are rejected (robust strategies
against Byzantine clients: tests/test_byzantine.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flower_messages import task_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from inprocess import run_inprocess
from simulation import read_results

from common.models import build_model
from fl_dp.run_config import parse_overrides
from server_app.update_validation import reply_problem

SIMULATE = Path(__file__).resolve().parent.parent / "scripts" / "simulate.py"
# A debug key makes two runs draw the same secret stream, so a resumed run can be compared with an
# uninterrupted one draw for draw: it proves the stream continues exactly where it was checkpointed.
DP_RUN = ("num-server-rounds=5 dp='server' sampling='poisson' clients-per-round=3 noise-multiplier=0.5 "
          "clipping-norm=2.0 debug-noise-key='resume-test'")


def _simulate(out: Path, run_config: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SIMULATE), "--num-clients", "6", "--output-dir", str(out), "--run-config", run_config],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _descendants(pid: int) -> list[int]:
    """Every process started (directly or not) by ``pid``, detached sessions included."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rounds_done(out: Path) -> int:
    try:
        return len(json.loads((out / "metrics.json").read_text()))
    except (OSError, ValueError):
        return 0


@pytest.mark.e2e
def test_killed_server_resumes_to_the_same_history_and_epsilon(tmp_path):
    """Killed mid-run (every process of `fl-dp simulate`), then resumed: the same rounds, models' metrics
    and epsilons as an uninterrupted run of the same config. The uninterrupted run is the in-process
    harness, which releases what Flower's runtime releases (tests/test_inprocess.py)."""
    interrupted = tmp_path / "interrupted"
    victim = _simulate(interrupted, DP_RUN)
    deadline = time.monotonic() + 300
    while _rounds_done(interrupted) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed"
    for pid in [victim.pid, *_descendants(victim.pid)]:  # SuperLink, ServerApp, clients: all, mid-run
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    victim.wait()
    resumed = _simulate(interrupted, DP_RUN + " resume=true")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    resumed_after = int(re.search(r"Resuming after round (\d+)", output).group(1))
    assert 2 <= resumed_after < 5  # at most the round in flight was lost

    reference = run_inprocess(parse_overrides(DP_RUN) | {"output-dir": str(tmp_path / "reference")}, num_clients=6)
    expected, expected_summary = read_results(reference)
    got, got_summary = read_results(interrupted)
    assert [r["round"] for r in got] == [1, 2, 3, 4, 5]
    for key in ("central_accuracy", "central_loss", "epsilon", "clipping_norm"):
        assert [r[key] for r in got] == [r[key] for r in expected], key
    assert got_summary["epsilon"] == expected_summary["epsilon"]
    assert (interrupted / "secret_state.json").stat().st_mode & 0o777 == 0o600


def test_missing_clients_end_the_run_within_the_wait_limit_with_results_saved(tmp_path):
    started = time.monotonic()
    overrides = {"output-dir": str(tmp_path), "num-server-rounds": 3, "min-available-clients": 5, "wait-timeout": 3.0}
    metrics, summary = read_results(run_inprocess(overrides, num_clients=3))
    assert time.monotonic() - started < 3.0 + 30  # the wait limit, plus loading the apps on a busy machine
    assert summary["rounds"] == 0 and "wait-timeout = 3s" in summary["stop_reason"]
    assert (tmp_path / "model.pt").exists() and (tmp_path / "config.json").exists()


def _reply(arrays: dict, num_examples=10) -> Message:
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": num_examples})})
    with task_identity():
        instruction = Message(RecordDict({"config": ConfigRecord()}), 3, "train")
    return Message(content, reply_to=instruction)


def _malformed_replies():
    good = {k: v.numpy() for k, v in build_model("mlp", 64, 10, seed=0).state_dict().items()}
    first = next(iter(good))
    return good, {
        "missing array": {k: v for k, v in good.items() if k != first},
        "extra array": good | {"bonus": np.zeros(3, dtype=np.float32)},
        "wrong shape": good | {first: np.zeros((2, 2), dtype=np.float32)},
        "wrong dtype": good | {first: good[first].astype(np.float64)},
        "NaN": good | {first: np.full_like(good[first], np.nan)},
        "Inf": good | {first: np.full_like(good[first], np.inf)},
    }


@pytest.mark.parametrize("kind", list(_malformed_replies()[1]))
def test_each_kind_of_malformed_reply_is_named(kind):
    good, bad = _malformed_replies()
    assert reply_problem(_reply(good), good) is None
    problem = reply_problem(_reply(bad[kind]), good)
    expected = {"missing array": "missing", "extra array": "extra", "wrong shape": "expected",
                "wrong dtype": "float64", "NaN": "NaN or Inf", "Inf": "NaN or Inf"}[kind]
    assert problem is not None and expected in problem


def test_robust_strategies_refuse_too_few_clients_for_their_f():
    from common.config import ConfigError, RunConfig
    from server_app.privacy import plan_privacy

    config = RunConfig.from_run_config({"strategy": "bulyan", "num-malicious-nodes": 2})
    with pytest.raises(ConfigError, match="needs at least 4\\*2\\+3 = 11 clients per round, but the round has 10"):
        plan_privacy(config, num_clients=10)


def test_checkpoint_keeps_zero_copy_arrays_as_received_in_deployment(tmp_path):
    """Deployment hands the server arrays backed by memoryviews (the model, and a strategy's state)."""
    from flwr.serverapp.strategy import FedAvgM

    from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from server_app.run_state import restore_strategy, strategy_to_plain

    record = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    record["w"].data = memoryview(bytes(record["w"].data))
    strategy = FedAvgM()
    strategy.current_arrays = record
    plain, arrays = strategy_to_plain(strategy)
    model = {name: array.numpy() for name, array in record.items()}
    rows = [{"round": r} for r in (1, 2, 3)]
    save_checkpoint(str(tmp_path), Checkpoint(3, model, {"strategy": plain}, arrays, rows, {"seed": 1}, 9.0))
    restored = load_checkpoint(str(tmp_path), {"seed": 1})
    assert restored.completed_rounds == 3 and restored.rows == rows
    assert np.array_equal(restored.model["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    fresh = FedAvgM()
    restore_strategy(fresh, restored.federation["strategy"], restored.arrays, restored.model)
    assert np.array_equal(fresh.current_arrays["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
