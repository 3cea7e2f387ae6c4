#!/usr/bin/env python3
"""Audit a run's privacy: run the federation with canaries and measure a lower bound on epsilon.

    fl-dp audit --num-clients 100 --run-config "dp='server' sampling='poisson' clients-per-round=10"

The run goes through exactly the path of `fl-dp simulate` (Flower's runtime), with
``audit-canaries`` canaries added (``--canaries``, default 100; common/privacy/audit.py has the
papers and the math, client_app/canary.py how canaries take part):

* dp = 'server', 'client' or 'none': k canary CLIENTS join the N real ones (N + k SuperNodes;
  the ledger accounts all N + k, and min-available-clients is set to N + k so every one of
  them is in the population). Each is inserted with probability 1/2; an inserted one, when
  sampled, sends a random direction of norm above the clip bound. Scores, from the released
  models only: the cosine of each round's model change with the canary's direction, maximised
  over rounds (the adversary sees every round's model), and the cosine of the final change
  theta_T - theta_0 (Andrew et al.'s final-model statistic). If the run's config holds a
  debug-noise-key (its noise is reproducible), the attack regenerates the noise and the
  sampling from it, subtracts the noise and scores each canary only in rounds it was sampled.
* dp = 'dpsgd': k canary EXAMPLES (out-of-distribution inputs, random labels) in partition 0's
  data, each inserted with probability 1/2; score: how much the released training lowered the
  canary's loss, loss(theta_0) - loss(theta_T) on the final global model.

The one-run bound (Steinke et al. 2023) over those scores is ``epsilon_lower_bound`` at
``--confidence`` (95%); ``epsilon_upper_bound`` is the ledger's epsilon for the same run. A
lower bound above the upper bound means the mechanism (or its accounting) is broken: the
audit then exits 1. Written to the output directory: ``audit.json`` (the bounds, the method,
the canary score statistics, the audit's cost) and ``audit-secret.json`` (mode 0600,
operator-only: the audit key, which canaries were inserted and every canary's scores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fl_dp import outcome
from fl_dp.help import HelpFormatter
from fl_dp.run_config import RunConfigError, parse_overrides, to_flwr, validate

DEFAULT_CANARIES = 100
AUDIT_FILE = "audit.json"
SECRET_FILE = "audit-secret.json"
# Strategies whose server step is the aggregate itself: a regenerated noise can be subtracted per round.
IDENTITY_STEP = ("fedavg", "fedprox")


# --- reading a finished run -----------------------------------------------------------------------


def _config(output_dir: Path):
    from common.config import RunConfig

    values = json.loads((output_dir / "config.json").read_text())
    try:
        return RunConfig.from_run_config(values)
    except ValueError:  # a key this version does not know: keep the ones it does
        import dataclasses

        known = {f.metadata["key"] for f in dataclasses.fields(RunConfig)}
        return RunConfig.from_run_config({k: v for k, v in values.items() if k in known})


def released_models(output_dir: Path) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """The array names and every round's released model, round 0 (the start) first."""
    from server_app.audit_rounds import ROUNDS_DIR

    files = sorted((output_dir / ROUNDS_DIR).glob("round-*.npz"))
    if len(files) < 2:
        raise RuntimeError(f"{output_dir / ROUNDS_DIR} holds {len(files)} model(s): no round was released")
    models = []
    for path in files:
        with np.load(path) as stored:
            models.append({name: stored[name] for name in stored.files})
    return list(models[0]), models


def _flat(model: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(model[name], dtype=np.float64).ravel() for name in names])


# --- user-level: canary clients ------------------------------------------------------------------


def _regenerated_noise(config, summary: dict, models: list[dict], names: list[str], num_real: int):
    """With the debug key: every round's noise (flattened) and which canaries the server sampled.

    Replays the server's generator draw for draw (its sampler, then its noise) with the app's own
    code; None when the run's draws cannot be replayed (adaptive clipping also draws count noise;
    a server optimiser's step is not the aggregate itself).
    """
    from client_app.privacy_store import client_identity
    from common.config import NodeConfig
    from common.privacy.clipping import gaussian_noise_like
    from common.privacy.secret_random import SecretRandom
    from server_app.privacy import expected_clients_per_round
    from server_app.sampling import ClientSampler, EveryoneSampler, PoissonSampler, Sampler

    if config.clipping != "fixed" or config.strategy not in IDENTITY_STEP:
        return None
    population = int(summary["num_clients"])
    m = expected_clients_per_round(config, population)
    rng = SecretRandom.from_debug_key(config.debug_noise_key)
    sampler: Sampler = EveryoneSampler()
    if config.sampling == "poisson":
        sampler = PoissonSampler(m / population, rng)
    elif config.sampling == "fixed":
        sampler = ClientSampler(m, rng)
    std = float(summary["noise_multiplier"]) * config.clipping_norm / m
    # The server samples from its clients ordered by their identities (server_app/federation.py).
    order = sorted(range(population), key=lambda p: client_identity(config, NodeConfig(p, population)))
    template = {name: models[0][name] for name in names}
    noises, sampled = [], []
    for _ in range(len(models) - 1):
        chosen = sampler.sample(list(range(population)))
        noise = gaussian_noise_like(template, std, rng)
        noises.append(_flat(noise, names))
        canaries = {order[i] - num_real for i in chosen if order[i] >= num_real}
        sampled.append(canaries if config.identify_clients else None)
    return np.stack(noises), sampled


def _client_scores(config, summary: dict, key: bytes, names: list[str], models: list[dict]):
    """{statistic: one score per canary}, the attack's name, and the model dimension."""
    from common.privacy.audit import cosine_scores

    k = config.audit_canaries
    flats = np.stack([_flat(model, names) for model in models])
    changes = np.diff(flats, axis=0)
    num_real = int(summary["num_clients"]) - k
    replay = _regenerated_noise(config, summary, models, names, num_real) if config.debug_noise_key else None
    if replay is not None:
        noises, sampled = replay
        per_round = cosine_scores(key, k, changes - noises)
        if all(s is not None for s in sampled):
            mask = np.array([[i in rounds for rounds in sampled] for i in range(k)])
            per_round = np.where(mask, per_round, -np.inf)
        best = per_round.max(axis=1)
        best[np.isneginf(best)] = np.nan  # never sampled: the attacker knows it and abstains
        attack = ("debug-noise-key known: the server's noise and sampling regenerated from it, the noise "
                  "subtracted from every round's model change, each canary scored by its largest cosine "
                  "in the rounds it was sampled (abstaining on canaries never sampled)")
        return {"denoised max cosine over sampled rounds": best}, attack, changes.shape[1]
    per_round = cosine_scores(key, k, changes)
    final = cosine_scores(key, k, flats[-1] - flats[0])[:, 0]
    attack = ("max over rounds of cos(theta_t - theta_t-1, c_i) (all released iterates) and "
              "cos(theta_T - theta_0, c_i) (final model), Bonferroni over both")
    return {"max cosine over rounds": per_round.max(axis=1), "final-model cosine": final}, attack, changes.shape[1]


# --- sample-level: canary examples ---------------------------------------------------------------


def _example_scores(config, summary: dict, key: bytes, names: list[str], models: list[dict]):
    import torch

    from client_app.canary import EXAMPLE_CANARY_PARTITION, example_canaries
    from common.config import NodeConfig
    from common.data.client_data import central_test_set, load_client_data
    from common.data.scaling import FeatureScaling
    from common.models import build_model

    test = central_test_set(config)
    node = NodeConfig(EXAMPLE_CANARY_PARTITION, int(summary["num_clients"]))
    data = load_client_data(config, node, test.num_features, test.num_classes)
    if config.dataset == "file":
        data = data.scaled(FeatureScaling.fit(test.x))
    x, y = example_canaries(config, key, data.x_train, test.num_classes)
    model = build_model(config.model, test.num_features, test.num_classes)

    def losses(arrays: dict) -> np.ndarray:
        model.load_state_dict({name: torch.from_numpy(np.asarray(arrays[name])) for name in names})
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(
                model(torch.from_numpy(x)), torch.from_numpy(y), reduction="none"
            ).numpy().astype(np.float64)

    attack = "loss(theta_0) - loss(theta_T) of each canary example on the released global models"
    return {"loss decrease": losses(models[0]) - losses(models[-1])}, attack, int(x.shape[1])


# --- the audit ------------------------------------------------------------------------------------


def analyse(output_dir: Path, key: bytes, confidence: float = 0.95) -> tuple[dict, dict]:
    """The public report (audit.json) and the operator-only details (audit-secret.json) of a
    finished audit run in ``output_dir`` whose canaries came from ``key``."""
    from client_app.canary import CANARY_MODES
    from common.privacy.audit import GuessingGame, canary_included, gaussian_fit_estimate, one_run_lower_bound

    output_dir = Path(output_dir)
    config = _config(output_dir)
    summary = json.loads((output_dir / "summary.json").read_text())
    k = config.audit_canaries
    if not k:
        raise RuntimeError(f"{output_dir} is not an audit run (audit-canaries = 0)")
    names, models = released_models(output_dir)
    included = np.array([canary_included(key, i) for i in range(k)], dtype=bool)
    delta = config.target_delta
    if config.dp in CANARY_MODES:
        statistics, attack, dimension = _client_scores(config, summary, key, names, models)
        kind = "clients"
        upper = summary.get("epsilon") if config.dp != "none" else None
    else:
        statistics, attack, dimension = _example_scores(config, summary, key, names, models)
        kind = "examples in partition 0's data"
        upper = summary.get("sample_epsilon_max")
    best: GuessingGame | None = None
    best_name: str | None = None
    stats: dict[str, Any] = {}
    for name, scores in statistics.items():
        game = one_run_lower_bound(scores, included, delta, confidence, statistics=len(statistics))
        stats[name] = gaussian_fit_estimate(scores[included], scores[~included], delta) | {"game": game.to_dict()}
        if best is None or game.epsilon > best.epsilon:
            best, best_name = game, name
    if kind == "clients":
        stats["null_std"] = 1 / math.sqrt(dimension)  # a canary that never touched the model: cos ~ N(0, 1/d)
    if best is None:
        raise ValueError("no score statistic to audit with")
    lower = best.epsilon
    debug = bool(summary.get("debug_noise"))
    if upper is None:
        verdict = f"no guarantee claimed (dp = {config.dp!r}): the canaries are found, epsilon >= {lower:.3f}"
        broken = False
    elif lower > upper:
        verdict = (f"BROKEN: the measured lower bound {lower:.3f} exceeds the ledger's epsilon {upper:.3f}; "
                   "the mechanism does not give the guarantee it reports")
        broken = True
    else:
        verdict = f"consistent: the measured lower bound {lower:.3f} does not exceed the ledger's epsilon {upper:.3f}"
        broken = False
    if debug:
        verdict += " (debug-noise-key set: the run itself claims no guarantee)"
    report = {
        "epsilon_lower_bound": lower,
        "epsilon_upper_bound": upper,
        "delta": delta,
        "method": (
            f"one-run guessing game (Steinke, Nasr and Jagielski 2023) on canary {kind}, best of "
            f"{best.games} games (top k guessed in, bottom k out; Bonferroni) at confidence {confidence}; "
            f"attack: {attack}; "
            + (f"best statistic: {best_name}, {best.correct} of {best.guesses} guesses correct. " if best.guesses
               else "no game did better than its chance level at this confidence. ")
            + "epsilon_estimate per statistic: Gaussian fit of inserted vs held-out scores (Andrew et al. 2024), "
            "an estimate, not a bound"
        ),
        "canaries": k,
        "confidence": confidence,
        "canaries_inserted": int(included.sum()),
        "canary_scores": stats,
        "verdict": verdict,
        "broken": broken,
        "dp": config.dp,
        "rounds": len(models) - 1,
    }
    details = {
        "audit_key": key.hex(),
        "inserted": included.astype(int).tolist(),
        "scores": {name: [None if math.isnan(s) else float(s) for s in scores] for name, scores in statistics.items()},
    }
    return report, details


def _write_json(path: Path, obj: dict, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON: {value!r}")


def write_audit(output_dir: Path, report: dict, details: dict) -> None:
    _write_json(Path(output_dir) / SECRET_FILE, details, 0o600)  # the key and the bits: operator-only
    _write_json(Path(output_dir) / AUDIT_FILE, report)


def summary_line(report: dict, output_dir: Path) -> str:
    upper = report["epsilon_upper_bound"]
    ledger = "none (no guarantee claimed)" if upper is None else f"{upper:.3f}"
    return (
        f"Audit: epsilon >= {report['epsilon_lower_bound']:.3f} at {report['confidence']:.0%} confidence "
        f"({report['canaries']} canaries), ledger epsilon {ledger} (delta {report['delta']:g}): "
        f"{report['verdict'].split(':')[0]}. {Path(output_dir) / AUDIT_FILE}"
    )


def main(argv: list[str] | None = None) -> int:
    from client_app.canary import AUDIT_KEY_ENV, CANARY_MODES
    from fl_dp import simulate
    from fl_dp.runtime import RUNTIME_ENV

    parser = argparse.ArgumentParser(
        prog="fl-dp audit", description=__doc__, formatter_class=HelpFormatter, epilog=outcome.__doc__
    )
    simulate.add_run_options(parser, "real simulated clients (canary clients come on top)",
                             "dp='server' noise-multiplier=1.0")
    parser.add_argument("--canaries", type=int, default=0,
                        help=f"canaries (default: audit-canaries from --run-config, else {DEFAULT_CANARIES})")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound")
    args = parser.parse_args(argv)

    try:
        overrides = parse_overrides(args.run_config)
        canaries = args.canaries or int(overrides.get("audit-canaries") or DEFAULT_CANARIES)
        overrides["audit-canaries"] = canaries
        config = validate(overrides)
        if config.dp == "local":
            raise RunConfigError("dp = 'local' cannot be audited here: each client adds its own noise, "
                                 "so a canary client would choose its own; audit server, client, dpsgd or none")
        if not 0 < args.confidence < 1:
            raise RunConfigError(f"--confidence {args.confidence}: give a number in (0, 1)")
        if args.num_clients < 1 or canaries < 1:
            raise RunConfigError("--num-clients and --canaries must be >= 1")
        nodes = args.num_clients + canaries if config.dp in CANARY_MODES else args.num_clients
        if config.dp in CANARY_MODES:  # every canary is in the population the ledger accounts
            overrides["min-available-clients"] = nodes
        output_dir, run_config = simulate.plan_run(to_flwr(overrides), args.output_dir, nodes)
    except RunConfigError as error:
        print(f"fl-dp audit: error: {error}", file=sys.stderr)
        return outcome.USAGE

    key = os.urandom(32)  # fresh for every audit: directions and inclusion bits
    os.environ[AUDIT_KEY_ENV] = key.hex()  # the simulation's processes inherit it
    # ... which they can only if this command starts them: a shared runtime (fl-dp sweep's, or a warm one)
    # was started with another environment, and its processes must never see this key.
    os.environ[RUNTIME_ENV] = "none"
    started = time.monotonic()
    code = simulate.main([
        "--num-clients", str(nodes), "--run-config", run_config, "--output-dir", str(output_dir),
        "--cpus-per-client", str(args.cpus_per_client),
    ])
    run_seconds = time.monotonic() - started
    if code not in (outcome.COMPLETED, outcome.BUDGET):
        print(f"fl-dp audit: the run did not complete (exit code {code}); nothing audited", file=sys.stderr)
        return code
    analysed = time.monotonic()
    report, details = analyse(output_dir, key, args.confidence)
    report["cost"] = {"run_seconds": round(run_seconds, 1), "analysis_seconds": round(time.monotonic() - analysed, 1)}
    write_audit(output_dir, report, details)
    print(summary_line(report, output_dir), flush=True)
    return outcome.FAILED if report["broken"] else code


if __name__ == "__main__":
    sys.exit(main())
