"""Checkpoints are plain data (issue 12): a crafted file is refused without running anything, an old
pickle checkpoint gets a clear message (and an explicit, trusted conversion), a crash mid-write
leaves the previous complete checkpoint, and what is restored is checked field by field."""

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg
from inprocess import run_inprocess

from common.config import RunConfig
from common.privacy.secret_random import SecretRandom
from server_app import checkpoint as checkpoint_module
from server_app.checkpoint import CHECKPOINT_FILE, SECRET_FILE, Checkpoint, load_checkpoint, save_checkpoint
from server_app.checkpoint_convert import convert
from server_app.federation import PrivacyTally
from server_app.plain import CheckpointError
from server_app.privacy import plan_privacy
from server_app.run_state import federation_to_plain, privacy_from_plain, restore_strategy
from server_app.sampling import ClientSampler, SeededChoices

FAST = {"local-epochs": 1, "num-server-rounds": 1}
MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, dtype=np.float32)}
CONFIG = {"seed": 1}


class Payload:
    """Unpickling this creates ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _save(tmp_path: Path, rounds: int = 1, **extra) -> None:
    rows = [{"round": r, "central_accuracy": 0.5} for r in range(1, rounds + 1)]
    save_checkpoint(str(tmp_path), Checkpoint(rounds, MODEL, extra.pop("federation", {}), extra.pop("arrays", {}),
                                              rows, CONFIG, 2.0, extra.pop("secret", None)))


def _edit(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_a_round_trip_keeps_every_array_and_value(tmp_path):
    _save(tmp_path, rounds=2, arrays={"strategy.m_t.0": np.ones((2, 3))})
    restored = load_checkpoint(str(tmp_path), CONFIG)
    assert restored.completed_rounds == 2 and restored.elapsed_seconds == 2.0 and len(restored.rows) == 2
    assert list(restored.model) == ["w", "b"] and all(np.array_equal(restored.model[k], v) for k, v in MODEL.items())
    assert restored.model["w"].dtype == np.float32 and restored.arrays["strategy.m_t.0"].dtype == np.float64
    assert restored.model_for(MODEL) is restored.model
    with pytest.raises(CheckpointError, match="is not this run's model"):
        restored.model_for({"w": np.zeros((3, 2), dtype=np.float32), "b": MODEL["b"]})


def _pickle_as_checkpoint_json(tmp_path, marker):
    (tmp_path / CHECKPOINT_FILE).write_bytes(pickle.dumps(Payload(marker)))


def _pickle_inside_the_npz(tmp_path, marker):
    _save(tmp_path)
    document = json.loads((tmp_path / CHECKPOINT_FILE).read_text())
    npz = tmp_path / document["arrays"]["file"]
    np.savez(npz, **{"model.0": np.array([Payload(marker)], dtype=object), "model.1": MODEL["b"]})
    # The attacker fixes the hash too: the format itself must refuse object arrays.
    _edit(tmp_path / CHECKPOINT_FILE, lambda d: d["arrays"].update(sha256=hashlib.sha256(npz.read_bytes()).hexdigest()))


def _pickle_as_the_npz(tmp_path, marker):
    _save(tmp_path)
    document = json.loads((tmp_path / CHECKPOINT_FILE).read_text())
    npz = tmp_path / document["arrays"]["file"]
    npz.write_bytes(pickle.dumps(Payload(marker)))
    _edit(tmp_path / CHECKPOINT_FILE, lambda d: d["arrays"].update(sha256=hashlib.sha256(npz.read_bytes()).hexdigest()))


def _pickle_as_secret_state(tmp_path, marker):
    _save(tmp_path, secret=SecretRandom())
    (tmp_path / SECRET_FILE).write_bytes(pickle.dumps(Payload(marker)))


def _old_pickle_checkpoint(tmp_path, marker):
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps(Payload(marker)))


CRAFTED = {
    "a pickle named checkpoint.json": (_pickle_as_checkpoint_json, "is not a checkpoint of this app"),
    "a pickled object array in the NPZ": (_pickle_inside_the_npz, "is not a valid checkpoint NPZ"),
    "a pickle as the NPZ": (_pickle_as_the_npz, "is not a valid checkpoint NPZ"),
    "a pickle as secret_state.json": (_pickle_as_secret_state, "is not a secret generator state"),
    "an old checkpoint.pkl": (_old_pickle_checkpoint, "written by an older version of this app"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_checkpoint_is_refused_without_running_anything(tmp_path, case):
    make, message = CRAFTED[case]
    marker = tmp_path.parent / f"{tmp_path.name}-marker"
    make(tmp_path, marker)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(tmp_path), CONFIG)
    assert not marker.exists(), "loading the checkpoint ran code"


def test_the_old_format_message_says_how_to_go_on(tmp_path):
    (tmp_path / "checkpoint.pkl").write_bytes(b"anything")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(tmp_path), CONFIG)
    text = str(error.value)
    assert "re-run without resume = true" in text and "overwrite = true" in text
    assert f"python -m server_app.checkpoint_convert {tmp_path} --trust" in text and "\n" not in text


SCHEMA = {
    "garbage bytes": (lambda d: None, "not JSON", b"\x00\xff garbage"),
    "another JSON document": (lambda d: d.clear() or d.update(hello="world"), "no \"format\"", None),
    "a newer version": (lambda d: d.update(version=3), "has format version 3", None),
    "rounds as a string": (lambda d: d.update(completed_rounds="1"), "completed_rounds: expected a whole number", None),
    "a missing key": (lambda d: d.pop("rows"), "missing keys ['rows']", None),
    "an extra key": (lambda d: d.update(code="print(1)"), "unexpected keys ['code']", None),
    "rows not matching the rounds": (lambda d: d["rows"].pop(), "1 metric rows for 2 completed rounds", None),
    "a row out of order": (lambda d: d["rows"].reverse(), "rows[0]: expected round 1", None),
    "a nested config value": (lambda d: d["config"].update(seed={"x": 1}), "config.seed: expected a plain value", None),
    "an NPZ outside the run": (lambda d: d["arrays"].update(file="../elsewhere.npz"), "expected a file name", None),
    "an NPZ that is not the one written": (lambda d: d["arrays"].update(sha256="0" * 64), "SHA-256 differs", None),
    "arrays the JSON does not list": (lambda d: d["arrays"]["model"].pop(), "not the arrays the checkpoint lists", None),
    "a missing NPZ": (lambda d: d["arrays"].update(file="checkpoint-000009.npz"), "cannot be read", None),
}


@pytest.mark.parametrize("case", list(SCHEMA))
def test_a_checkpoint_that_fails_the_schema_is_refused_with_its_field(tmp_path, case):
    change, message, raw = SCHEMA[case]
    _save(tmp_path, rounds=2)
    if raw is not None:
        (tmp_path / CHECKPOINT_FILE).write_bytes(raw)
    else:
        _edit(tmp_path / CHECKPOINT_FILE, change)
    with pytest.raises(CheckpointError, match=re.escape(message)) as error:
        load_checkpoint(str(tmp_path), CONFIG)
    assert str(tmp_path) in str(error.value)


def test_a_crash_while_saving_leaves_the_previous_complete_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, rounds=1)
    real_write = checkpoint_module.atomic_write

    def crash_on_commit(path, data):
        if path.endswith(CHECKPOINT_FILE):
            raise KeyboardInterrupt("killed after the NPZ, before the commit")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "atomic_write", crash_on_commit)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, rounds=2, arrays={"strategy.m_t.0": np.ones(3)})
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path), CONFIG).completed_rounds == 1  # the new NPZ is not committed
    _save(tmp_path, rounds=2)
    assert load_checkpoint(str(tmp_path), CONFIG).completed_rounds == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint-000002.npz", CHECKPOINT_FILE]


def test_restored_state_is_checked_against_the_run(tmp_path):
    strategy = FedAdam()
    strategy.current_arrays = {k: v.copy() for k, v in MODEL.items()}
    strategy.m_t = {k: np.ones_like(v) for k, v in MODEL.items()}
    config = RunConfig(dp="server", sampling="poisson", clients_per_round=2)
    plan = plan_privacy(config, num_clients=4)
    plain, arrays = federation_to_plain(strategy, plan, ClientSampler(1.0, SeededChoices(1)), PrivacyTally(), {7: "a"}, 4)
    restored = FedAdam()
    restore_strategy(restored, plain["strategy"], arrays, MODEL)
    assert restored.v_t is None and all(np.array_equal(restored.m_t[k], strategy.m_t[k]) for k in MODEL)
    with pytest.raises(CheckpointError, match="written by FedAdam, this run uses FedAvg"):
        restore_strategy(FedAvg(), plain["strategy"], arrays, MODEL)
    with pytest.raises(CheckpointError, match=r"m_t\[0\]: expected a numeric array of shape \(2, 3\)"):
        restore_strategy(FedAdam(), plain["strategy"], arrays | {"strategy.m_t.0": np.ones(5)}, MODEL)
    with pytest.raises(CheckpointError, match="secret generator is missing"):
        privacy_from_plain(plain["privacy"], config, None)
    seeded = json.loads(json.dumps(plain["privacy"]))
    seeded["sampler"]["rng"] = federation_to_plain(FedAvg(), plan_privacy(RunConfig(), 4),
                                                    ClientSampler(1.0, SeededChoices(1)), PrivacyTally(), {}, 4)[0]["eval_rng"]
    with pytest.raises(CheckpointError, match="must draw from the secret generator"):
        privacy_from_plain(seeded, config, plan.secret)
    weaker = json.loads(json.dumps(plain["privacy"])) | {"noise_multiplier": 0.01}
    with pytest.raises(CheckpointError, match="noise multipliers of the plan, ledger and mechanism disagree"):
        privacy_from_plain(weaker, config, plan.secret)


def test_an_old_pickle_checkpoint_converts_once_trusted_and_resumes_the_same_stream(tmp_path):
    """The conversion reads the old format exactly as the old server wrote it."""
    config = RunConfig(dp="server", sampling="all", debug_noise_key="convert")
    plan = plan_privacy(config, num_clients=3)
    plan.secret.gaussian((7,), 1.0)
    old = object.__new__(Checkpoint)  # the old class had these fields and was pickled whole
    old.__dict__.update(
        completed_rounds=1, arrays=ArrayRecord({k: Array(v) for k, v in MODEL.items()}), rows=[{"round": 1}],
        config={k: v for k, v in config.to_dict().items() if k not in ("overwrite",)}, elapsed_seconds=3.0,
        federation_state={"strategy": FedAvg(), "privacy": plan, "eval_sampler": ClientSampler(1.0, SeededChoices(2)),
                          "tally": PrivacyTally(), "num_clients": 3},
    )

    class OldPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "secret-random" if isinstance(obj, SecretRandom) else None

    with open(tmp_path / "checkpoint.pkl", "wb") as handle:
        OldPickler(handle).dump(old)
    (tmp_path / SECRET_FILE).write_text(json.dumps(plan.secret.state_dict()))

    convert(str(tmp_path))
    assert (tmp_path / "checkpoint.pkl.converted").exists() and not (tmp_path / "checkpoint.pkl").exists()
    restored = load_checkpoint(str(tmp_path), config.to_dict())
    resumed = privacy_from_plain(restored.federation["privacy"], config, restored.secret)
    assert np.array_equal(resumed.secret.gaussian((50,), 1.0), plan.secret.gaussian((50,), 1.0))
    assert resumed.ledger.rounds == plan.ledger.rounds and np.array_equal(restored.model["w"], MODEL["w"])


def test_the_server_refuses_a_tampered_checkpoint_and_leaves_the_results_untouched(tmp_path):
    out = run_inprocess(FAST | {"output-dir": str(tmp_path)}, num_clients=3)
    _edit(out / CHECKPOINT_FILE, lambda d: d["federation"]["privacy"]["sampler"]["rng"]["internal"].pop())

    def results():  # config.json is rewritten by every resume (resume = true); the rest must not change
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "config.json"}

    before = results()
    with pytest.raises(CheckpointError, match="not a random.Random state"):
        run_inprocess(FAST | {"output-dir": str(out), "resume": True}, num_clients=3)
    assert results() == before
