"""Run the real app on Flower's real simulation runtime (Ray backend) inside the test process.

Flower 1.41's public ``run_simulation`` gives every app an EMPTY run config. ``flwr run``
loads the app from its directory and fuses ``[tool.flwr.app.config]`` with the overrides;
this helper does the same through the engine ``flwr run`` itself uses
(``flwr.simulation.run_simulation._run_simulation`` with ``is_app=True``), so the ServerApp
and every ClientApp see the same fused config. It is private API: it is kept in this one
file. The user's path (``flwr run`` via scripts/simulate.py) has its own end-to-end test.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent.parent

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@contextlib.contextmanager
def _one_ast_parse_at_a_time():
    """Serialize ``ast.parse`` while the engine runs. Its ServerApp thread and its client loader both
    check their app's source with ``ast.parse``, and two parses at once in CPython 3.11 can fail
    with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905; seen once
    in this suite). Each parse runs unchanged, one after the other."""
    parse, lock = ast.parse, threading.Lock()

    def locked_parse(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    ast.parse = locked_parse
    try:
        yield
    finally:
        ast.parse = parse


@contextlib.contextmanager
def _pythonpath_kept():
    """Put PYTHONPATH back as it was: Flower's Ray backend sets it, in this process's environment,
    to the driver's whole sys.path (this venv's site-packages included), and every later subprocess
    would inherit it (docker-compose, a system Python tool, then imported this venv's packages and
    failed in a later test of the same process)."""
    before = os.environ.get("PYTHONPATH")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def run_app(overrides: dict[str, Any], num_clients: int = 10, cpus_per_client: int = 1) -> Path:
    """Run the federation with ``overrides`` on ``num_clients`` simulated nodes; return output-dir."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    output_dir = Path(overrides["output-dir"])
    run = Run.create_empty(run_id=1)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(overrides)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    fused = get_fused_config_from_dir(APP_DIR, run.override_config)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    with _one_ast_parse_at_a_time(), _pythonpath_kept():
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app_attr="client_app.app:app",
            server_app_attr="server_app.app:app",
            server_app_context=context,
            app_dir=str(APP_DIR),
            is_app=True,
            run=run,
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
        )
    return output_dir


def read_results(output_dir: Path) -> tuple[list[dict], dict]:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    summary = json.loads((output_dir / "summary.json").read_text())
    return metrics, summary
