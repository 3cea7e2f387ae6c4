"""Users' own tables: simulated on one file, evaluated on the whole held-out file, standardised
by the app (no preprocessing needed), with a warning when a run diverges or collapses."""

import json

import numpy as np
import pytest
from inprocess import run_inprocess

from common.data.partitioning import central_split
from server_app.health import RunHealth

SCALES = 10.0 ** np.arange(-2, 5)  # columns from 0.01 to 10,000: about 10^4 apart and more


def _table(seed: int, rows: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class table whose classes differ in every column, each column on its own scale."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=rows)
    centres = rng.normal(size=(3, len(SCALES)))
    x = (centres[y] + rng.normal(scale=1.2, size=(rows, len(SCALES)))) * SCALES + 5 * SCALES
    return x, y


def _write_csv(path, x, y) -> str:
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    rows = [",".join([*(f"{v:.6g}" for v in features), str(label)]) for features, label in zip(x, y)]
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def _standardised_logreg_accuracy(x_train, y_train, x_test, y_test) -> float:
    """The reference: scikit-learn's logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    return float(model.score(scaler.transform(x_test), y_test))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_table_on_wildly_different_scales_trains_like_a_standardised_logistic_regression(tmp_path, seed):
    x, y = _table(seed)
    path = _write_csv(tmp_path / "table.csv", x, y)
    out = run_inprocess({"output-dir": str(tmp_path / "run"), "dataset": "file", "dataset-path": path,
                         "seed": seed, "num-server-rounds": 5}, num_clients=5)
    summary = json.loads((out / "summary.json").read_text())
    pool, test = central_split(len(y), 0.2, seed)
    reference = _standardised_logreg_accuracy(x[pool], y[pool], x[test], y[test])
    assert summary["final_central_accuracy"] >= reference - 0.05, (summary["final_central_accuracy"], reference)
    assert summary["warnings"] == [] and summary["central_examples"] == len(central_split(len(y), 0.2, seed)[1])


def test_the_server_evaluates_on_all_of_its_held_out_file_with_logreg(tmp_path):
    x, y = _table(7, rows=714)
    clients = _write_csv(tmp_path / "clients.csv", x[:600], y[:600])
    central = _write_csv(tmp_path / "central.csv", x[600:], y[600:])
    out = run_inprocess({"output-dir": str(tmp_path / "run"), "dataset": "file", "dataset-path": clients,
                         "central-data-path": central, "model": "logreg", "num-server-rounds": 3}, num_clients=4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["central_examples"] == 114  # the whole file, not test-fraction of it
    pool, _ = central_split(600, 0.2, 42)  # the clients' rows: the rest is the held-out split of clients.csv
    reference = _standardised_logreg_accuracy(x[pool], y[pool], x[600:], y[600:])
    assert summary["final_central_accuracy"] >= reference - 0.05, (summary["final_central_accuracy"], reference)
    assert 114 * summary["final_central_accuracy"] == pytest.approx(round(114 * summary["final_central_accuracy"]))


def test_a_diverged_run_says_so_in_the_summary(tmp_path, capsys):
    x, y = _table(4)
    path = _write_csv(tmp_path / "table.csv", x, y)
    out = run_inprocess({"output-dir": str(tmp_path / "run"), "dataset": "file", "dataset-path": path,
                         "learning-rate": 40.0, "momentum": 0.0, "num-server-rounds": 3}, num_clients=3)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["warnings"]) == 1 and "training diverged" in summary["warnings"][0]
    assert "WARNING: round 1: training diverged" in capsys.readouterr().out


def test_health_names_each_problem_once():
    health = RunHealth(num_classes=3, classes_in_test=3)
    assert health.check(1, 0.9, 1.0, predicted_classes=3) == []
    assert health.check(2, float("nan"), None, predicted_classes=3) == ["diverging-central"]
    assert health.check(3, 2.8e17, 2.8e17, predicted_classes=1) == ["diverging-central", "diverging-training", "collapsed"]
    assert len(health.warnings) == 3 and "round 2" in health.warnings[0] and "not finite" in health.warnings[0]
    assert RunHealth(3, classes_in_test=1).check(1, 0.5, None, predicted_classes=1) == []
