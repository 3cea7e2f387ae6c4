"""server_app/linkstate_index.py on Flower 1.41's real in-memory LinkState and simulation engine.

The same script of stores and engine sweeps (one pass of Flower's own ``add_messages_to_queue``
each) runs against ``InMemoryLinkState`` and the engine as Flower ships them and with the
wrappers installed (all of them, or the LinkState's alone: the engine started its sweep before the
ServerApp installed them); each must hand out exactly the same messages, in the same sweeps and
order, including a message stored for a node right after a sweep found it empty, messages stored
before the wrappers were installed, ``limit`` > 1 and ``run_id`` filters. Another test runs the
engine's sweep thread against concurrent stores.
"""

from __future__ import annotations

import threading
import time
from queue import Empty, Queue

import pytest
from flower_messages import task_identity
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from server_app import linkstate_index

NUM_NODES = 40


def unwrapped(function):
    while getattr(function, linkstate_index._MARK, False):
        function = function.__wrapped__
    return function


@pytest.fixture
def pristine(monkeypatch):
    """InMemoryLinkState and the engine's sweep as Flower ships them for this test (an in-process
    simulation test may already have installed the wrappers); restored afterwards."""
    for name in ("get_message_ins", "store_message_ins"):
        monkeypatch.setattr(InMemoryLinkState, name, unwrapped(getattr(InMemoryLinkState, name)))
    monkeypatch.setattr(vce_api, "add_messages_to_queue", unwrapped(vce_api.add_messages_to_queue))
    assert not getattr(InMemoryLinkState.get_message_ins, linkstate_index._MARK, False)


class OnePass:
    """A stop event for ``add_messages_to_queue`` that lets its loop run exactly once."""

    def __init__(self) -> None:
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > 1

    def wait(self, timeout=None) -> bool:
        return False


class Federation:
    """A real InMemoryLinkState with a run and NUM_NODES nodes registered by the simulation
    engine's own ``_register_nodes``; messages pushed through the real ``InMemoryGrid``."""

    def __init__(self, num_nodes: int = NUM_NODES, runs: tuple[int, ...] = (1,)):
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        self.state = factory.state()
        for run_id in runs:
            run = Run.create_empty(run_id=run_id)
            run.primary_task_id, run.federation_id = run_id, NOOP_FEDERATION_ID
            self.state.run_ids[run_id] = RunRecord(run=run)
            self.state.task_store[run_id] = Task(task_id=run_id, run_id=run_id)
        self.mapping = _register_nodes(num_nodes, factory)  # node id -> partition id
        self.node_ids = list(self.mapping)
        self.grids = {}
        for run_id in runs:
            self.grids[run_id] = InMemoryGrid(state_factory=factory)
            self.grids[run_id].set_run(self.state.run_ids[run_id].run)

    def push(self, partition: int, tag: str, run_id: int = 1) -> None:
        with task_identity(run_id=run_id, task_id=run_id):
            message = Message(RecordDict({"c": ConfigRecord({"tag": tag})}), self.node_ids[partition], "train")
            assert len(list(self.grids[run_id].push_messages([message]))) == 1

    def delivered(self, messages) -> list[tuple[int, str]]:
        return [(self.mapping[m.metadata.dst_node_id], m.content["c"]["tag"]) for m in messages]

    def sweep(self) -> list[tuple[int, str]]:
        """One pass of the engine's sweep (vce_api.add_messages_to_queue, as installed now)."""
        queue: Queue = Queue()
        vce_api.add_messages_to_queue(self.state, queue, self.mapping, OnePass())
        return self.delivered([queue.get_nowait() for _ in range(queue.qsize())])


def script(install: str, monkeypatch) -> list:
    """Stores and sweeps; returns what each step delivered."""
    fed = Federation(runs=(1, 2))
    log = []
    fed.push(30, "before-install-c")
    fed.push(3, "before-install-a")
    fed.push(3, "before-install-b")  # two for one node: limit=1 delivers them in two sweeps
    if install:
        flowers_sweep = vce_api.add_messages_to_queue
        assert linkstate_index.install()
        assert linkstate_index.install()  # idempotent
        assert getattr(vce_api.add_messages_to_queue, linkstate_index._MARK, False)
        if install == "linkstate only":
            monkeypatch.setattr(vce_api, "add_messages_to_queue", flowers_sweep)
    log.append(("sweep 1", fed.sweep()))
    log.append(("sweep 2", fed.sweep()))
    log.append(("sweep 3 (all empty)", fed.sweep()))
    fed.push(7, "after-an-empty-sweep")  # node 7 was just found empty
    fed.push(3, "node-3-again")
    log.append(("sweep 4", fed.sweep()))
    log.append(("sweep 5 (all empty)", fed.sweep()))
    for i in range(5):
        fed.push(12, f"batch-{i}")
    node_12 = fed.node_ids[12]
    log.append(("limit 2", fed.delivered(fed.state.get_message_ins(node_12, limit=2))))
    log.append(("limit 2 again", fed.delivered(fed.state.get_message_ins(node_12, limit=2))))
    log.append(("limit None", fed.delivered(fed.state.get_message_ins(node_12, limit=None))))
    log.append(("limit None, empty", fed.delivered(fed.state.get_message_ins(node_12, limit=None))))
    fed.push(20, "run-2", run_id=2)
    fed.push(20, "run-1", run_id=1)
    node_20 = fed.node_ids[20]
    log.append(("run 1 only", fed.delivered(fed.state.get_message_ins(node_20, limit=None, run_id=1))))
    log.append(("run 1 only, empty", fed.delivered(fed.state.get_message_ins(node_20, limit=None, run_id=1))))
    log.append(("sweep 6 (run 2 left)", fed.sweep()))
    log.append(("sweep 7 (all empty)", fed.sweep()))
    with pytest.raises(AssertionError, match="limit"):
        fed.state.get_message_ins(fed.node_ids[0], limit=0)  # Flower's own check still applies
    return log


@pytest.mark.parametrize("install", ["all", "linkstate only"])
def test_patched_state_delivers_exactly_what_flower_delivers(pristine, monkeypatch, install):
    reference = script("", monkeypatch)
    patched = script(install, monkeypatch)
    assert patched == reference
    as_dict = dict(reference)  # and the script does test what it says
    assert as_dict["sweep 1"] == [(3, "before-install-a"), (30, "before-install-c")]
    assert as_dict["sweep 2"] == [(3, "before-install-b")]
    assert as_dict["sweep 4"] == [(3, "node-3-again"), (7, "after-an-empty-sweep")]
    assert as_dict["limit 2"] == [(12, "batch-0"), (12, "batch-1")]
    assert as_dict["limit None"] == [(12, "batch-4")]
    assert as_dict["run 1 only"] == [(20, "run-1")] and as_dict["sweep 6 (run 2 left)"] == [(20, "run-2")]
    assert not any(as_dict[k] for k in as_dict if "empty" in k)


def test_idle_nodes_cost_no_call_and_no_scan(pristine):
    assert linkstate_index.install()
    fed = Federation(num_nodes=200)
    for partition in (150, 5, 50):
        fed.push(partition, f"m{partition}")
    asked, scans = [], []
    get, check = fed.state.get_message_ins, fed.state._check_stored_messages
    fed.state.get_message_ins = lambda node_id, limit, **kw: (asked.append(fed.mapping[node_id]), get(node_id, limit, **kw))[1]
    fed.state._check_stored_messages = lambda ids, run_id=None: (scans.append(1), check(ids, run_id))[1]
    assert fed.sweep() == [(5, "m5"), (50, "m50"), (150, "m150")]  # the engine's order: by partition
    # Only the 3 nodes with a message were asked, and each scan saw the 3 stored messages at most:
    # as Flower ships it, all 200 nodes would be asked and scan (600 checks).
    assert asked == [5, 50, 150] and 0 < len(scans) <= 3 * 3
    asked.clear(), scans.clear()
    assert fed.sweep() == [] and asked == [5, 50, 150]  # each found empty once, then dropped
    asked.clear(), scans.clear()
    assert fed.sweep() == [] and asked == [] and scans == []


def test_flowers_sweep_thread_delivers_every_concurrently_stored_message_once(pristine):
    assert linkstate_index.install()
    fed = Federation(num_nodes=300)
    queue: Queue = Queue()
    stop = threading.Event()
    sweeper = threading.Thread(target=vce_api.add_messages_to_queue, args=(fed.state, queue, fed.mapping, stop),
                               daemon=True)
    sweeper.start()
    expected = []
    try:
        for i in range(400):  # stores land before, during and after the sweeps reach each node
            partition = (i * 37) % 300 if i % 20 else 7  # node 7 gets several: one per sweep
            fed.push(partition, f"t{i}")
            expected.append((partition, f"t{i}"))
            if i % 50 == 0:
                time.sleep(0.15)  # let a sweep find the nodes empty, then store again
        got = []
        deadline = time.monotonic() + 60
        while len(got) < len(expected) and time.monotonic() < deadline:
            try:
                got += fed.delivered([queue.get(timeout=1)])
            except Empty:
                pass
        time.sleep(0.5)  # nothing delivered twice
        while not queue.empty():
            got += fed.delivered([queue.get_nowait()])
    finally:
        stop.set()
        sweeper.join(timeout=5)
    assert sorted(got) == sorted(expected)


def test_other_flower_versions_are_left_alone(pristine, monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    assert linkstate_index.install() is False
    assert not getattr(InMemoryLinkState.get_message_ins, linkstate_index._MARK, False)
    assert not getattr(vce_api.add_messages_to_queue, linkstate_index._MARK, False)


def test_the_patch_is_checked_against_the_installed_flower():
    """Fails loudly on an upgrade: re-read Flower's LinkState and simulation engine, re-run this
    file's tests against them, then update linkstate_index.FLOWER_VERSION."""
    import flwr

    assert flwr.__version__ == linkstate_index.FLOWER_VERSION, (
        f"server_app/linkstate_index.py patches private API of flwr {linkstate_index.FLOWER_VERSION}; "
        f"flwr {flwr.__version__} is installed: re-check it before relying on index-idle-nodes"
    )

