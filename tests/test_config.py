"""The run config is validated at start: every error names the key, the bad value and what is valid."""

import dataclasses
from pathlib import Path

import pytest
import tomllib

from common.config import ConfigError, NodeConfig, RunConfig
from common.names import DATASETS, MODELS, PARTITIONERS, STRATEGIES

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_pyproject_lists_every_key_with_the_same_default():
    app_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    # The declared defaults ("auto" included: a mode-dependent default is resolved per dp mode).
    assert app_config == {f.metadata["key"]: f.default for f in dataclasses.fields(RunConfig)}


def test_auto_sampling_is_poisson_in_user_level_modes_and_fixed_otherwise():
    for dp, expected in (("none", "fixed"), ("server", "poisson"), ("client", "poisson"), ("dpsgd", "fixed"),
                         ("local", "fixed")):
        config = RunConfig.from_run_config({"dp": dp, "target-epsilon": 0.0 if dp == "none" else 3.0})
        assert config.sampling == expected and config.to_dict()["sampling"] == expected, dp
        assert RunConfig(dp=dp).sampling == expected, dp
    # an explicit choice is kept
    assert RunConfig.from_run_config({"dp": "server", "sampling": "fixed"}).sampling == "fixed"
    assert RunConfig.from_run_config({"dp": "none", "sampling": "poisson"}).sampling == "poisson"


def test_pyproject_defaults_validate():
    app_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_run_config(app_config) == RunConfig()


@pytest.mark.parametrize(
    "key, value, must_mention",
    [
        ("strategy", "fedsgd", STRATEGIES),
        ("dataset", "cifar", DATASETS),
        ("partitioner", "shards", PARTITIONERS),
        ("model", "resnet", MODELS),
        ("optimizer", "rmsprop", ("sgd", "adam")),
        ("num-server-rounds", 0, (">= 1",)),
        ("local-epochs", -1, (">= 1",)),
        ("batch-size", 0, (">= 1",)),
        ("learning-rate", 0.0, ("(0",)),
        ("dirichlet-alpha", -0.5, ("(0",)),
        ("test-fraction", 1.0, ("(0, 1)",)),
        ("clients-per-round", 0, ("whole number >= 1", "(0, 1]")),
        ("clients-per-round", 1.5, ("whole number >= 1", "(0, 1]")),
        ("trim-beta", 0.5, ("(0, 0.5)",)),
        ("output-dir", "relative/dir", ("absolute path",)),
        ("learning-rate", "fast", ("expected number",)),
        ("num-server-rounds", 2.5, ("expected whole number",)),
        ("seed", True, ("not a boolean",)),
    ],
)
def test_bad_value_names_key_value_and_choices(key, value, must_mention):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_run_config({key: value})
    message = str(error.value)
    assert key in message and repr(value) in message
    for text in must_mention:
        assert text in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown run-config key.*num-rounds.*valid keys: .*num-server-rounds"):
        RunConfig.from_run_config({"num-rounds": 3})


def test_file_dataset_needs_central_file():
    with pytest.raises(ConfigError, match="central-data-path"):
        RunConfig.from_run_config({"dataset": "file"})


def test_ints_accepted_for_floats_and_clients_per_round_keeps_its_kind():
    config = RunConfig.from_run_config({"learning-rate": 1, "clients-per-round": 4})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.clients_per_round == 4 and isinstance(config.clients_per_round, int)


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({}, "either data-path"),
        ({"partition-id": 3}, "either data-path"),
        ({"partition-id": 5, "num-partitions": 5}, "partition-id = 5 is out of range; valid values are 0..4"),
        ({"partition-id": "0", "num-partitions": 5}, "partition-id = '0' must be a whole number"),
        ({"data-path": "client.csv"}, "data-path = 'client.csv' is not an absolute path"),
        ({"data-path": "/d.csv", "colour": "red"}, "unknown node-config key(s): colour"),
    ],
)
def test_bad_node_config(node_config, message):
    with pytest.raises(ConfigError) as error:
        NodeConfig.from_node_config(node_config)
    assert message in str(error.value)


def test_node_config_accepts_partition_or_file():
    assert NodeConfig.from_node_config({"partition-id": 1, "num-partitions": 3}).partition_id == 1
    assert NodeConfig.from_node_config({"data-path": "/data/mine.csv"}).data_path == "/data/mine.csv"


def test_each_privacy_mode_is_one_object_the_code_asks():
    from common.names import DP_MODES
    from common.privacy.modes import MODES

    assert DP_MODES == tuple(MODES) == ("none", "server", "client", "dpsgd", "local")
    modes = {name: RunConfig.from_run_config({"dp": name}).privacy for name in DP_MODES}
    assert [n for n, m in modes.items() if m.server_noise] == ["server", "client"]
    assert [n for n, m in modes.items() if m.self_protecting] == ["dpsgd", "local"]
    assert [n for n, m in modes.items() if not m.private] == ["none"] and modes["client"].client_clips
