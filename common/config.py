"""The one typed, validated run configuration, built from Flower's ``context.run_config``.

Both the ServerApp and the ClientApp call :func:`RunConfig.from_run_config` first thing,
so a bad value fails before any training, with a message that names the key, the bad value
and what would be valid. Nothing else in the project reads raw run-config keys.

Keys are kebab-case (as in ``pyproject.toml``); attributes are the same names in
snake_case. Every key's default lives both here and in ``[tool.flwr.app.config]``; a test
keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from common.names import (
    ACCOUNTANTS,
    ATTACKS,
    CLIPPING,
    DATASETS,
    DP_MODES,
    LOCAL_MECHANISMS,
    MEAN_BASED_STRATEGIES,
    MODELS,
    OPTIMIZERS,
    PARTITIONERS,
    SAMPLING,
    STRATEGIES,
)
from common.privacy.modes import MODES, PrivacyMode


class ConfigError(ValueError):
    """A run-config or node-config value is missing, of the wrong type, or out of range."""


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if value not in choices:
            raise ConfigError(
                f"{key} = {value!r} is not valid; choose one of: {', '.join(choices)}"
            )

    return check


def _range(low: float, high: float, low_open: bool = False, high_open: bool = False):
    def check(key: str, value: Any) -> None:
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            raise ConfigError(
                f"{key} = {value!r} is out of range; valid values lie in "
                f"{left}{low}, {high}{right}"
            )

    return check


def _absolute_path_or_empty(key: str, value: Any) -> None:
    if value and not os.path.isabs(value):
        raise ConfigError(
            f"{key} = {value!r} is not an absolute path; give an absolute path "
            f"(e.g. {os.path.abspath(value)!r}) or leave it empty for the default"
        )


def _positive_int(key: str, value: Any) -> None:
    if value < 1:
        raise ConfigError(f"{key} = {value!r} must be a whole number >= 1")


def _non_negative(key: str, value: Any) -> None:
    if value < 0:
        raise ConfigError(f"{key} = {value!r} must be >= 0")


def _clients_per_round(key: str, value: Any) -> None:
    if isinstance(value, int) and value >= 1:
        return
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return
    raise ConfigError(
        f"{key} = {value!r} is not valid; give a whole number >= 1 (clients per round) "
        "or a fraction in (0, 1] (share of connected clients, 1.0 = all)"
    )


INF = float("inf")
AUTO = "auto"  # a mode-dependent default, resolved when the RunConfig is built (see _resolve_auto)


def _key(name: str, default: Any, check: Callable[[str, Any], None] | None = None, help: str = ""):
    """A dataclass field that knows its run-config key, its validator and its meaning."""
    return field(default=default, metadata={"key": name, "check": check, "help": help})


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration. See ``[tool.flwr.app.config]`` in pyproject.toml."""

    num_server_rounds: int = _key("num-server-rounds", 5, _positive_int, "rounds of federated training")
    strategy: str = _key("strategy", "fedavg", _choice(STRATEGIES), "aggregation strategy")
    dataset: str = _key("dataset", "digits", _choice(DATASETS), "dataset name")
    dataset_samples: int = _key("dataset-samples", 5000, _positive_int, "mnist1d: samples to generate")
    central_data_path: str = _key(
        "central-data-path", "", _absolute_path_or_empty, "file: the server's held-out CSV/NPZ"
    )
    dataset_path: str = _key(
        "dataset-path", "", _absolute_path_or_empty,
        "file: one CSV/NPZ table split into the server's held-out part and simulated clients' partitions",
    )
    partitioner: str = _key("partitioner", "iid", _choice(PARTITIONERS), "how demo data is split")
    dirichlet_alpha: float = _key("dirichlet-alpha", 0.5, _range(0, INF, low_open=True))
    classes_per_client: int = _key("classes-per-client", 2, _positive_int, "pathological partitioner")
    test_fraction: float = _key("test-fraction", 0.2, _range(0, 1, True, True), "central held-out share")
    val_fraction: float = _key("val-fraction", 0.2, _range(0, 1, False, True), "client validation share")
    model: str = _key("model", "mlp", _choice(MODELS), "model name")
    optimizer: str = _key("optimizer", "sgd", _choice(OPTIMIZERS), "client optimizer")
    local_epochs: int = _key("local-epochs", 5, _positive_int)
    batch_size: int = _key("batch-size", 16, _positive_int)
    learning_rate: float = _key("learning-rate", 0.1, _range(0, INF, low_open=True))
    momentum: float = _key("momentum", 0.9, _range(0, 1, high_open=True))
    clients_per_round: float = _key("clients-per-round", 1.0, _clients_per_round)
    min_available_clients: int = _key("min-available-clients", 2, _positive_int, "wait for this many before a round")
    fraction_evaluate: float = _key("fraction-evaluate", 1.0, _range(0, 1))
    seed: int = _key("seed", 42, _non_negative)
    output_dir: str = _key("output-dir", "", _absolute_path_or_empty, "absolute results directory")
    proximal_mu: float = _key("proximal-mu", 0.01, _non_negative, "fedprox")
    server_learning_rate: float = _key(
        "server-learning-rate", 1.0, _range(0, INF, low_open=True), "fedavgm, fedadam, fedyogi, fedadagrad"
    )
    server_momentum: float = _key("server-momentum", 0.9, _range(0, 1, high_open=True), "fedavgm")
    server_beta_1: float = _key("server-beta-1", 0.9, _range(0, 1, high_open=True), "fedadam, fedyogi")
    server_beta_2: float = _key("server-beta-2", 0.99, _range(0, 1, high_open=True), "fedadam, fedyogi")
    server_tau: float = _key("server-tau", 0.001, _range(0, INF, low_open=True), "fedadam, fedyogi, fedadagrad")
    trim_beta: float = _key("trim-beta", 0.2, _range(0, 0.5, True, True), "fedtrimmedavg")
    num_malicious_nodes: int = _key("num-malicious-nodes", 0, _non_negative, "krum, multikrum, bulyan")
    num_nodes_to_select: int = _key("num-nodes-to-select", 3, _positive_int, "multikrum")
    qfedavg_q: float = _key("qfedavg-q", 0.1, _non_negative, "qfedavg")
    # Differential privacy (see common/privacy/ and the README's "Differential privacy").
    dp: str = _key("dp", "none", _choice(DP_MODES), "privacy mode")
    clipping: str = _key("clipping", "fixed", _choice(CLIPPING), "server/client: fixed or adaptive clip norm")
    clipping_norm: float = _key("clipping-norm", 1.0, _range(0, INF, low_open=True), "L2 (L1 for laplace) bound")
    noise_multiplier: float = _key("noise-multiplier", 1.0, _non_negative, "noise std / clipping norm")
    sampling: str = _key(
        "sampling", "auto", _choice((AUTO,) + SAMPLING),
        "how clients are sampled each round; auto: poisson with dp = server/client, fixed otherwise",
    )
    target_epsilon: float = _key("target-epsilon", 0.0, _non_negative, "0: use noise-multiplier as given")
    target_delta: float = _key("target-delta", 1e-5, _range(0, 1, True, True))
    max_epsilon: float = _key("max-epsilon", 0.0, _non_negative, "0: no budget stop")
    accountant: str = _key("accountant", "rdp", _choice(ACCOUNTANTS), "server/client ledger")
    adaptive_target_quantile: float = _key("adaptive-target-quantile", 0.5, _range(0, 1, True, True))
    adaptive_clip_lr: float = _key("adaptive-clip-lr", 0.2, _range(0, INF, low_open=True))
    adaptive_count_stddev: float = _key("adaptive-count-stddev", 0.0, _non_negative, "0: expected clients / 20")
    local_mechanism: str = _key("local-mechanism", "gaussian", _choice(LOCAL_MECHANISMS), "local mode")
    debug_noise_key: str = _key(
        "debug-noise-key", "", None,
        "DEBUG ONLY: derive the server's DP noise and sampling from this key (reproducible, NO privacy)",
    )
    # Reliability (see server_app/checkpoint.py and client_app/attacks.py).
    resume: bool = _key("resume", False, None, "continue the run checkpointed in output-dir")
    overwrite: bool = _key("overwrite", False, None, "a new run into a used output-dir moves the old run aside")
    wait_timeout: float = _key("wait-timeout", 300.0, _non_negative, "seconds to wait for clients; 0 = forever")
    attack: str = _key("attack", "none", _choice(ATTACKS), "simulated Byzantine clients' attack")
    malicious_clients: int = _key("malicious-clients", 0, _non_negative, "how many simulated clients attack")
    attack_scale: float = _key("attack-scale", 10.0, _range(0, INF, low_open=True), "attack magnitude")
    identify_clients: bool = _key(
        "identify-clients", True, None, "ask clients once for a stable identity: reproducible sampling"
    )
    index_idle_nodes: bool = _key(
        "index-idle-nodes", False, None,
        "huge simulations: Flower 1.41.0's engine skips idle nodes (patches private Flower API)",
    )
    audit_canaries: int = _key(
        "audit-canaries", 0, _non_negative,
        "fl-dp audit: canary clients (server, client, none) or canary examples in partition 0 (dpsgd); 0: none",
    )

    def __post_init__(self) -> None:
        _resolve_auto(self)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Check every key and value; missing keys take their defaults."""
        known = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        values = {}
        for key, f in known.items():
            value = run_config.get(key, f.default)
            value = _coerce(key, value, f.default)
            check = f.metadata["check"]
            if check is not None:
                check(key, value)
            values[f.name] = value
        config = cls(**values)
        config._check_combinations()
        return config

    def _check_combinations(self) -> None:
        if self.privacy.server_noise and self.strategy not in MEAN_BASED_STRATEGIES:
            raise ConfigError(
                f"strategy = {self.strategy!r} cannot be combined with dp = {self.dp!r}: user-level "
                "DP-FedAvg calibrates its noise to the sensitivity of the MEAN of clipped updates, "
                f"and {self.strategy} does not aggregate by the mean. Use dp = 'dpsgd' or 'local' "
                f"with {self.strategy}, or one of {', '.join(MEAN_BASED_STRATEGIES)} with dp = {self.dp!r}"
            )
        if self.clipping == "adaptive" and not self.privacy.server_noise:
            raise ConfigError(
                f"clipping = 'adaptive' needs dp = 'server' or 'client' (got dp = {self.dp!r}); "
                "use clipping = 'fixed' otherwise"
            )
        if not self.privacy.private and (self.target_epsilon or self.max_epsilon):
            raise ConfigError(
                f"target-epsilon = {self.target_epsilon!r} / max-epsilon = {self.max_epsilon!r} need a "
                f"privacy mode; set dp to one of: {', '.join(DP_MODES[1:])}"
            )
        if self.accountant == "pld" and self.sampling == "fixed" and self.privacy.server_noise:
            raise ConfigError(
                "accountant = 'pld' cannot account sampling = 'fixed' (dp-accounting's PLD has no "
                "fixed-size sampling event); use accountant = 'rdp' or sampling = 'poisson' or 'all'"
            )
        if self.debug_noise_key and not self.privacy.server_noise:
            raise ConfigError(
                f"debug-noise-key applies to the server's noise (dp = 'server' or 'client'), not dp = {self.dp!r}; "
                "a dpsgd/local client takes its own debug key from its node config, never from the server"
            )
        if self.local_mechanism == "laplace" and self.dp != "local":
            raise ConfigError("local-mechanism = 'laplace' applies to dp = 'local' only")
        if self.privacy.private and self.noise_multiplier == 0 and not self.target_epsilon:
            raise ConfigError(
                f"dp = {self.dp!r} with noise-multiplier = 0.0 gives no privacy; set noise-multiplier > 0 "
                "or target-epsilon > 0"
            )
        if self.resume and not self.output_dir:
            raise ConfigError("resume = true needs output-dir: the absolute path of the run to continue")
        if self.attack != "none" and self.malicious_clients == 0:
            raise ConfigError(f"attack = {self.attack!r} needs malicious-clients >= 1")
        if self.dataset == "file" and not (self.central_data_path or self.dataset_path):
            raise ConfigError(
                "dataset = 'file' needs central-data-path (the absolute path of the server's held-out CSV/NPZ, "
                "the same columns as the clients' files) or, to simulate on one table, dataset-path"
            )
        if self.dataset_path and self.dataset != "file":
            raise ConfigError(f"dataset-path applies to dataset = 'file' (got dataset = {self.dataset!r})")

    @property
    def privacy(self) -> PrivacyMode:
        """What the chosen ``dp`` mode does (common/privacy/modes.py)."""
        return MODES[self.dp]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with its run-config keys, as written to config.json."""
        return {f.metadata["key"]: getattr(self, f.name) for f in dataclasses.fields(self)}


def _resolve_auto(config: "RunConfig") -> None:
    """Mode-dependent defaults: a key left at ``"auto"`` takes the value measured best for the ``dp`` mode.

    ``sampling``: ``poisson`` in the user-level modes (``server``, ``client``), ``fixed`` otherwise.
    At the same target epsilon Poisson sampling needs far less noise than fixed-size sampling,
    which is accounted under the replace-one relation with a looser bound (1,000 clients, 100
    rounds, epsilon 4: z = 1.01 against 2.88 for 50 clients per round, 11.7 against 23.3 for all
    of them); benchmarks/results_privacy.md, "Recipes". Without server noise sampling protects
    nothing, so those modes keep the seeded fixed-size sampling (non-DP runs are unchanged).
    """
    if config.sampling == AUTO and config.dp in MODES:
        object.__setattr__(config, "sampling", "poisson" if MODES[config.dp].server_noise else "fixed")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Accept TOML's int where a float is expected; refuse any other type change."""
    expected: type | tuple[type, ...] = type(default)
    if key == "clients-per-round":  # a count (int) or a fraction (float)
        expected = (int, float)
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{key} = {value!r} must be a {_type_name(default)}, not a boolean")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise ConfigError(
            f"{key} = {value!r} has type {type(value).__name__}; expected {_type_name(default)}"
        )
    return value


def _type_name(default: Any) -> str:
    return {int: "whole number", float: "number", str: "string", bool: "boolean (true or false)"}[type(default)]


DEFAULT_CLIENT_MAX_EPSILON = 10.0
DEFAULT_CLIENT_MIN_NOISE = 0.3
DEFAULT_CLIENT_MAX_DELTA = 1e-5


@dataclass(frozen=True)
class ClientPolicy:
    """A ``dpsgd``/``local`` client's own privacy policy, from its node config, never from the server.

    In those modes the client trusts no one: whatever the run config (written by the server's
    operator) asks, the client refuses to release an update that would take its own ledger
    above ``max-epsilon``, use a noise multiplier below ``min-noise-multiplier``, or be
    accounted at a delta above ``max-delta``; with ``require-dp`` it also refuses every run
    whose ``dp`` mode is another one (e.g. a server that switches to ``dp = 'none'``).
    ``debug-noise-key`` makes this client's noise reproducible for debugging and voids its
    guarantee (its replies say so).
    """

    max_epsilon: float = DEFAULT_CLIENT_MAX_EPSILON
    min_noise_multiplier: float = DEFAULT_CLIENT_MIN_NOISE
    max_delta: float = DEFAULT_CLIENT_MAX_DELTA
    require_dp: str = ""
    debug_noise_key: str = ""


POLICY_KEYS = {
    "max-epsilon": ("max_epsilon", _range(0, INF, low_open=True)),
    "min-noise-multiplier": ("min_noise_multiplier", _non_negative),
    "max-delta": ("max_delta", _range(0, 1, True, True)),
    "require-dp": ("require_dp", _choice(("",) + DP_MODES[1:])),
    "debug-noise-key": ("debug_noise_key", None),
}


def _policy_from(node_config: Mapping[str, Any]) -> ClientPolicy:
    values = {}
    for key, (name, check) in POLICY_KEYS.items():
        if key not in node_config:
            continue
        value = _coerce(key, node_config[key], getattr(ClientPolicy, name))
        if check is not None:
            check(key, value)
        values[name] = value
    return ClientPolicy(**values)


@dataclass(frozen=True)
class NodeConfig:
    """What a client node says about itself (``--node-config`` in deployment).

    Either ``data-path`` (the client's own CSV/NPZ file) or ``partition-id`` with
    ``num-partitions`` (a demo partition of a built-in dataset), plus this client's own
    privacy policy (:class:`ClientPolicy`).
    """

    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str = ""
    state_dir: str = ""
    policy: ClientPolicy = ClientPolicy()

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "NodeConfig":
        known = {"partition-id", "num-partitions", "data-path", "state-dir"} | set(POLICY_KEYS)
        unknown = sorted(set(node_config) - known)
        if unknown:
            raise ConfigError(
                f"unknown node-config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        policy = _policy_from(node_config)
        data_path = str(node_config.get("data-path", ""))
        state_dir = str(node_config.get("state-dir", ""))
        for key, value in (("data-path", data_path), ("state-dir", state_dir)):
            _absolute_path_or_empty(key, value)
        if data_path:
            return cls(data_path=data_path, state_dir=state_dir, policy=policy)
        if "partition-id" not in node_config or "num-partitions" not in node_config:
            raise ConfigError(
                "node config needs either data-path=<absolute path of this client's CSV/NPZ> "
                f"or both partition-id and num-partitions; got {dict(node_config)!r}"
            )
        partition_id = node_config["partition-id"]
        num_partitions = node_config["num-partitions"]
        for key, value in (("partition-id", partition_id), ("num-partitions", num_partitions)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key} = {value!r} must be a whole number")
        if num_partitions < 1:
            raise ConfigError(f"num-partitions = {num_partitions!r} must be >= 1")
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"partition-id = {partition_id!r} is out of range; valid values are 0..{num_partitions - 1}"
            )
        return cls(partition_id, num_partitions, "", state_dir, policy)
