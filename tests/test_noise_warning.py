"""Before round 1, a user-level DP run whose planned noise outweighs anything the clients could
contribute says so plainly (on the log and in summary.json's warnings); a sensible plan does not."""

import json

from inprocess import run_inprocess

FAST = {"local-epochs": 1, "num-server-rounds": 2, "dp": "server"}


def _warnings(out) -> list[str]:
    return json.loads((out / "summary.json").read_text())["warnings"]


def test_too_few_clients_for_the_target_epsilon_are_warned_before_training(tmp_path, capsys):
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "target-epsilon": 1.0}, num_clients=3)
    (warning,) = [w for w in _warnings(out) if "swamp" in w]
    assert "clients per round" in warning and "target-epsilon" in warning
    printed = capsys.readouterr().out
    assert printed.index("WARNING: the privacy noise will swamp") < printed.index("round 1/2")


def test_a_plan_whose_noise_the_clients_can_outweigh_is_not_warned(tmp_path):
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "model": "logreg", "noise-multiplier": 0.3},
                        num_clients=10)
    assert not [w for w in _warnings(out) if "swamp" in w]
