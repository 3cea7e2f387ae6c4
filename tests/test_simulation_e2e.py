"""One DP federation on Flower's real simulation runtime (Ray), judged by the files it writes.

Behaviour is tested in process (tests/test_federation.py, tests/test_privacy_modes.py,
tests/test_byzantine.py); this checks what only the real runtime does: ClientApps in Ray actors,
each node's Context (here DP-SGD's privacy ledger) carried between rounds by Flower's NodeState
and serialized on the way, and the app loaded from its directory with the fused run config.
"""

import pytest
from run_outputs import check_outputs
from simulation import run_app

pytestmark = pytest.mark.e2e

NUM_CLIENTS = 3  # each DP-SGD client solves its noise multiplier with Opacus in every round (~2-4 s)
ROUNDS = 2
TARGET_EPSILON = 8.0


def test_a_dpsgd_federation_learns_and_keeps_each_clients_ledger_across_rounds(tmp_path):
    overrides = {"output-dir": str(tmp_path), "num-server-rounds": ROUNDS, "local-epochs": 1, "dp": "dpsgd",
                 "target-epsilon": TARGET_EPSILON, "clipping-norm": 1.0, "learning-rate": 0.2}
    metrics, summary = check_outputs(run_app(overrides, num_clients=NUM_CLIENTS), rounds=ROUNDS, num_clients=None)
    assert summary["final_central_accuracy"] > 0.2, [r["central_accuracy"] for r in metrics]
    # Each client's ledger lives in its Context: had the runtime lost it between rounds, epsilon
    # would restart at one round's worth instead of growing to the calibrated target.
    epsilons = [row["sample_epsilon_max"] for row in metrics]
    assert all(e is not None and e > 0 for e in epsilons) and epsilons == sorted(epsilons)
    assert len(set(epsilons)) == ROUNDS and epsilons[-1] <= TARGET_EPSILON
    assert epsilons[-1] == pytest.approx(TARGET_EPSILON, rel=0.05)  # calibrated for every planned round
    assert summary["sample_epsilon_max"] == epsilons[-1] and f"{epsilons[-1]:.3f}" in summary["guarantee"]
    assert (tmp_path / "privacy.png").stat().st_size > 0


def test_runs_sharing_one_runtime_see_nothing_of_each_other_and_it_is_gone_after(tmp_path, monkeypatch):
    """What fl-dp sweep does: several `fl-dp simulate` runs on ONE SuperLink + Ray head. A DP-SGD run,
    a non-private run with another seed, the DP-SGD run again: the non-private run gives exactly what a
    fresh federation gives (the in-process harness: tests/test_inprocess.py shows it releases what
    Flower's runtime releases, bit for bit), the repeated DP-SGD run spends exactly the first one's
    epsilon (no client ledger carried over in a Ray worker or the SuperLink), and no process of the
    runtime is left."""
    import json

    from inprocess import run_inprocess

    from fl_dp import simulate
    from fl_dp.run_config import parse_overrides
    from fl_dp.runtime import DESCRIPTOR, RUNTIME_ENV, Runtime, group_pids

    base = ["--num-clients", "2", "--cpus-per-client", "1"]
    dpsgd = "dp='dpsgd' noise-multiplier=1.0 num-server-rounds=2 local-epochs=1 seed=1"
    plain = "num-server-rounds=2 local-epochs=1 seed=7"

    def run(name: str, config: str) -> list[dict]:
        assert simulate.main([*base, "--output-dir", str(tmp_path / name), "--run-config", config]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())

    with Runtime() as runtime:
        monkeypatch.setenv(RUNTIME_ENV, str(runtime.home / DESCRIPTOR))
        first, shared_plain, again = run("dpsgd-1", dpsgd), run("plain-shared", plain), run("dpsgd-2", dpsgd)
        groups = runtime.process_groups()
        assert len(groups) == 2 and all(group_pids(g) for g in groups)
    assert not [pid for g in groups for pid in group_pids(g)], "a process of the shared runtime outlived it"
    assert not runtime.home.exists()

    alone_dir = run_inprocess(parse_overrides(plain) | {"output-dir": str(tmp_path / "plain-alone")}, num_clients=2)
    alone = json.loads((alone_dir / "metrics.json").read_text())
    keys = ("central_accuracy", "central_loss", "federated_accuracy", "federated_loss", "train_loss")
    assert [[row[k] for k in keys] for row in shared_plain] == [[row[k] for k in keys] for row in alone]
    epsilons = [row["sample_epsilon_max"] for row in first]
    assert epsilons[0] > 0 and [row["sample_epsilon_max"] for row in again] == epsilons
