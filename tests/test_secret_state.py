"""The server's secret state stays secret: the noise key is never in the (shareable) checkpoint,
lives in a 0600 file and resumes the exact stream; exact counts go to an operator-only file;
fixed-size DP sampling never samples from fewer clients than it accounts for."""

import json
import logging
import os
import stat

import numpy as np
import pytest

from common.config import RunConfig
from common.privacy.secret_random import SecretRandom
from server_app.checkpoint import CHECKPOINT_FILE, SECRET_FILE, Checkpoint, load_checkpoint, save_checkpoint
from server_app.diagnostics import DIAGNOSTICS_FILE, Diagnostics
from server_app.federation import Federation, WaitTimeout
from server_app.privacy import plan_privacy
from server_app.run_state import privacy_from_plain, privacy_to_plain


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _save(tmp_path, plan) -> None:
    model = {"w": np.zeros((2, 3), dtype=np.float32)}
    save_checkpoint(str(tmp_path), Checkpoint(1, model, {"privacy": privacy_to_plain(plan)}, {}, [{"round": 1}],
                                              {"seed": 1}, 1.0, plan.secret))


def test_the_checkpoint_holds_no_key_and_a_resume_continues_the_same_stream(tmp_path):
    config = RunConfig(dp="server", sampling="poisson", clients_per_round=3, clipping="adaptive", adaptive_count_stddev=1.0)
    plan = plan_privacy(config, num_clients=10)
    plan.secret.gaussian((5,), 1.0)  # the stream has moved on before the checkpoint
    key = bytes.fromhex(plan.secret.state_dict()["key"])
    _save(tmp_path, plan)

    public = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert key not in public and key.hex().encode() not in public
    assert (tmp_path / CHECKPOINT_FILE).exists() and _mode(tmp_path / SECRET_FILE) == 0o600
    assert json.loads((tmp_path / SECRET_FILE).read_text())["key"] == key.hex()

    checkpoint = load_checkpoint(str(tmp_path), {"seed": 1})
    restored = privacy_from_plain(checkpoint.federation["privacy"], config, checkpoint.secret)
    # One generator shared by the sampler, the noise and the adaptive clipping, as before.
    assert restored.sampler.rng is restored.mechanism.rng is restored.secret
    assert np.array_equal(restored.secret.gaussian((100,), 1.0), plan.secret.gaussian((100,), 1.0))


def test_a_resume_without_the_secret_file_says_what_is_missing(tmp_path):
    plan = plan_privacy(RunConfig(dp="server", sampling="all"), num_clients=4)
    _save(tmp_path, plan)
    (tmp_path / SECRET_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="secret state .* is missing"):
        load_checkpoint(str(tmp_path), {"seed": 1})


def test_a_secret_generator_refuses_to_be_pickled_anywhere_else():
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(SecretRandom())


def test_dp_counts_and_client_events_go_to_an_operator_only_file(tmp_path, caplog):
    diagnostics = Diagnostics(str(tmp_path), private=True)
    with caplog.at_level(logging.DEBUG):
        assert diagnostics.counts(3, {"num_replies": 4, "num_clipped": 1}) == {}
        diagnostics.event(3, "client 17 failed: boom")
    assert "client 17" not in caplog.text
    lines = [json.loads(line) for line in (tmp_path / DIAGNOSTICS_FILE).read_text().splitlines()]
    assert lines == [{"round": 3, "num_replies": 4, "num_clipped": 1}, {"round": 3, "event": "client 17 failed: boom"}]
    assert _mode(tmp_path / DIAGNOSTICS_FILE) == 0o600


def test_without_dp_the_counts_are_ordinary_columns(tmp_path):
    diagnostics = Diagnostics(str(tmp_path), private=False)
    assert diagnostics.counts(1, {"num_replies": 4}) == {"num_replies": 4}
    assert not (tmp_path / DIAGNOSTICS_FILE).exists()


def test_fixed_dp_sampling_waits_for_the_whole_accounted_population():
    """m of N is accounted at rate m/N: with N-1 connected the real rate would be higher."""

    class Grid:
        def get_node_ids(self):
            return [11, 12, 13, 14]  # one of the five clients the ledger was opened for is gone

    def federation(sampling: str) -> Federation:
        plan = plan_privacy(RunConfig(dp="server", sampling=sampling, clients_per_round=2), num_clients=5)
        return Federation(
            grid=Grid(), strategy=None, privacy=plan, eval_sampler=None, recorder=None, diagnostics=None,
            central_eval=None, num_features=4, num_classes=2, min_available_clients=2,
            federated_evaluation=False, tally=None, health=None, wait_timeout=0.01,
        )

    with pytest.raises(WaitTimeout, match="only 4 of the 5 required clients .fixed DP sampling"):
        federation("fixed").wait_for_clients()
    # A missing client is sampled with probability 0 <= q: Poisson sampling does not wait.
    assert federation("poisson").wait_for_clients() == [11, 12, 13, 14]


def test_flowers_own_count_lines_leave_the_log_in_a_dp_mode(tmp_path, caplog):
    from flwr.common.logger import log

    diagnostics = Diagnostics(str(tmp_path), private=True)
    with caplog.at_level(logging.INFO, logger="flwr"), diagnostics.flower_counts_diverted():
        log(logging.INFO, "configure_train: Sampled %s nodes (out of %s)", 3, 10)
        log(logging.INFO, "aggregate_train: Received 3 results and 0 failures")
        log(logging.INFO, "10 clients ready in 1.0 s")
    assert "Sampled" not in caplog.text and "Received" not in caplog.text and "clients ready" in caplog.text
    lines = (tmp_path / DIAGNOSTICS_FILE).read_text()
    assert "Sampled 3 nodes (out of 10)" in lines and "Received 3 results" in lines
