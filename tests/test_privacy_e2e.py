"""Every privacy mode end to end on Flower's real simulation runtime: it learns, and it keeps
an honest ledger in the results."""

import json

import pytest

from common.privacy.accounting import UserLevelLedger
from simulation import read_results, run_app

pytestmark = pytest.mark.e2e

PRIVACY_FIELDS = {"epsilon", "sample_epsilon_max", "delta", "noise_multiplier", "clipping_norm"}
SUMMARY_FIELDS = {"epsilon", "delta", "accountant", "sampling", "guarantee"}

MODES = {
    "server-poisson": {"dp": "server", "sampling": "poisson", "clients-per-round": 5, "noise-multiplier": 0.3,
                       "clipping-norm": 2.0},
    "client-adaptive": {"dp": "client", "clipping": "adaptive", "sampling": "all", "noise-multiplier": 0.3,
                        "clipping-norm": 0.5},
    "dpsgd": {"dp": "dpsgd", "target-epsilon": 8.0, "clipping-norm": 1.0, "learning-rate": 0.2},
    # Local DP that stays within a client's default policy (epsilon <= 10): honest, but too noisy to
    # learn on digits; that local DP learns with a cap the client raised itself is tested in process
    # (tests/test_client_policy.py), since Flower's simulation gives nodes no config of their own.
    "local": {"dp": "local", "noise-multiplier": 3.0, "clipping-norm": 1.0},
}
LEARNS = {"server-poisson", "client-adaptive", "dpsgd"}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_learns_and_writes_its_ledger(tmp_path, mode):
    rounds = 4
    metrics, summary = read_results(run_app({"output-dir": str(tmp_path), "num-server-rounds": rounds} | MODES[mode], 10))
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
    metrics, summary = read_results(run_app(overrides, 10))
    assert len(metrics) == 2 and summary["rounds"] == 2
    assert "budget stop before round 3" in summary["stop_reason"]
    assert metrics[-1]["epsilon"] == pytest.approx(after_two, rel=1e-9) and metrics[-1]["epsilon"] <= limit
    assert (tmp_path / "model.pt").exists() and json.loads((tmp_path / "config.json").read_text())["max-epsilon"] == limit
