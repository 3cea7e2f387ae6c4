"""The empirical privacy audit (issue 14): the bound's math against the papers, and audits of
real runs (the real ServerApp and ClientApp in process, tests/inprocess.py).

* On the real mechanism the measured lower bound never exceeds the ledger's epsilon (z = 1, 0.5).
* The audit can fail: with the noise reproducible from a debug-noise-key the attacker regenerates
  and subtracts it, the lower bound rises far above the ledger's epsilon, and the audit says broken.
* Without DP the canaries are found: the bound is as large as its canaries allow.
"""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest
from inprocess import run_inprocess

from client_app.canary import AUDIT_KEY_ENV, HELD_OUT
from common.privacy import audit

KEY = bytes(range(32))  # the auditor's key: fixed here so every run inserts the same canaries
FAST = {"local-epochs": 1, "val-fraction": 0.0, "fraction-evaluate": 0.0, "seed": 7}


# --- the math -------------------------------------------------------------------------------------


def _p_value_term_by_term(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Steinke et al. 2023, Theorem 5.2 / Appendix D, summed term by term with exact binomials."""
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    pmf = [math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += pmf[v - i]  # P[v - i <= Bin(r, p) < v]
        alpha = max(alpha, window / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def test_one_run_bound_reproduces_theorem_3_1_worked_number():
    # delta = 0, r guesses all correct: P[Bin(r, p) >= r] = p^r = 0.05 gives p = 0.05^(1/r), and
    # epsilon = log(p / (1 - p)): for r = 100 that is 3.4930 (and 2.7847 for r = 50).
    for r, expected in ((100, 3.4930), (50, 2.7847)):
        p = 0.05 ** (1 / r)
        assert math.log(p / (1 - p)) == pytest.approx(expected, abs=1e-4)
        assert audit.one_run_epsilon(r, r, r, 0.0, 0.05) == pytest.approx(expected, abs=1e-4)
    # delta only ever weakens the conclusion, the more the more canaries it is paid for
    assert audit.one_run_epsilon(1000, 100, 100, 1e-5, 0.05) < 3.4930
    assert audit.one_run_epsilon(10**6, 100, 100, 1e-5, 0.05) < audit.one_run_epsilon(1000, 100, 100, 1e-5, 0.05)
    assert audit.one_run_epsilon(1000, 100, 50, 1e-5, 0.05) == 0.0  # chance level rejects nothing


@pytest.mark.parametrize("m,r,v,epsilon,delta", [
    (100, 100, 100, 3.0, 0.0), (1000, 100, 90, 1.5, 1e-5), (1000, 200, 150, 0.5, 1e-3), (50, 20, 19, 2.0, 1e-2),
])
def test_one_run_p_value_matches_the_papers_sums(m, r, v, epsilon, delta):
    assert audit.one_run_p_value(m, r, v, epsilon, delta) == pytest.approx(
        _p_value_term_by_term(m, r, v, epsilon, delta), rel=1e-9, abs=1e-15)


def test_one_run_epsilon_is_where_the_p_value_reaches_the_significance():
    eps = audit.one_run_epsilon(1000, 100, 90, 1e-5, 0.05)
    assert _p_value_term_by_term(1000, 100, 90, eps, 1e-5) == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gaussian_estimate_matches_dp_accounting(mu):
    """Andrew et al.'s estimate is the epsilon of the Gaussian mechanism with mu = shift / std."""
    import dp_accounting

    expected = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(1 / mu)).get_epsilon(1e-5)
    assert audit.gaussian_epsilon(mu, 1e-5) == pytest.approx(expected, rel=1e-3)


def test_held_out_canary_cosines_are_the_isotropic_null():
    """A direction that never touched the model: cos ~ N(0, 1/d) (Andrew et al., Section 3)."""
    d = 5000
    change = np.random.default_rng(0).normal(size=d) + 3.0  # any fixed vector
    cos = audit.cosine_scores(KEY, 400, change)[:, 0]
    assert abs(cos.mean()) < 3 / math.sqrt(d * 400)
    assert cos.std() * math.sqrt(d) == pytest.approx(1.0, abs=0.12)


def test_lower_bound_of_a_gaussian_mechanism_stays_below_its_epsilon():
    """Scores from the Gaussian mechanism itself (mu = 2: epsilon 8.6 at delta 1e-5), many draws."""
    rng = np.random.default_rng(1)
    truth = audit.gaussian_epsilon(2.0, 1e-5)
    for _ in range(20):
        included = rng.random(500) < 0.5
        bound = audit.one_run_lower_bound(rng.normal(2.0 * included, 1.0), included, 1e-5).epsilon
        assert 0.5 < bound < truth


def test_canaries_come_from_the_key():
    included = [audit.canary_included(KEY, i) for i in range(1000)]
    assert 430 < sum(included) < 570
    assert included == [audit.canary_included(KEY, i) for i in range(1000)]
    assert included != [audit.canary_included(bytes(32), i) for i in range(1000)]
    c = audit.canary_direction(KEY, 3, 100)
    assert np.linalg.norm(c) == pytest.approx(1.0) and np.array_equal(c, audit.canary_direction(KEY, 3, 100))


# --- audits of real runs --------------------------------------------------------------------------


def _audit(tmp_path, monkeypatch, real: int, canaries: int, **overrides):
    from client_app.canary import CANARY_MODES
    from fl_dp.audit import SECRET_FILE, analyse, write_audit

    monkeypatch.setenv(AUDIT_KEY_ENV, KEY.hex())
    nodes = real + canaries if overrides.get("dp", "none") in CANARY_MODES else real
    out = run_inprocess(
        FAST | {"output-dir": str(tmp_path / "run"), "audit-canaries": canaries, "min-available-clients": nodes}
        | overrides,
        num_clients=nodes,
    )
    report, details = analyse(out, KEY)
    write_audit(out, report, details)
    assert stat.S_IMODE(os.stat(out / SECRET_FILE).st_mode) == 0o600  # the key and the bits
    assert json.loads((out / "audit.json").read_text())["epsilon_lower_bound"] == report["epsilon_lower_bound"]
    return out, report


@pytest.mark.parametrize("z", [1.0, 0.5])
def test_real_mechanism_lower_bound_does_not_exceed_the_ledger(tmp_path, monkeypatch, z):
    out, report = _audit(tmp_path, monkeypatch, 20, 100, dp="server", sampling="poisson", **{
        "clients-per-round": 20, "num-server-rounds": 3, "noise-multiplier": z})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 120  # the ledger's population counts the canaries
    assert report["epsilon_upper_bound"] == summary["epsilon"]
    assert 0 <= report["epsilon_lower_bound"] <= report["epsilon_upper_bound"]
    assert not report["broken"] and report["verdict"].startswith("consistent")
    assert set(report) >= {"epsilon_lower_bound", "epsilon_upper_bound", "delta", "method", "canaries", "confidence"}
    assert report["canaries"] == 100 and report["confidence"] == 0.95 and report["delta"] == 1e-5
    scores = report["canary_scores"]["max cosine over rounds"]
    assert scores["inserted"]["n"] + scores["held_out"]["n"] == 100


def test_client_mode_canaries_clip_themselves_and_held_out_ones_are_absent(tmp_path, monkeypatch):
    out, report = _audit(tmp_path, monkeypatch, 10, 60, dp="client", sampling="poisson", **{
        "clients-per-round": 20, "num-server-rounds": 2, "noise-multiplier": 1.0})
    assert report["epsilon_lower_bound"] <= report["epsilon_upper_bound"]
    events = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    text = json.dumps(events)
    assert "exceeded the clip norm" not in text and "rejected the update" not in text  # canaries clip themselves
    assert all(event.get("num_rejected", 0) == 0 for event in events)
    refusals = [e for e in events if "refused to train" in json.dumps(e)]
    assert refusals and all(HELD_OUT in json.dumps(e) for e in refusals)  # only held-out canaries decline


def test_audit_finds_a_broken_mechanism_when_the_noise_is_known(tmp_path, monkeypatch):
    """debug-noise-key: the noise and the sampling can be regenerated; the audit does so."""
    out, report = _audit(tmp_path, monkeypatch, 20, 200, dp="server", sampling="poisson", **{
        "clients-per-round": 40, "num-server-rounds": 4, "noise-multiplier": 4.0, "debug-noise-key": "known"})
    assert report["epsilon_upper_bound"] < 1.0
    assert report["epsilon_lower_bound"] > 3 * report["epsilon_upper_bound"]
    assert report["broken"] and report["verdict"].startswith("BROKEN")
    assert "regenerated" in report["method"]


def test_non_private_run_gives_away_its_canaries(tmp_path, monkeypatch):
    out, report = _audit(tmp_path, monkeypatch, 10, 100, dp="none", **{"num-server-rounds": 2})
    assert report["epsilon_upper_bound"] is None and not report["broken"]
    assert report["canary_scores"]["max cosine over rounds"]["auc"] == 1.0
    perfect = audit.perfect_guess_bound(100, 1e-5, statistics=2, inserted=report["canaries_inserted"])
    assert report["epsilon_lower_bound"] == pytest.approx(perfect)  # every game guessed right
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(row["train_loss"]) for row in metrics)


def test_dpsgd_canary_examples(tmp_path, monkeypatch):
    out, report = _audit(tmp_path, monkeypatch, 3, 40, dp="dpsgd", **{
        "num-server-rounds": 2, "noise-multiplier": 1.0, "min-available-clients": 3})
    assert report["epsilon_upper_bound"] == json.loads((out / "summary.json").read_text())["sample_epsilon_max"]
    assert 0 <= report["epsilon_lower_bound"] <= report["epsilon_upper_bound"]
    assert "examples" in report["method"]


def test_canary_examples_join_partition_0_only(monkeypatch):
    from client_app.canary import with_canary_examples
    from common.config import NodeConfig, RunConfig
    from common.data.client_data import load_client_data

    monkeypatch.setenv(AUDIT_KEY_ENV, KEY.hex())
    config = RunConfig.from_run_config({"dp": "dpsgd", "audit-canaries": 40})
    inserted = sum(audit.canary_included(KEY, i) for i in range(40))
    for partition, extra in ((0, inserted), (1, 0)):
        node = NodeConfig(partition, 3)
        data = load_client_data(config, node, 64, 10)
        assert len(with_canary_examples(config, node, data, 10).y_train) == len(data.y_train) + extra


def test_audit_command_refuses_local_dp_before_starting(capsys):
    from fl_dp.cli import main

    assert main(["audit", "--run-config", "dp='local'"]) == 2
    assert "cannot be audited" in capsys.readouterr().err
