"""The federation's resumable state as plain data: JSON values plus named numpy arrays.

Why: loading a checkpoint must never run code (issue 12), so no object is handed to pickle.
Each stateful piece has an explicit pair: ``*_to_plain`` turns it into JSON values (arrays go
to the checkpoint's NPZ under names the JSON lists), ``*_from_plain`` checks every field
(:mod:`server_app.plain`: keys, types, shapes against the model) and only then rebuilds the
piece from the run's config. What is kept:

* the strategy's own state (Flower 1.41: FedAvgM ``current_arrays`` and ``momentum_vector``;
  FedAdam, FedYogi, FedAdagrad ``current_arrays``, ``m_t``, ``v_t``; QFedAvg
  ``current_arrays``); every other strategy holds no state between rounds;
* the privacy plan: the sampler (kind, rate or size, and the ``random.Random`` state when it is
  seeded), the noise multiplier, the ledger (``state_dict``), the DP mechanism's clip norm and
  adaptive clipping (``state_dict``). The server's secret generator is NOT here: it lives in
  ``secret_state.json`` (0600) and is handed in on restore;
* the evaluation sampler's ``random.Random`` state, the privacy tally, the client identities
  and the number of clients the plan was made for.

The tally's ``num_clipped``/``num_rejected`` are exact per-round counts of private data (in DP
modes they go only to the 0600 diagnostics file); each round sets them before use, so they are
left out of the (shareable) checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from common.config import RunConfig
from common.privacy.adaptive_clipping import AdaptiveClipping
from common.privacy.secret_random import SecretRandom
from server_app.dp_strategy import unwrapped
from server_app.plain import (
    BOOLEAN,
    ENCODED_NUMBER,
    INTEGER,
    LIST,
    NUMBER,
    OBJECT,
    OPTIONAL_NUMBER,
    OPTIONAL_OBJECT,
    STRING,
    CheckpointError,
    at_least,
    check,
    list_of,
    record,
)
from server_app.privacy import PrivacyPlan
from server_app.sampling import ClientSampler, EveryoneSampler, PoissonSampler, Sampler, SeededChoices
from server_app.user_level_dp import UserLevelDP

# Attributes of Flower 1.41's strategies that carry state from one round to the next.
STRATEGY_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")
TALLY_KEPT = {
    "sample_epsilon_max": OPTIONAL_NUMBER,
    "local_epsilon_max": OPTIONAL_NUMBER,
    "reported_noise": OPTIONAL_NUMBER,
    "clipping_norm": OPTIONAL_NUMBER,
    "debug_clients": BOOLEAN,
}
Arrays = dict[str, np.ndarray]


# --- the whole federation ---------------------------------------------------------------------


def federation_to_plain(strategy, privacy: PrivacyPlan, eval_sampler: ClientSampler, tally,
                        identities: dict[int, str], num_clients: int) -> tuple[dict[str, Any], Arrays]:
    """(JSON state, arrays for the NPZ) of everything a resumed run needs besides the model."""
    strategy_plain, arrays = strategy_to_plain(unwrapped(strategy))
    return {
        "num_clients": int(num_clients),
        "strategy": strategy_plain,
        "privacy": privacy_to_plain(privacy),
        "eval_rng": _rng_to_plain(eval_sampler.rng),
        "tally": {key: getattr(tally, key) for key in TALLY_KEPT},
        "identities": [[int(node), str(identity)] for node, identity in identities.items()],
    }, arrays


FEDERATION = {"num_clients": INTEGER, "strategy": OBJECT, "privacy": OBJECT, "eval_rng": OBJECT,
              "tally": OBJECT, "identities": LIST}


@dataclass
class ResumedFederation:
    """The federation's parts read back from a checkpoint, each checked, ready to build it with."""

    num_clients: int
    privacy: PrivacyPlan
    eval_choices: Any  # SeededChoices: the evaluation sampler's generator
    tally: dict[str, Any]  # PrivacyTally's kept fields
    identities: dict[int, str]
    strategy: dict[str, Any]  # the strategy's state: see restore_strategy


def resumed_federation(plain: Any, config: RunConfig, secret: SecretRandom | None) -> ResumedFederation:
    """Read a checkpoint's federation state; ``secret`` is the generator from secret_state.json."""
    record(plain, FEDERATION, "federation")
    at_least(plain["num_clients"], 1, "federation.num_clients")
    return ResumedFederation(
        num_clients=plain["num_clients"],
        privacy=privacy_from_plain(plain["privacy"], config, secret),
        eval_choices=_rng_from_plain(plain["eval_rng"], None, "federation.eval_rng"),
        tally=dict(record(plain["tally"], TALLY_KEPT, "federation.tally")),
        identities=identities_from_plain(plain["identities"]),
        strategy=plain["strategy"],
    )


def identities_from_plain(plain: Any) -> dict[int, str]:
    identities = {}
    for index, pair in enumerate(list_of(plain, LIST, "federation.identities")):
        where = f"federation.identities[{index}]"
        if len(pair) != 2:
            raise CheckpointError(f"{where}: expected [node id, identity]")
        identities[check(pair[0], INTEGER, where)] = check(pair[1], STRING, where)
    return identities


# --- the strategy -----------------------------------------------------------------------------


def strategy_to_plain(strategy) -> tuple[dict[str, Any], Arrays]:
    """Which state attributes the strategy has, how each is laid out, and its arrays."""
    layout: dict[str, Any] = {}
    arrays: Arrays = {}
    for attribute in STRATEGY_STATE:
        if not hasattr(strategy, attribute):
            continue
        value = getattr(strategy, attribute)
        if value is None:
            layout[attribute] = {"kind": "none"}
            continue
        if isinstance(value, ArrayRecord):
            kind, names, values = "record", list(value.keys()), [a.numpy() for a in value.values()]
        elif isinstance(value, dict):
            kind, names, values = "dict", list(value), [np.asarray(v) for v in value.values()]
        elif isinstance(value, list):
            kind, names, values = "list", [str(i) for i in range(len(value))], [np.asarray(v) for v in value]
        else:
            raise TypeError(f"{type(strategy).__name__}.{attribute} is a {type(value).__name__}: not checkpointable")
        layout[attribute] = {"kind": kind, "names": names}
        arrays |= {f"strategy.{attribute}.{i}": v for i, v in enumerate(values)}
    return {"class": type(strategy).__name__, "state": layout}, arrays


def restore_strategy(strategy, plain: Any, arrays: Arrays, model: Arrays) -> None:
    """Set the strategy's state attributes, each checked against the model's names and shapes."""
    strategy = unwrapped(strategy)
    record(plain, {"class": STRING, "state": OBJECT}, "federation.strategy")
    if plain["class"] != type(strategy).__name__:
        raise CheckpointError(f"federation.strategy: written by {plain['class']}, this run uses {type(strategy).__name__}")
    expected = {a for a in STRATEGY_STATE if hasattr(strategy, a)}
    if set(plain["state"]) != expected:
        raise CheckpointError(f"federation.strategy.state: expected {sorted(expected)}, got {sorted(plain['state'])}")
    names, shapes = list(model), [v.shape for v in model.values()]
    for attribute, layout in plain["state"].items():
        where = f"federation.strategy.state.{attribute}"
        check(layout, OBJECT, where)
        if layout == {"kind": "none"}:
            setattr(strategy, attribute, None)
            continue
        record(layout, {"kind": STRING, "names": LIST}, where)
        kind, stored = layout["kind"], list_of(layout["names"], STRING, f"{where}.names")
        wanted = [str(i) for i in range(len(names))] if kind == "list" else names
        # Empty is a state too: QFedAvg's aggregation empties its current_arrays (keep_input=False).
        if kind not in ("record", "dict", "list") or stored not in (wanted, []):
            raise CheckpointError(f"{where}: a {kind!r} of {stored[:3]}... does not match the model's arrays")
        values = []
        for i, shape in enumerate(shapes[: len(stored)]):
            value = arrays.get(f"strategy.{attribute}.{i}")
            if value is None or value.shape != shape or value.dtype.kind not in "fiu":
                raise CheckpointError(f"{where}[{i}]: expected a numeric array of shape {shape}")
            values.append(value)
        names_here = names[: len(stored)]
        if kind == "record":
            setattr(strategy, attribute, ArrayRecord({n: Array(v) for n, v in zip(names_here, values)}))
        elif kind == "dict":
            setattr(strategy, attribute, dict(zip(names_here, values)))
        else:
            setattr(strategy, attribute, values)


# --- samplers ---------------------------------------------------------------------------------


def _rng_to_plain(rng) -> dict[str, Any]:
    if isinstance(rng, SecretRandom):
        return {"kind": "secret"}  # its state is in secret_state.json, never here
    if isinstance(rng, SeededChoices):
        version, internal, gauss_next = rng.rng.getstate()
        return {"kind": "seeded", "version": version, "internal": list(internal), "gauss_next": gauss_next}
    raise TypeError(f"a sampler draws from a {type(rng).__name__}: not checkpointable")


def _rng_from_plain(plain: Any, secret: SecretRandom | None, where: str):
    check(plain, OBJECT, where)
    if plain == {"kind": "secret"}:
        if secret is None:
            raise CheckpointError(f"{where}: draws from the secret generator, but the run has none")
        return secret
    record(plain, {"kind": STRING, "version": INTEGER, "internal": LIST, "gauss_next": OPTIONAL_NUMBER}, where)
    internal = list_of(plain["internal"], INTEGER, f"{where}.internal")
    # random.Random's Mersenne Twister state: 624 32-bit words and a position <= 624.
    if (plain["kind"] != "seeded" or plain["version"] != 3 or len(internal) != 625
            or not all(0 <= word < 2**32 for word in internal) or not 0 <= internal[-1] <= 624):
        raise CheckpointError(f"{where}: not a random.Random state")
    choices = SeededChoices(0)
    choices.rng.setstate((3, tuple(internal), plain["gauss_next"]))
    return choices


def sampler_to_plain(sampler) -> dict[str, Any]:
    if isinstance(sampler, EveryoneSampler):
        return {"kind": "everyone"}
    if isinstance(sampler, PoissonSampler):
        return {"kind": "poisson", "size": sampler.sample_rate, "rng": _rng_to_plain(sampler.rng)}
    if isinstance(sampler, ClientSampler):
        return {"kind": "fixed", "size": sampler.clients_per_round, "rng": _rng_to_plain(sampler.rng)}
    raise TypeError(f"{type(sampler).__name__}: not checkpointable")


def sampler_from_plain(plain: Any, secret: SecretRandom | None, where: str) -> Sampler:
    check(plain, OBJECT, where)
    if plain == {"kind": "everyone"}:
        return EveryoneSampler()
    record(plain, {"kind": STRING, "size": NUMBER, "rng": OBJECT}, where)
    rng = _rng_from_plain(plain["rng"], secret, f"{where}.rng")
    if plain["kind"] == "poisson" and 0 <= plain["size"] <= 1:
        return PoissonSampler(float(plain["size"]), rng)
    if plain["kind"] == "fixed" and plain["size"] > 0:
        return ClientSampler(plain["size"], rng)  # int: a count; float: a share (as configured)
    raise CheckpointError(f"{where}: not a sampler: {plain['kind']!r} of size {plain['size']!r}")


# --- the privacy plan -------------------------------------------------------------------------


def privacy_to_plain(plan: PrivacyPlan) -> dict[str, Any]:
    dp = plan.mechanism
    return {
        "expected_clients": plan.expected_clients,
        "noise_multiplier": plan.noise_multiplier,
        "population": plan.population,
        "notes": list(plan.notes),
        "sampler": sampler_to_plain(plan.sampler),
        "ledger": plan.ledger.state_dict() if plan.ledger is not None else None,
        "aggregator": None if dp is None else {  # the file's name for the mechanism (format kept)
            "noise_multiplier": dp.noise_multiplier,
            "clipping_norm": dp.fixed_clipping_norm,
            "expected_clients": dp.expected_clients,
            "clip_on_server": dp.clip_on_server,
            "adaptive": dp.adaptive.state_dict() if dp.adaptive is not None else None,
        },
        "secret": None if plan.secret is None else {"debug": plan.secret.debug},
    }


PLAN = {"expected_clients": NUMBER, "noise_multiplier": OPTIONAL_NUMBER, "population": INTEGER, "notes": LIST,
        "sampler": OBJECT, "ledger": OPTIONAL_OBJECT, "aggregator": OPTIONAL_OBJECT, "secret": OPTIONAL_OBJECT}
MECHANISM = {"noise_multiplier": NUMBER, "clipping_norm": NUMBER, "expected_clients": NUMBER,
              "clip_on_server": BOOLEAN, "adaptive": OPTIONAL_OBJECT}
ADAPTIVE = {"clipping_norm": NUMBER, "target_unclipped_quantile": NUMBER, "learning_rate": NUMBER,
            "count_noise_std": OPTIONAL_NUMBER, "rounds": INTEGER, "last_unclipped_fraction": OPTIONAL_NUMBER}
LEDGER = {"version": INTEGER, "kind": STRING, "params": OBJECT, "runs": LIST}
LEDGER_PARAMS = {"noise_multiplier": ENCODED_NUMBER, "sampling": STRING, "num_clients": INTEGER,
                 "clients_per_round": INTEGER, "delta": NUMBER, "accountant": STRING}


def privacy_from_plain(plain: Any, config: RunConfig, secret: SecretRandom | None) -> PrivacyPlan:
    """The plan the interrupted run was using, sharing ``secret`` as the original shared its generator."""
    where = "federation.privacy"
    record(plain, PLAN, where)
    user_level = config.privacy.server_noise
    present = [plain["ledger"] is not None, plain["aggregator"] is not None, plain["secret"] is not None]
    if present != [user_level] * 3:
        raise CheckpointError(f"{where}: ledger/mechanism/secret {present} do not fit dp = {config.dp!r}")
    if user_level:
        record(plain["secret"], {"debug": BOOLEAN}, f"{where}.secret")
        if secret is None or secret.debug != plain["secret"]["debug"] or secret.debug != bool(config.debug_noise_key):
            raise CheckpointError(f"{where}.secret: the secret generator is missing or not the one this run used")
    sampler = sampler_from_plain(plain["sampler"], secret if user_level else None, f"{where}.sampler")
    wanted = {"poisson": PoissonSampler, "fixed": ClientSampler, "all": EveryoneSampler}[config.sampling]
    if not user_level and config.sampling != "all":
        wanted = ClientSampler
    if type(sampler) is not wanted:
        raise CheckpointError(f"{where}.sampler: {type(sampler).__name__} does not fit sampling = {config.sampling!r}")
    if user_level and isinstance(sampler, (ClientSampler, PoissonSampler)) and sampler.rng is not secret:
        raise CheckpointError(f"{where}.sampler: user-level DP sampling must draw from the secret generator")
    z = plain["noise_multiplier"]
    ledger, mechanism = None, None
    if user_level and secret is not None:  # secret: checked above
        ledger = _ledger_from_plain(plain["ledger"], config)
        mechanism = _mechanism_from_plain(plain["aggregator"], secret)
        if not (z == ledger.noise_multiplier == mechanism.noise_multiplier
                and (config.target_epsilon or z == config.noise_multiplier)):
            raise CheckpointError(f"{where}: the noise multipliers of the plan, ledger and mechanism disagree")
    notes = list_of(plain["notes"], STRING, f"{where}.notes")
    population = int(at_least(plain["population"], 0, f"{where}.population"))
    expected = at_least(plain["expected_clients"], 0, f"{where}.expected_clients")
    return PrivacyPlan(sampler, expected, z, ledger, mechanism, secret if user_level else None,
                       population, notes)


def _ledger_from_plain(plain: Any, config: RunConfig):
    from common.privacy.accounting import UserLevelLedger  # dp-accounting: only with user-level DP

    where = "federation.privacy.ledger"
    record(plain, LEDGER, where)
    params = record(plain["params"], LEDGER_PARAMS, f"{where}.params")
    if (params["sampling"], params["accountant"]) != (config.sampling, config.accountant):
        raise CheckpointError(f"{where}: accounted for another sampling or accountant than this run's")
    for index, run in enumerate(list_of(plain["runs"], LIST, f"{where}.runs")):
        if len(run) != 2:
            raise CheckpointError(f"{where}.runs[{index}]: expected [noise multiplier, rounds]")
        check(run[0], ENCODED_NUMBER, f"{where}.runs[{index}][0]")
        at_least(check(run[1], INTEGER, f"{where}.runs[{index}][1]"), 1, f"{where}.runs[{index}][1]")
    try:
        return UserLevelLedger.from_state_dict(plain)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: {error}") from None


def _mechanism_from_plain(plain: Any, secret: SecretRandom) -> UserLevelDP:
    where = "federation.privacy.aggregator"
    record(plain, MECHANISM, where)
    adaptive = None
    if plain["adaptive"] is not None:
        state = record(plain["adaptive"], ADAPTIVE, f"{where}.adaptive")
        try:
            adaptive = AdaptiveClipping.from_state_dict(state)
        except ValueError as error:
            raise CheckpointError(f"{where}.adaptive: {error}") from None
    try:
        return UserLevelDP(plain["noise_multiplier"], plain["clipping_norm"], plain["expected_clients"],
                           plain["clip_on_server"], secret, adaptive)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
