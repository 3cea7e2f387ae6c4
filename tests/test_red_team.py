"""The red team: a DP reviewer's attacks on what a run publishes, as tests that must FAIL to break privacy.

The adversary knows the code and the public run config (seed included: a seed is not a secret)
and reads every file the run publishes in output-dir (config.json, metrics.json/csv,
summary.json, model.pt, the plots, the checkpoint), EXCEPT files only their owner can read:
a file with ``st_mode & 0o077 == 0`` (e.g. 0600) is operator-only and not public. Client-side,
the adversary sees what a client releases (its reply) and may replay a server message to it.

Each test states its attack and the threshold the attack must miss. Server-side runs use the
in-process federation (tests/inprocess.py, seconds per run); client-side attacks call the real
ClientApp (tests/client_calls.py). Randomness that protects privacy must therefore be
unpredictable from anything public and never repeat: a generator seeded from the run's seed
(or a hash of public fields) fails these tests.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import pickle
import random
import stat
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from client_calls import make_context
from flower_messages import task_identity
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import MessageType
from inprocess import run_inprocess

from client_app.app import app as client_app
from client_app.privacy_store import client_identity
from common.config import NodeConfig, RunConfig
from common.data.client_data import central_test_set
from common.models import build_model
from common.protocol import LOCAL_EPSILON, REFUSED, RoundInstructions

SEED = 42
COUNT_KEYS = ("num_replies", "num_failures", "num_refused", "num_invalid", "num_clipped", "num_rejected")
FAST = {"local-epochs": 1, "seed": SEED}


@pytest.fixture(autouse=True)
def ordinary_umask():
    """Files are public unless the app makes them private: run with the usual umask 022."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# --- what the adversary can read ------------------------------------------------------------------


def is_public(path: Path) -> bool:
    return path.stat().st_mode & 0o077 != 0


def public_json(path: Path):
    assert path.exists(), f"{path.name} was not written"
    return json.loads(path.read_text()) if is_public(path) else None


def released_model(output_dir: Path) -> dict[str, np.ndarray]:
    path = output_dir / "model.pt"
    assert is_public(path), "model.pt is the release: it is public by design"
    return {k: v.numpy().astype(np.float64) for k, v in torch.load(path).items()}


def initial_model(output_dir: Path) -> dict[str, np.ndarray]:
    """The round-0 global model, rebuilt from the public config exactly as the ServerApp builds it."""
    published = json.loads((output_dir / "config.json").read_text())
    config = RunConfig.from_run_config(published)
    test_set = central_test_set(config, cache_root=str(output_dir / "attacker-cache"))
    model = build_model(config.model, test_set.num_features, test_set.num_classes, seed=config.seed)
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in arrays.values()])


# --- noise regeneration -------------------------------------------------------------------------


def _numpy_default(seed):
    rng = np.random.default_rng(seed)
    return lambda shape: rng.normal(0.0, 1.0, shape)


def _numpy_legacy(seed):
    rng = np.random.RandomState(seed % 2**32)
    return lambda shape: rng.normal(0.0, 1.0, shape)


def _torch(seed):
    generator = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=generator, dtype=torch.float64).numpy()


GENERATORS = {"numpy default_rng": _numpy_default, "numpy RandomState": _numpy_legacy, "torch": _torch}


def seed_guesses(seed: int, server_round: int, extra: dict[str, int] | None = None) -> dict[str, int]:
    """Seeds a DP implementation might plausibly derive from the public run seed."""
    guesses = {f"seed{k:+d}": seed + k for k in range(-2, 11)}
    for text in (f"{seed}", f"{seed}|{server_round}", f"{seed}|server|{server_round}", f"{seed}|noise|{server_round}"):
        guesses[f"crc32({text})"] = zlib.crc32(text.encode())
    guesses["seed*1000+round"] = seed * 1000 + server_round
    return guesses | (extra or {})


def residual_norm(delta: np.ndarray, unit_noise: np.ndarray, std: float) -> float:
    """What is left of ``delta`` after subtracting the regenerated noise, at the noise's known
    std or at the least-squares best scale (whichever leaves less)."""
    scale = float(delta @ unit_noise) / float(unit_noise @ unit_noise)
    return min(float(np.linalg.norm(delta - std * unit_noise)), float(np.linalg.norm(delta - scale * unit_noise)))


def best_regeneration(delta: dict[str, np.ndarray], std: float, seeds: dict[str, int]) -> tuple[float, str]:
    """The smallest residual over every (generator, seed) guess, drawing per array in state-dict order."""
    target = flat(delta)
    best = (math.inf, "")
    for name, make in GENERATORS.items():
        for label, seed in seeds.items():
            draw = make(seed)
            unit = np.concatenate([draw(np.shape(v)).ravel() for v in delta.values()])
            best = min(best, (residual_norm(target, unit, std), f"{name}({label}={seed})"))
    return best


def test_server_noise_cannot_be_regenerated_from_the_public_seed(tmp_path):
    """Attack: rebuild the initial model from the public seed, subtract it from the released
    round-1 model, regenerate the server's Gaussian noise from seeds derived from the public
    seed, and subtract that too. If the noise is regenerated, what is left is the clipped mean
    of the 10 updates, of L2 norm <= C * 10 / m = 1 (privacy is gone: the mean is released
    without noise). Threshold: the residual must exceed that bound (+1e-3); with unpredictable
    noise it is of the order of the noise norm sqrt(d) * z * C / m."""
    clients, clip, z = 10, 1.0, 1.0
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "dp": "server", "num-server-rounds": 1,
                                "sampling": "all", "clipping": "fixed", "clipping-norm": clip,
                                "noise-multiplier": z, "strategy": "fedavg"}, num_clients=clients)
    initial = initial_model(out)
    delta = {k: v - initial[k] for k, v in released_model(out).items()}
    m = clients  # sampling = "all": the expected number of clients is all of them
    std = z * clip / m
    residual, guess = best_regeneration(delta, std, seed_guesses(SEED, 1))
    bound = clip * clients / m + 1e-3
    noise_norm = math.sqrt(flat(delta).size) * std
    assert residual > bound, (
        f"BROKEN: subtracting noise regenerated with {guess} leaves a residual of norm {residual:.4g} "
        f"<= {bound:.4g} (the clipped mean); unpredictable noise would leave ~{noise_norm:.3g}"
    )
    assert residual > 0.5 * noise_norm, (residual, noise_norm, guess)


def _objects(root):
    """Every object reachable from ``root`` (containers, attributes, slots)."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), np.ndarray)):
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                stack.append(getattr(obj, slot))


class _LenientUnpickler(pickle.Unpickler):
    """The attacker's unpickler: a reference to something kept outside the pickle loads as None."""

    def persistent_load(self, pid):
        return None


def _is_generator(obj) -> bool:
    if isinstance(obj, type):
        return False
    if isinstance(obj, (np.random.Generator, np.random.RandomState, random.Random, torch.Generator)):
        return True
    return any(callable(getattr(obj, name, None)) for name in ("gaussian", "normal", "standard_normal"))


def _draw_unit(generator, shape) -> np.ndarray:
    """Standard normal draws the way the server would ask this generator for its noise."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float64).numpy()
    if isinstance(generator, random.Random):
        return np.array([generator.gauss(0.0, 1.0) for _ in range(int(np.prod(shape)))]).reshape(shape)
    if callable(getattr(generator, "gaussian", None)):
        return np.asarray(generator.gaussian(shape, 1.0), dtype=np.float64)
    if callable(getattr(generator, "normal", None)):
        return np.asarray(generator.normal(0.0, 1.0, shape), dtype=np.float64)
    return np.asarray(generator.standard_normal(shape), dtype=np.float64)


def _secret_states(document) -> list:
    """Generators rebuilt from any JSON object in a public file that the app's own code accepts as
    the state of its secret generator (the attacker knows the code)."""
    try:
        from common.privacy.secret_random import SecretRandom
    except ImportError:
        return []
    found = []
    for obj in _objects(document):
        if isinstance(obj, dict):
            try:
                found.append(SecretRandom.from_state_dict(obj))
            except Exception:  # noqa: BLE001 - not a generator state
                continue
    return found


def test_no_public_file_holds_the_next_rounds_noise(tmp_path):
    """Attack: copy every public file of output-dir as it is after round 1 (an observer of output-dir
    sees them while the run goes on; the checkpoint in particular), take any random generator out
    of them (unpickling an old checkpoint.pkl, reading generator states from any JSON file) and draw round 2's
    noise before round 2 happens; subtract it from the released change of round 2 (final model.pt
    minus the round-1 model from the checkpoint's NPZ). Threshold as above: a residual within C * 10 / m
    (+1e-3) means round 2 was released without noise. Files only their owner can read are not public."""
    clients, clip, z = 10, 1.0, 1.0
    run_dir = tmp_path / "run"
    snapshot: dict[str, bytes] = {}

    def copy_public_files(message: Message) -> None:
        if snapshot or message.metadata.message_type != "train":
            return
        if int(message.content["config"]["server-round"]) == 2:
            snapshot.update({str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
                             if p.is_file() and is_public(p)})
            snapshot.setdefault("", b"")  # the copy was taken, even if nothing was public

    out = run_inprocess(FAST | {"output-dir": str(run_dir), "dp": "server", "num-server-rounds": 2,
                                "sampling": "all", "clipping": "fixed", "clipping-norm": clip,
                                "noise-multiplier": z}, num_clients=clients, on_message=copy_public_files)
    assert snapshot, "round 2 never started"
    generators, round_one = [], None
    for name, data in snapshot.items():
        if name.endswith(".pkl"):
            checkpoint = _LenientUnpickler(io.BytesIO(data)).load()
            generators += [(f"{type(g).__name__} in {name}", g) for g in _objects(checkpoint) if _is_generator(g)]
            record = getattr(checkpoint, "arrays", None)
            if isinstance(record, ArrayRecord):
                round_one = {k: a.numpy().astype(np.float64) for k, a in record.items()}
        elif name.endswith(".npz"):  # today's checkpoint: the model as model.0, model.1, ... in state_dict order
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                ordered = [npz[f"model.{i}"].astype(np.float64) for i in range(sum(k.startswith("model.") for k in npz.files))]
            round_one = dict(zip(released_model(out), ordered))
        elif name.endswith((".json", ".jsonl")):
            for line in data.decode(errors="replace").splitlines() if name.endswith(".jsonl") else [data.decode()]:
                try:
                    document = json.loads(line)
                except ValueError:
                    continue
                generators += [(f"generator state in {name}", g) for g in _secret_states(document)]
    if not generators:
        return  # nothing public to draw the noise from
    assert round_one is not None, "a generator is public but the round-1 model is not: test needs updating"
    delta = {k: v - round_one[k] for k, v in released_model(out).items()}
    std = z * clip / clients
    results = []
    for name, generator in generators:
        try:
            unit = np.concatenate([_draw_unit(generator, np.shape(v)).ravel() for v in delta.values()])
        except Exception:  # noqa: BLE001 - not a generator this attack can use
            continue
        results.append((residual_norm(flat(delta), unit, std), name))
    bound = clip * clients / clients + 1e-3
    residual, name = min(results, default=(math.inf, "no usable generator"))
    assert residual > bound, (
        f"BROKEN: the {name} (a public file) predicts round 2's noise: the residual {residual:.4g} <= {bound:.4g}"
    )


# --- client sampling ------------------------------------------------------------------------------


def _replayed_samples(config: RunConfig, num_clients: int, rate: float, rounds: int) -> dict[str, list[set[int]]]:
    """round -> predicted partitions, for every plausible replay of the server's sampler."""
    identity = {p: client_identity(config, NodeConfig(p, num_clients)) for p in range(num_clients)}
    orders = {
        "by identity": sorted(range(num_clients), key=lambda p: identity[p]),
        "by partition": list(range(num_clients)),
    }
    predictions = {}
    for order_name, order in orders.items():
        for k in range(4):
            for draw_name in ("random.Random", "numpy default_rng"):
                if draw_name == "random.Random":
                    rng = random.Random(config.seed + k)
                    uniform = rng.random
                else:
                    uniform = np.random.default_rng(config.seed + k).random
                predictions[f"{draw_name}(seed{k:+d}) {order_name}"] = [
                    {p for p in order if uniform() < rate} for _ in range(rounds)
                ]
    return predictions


def test_who_took_part_in_a_round_cannot_be_predicted(tmp_path):
    """Attack: replay the server's Poisson sampler (q = 3/10) from the public config (seed, and the
    clients' identities, which are hashes of public fields) to predict which clients trained in
    each of 10 rounds. Threshold: per-(round, client) membership accuracy < 0.9.

    Chance: any prediction made without the real randomness is right with probability 0.3 or 0.7
    per (round, client), independently, so its accuracy over 100 pairs is at most Binomial(100, 0.7)
    (the 'nobody' guess); P(>= 90 right) = 1.6e-6 per replay, < 3e-5 over the 16 replays tried.
    The replayed sampler itself expects 0.58 (P(>= 0.9) = 1.8e-12)."""
    clients, rounds, per_round = 10, 10, 3
    sent, nodes = [], {}
    out = run_inprocess(FAST | {"output-dir": str(tmp_path), "dp": "server", "sampling": "poisson",
                                "clients-per-round": per_round, "num-server-rounds": rounds},
                        num_clients=clients, on_message=sent.append, nodes=nodes)
    truth = [set() for _ in range(rounds)]
    for message in sent:
        if message.metadata.message_type == MessageType.TRAIN:
            server_round = int(message.content["config"]["server-round"])
            truth[server_round - 1].add(nodes[message.metadata.dst_node_id]["partition-id"])
    assert len(json.loads((out / "metrics.json").read_text())) == rounds

    config = RunConfig.from_run_config(json.loads((out / "config.json").read_text()))
    rate = per_round / clients  # public: clients-per-round over the number of clients (summary.json)
    accuracies = {
        name: np.mean([(p in predicted[r]) == (p in truth[r]) for r in range(rounds) for p in range(clients)])
        for name, predicted in _replayed_samples(config, clients, rate, rounds).items()
    }
    best = max(accuracies, key=accuracies.get)
    assert accuracies[best] < 0.9, (
        f"BROKEN: replaying the sampler ({best}) predicts membership with accuracy {accuracies[best]:.2f}; "
        f"truth per round: {[sorted(t) for t in truth]}"
    )


# --- client-side replays --------------------------------------------------------------------------

NODE = {"partition-id": 0, "num-partitions": 10}
DPSGD = {"dp": "dpsgd", "noise-multiplier": 1.0, "clipping-norm": 1.0, "local-epochs": 1, "seed": SEED}
# z = 3: a few releases stay within a client's own epsilon cap (a cautious client refuses more).
LOCAL = {"dp": "local", "noise-multiplier": 3.0, "clipping-norm": 1.0, "local-epochs": 1, "seed": SEED}


def _train_message(server_round: int = 1) -> tuple[Message, ArrayRecord]:
    arrays = ArrayRecord(build_model("mlp", 64, 10, seed=0).state_dict())
    content = RecordDict({"arrays": arrays, "config": RoundInstructions(server_round, 64, 10).to_record()})
    with task_identity(node_id=1):
        return Message(content, 7, MessageType.TRAIN), arrays


def _deliver(message: Message, context) -> Message:
    with task_identity(node_id=context.node_id):
        reply = client_app(message, context)
    assert not reply.has_error(), reply.error.reason
    refused = reply.content["metrics"].get(REFUSED, 0)
    assert not refused, f"the client refused, so there is no release to attack: {reply.content['status']['reason']}"
    return reply


def _release(reply: Message) -> np.ndarray:
    return flat({k: a.numpy() for k, a in reply.content["arrays"].items()})


@pytest.mark.parametrize("mode", [DPSGD, LOCAL], ids=["dpsgd", "local"])
def test_a_replayed_message_gets_a_fresh_release_and_is_charged(mode, tmp_path):
    """Attack: send the same train message twice to a client, to the same node (same context) and to
    a restarted one (fresh context, same state-dir). Two identical releases show that the noise is a
    function of public inputs (message, round, partition, seed), so anyone can regenerate it; a
    replay that is not charged is a free release. Threshold: the two releases must differ, and in
    local mode the client's ledger must charge the second release (its reported local_epsilon grows)."""
    message, _ = _train_message()
    node = NODE | {"state-dir": str(tmp_path / "state")}

    same = make_context(mode, node)
    first, second = _deliver(message, same), _deliver(message, same)
    repeated = bool(np.array_equal(_release(first), _release(second)))
    assert not repeated, "BROKEN: the same node released the same update twice"

    restarted = [make_context(mode, NODE | {"state-dir": str(tmp_path / "restart")}, node_id=n) for n in (11, 12)]
    before, after = (_deliver(message, context) for context in restarted)
    repeated = bool(np.array_equal(_release(before), _release(after)))
    assert not repeated, (
        "BROKEN: a restarted client released the same update for the same message: the noise is a "
        "function of public inputs"
    )
    if mode["dp"] == "local":
        assert second.content["metrics"][LOCAL_EPSILON] > first.content["metrics"][LOCAL_EPSILON]
        assert after.content["metrics"][LOCAL_EPSILON] > before.content["metrics"][LOCAL_EPSILON]


def test_dpsgd_release_cannot_be_reproduced_from_the_public_seed():
    """Attack: the adversary knows the message and the public seed; if the client's randomness were a
    function of them, two independent clients holding the same data (fresh contexts, no state)
    would release the same model, i.e. the adversary can rerun the release. Threshold: they differ."""
    message, _ = _train_message()
    releases = [_release(_deliver(message, make_context(DPSGD, NODE, node_id=n))) for n in (21, 22)]
    reproduced = bool(np.array_equal(*releases))
    assert not reproduced, "BROKEN: DP-SGD's release is reproducible from public inputs"


def test_local_noise_cannot_be_regenerated_from_the_public_seed():
    """Attack (local mode, Gaussian, C = 1, z = 3): regenerate the client's noise from seeds derived from
    the public seed, round and partition (the client's former crc32(seed|round|partition|data-path)
    among them), subtract it and the global model from the release. Regenerated noise leaves the
    clipped update, of L2 norm <= C = 1. Threshold: the residual exceeds C (+1e-3) for every guess
    (unpredictable noise leaves ~sqrt(d) * z * C = ~480)."""
    message, global_arrays = _train_message(server_round=1)
    reply = _deliver(message, make_context(LOCAL, NODE))
    start = {k: a.numpy().astype(np.float64) for k, a in global_arrays.items()}
    delta = {k: a.numpy().astype(np.float64) - start[k] for k, a in reply.content["arrays"].items()}
    extra = {
        f"crc32({SEED}|1|{p}|)": zlib.crc32(f"{SEED}|1|{p}|".encode()) for p in range(NODE["num-partitions"])
    }
    std = LOCAL["noise-multiplier"] * LOCAL["clipping-norm"]
    residual, guess = best_regeneration(delta, std, seed_guesses(SEED, 1, extra))
    assert residual > LOCAL["clipping-norm"] + 1e-3, (
        f"BROKEN: noise regenerated with {guess} leaves the clipped update (norm {residual:.4g})"
    )


# --- whole runs ---------------------------------------------------------------------------------


def test_dp_runs_with_the_same_seed_release_different_models_non_dp_runs_the_same(tmp_path):
    """Attack: rerun the published config (same seed) and compare. Threshold: two dp='server' runs
    must release different models (the noise is fresh); the control: two non-DP runs with the same
    seed release byte-identical ones (so the difference is the noise, not the harness)."""
    def model_bytes(name, dp):
        overrides = FAST | {"output-dir": str(tmp_path / name), "dp": dp, "num-server-rounds": 1}
        return hashlib.sha256((run_inprocess(overrides, num_clients=5) / "model.pt").read_bytes()).hexdigest()

    assert model_bytes("plain-a", "none") == model_bytes("plain-b", "none")
    assert model_bytes("dp-a", "server") != model_bytes("dp-b", "server"), (
        "BROKEN: two DP runs with the same seed released the same model: the noise is a function of the seed"
    )


@pytest.mark.parametrize("dp", ["server", "client", "dpsgd", "local"])
def test_published_files_hold_no_exact_counts(dp, tmp_path):
    """Attack: read the per-round counts of replies, failures, refusals, invalid, clipped and rejected
    updates from metrics.json/metrics.csv/summary.json: exact counts are functions of who took part
    (and of their data, for clipping) released without noise, outside the guarantee.
    Threshold: in every DP mode none of those keys holds a value in any public file, and any
    diagnostics.* file in output-dir is operator-only (no permission for group or others)."""
    overrides = FAST | {"output-dir": str(tmp_path), "dp": dp, "num-server-rounds": 2}
    if dp == "local":
        overrides["noise-multiplier"] = LOCAL["noise-multiplier"]  # within a client's own epsilon cap
    out = run_inprocess(overrides, num_clients=4)
    leaks = []
    rows = public_json(out / "metrics.json") or []
    assert rows or not is_public(out / "metrics.json"), "no rounds ran"
    for row in rows:
        leaks += [f"metrics.json round {row.get('round')}: {k}={row[k]}" for k in COUNT_KEYS if row.get(k) is not None]
    summary = public_json(out / "summary.json") or {}
    leaks += [f"summary.json: {k}={summary[k]}" for k in COUNT_KEYS if summary.get(k) is not None]
    if is_public(out / "metrics.csv"):
        for row in csv.DictReader(io.StringIO((out / "metrics.csv").read_text())):
            leaks += [f"metrics.csv round {row.get('round')}: {k}={row[k]}"
                      for k in COUNT_KEYS if row.get(k) not in (None, "")]
    for path in out.rglob("diagnostics*"):
        if is_public(path):
            leaks.append(f"{path.name} is readable by others (mode {stat.filemode(path.stat().st_mode)})")
    assert not leaks, "BROKEN: exact counts are published:\n" + "\n".join(leaks[:12])
