"""The in-process federation (tests/inprocess.py): the real ServerApp and ClientApp without Ray.

Each run takes a few seconds (the same federation on Flower's simulation runtime,
tests/simulation.run_app, takes ~15-30 s), so behaviour that needs a whole federation can be
tested here; what needs the real runtime stays in the e2e tests. The last test (e2e) checks
that both release the same model, bit for bit.
"""

import csv
import json
import os

import pytest
import torch
from inprocess import run_inprocess

from common.models import build_model

CHANCE = 0.1  # ten balanced digit classes


def _train_messages(log):
    """round -> the node ids sent a TRAIN instruction in that round."""
    rounds = {}
    for message in log:
        if message.metadata.message_type == "train":
            rounds.setdefault(int(message.content["config"]["server-round"]), []).append(message.metadata.dst_node_id)
    return rounds


def test_a_non_private_run_learns_and_writes_its_results(tmp_path):
    sent, nodes = [], {}
    out = run_inprocess({"output-dir": str(tmp_path), "num-server-rounds": 3}, num_clients=5,
                        on_message=sent.append, nodes=nodes)
    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    accuracies = [row["central_accuracy"] for row in metrics]
    assert [row["round"] for row in metrics] == [1, 2, 3]
    assert accuracies[0] > CHANCE + 0.2 and accuracies[-1] > accuracies[0] and accuracies[-1] > 0.5, accuracies
    assert all(row["num_replies"] == 5 and row["num_failures"] == 0 for row in metrics), metrics
    assert summary["rounds"] == 3 and summary["final_central_accuracy"] == accuracies[-1]
    with open(out / "metrics.csv") as handle:
        assert [int(row["round"]) for row in csv.DictReader(handle)] == [1, 2, 3]
    model = build_model("mlp", 64, 10)
    model.load_state_dict(torch.load(out / "model.pt"))

    # Every client trained in every round (clients-per-round defaults to all), one instruction each;
    # node ids are random, as a SuperNode's are, not 0..N-1.
    assert sorted(_train_messages(sent)) == [1, 2, 3]
    assert all(sorted(ids) == sorted(nodes) for ids in _train_messages(sent).values())
    assert len(nodes) == 5 and not set(nodes) & set(range(100))
    assert sorted(config["partition-id"] for config in nodes.values()) == list(range(5))


def test_non_private_runs_with_the_same_seed_release_the_same_model(tmp_path):
    """Bit for bit, although every run gives its nodes new random ids (sampling and aggregation
    follow the clients' stable identities, not their node ids)."""
    overrides = {"num-server-rounds": 2, "local-epochs": 2, "clients-per-round": 3}
    first_nodes, second_nodes = {}, {}
    first = run_inprocess(overrides | {"output-dir": str(tmp_path / "a")}, num_clients=5, nodes=first_nodes)
    second = run_inprocess(overrides | {"output-dir": str(tmp_path / "b")}, num_clients=5, nodes=second_nodes)
    assert set(first_nodes).isdisjoint(second_nodes)
    assert (first / "model.pt").read_bytes() == (second / "model.pt").read_bytes()


def test_a_client_that_raises_becomes_an_error_reply_and_the_round_goes_on(tmp_path):
    """As on Flower's runtime: the server sees a failed reply (counted in num_failures), not an exception."""
    configs = [{"partition-id": i, "num-partitions": 4} for i in range(3)] + [{"partition-id": 9, "num-partitions": 4}]
    out = run_inprocess({"output-dir": str(tmp_path), "num-server-rounds": 1, "local-epochs": 1},
                        num_clients=4, node_configs=configs)
    (row,) = json.loads((out / "metrics.json").read_text())
    assert row["num_replies"] == 3 and row["num_failures"] == 1, row


def test_a_node_that_leaves_fails_its_round_then_is_no_longer_offered(tmp_path):
    sent = []
    out = run_inprocess({"output-dir": str(tmp_path), "num-server-rounds": 3, "local-epochs": 1},
                        num_clients=4, on_message=sent.append, drop_after={0: 1})
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["num_replies"], r["num_failures"]) for r in metrics] == [(4, 0), (3, 1), (3, 0)], metrics
    assert [len(ids) for _, ids in sorted(_train_messages(sent).items())] == [4, 4, 3]


@pytest.mark.e2e
def test_the_harness_releases_what_flowers_simulation_runtime_releases(tmp_path):
    """The same non-DP federation in process and on Flower's simulation runtime (Ray): the same
    model bytes and the same metrics (but the timings), sampling and federated evaluation included."""
    from simulation import run_app

    overrides = {"num-server-rounds": 2, "clients-per-round": 3, "local-epochs": 2}
    here = run_inprocess(overrides | {"output-dir": str(tmp_path / "inprocess")}, num_clients=5)
    pythonpath = os.environ.get("PYTHONPATH")
    there = run_app(overrides | {"output-dir": str(tmp_path / "simulation")}, num_clients=5)
    assert os.environ.get("PYTHONPATH") == pythonpath  # Flower's Ray backend sets it; later subprocesses must not inherit it
    assert (here / "model.pt").read_bytes() == (there / "model.pt").read_bytes()
    rows = [json.loads((out / "metrics.json").read_text()) for out in (here, there)]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in rows[0]] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in rows[1]
    ]
