"""Every privacy mode in a whole federation of the real ServerApp and ClientApp, in process
(tests/inprocess.py): it learns, and it keeps an honest ledger in the results; the budget stop.
One DP mode also runs on Flower's real simulation runtime (tests/test_simulation_e2e.py)."""

import json

import pytest
from inprocess import run_inprocess
from run_outputs import read_results

from common.privacy.accounting import UserLevelLedger

pytestmark = pytest.mark.usefixtures("frozen_heap")

NUM_CLIENTS = 10
PRIVACY_FIELDS = {"epsilon", "sample_epsilon_max", "delta", "noise_multiplier", "clipping_norm"}
SUMMARY_FIELDS = {"epsilon", "delta", "accountant", "sampling", "guarantee"}

# mode -> (run-config overrides, the clients' own node-config policy keys)
MODES = {
    "server-poisson": ({"dp": "server", "sampling": "poisson", "clients-per-round": 5, "noise-multiplier": 0.3,
                        "clipping-norm": 2.0}, {}),
    "client-adaptive": ({"dp": "client", "clipping": "adaptive", "sampling": "all", "noise-multiplier": 0.3,
                         "clipping-norm": 0.5}, {}),
    # Fewer, shorter client rounds: each DP-SGD client solves its noise multiplier with Opacus in
    # every round, ~2-4 s per client and round.
    "dpsgd": ({"dp": "dpsgd", "target-epsilon": 8.0, "clipping-norm": 1.0, "learning-rate": 0.2,
               "local-epochs": 1}, {}),
    # Local DP within a client's default policy (epsilon <= 10, noise >= 0.3): honest, but too
    # noisy to learn on digits.
    "local": ({"dp": "local", "noise-multiplier": 3.0, "clipping-norm": 1.0}, {}),
    # Local DP learns when each client raises its own caps in its node config (which Flower's
    # simulation cannot give a node; a SuperNode's --node-config can).
    "local-own-cap": ({"dp": "local", "noise-multiplier": 0.02, "clipping-norm": 1.0},
                      {"max-epsilon": 1e9, "min-noise-multiplier": 0.0}),
}
LEARNS = {"server-poisson", "client-adaptive", "dpsgd", "local-own-cap"}
SHAPE = {"dpsgd": (2, 2)}  # mode -> (clients, rounds); the others: (NUM_CLIENTS, 4)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_learns_and_writes_its_ledger(tmp_path, mode):
    num_clients, rounds = SHAPE.get(mode, (NUM_CLIENTS, 4))
    overrides, policy = MODES[mode]
    nodes = [{"partition-id": i, "num-partitions": num_clients} | policy for i in range(num_clients)]
    out = run_inprocess({"output-dir": str(tmp_path), "num-server-rounds": rounds} | overrides, num_clients,
                        node_configs=nodes)
    metrics, summary = read_results(out)
    assert len(metrics) == rounds
    if mode in LEARNS:
        assert summary["final_central_accuracy"] > 0.2, [r["central_accuracy"] for r in metrics]
    assert all(PRIVACY_FIELDS <= set(row) for row in metrics) and SUMMARY_FIELDS <= set(summary)
    assert all(row["delta"] == 1e-5 for row in metrics)
    key = "sample_epsilon_max" if mode == "dpsgd" else "epsilon"
    epsilons = [row[key] for row in metrics]
    assert all(e is not None and e > 0 for e in epsilons) and epsilons == sorted(epsilons)
    assert summary[key] == epsilons[-1] and f"{epsilons[-1]:.3f}" in summary["guarantee"]
    assert (tmp_path / "privacy.png").stat().st_size > 0
    if mode == "dpsgd":
        assert epsilons[-1] <= 8.0  # calibrated for every planned round
    if mode == "local":
        assert epsilons[-1] <= 10.0  # every client kept within its own default cap
    if mode == "local-own-cap":
        assert epsilons[-1] > 10.0  # beyond the default cap: the clients' raised caps were used
    if mode == "client-adaptive":
        clips = [row["clipping_norm"] for row in metrics]
        assert len(set(clips)) > 1  # the norm adapts
    if mode == "server-poisson":
        assert summary["sampling"] == "poisson" and "add-or-remove" in summary["neighbouring_relation"]


def test_budget_stop_ends_before_exceeding_max_epsilon(tmp_path):
    ledger = UserLevelLedger(1.0, "all", 10, 10, 1e-5)
    ledger.step(), ledger.step()
    after_two = ledger.epsilon()
    limit = (after_two + ledger.epsilon_if_step()) / 2  # between rounds 2 and 3
    overrides = {"output-dir": str(tmp_path), "dp": "server", "sampling": "all", "noise-multiplier": 1.0,
                 "max-epsilon": limit, "num-server-rounds": 6}
    metrics, summary = read_results(run_inprocess(overrides, 10))
    assert len(metrics) == 2 and summary["rounds"] == 2
    assert "budget stop before round 3" in summary["stop_reason"]
    assert metrics[-1]["epsilon"] == pytest.approx(after_two, rel=1e-9) and metrics[-1]["epsilon"] <= limit
    assert (tmp_path / "model.pt").exists() and json.loads((tmp_path / "config.json").read_text())["max-epsilon"] == limit
