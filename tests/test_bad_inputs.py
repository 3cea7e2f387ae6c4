"""Bad input anywhere a user gives it: each case fails before any training with a message that
names what is wrong and how to fix it (never a traceback from deep inside a library)."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, NodeConfig, RunConfig
from common.data.client_data import load_client_data
from common.data.files import DataFileError
from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server_app.plain import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def _config(**overrides):
    return lambda directory: RunConfig.from_run_config({k.replace("_", "-"): v for k, v in overrides.items()})


def _node(node_config):
    return lambda directory: NodeConfig.from_node_config(node_config)


def _client_file(content: str, name="mine.csv", num_features=64):
    def load(directory):
        path = directory / name
        path.write_text(content)
        return load_client_data(RunConfig(), NodeConfig(data_path=str(path)), num_features, 10)

    return load


def _resume(saved_config: dict, now: dict):
    def load(directory):
        if saved_config:
            save_checkpoint(str(directory), Checkpoint(1, {}, {}, {}, [{"round": 1}], saved_config, 1.0))
        return load_checkpoint(str(directory), now)

    return load


def _ca_file(content: str | None):
    def check(directory):
        path = directory / "ca.crt"
        if content is not None:
            path.write_text(content)
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts/deploy/run_and_wait.py"), "--superlink", "127.0.0.1:9",
             "--root-certificates", str(path)],
            capture_output=True, text=True, check=False,
        )
        assert done.returncode == 2
        raise ValueError(done.stderr)

    return check


HEADER = ",".join(f"f{i}" for i in range(64)) + ",label\n"
ROW = ",".join("0.5" for _ in range(64))

CASES = {
    # run config
    "unknown strategy": (_config(strategy="fedsgd"), ConfigError, "choose one of: fedavg"),
    "robust strategy with central DP": (_config(strategy="krum", dp="server"), ConfigError, "'dpsgd' or 'local'"),
    "attack without attackers": (_config(attack="sign-flip"), ConfigError, "needs malicious-clients >= 1"),
    "resume without output-dir": (_config(resume=True), ConfigError, "resume = true needs output-dir"),
    "budget without a privacy mode": (_config(max_epsilon=3.0), ConfigError, "set dp to one of"),
    "no noise in a DP mode": (_config(dp="local", noise_multiplier=0.0), ConfigError, "gives no privacy"),
    "wrong type": (_config(num_server_rounds="ten"), ConfigError, "expected whole number"),
    # node config
    "no data for a client": (_node({}), ConfigError, "either data-path"),
    "relative data path": (_node({"data-path": "data.csv"}), ConfigError, "not an absolute path"),
    "partition out of range": (_node({"partition-id": 3, "num-partitions": 3}), ConfigError, "valid values are 0..2"),
    # a client's data file
    "missing file": (lambda directory: load_client_data(RunConfig(), NodeConfig(data_path=str(directory / "x.csv")), 64, 10),
                     DataFileError, "no such file"),
    "empty file": (_client_file(HEADER), DataFileError, "header but no rows"),
    "no label column": (_client_file("a,b\n1,2\n"), DataFileError, "no 'label' column"),
    "label out of range": (_client_file(HEADER + ROW + ",12\n"), DataFileError, "label 12 is out of range"),
    "wrong feature count": (_client_file("a,label\n1,0\n"), DataFileError, "1 features per example, but the model"),
    # resuming
    "resume with no checkpoint": (_resume({}, {"seed": 1}), FileNotFoundError, "no checkpoint at"),
    "resume with another config": (_resume({"seed": 1}, {"seed": 2}), ValueError, "seed: 1 -> 2"),
    "resume more rounds of a target-epsilon run": (
        _resume({"num-server-rounds": 5, "target-epsilon": 3.0}, {"num-server-rounds": 8, "target-epsilon": 3.0}),
        ConfigError, "the noise multiplier was solved from target-epsilon = 3.0 for 5 rounds"),
    "resume an old pickle checkpoint": (
        lambda directory: (directory / "checkpoint.pkl").write_bytes(b"\x80\x04.") and load_checkpoint(str(directory), {}),
        CheckpointError, "written by an older version of this app"),
    # certificates
    "missing CA file": (_ca_file(None), ValueError, "no such file; pass the ca.crt"),
    "a key instead of the CA": (_ca_file("-----BEGIN EC PRIVATE KEY-----\n"), ValueError, "this is a private key"),
    "not a certificate": (_ca_file("hello"), ValueError, "not a PEM certificate"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_a_clear_error(tmp_path, case):
    action, error_type, message = CASES[case]
    with pytest.raises(error_type) as error:
        action(tmp_path)
    assert message in str(error.value)
