"""Nothing lost, nothing misreported (issue 12), on the real ServerApp and ClientApp in process:
summary.json's stop_kind says how a run ended; a used output-dir is never overwritten; every file of
a stopped run describes the same last completed round; a lost client is named by its own node id;
a moved run resumes; a resume may extend a run unless its noise was solved for the planned rounds;
and a run resumed from its checkpoint releases the same model, bit for bit, as an uninterrupted one."""

import hashlib
import json
import logging
from pathlib import Path

import inprocess
import numpy as np
import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from inprocess import run_inprocess

from common.config import ConfigError
from server_app.checkpoint import load_checkpoint
from server_app.federation import RoundFailed

FAST = {"local-epochs": 1}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _metrics(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())


def _hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}


# --- stop_kind --------------------------------------------------------------------------------


def test_a_completed_run_says_completed(tmp_path, capsys):
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "num-server-rounds": 2}, num_clients=3)
    summary = _summary(out)
    assert summary["stop_kind"] == "completed" and summary["stop_reason"] == "completed 2 rounds"
    assert summary["rounds"] == 2 and summary["interrupted_round"] is None
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "fl-dp stop-kind: completed"


def test_clients_out_of_their_own_budget_stop_the_run_as_budget_not_failed(tmp_path):
    """local DP: each client enforces the smaller of its cap and the run's max-epsilon; when every
    sampled client refuses for that reason the run ends as a budget stop (exit code 3), not a failure."""
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "num-server-rounds": 2, "dp": "local",
                                "max-epsilon": 1e-3}, num_clients=3)
    summary = _summary(out)
    assert summary["stop_kind"] == "budget", summary["stop_reason"]
    assert "privacy budget" in summary["stop_reason"] and summary["rounds"] == 0


def test_a_budget_stop_says_budget(tmp_path):
    from common.privacy.accounting import UserLevelLedger

    ledger = UserLevelLedger(1.0, "all", 3, 3, 1e-5)
    first = ledger.epsilon_if_step()
    ledger.step()
    budget = (first + ledger.epsilon_if_step()) / 2  # room for one round, not two
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "num-server-rounds": 4, "dp": "server", "sampling": "all",
                                "noise-multiplier": 1.0, "max-epsilon": budget}, num_clients=3)
    summary = _summary(out)
    assert summary["stop_kind"] == "budget" and "budget stop before round 2" in summary["stop_reason"]
    assert summary["rounds"] == 1 and summary["interrupted_round"] is None


def test_no_clients_says_clients(tmp_path, capsys):
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "min-available-clients": 4, "wait-timeout": 0.1},
                        num_clients=2)
    summary = _summary(out)
    assert summary["stop_kind"] == "clients" and "wait-timeout = 0.1s" in summary["stop_reason"]
    assert summary["rounds"] == 0 and (out / "model.pt").exists()
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "fl-dp stop-kind: clients"


def test_a_round_without_any_update_says_failed_and_still_fails_the_run(tmp_path):
    """Every client raises: the files are written (stop_kind failed), then the ServerApp raises as
    before, so Flower's own status is failed too."""
    broken = [{"partition-id": 7, "num-partitions": 3}] * 2  # no such partition: the ClientApp raises
    with pytest.raises(RoundFailed, match="none of 2 sampled clients returned an update"):
        run_inprocess(FAST | {"output-dir": str(tmp_path), "num-server-rounds": 2}, num_clients=2, node_configs=broken)
    summary = _summary(tmp_path)
    assert summary["stop_kind"] == "failed" and summary["rounds"] == 0
    assert summary["interrupted_round"] == {"round": 1, "num_replies": 0, "num_failures": 2, "num_refused": 0,
                                            "num_invalid": 0}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_diverged_dp_round_says_failed_and_files_its_counts_privately(tmp_path):
    """A clip norm of 1e300 makes the noisy float32 aggregate infinite: the run stops in round 1, after one
    client was lost; its exact counts (the DP release's clipped and rejected counts too) go to the 0600
    diagnostics file only, as DP counts must."""
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "num-server-rounds": 2, "dp": "server", "sampling": "all",
                                "clipping-norm": 1e300}, num_clients=3, drop_after={0: 0})
    summary = _summary(out)
    assert summary["stop_kind"] == "failed" and "NaN/Inf" in summary["stop_reason"]
    assert summary["interrupted_round"] == {"round": 1} and summary["rounds"] == 0
    records = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    counts = [r for r in records if r.get("interrupted")]
    assert counts == [{"round": 1, "num_replies": 2, "num_failures": 1, "num_refused": 0, "num_invalid": 0,
                       "num_clipped": 0, "num_rejected": 0, "interrupted": True}]
    assert "num_failures" not in json.dumps(summary) and _metrics(out) == []


# --- output-dir -------------------------------------------------------------------------------


def test_a_second_run_into_a_used_output_dir_is_refused_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    run_inprocess(FAST | {"output-dir": str(out), "num-server-rounds": 2}, num_clients=3)
    first = _hashes(out)
    with pytest.raises(ConfigError) as error:
        run_inprocess(FAST | {"output-dir": str(out), "num-server-rounds": 1}, num_clients=3)
    message = str(error.value)
    assert str(out) in message and "resume=true" in message and "overwrite=true" in message and "\n" not in message
    assert _hashes(out) == first, "the refused run changed the first run's files"

    run_inprocess(FAST | {"output-dir": str(out), "num-server-rounds": 1, "overwrite": True}, num_clients=3)
    (moved,) = tmp_path.glob("run.old-*")
    assert _hashes(moved) == first, "the first run was not moved aside intact"
    assert _summary(out)["rounds"] == 1 and len(_metrics(out)) == 1


def test_a_directory_without_a_runs_files_is_not_a_used_one(tmp_path):
    from server_app.output_dir import prepare_output_dir

    (tmp_path / "notes.txt").write_text("my own notes")
    assert prepare_output_dir(str(tmp_path), resume=False, overwrite=False) is None
    assert prepare_output_dir(str(tmp_path / "new"), resume=False, overwrite=True) is None


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="contradict"):
        run_inprocess(FAST | {"output-dir": str(tmp_path), "resume": True, "overwrite": True}, num_clients=2)


# --- a client lost mid-round ------------------------------------------------------------------


class SuperLinkLikeGrid(inprocess.InProcessGrid):
    """As Flower's SuperLink: a pushed message gets its id set on it, and a node that left is answered
    by the SuperLink itself (source node id: the SuperLink's own)."""

    def push_messages(self, messages):
        ids = []
        for message in messages:
            pushed = list(super().push_messages([message]))
            if pushed:
                message.metadata.__dict__["_message_id"] = pushed[0]
            ids += pushed
        return ids

    def _handle(self, message):
        reply = super()._handle(message)
        if message.metadata.dst_node_id in self.gone:
            reply = inprocess._with_metadata(reply, src_node_id=SUPERLINK_NODE_ID, dst_node_id=SUPERLINK_NODE_ID)
        return reply


def test_after_a_client_is_lost_mid_round_every_file_describes_the_last_completed_round(tmp_path, monkeypatch, caplog):
    """Client 0 leaves during round 2; round 2's training goes on without it, then its evaluation waits
    for 4 clients and stops: model.pt, summary.json, metrics.json and the checkpoint all stay at round 1."""
    monkeypatch.setattr(inprocess, "InProcessGrid", SuperLinkLikeGrid)
    nodes = {}
    with caplog.at_level(logging.WARNING, logger="flwr"):
        out = run_inprocess(FAST | {"output-dir": str(tmp_path), "num-server-rounds": 3, "min-available-clients": 4,
                                    "wait-timeout": 0.1}, num_clients=4, drop_after={0: 1}, nodes=nodes)
    summary, metrics = _summary(out), _metrics(out)
    assert summary["stop_kind"] == "clients" and "stopped before finishing round 2" in summary["stop_reason"]
    assert summary["rounds"] == 1 and [row["round"] for row in metrics] == [1]
    checkpoint = load_checkpoint(str(out), json.loads((out / "config.json").read_text()))
    assert checkpoint.completed_rounds == 1 and checkpoint.rows == metrics
    released = torch.load(out / "model.pt")
    assert list(released) == list(checkpoint.model)
    assert all(np.array_equal(released[name].numpy(), checkpoint.model[name]) for name in released)
    assert summary["final_central_accuracy"] == metrics[-1]["central_accuracy"]

    assert summary["interrupted_round"] == {"round": 2, "num_replies": 3, "num_failures": 1, "num_refused": 0,
                                            "num_invalid": 0}
    (lost,) = [node for node, config in nodes.items() if config["partition-id"] == 0]
    failed = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert failed and all(m.startswith(f"client {lost} failed: ") for m in failed), failed


# --- resume -----------------------------------------------------------------------------------


def test_a_moved_run_directory_resumes(tmp_path):
    first = run_inprocess(FAST | {"output-dir": str(tmp_path / "here"), "num-server-rounds": 1}, num_clients=3)
    moved = first.rename(tmp_path / "there")
    run_inprocess(FAST | {"output-dir": str(moved), "num-server-rounds": 2, "resume": True}, num_clients=3)
    assert [row["round"] for row in _metrics(moved)] == [1, 2] and _summary(moved)["stop_kind"] == "completed"


def test_resume_may_not_extend_a_run_whose_noise_was_solved_for_its_rounds(tmp_path):
    run = FAST | {"output-dir": str(tmp_path), "num-server-rounds": 1, "dp": "server", "sampling": "all",
                  "target-epsilon": 20.0}
    run_inprocess(run, num_clients=3)
    before = _hashes(tmp_path)
    with pytest.raises(ConfigError) as error:
        run_inprocess(run | {"num-server-rounds": 3, "resume": True}, num_clients=3)
    message = str(error.value)
    assert "num-server-rounds cannot change from 1 to 3" in message and "target-epsilon = 20.0 for 1 rounds" in message
    assert "\n" not in message and _hashes(tmp_path) == before


EQUIVALENT = {
    "dp none": {},
    "dp server, same debug-noise-key": {"dp": "server", "sampling": "poisson", "clients-per-round": 2,
                                        "noise-multiplier": 0.5, "clipping-norm": 2.0, "debug-noise-key": "resume-test"},
    "fedadam (server optimizer state)": {"strategy": "fedadam", "server-learning-rate": 0.1, "clients-per-round": 2},
}


@pytest.mark.parametrize("case", list(EQUIVALENT))
def test_two_rounds_resumed_to_four_release_the_model_of_a_straight_four_round_run(tmp_path, case):
    """Resuming extends the run (fixed noise multiplier: the ledger simply continues); model.pt is
    byte-identical to an uninterrupted run's, and so is the history."""
    run = FAST | EQUIVALENT[case]
    split, straight = tmp_path / "split", tmp_path / "straight"
    run_inprocess(run | {"output-dir": str(split), "num-server-rounds": 2}, num_clients=4)
    run_inprocess(run | {"output-dir": str(split), "num-server-rounds": 4, "resume": True}, num_clients=4)
    run_inprocess(run | {"output-dir": str(straight), "num-server-rounds": 4}, num_clients=4)
    assert (split / "model.pt").read_bytes() == (straight / "model.pt").read_bytes()
    keep = ("round", "central_loss", "central_accuracy", "epsilon", "clipping_norm")
    assert [{k: r[k] for k in keep} for r in _metrics(split)] == [{k: r[k] for k in keep} for r in _metrics(straight)]
    assert _summary(split)["stop_kind"] == "completed" and _summary(split)["rounds"] == 4
