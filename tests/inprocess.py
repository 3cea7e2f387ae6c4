"""Run the real ServerApp against the real ClientApp in this process: no Ray, no SuperLink.

``run_inprocess`` builds the fused run config exactly as ``flwr run`` does
(``get_fused_config_from_dir``: ``[tool.flwr.app.config]`` of pyproject.toml plus the
overrides), then calls the ``ServerApp`` object the way Flower's runtime does,
``server_app(grid, context)``, with :class:`InProcessGrid` as its grid. The grid delivers
every instruction message to the real ``ClientApp`` (``client_app(message, context)``, as
Flower's runtime calls it) at once, in the order they were pushed, and keeps the reply for
the next pull.

What it reproduces from Flower 1.41's runtime:

* one persistent ``Context`` per node: ``node_config = {"partition-id": i, "num-partitions": N}``
  (or the caller's), ``state`` kept across rounds, ``run_config`` = the fused config; as in
  Flower, a ClientApp that raises leaves its node's context as it was before the call;
* node ids are random 63-bit integers, different in every run (as a SuperNode's are);
* a message gets its message id when pushed; a reply answers it (``reply_to_message_id``);
* a ClientApp exception becomes an error reply, ``Error(CLIENT_APP_RAISED_EXCEPTION,
  "<class '...'>:<'...'>")``, the code and reason format of Flower's runtime
  (``flwr/supernode/runtime/run_clientapp.py``);
* content is deep-copied on the way to the client and back, so the server and the clients
  share no objects (on the real runtime every message is serialized);
* a node that leaves (``drop_after``) is no longer listed by ``get_node_ids`` and its
  messages are answered with Flower's ``NODE_UNAVAILABLE`` error.

What it does not: concurrency (clients run one after another), TTL expiry, and anything of
the SuperLink (heartbeats, the LinkState).
A run takes a few seconds instead of the ~15-30 s of ``tests/simulation.run_app`` (3 rounds of 5
clients: 1.9 s against 12.9 s), and releases the same model bit for bit (tests/test_inprocess.py).

The only private Flower API used is ``TaskIdentity`` (which an instruction ``Message`` reads
its run/source ids from), through ``tests/flower_messages.task_identity``. Message ids are set
by building the delivered copy with ``Message(..., metadata=Metadata(...))``: public classes and
a public keyword (Flower's source calls it "for internal use"; its own grids write the private
``metadata.__dict__["_message_id"]`` instead).
"""

from __future__ import annotations

import copy
import os
import random
import traceback
import uuid
from logging import ERROR
from pathlib import Path
from typing import Any, Callable, Iterable

from flower_messages import SERVER_NODE_ID, task_identity
from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

APP_DIR = Path(__file__).resolve().parent.parent
RUN_ID = 1
# Sent with Flower's NODE_UNAVAILABLE code, as its LinkState does for a node that stopped sending
# heartbeats (flwr/server/superlink/linkstate/utils.py).
NODE_UNAVAILABLE_REASON = "Error: Node Unavailable - the destination node left the federation."


def _flower_reason(error: BaseException) -> str:
    """The reason string Flower's runtime puts in the error reply of a ClientApp that raised."""
    return str(type(error)) + ":<'" + str(error) + "'>"


def _with_metadata(message: Message, **changes: Any) -> Message:
    """A copy of ``message`` (content deep-copied) whose metadata differs by ``changes``."""
    old = message.metadata
    fields = {
        "run_id": old.run_id,
        "message_id": old.message_id,
        "src_node_id": old.src_node_id,
        "dst_node_id": old.dst_node_id,
        "reply_to_message_id": old.reply_to_message_id,
        "group_id": old.group_id,
        "created_at": old.created_at,
        "ttl": old.ttl,
        "message_type": old.message_type,
        "src_task_id": old.src_task_id,
        "dst_task_id": old.dst_task_id,
    } | changes
    metadata = Metadata(**fields)
    if message.has_error():
        return Message(error=copy.deepcopy(message.error), metadata=metadata)
    return Message(content=copy.deepcopy(message.content), metadata=metadata)


def random_node_ids(count: int) -> list[int]:
    """``count`` distinct random 63-bit node ids (never 0 or the SuperLink's own id)."""
    rng = random.SystemRandom()
    ids: set[int] = set()
    while len(ids) < count:
        candidate = rng.getrandbits(63)
        if candidate not in (0, SERVER_NODE_ID):
            ids.add(candidate)
    return list(ids)


class InProcessGrid(Grid):
    """A Flower ``Grid`` that hands each pushed message straight to the ClientApp of its node.

    ``contexts`` maps node id -> that node's persistent ``Context``. ``on_message(msg)`` sees
    every instruction as delivered (message id set). ``drop_after`` maps node id -> the last
    server round it serves: once an instruction for a later round is pushed (to any node),
    the node has left (see the module docstring).
    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        contexts: dict[int, Context],
        on_message: Callable[[Message], None] | None = None,
        drop_after: dict[int, int] | None = None,
    ):
        self.client_app = client_app
        self.contexts = contexts
        self.on_message = on_message
        self.drop_after = dict(drop_after or {})
        self.gone: set[int] = set()
        self.replies: dict[str, Message] = {}
        self.delivered: list[Message] = []  # every instruction, in the order it was pushed
        self._run = None

    # --- Grid API ---------------------------------------------------------------------------

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        if self._run is None:
            raise RuntimeError("InProcessGrid has no Run (none was set with set_run)")
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.contexts if node not in self.gone]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = []
        for message in messages:
            if message.metadata.reply_to_message_id or message.metadata.ttl <= 0:
                raise ValueError(f"Invalid message: {message}")  # as Flower's grid checks
            if message.metadata.dst_node_id not in self.contexts:
                continue  # Flower's LinkState does not store a message to an unknown node
            delivered = _with_metadata(message, message_id=uuid.uuid4().hex)
            self._note_round(delivered)
            self.delivered.append(delivered)
            if self.on_message is not None:
                self.on_message(delivered)
            self.replies[delivered.metadata.message_id] = self._handle(delivered)
            message_ids.append(delivered.metadata.message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # --- delivery ---------------------------------------------------------------------------

    def _note_round(self, message: Message) -> None:
        if not message.has_content() or "config" not in message.content:
            return
        server_round = message.content["config"].get("server-round")
        if server_round is None:
            return
        for node, last_round in self.drop_after.items():
            if int(server_round) > last_round:
                self.gone.add(node)

    def _handle(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node in self.gone:
            reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_UNAVAILABLE_REASON), reply_to=message)
        else:
            working = copy.deepcopy(self.contexts[node])  # kept only if the ClientApp succeeds
            try:
                with task_identity(run_id=message.metadata.run_id, node_id=node):
                    reply = self.client_app(message, working)
                self.contexts[node] = working
            except Exception as error:  # noqa: BLE001 - reported to the server, as Flower does
                log(ERROR, "ClientApp on node %s raised: %s", node, traceback.format_exc())
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=_flower_reason(error)), reply_to=message
                )
        return _with_metadata(reply, message_id=uuid.uuid4().hex)


def fused_run_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` with ``overrides`` applied, as ``flwr run`` builds it."""
    return dict(get_fused_config_from_dir(APP_DIR, dict(overrides)))


def run_inprocess(
    overrides: dict[str, Any],
    num_clients: int = 10,
    node_configs: list[dict] | None = None,
    on_message: Callable[[Message], None] | None = None,
    drop_after: dict[int, int] | None = None,
    nodes: dict[int, dict] | None = None,
) -> Path:
    """Run the federation with ``overrides`` (which must set ``output-dir``) on ``num_clients``
    in-process nodes; return the output directory.

    ``node_configs``: one node config per client (default: demo partition i of num_clients).
    ``on_message(msg)``: called with every instruction the server sends (``msg.metadata.dst_node_id``,
    ``msg.metadata.message_type``, the round in ``msg.content["config"]["server-round"]``).
    ``drop_after``: client INDEX (position in node_configs) -> the last round that node serves.
    ``nodes``: if given, filled before the run starts with node id -> that node's node config
    (e.g. to tell which partition a recorded ``dst_node_id`` is).
    """
    # Imported here so that merely importing this module does not load torch and the apps.
    from client_app.app import app as client_app
    from server_app.app import app as server_app

    output_dir = Path(overrides["output-dir"])
    if node_configs is None:
        node_configs = [{"partition-id": i, "num-partitions": num_clients} for i in range(num_clients)]
    elif len(node_configs) != num_clients:
        raise ValueError(f"{len(node_configs)} node configs for {num_clients} clients")
    fused = fused_run_config(overrides)
    node_ids = random_node_ids(num_clients)
    contexts = {
        node: Context(run_id=RUN_ID, node_id=node, node_config=dict(config), state=RecordDict(), run_config=dict(fused))
        for node, config in zip(node_ids, node_configs)
    }
    if nodes is not None:
        nodes.update({node: dict(context.node_config) for node, context in contexts.items()})
    grid = InProcessGrid(
        client_app,
        contexts,
        on_message,
        {node_ids[index]: last for index, last in (drop_after or {}).items()},
    )
    server_context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=dict(fused))
    with task_identity(run_id=RUN_ID, node_id=SERVER_NODE_ID):
        server_app(grid, server_context)
    return output_dir
