"""Let Flower's simulation engine skip the nodes that have no message waiting.

Opt-in: ``index-idle-nodes = true`` (run config). It replaces methods of Flower's private
``InMemoryLinkState`` and of the simulation engine, checked on flwr 1.41.0 only; on any other
version it logs a warning and changes nothing, and tests/test_linkstate_index.py fails loudly
until someone re-checks it against the new Flower source. Cost: a set of node ids per LinkState
and one lock per poll of a node with something pending.

Why: in Flower 1.41.0 the simulation engine's ``add_messages_to_queue``
(``flwr/server/superlink/fleet/vce/vce_api.py``) asks the LinkState for the pending messages of
EVERY registered node every 0.1 s, one ``state.get_message_ins(node_id=..., limit=1)`` call per
node, and ``InMemoryLinkState.get_message_ins``
(``flwr/server/superlink/linkstate/in_memory_linkstate.py``) walks and re-validates every stored
message on each call: O(nodes x messages) per sweep. At 100,000 simulated clients that was 86% of the simulation process and most of an
18 s round, for 100 clients sampled (``benchmarks/results.md``, "3. Scale").

What: :func:`install` wraps ``InMemoryLinkState.store_message_ins`` and ``get_message_ins``
(the class, once) around a per-instance set of destination node ids that MAY have an
undelivered message:

* ``store_message_ins`` adds the destination after Flower stored the message;
* ``get_message_ins(node_id)`` returns ``[]`` at once for a node not in the set; otherwise it
  calls Flower's method and, holding the state's lock across that call, drops the node from the
  set only when it found nothing (a store can only add its message after that, and re-adds the
  node). So no message is lost or duplicated;
* the set is seeded from the messages already stored when an instance is first seen;
* the engine's sweep itself (``vce_api.add_messages_to_queue``) is wrapped too: it is handed,
  instead of the node -> partition mapping it walks, a stand-in whose ``keys()`` lists only the
  nodes in that set (in the mapping's order), so a sweep costs O(nodes with something pending),
  not O(nodes). Flower's loop runs unchanged; a message stored after a sweep took its list is
  picked up by the next sweep, 0.1 s later, as a node the sweep had already passed always was.
  The engine looks the function up when it starts its sweep thread: after the ServerApp's
  ``main()`` at any scale where it matters (registering the clients takes seconds to minutes
  first); in a small federation that starts it earlier, the first wrapper alone applies.

The one thing given up: Flower's per-call scan also deleted expired messages of OTHER nodes as a
side effect; now that happens only when a node with something pending is polled. Expiry as the
ServerApp sees it is unchanged (``get_message_res`` checks the messages it is asked about).

Where it applies: with the opt-in, the ServerApp calls :func:`install` from ``main()``. In simulation the
ServerApp and the engine share the ``flwr-simulation`` process and its ``InMemoryLinkState``. In
deployment the LinkState lives in the SuperLink process; the ServerApp's process has none (the
module is not even imported there) and :func:`install` does nothing. Private Flower API: only
for flwr 1.41.0; any other version is logged and left alone. Fix upstream: index undelivered
messages by destination node in the LinkState (or sweep the messages, not the nodes).
"""

from __future__ import annotations

import functools
import sys
import threading
from logging import DEBUG, WARNING

from flwr.common.logger import log

FLOWER_VERSION = "1.41.0"
MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"
ENGINE = "flwr.server.superlink.fleet.vce.vce_api"  # the simulation engine: add_messages_to_queue
_PENDING = "_fl_dp_maybe_pending"  # attribute holding the set on each InMemoryLinkState instance
_MARK = "_fl_dp_indexed"  # set on the wrappers: installed already
_install_lock = threading.Lock()


def install() -> bool:
    """Wrap ``InMemoryLinkState`` and, if loaded, the engine's sweep in this process (idempotent);
    True if the wrappers are in place."""
    import flwr

    if flwr.__version__ != FLOWER_VERSION:
        log(WARNING, "linkstate_index: flwr %s is not %s; the simulation engine's per-node scan is left "
            "as it is", flwr.__version__, FLOWER_VERSION)
        return False
    module = sys.modules.get(MODULE)
    if module is None:  # no in-memory LinkState in this process (deployment: it is in the SuperLink)
        log(DEBUG, "linkstate_index: no InMemoryLinkState in this process; nothing to do")
        return False
    cls = module.InMemoryLinkState
    with _install_lock:
        if not getattr(cls.get_message_ins, _MARK, False):
            cls.store_message_ins = _wrap_store(cls.store_message_ins)
            cls.get_message_ins = _wrap_get(cls.get_message_ins)
        engine = sys.modules.get(ENGINE)
        if engine is not None and not getattr(engine.add_messages_to_queue, _MARK, False):
            # setattr: mypy lets code read a module's unknown attributes, not assign them
            setattr(engine, "add_messages_to_queue", _wrap_sweep(engine.add_messages_to_queue, cls))
    log(DEBUG, "linkstate_index: the simulation engine's sweep skips nodes with nothing pending")
    return True


def _maybe_pending(state) -> set[int]:
    """The instance's set of node ids that may have an undelivered message (seeded on first use)."""
    pending = state.__dict__.get(_PENDING)
    if pending is None:
        with state.lock:  # Flower's RLock: stores and scans hold it too
            pending = state.__dict__.get(_PENDING)
            if pending is None:
                pending = {m.metadata.dst_node_id for m in state.message_ins_store.values()
                           if m.metadata.delivered_at == ""}
                state.__dict__[_PENDING] = pending
    return pending


def _wrap_store(original):
    @functools.wraps(original)
    def store_message_ins(self, message):
        message_id = original(self, message)
        if message_id is not None:
            _maybe_pending(self).add(message.metadata.dst_node_id)
        return message_id

    setattr(store_message_ins, _MARK, True)
    return store_message_ins


def _wrap_get(original):
    @functools.wraps(original)
    def get_message_ins(self, node_id, limit, *, run_id=None):
        # The fast path runs for every node every 0.1 s: keep it to a dict and a set lookup.
        pending = self.__dict__.get(_PENDING)
        if pending is None:
            pending = _maybe_pending(self)
        if node_id not in pending and (limit is None or limit >= 1):  # Flower raises for limit < 1
            return []
        with self.lock:
            messages = original(self, node_id, limit, run_id=run_id)
            if not messages and run_id is None:  # nothing left for this node in any run
                pending.discard(node_id)
        return messages

    setattr(get_message_ins, _MARK, True)
    return get_message_ins


class _PendingNodes:
    """Stands in for the engine's node id -> partition id mapping in its sweep, which only calls
    ``keys()``: the mapped nodes that may have a message, in the mapping's (registration) order."""

    def __init__(self, state, nodes_mapping) -> None:
        self.state, self.nodes_mapping = state, nodes_mapping

    def keys(self) -> list[int]:
        pending = _maybe_pending(self.state).copy()  # one C-level copy: safe against concurrent adds
        return sorted((n for n in pending if n in self.nodes_mapping), key=self.nodes_mapping.__getitem__)


def _wrap_sweep(original, state_class):
    @functools.wraps(original)
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        if isinstance(state, state_class):
            nodes_mapping = _PendingNodes(state, nodes_mapping)
        return original(state, queue, nodes_mapping, f_stop)

    setattr(add_messages_to_queue, _MARK, True)
    return add_messages_to_queue
