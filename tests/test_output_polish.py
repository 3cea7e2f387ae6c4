"""What a user reads: every log line once and at its level, privacy columns filled in every
DP mode, whole-number round ticks."""

import json
import subprocess
import sys

from inprocess import run_inprocess

FAST = {"num-server-rounds": 2, "local-epochs": 1}


def test_flower_lines_print_once_even_after_dp_accounting_logged_through_absl():
    """absl's first message calls logging.basicConfig(); without the app's guard every flwr record
    then printed twice ("INFO : x" and "INFO:flwr:x") and DEBUG lines appeared."""
    code = (
        "import server_app.app, logging\n"
        "from absl import logging as absl_logging\n"
        "absl_logging.warning('absl speaks')\n"
        "from flwr.common.logger import log\n"
        "log(logging.INFO, 'only-once')\n"
        "log(logging.DEBUG, 'debug-line')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    output = done.stdout + done.stderr
    assert output.count("only-once") == 1 and "debug-line" not in output, output


def test_dpsgd_rows_carry_the_clipping_norm(tmp_path):
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "dp": "dpsgd", "noise-multiplier": 1.0,
                                "clipping-norm": 0.7}, num_clients=3)
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["clipping_norm"] for row in rows] == [0.7, 0.7]


def test_round_ticks_are_whole_numbers():
    from server_app.results import _whole_rounds

    ticks = _whole_rounds().tick_values(1, 3)
    assert all(float(t).is_integer() for t in ticks)


def test_clients_without_validation_data_do_not_break_federated_evaluation(tmp_path):
    """1,000 clients on digits hold 1-2 examples each: none has a validation split, every
    evaluation weight is 0 and Flower's weighted mean divided by zero, failing the run."""
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "num-server-rounds": 1, "clients-per-round": 20},
                        num_clients=1000)
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "metrics.json").read_text())
    assert summary["stop_kind"] == "completed" and rows[0]["federated_accuracy"] is None
