import gc
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest


@pytest.fixture(scope="module")
def frozen_heap():
    """Keep what is already loaded (torch, Flower, the apps, pytest) out of full garbage collections
    while a module runs federations in this process. Flower's ``ArrayRecord.to_numpy_ndarrays(
    keep_input=False)`` calls ``gc.collect()`` for every reply (Bulyan, QFedAvg), and each walk of this
    heap takes ~0.2-0.5 s: seconds per round in process. ``gc.freeze`` changes which objects a
    collection visits, not what the apps compute."""
    import torch  # noqa: F401 - loaded before the freeze, so it is frozen too

    import client_app.app  # noqa: F401
    import server_app.app  # noqa: F401

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def federation_run(tmp_path_factory):
    """Run a federation in process (tests/inprocess.py) once per distinct config; tests that need
    the same run (e.g. a strategy's clean baseline) share it."""
    from inprocess import run_inprocess

    runs_by_settings: dict[tuple, object] = {}

    def run(num_clients: int = 10, **overrides):
        """The output directory of the run with these run-config overrides."""
        key = (num_clients, *sorted(overrides.items()))
        if key not in runs_by_settings:
            out = tmp_path_factory.mktemp("federation")
            runs_by_settings[key] = run_inprocess({"output-dir": str(out)} | overrides, num_clients=num_clients)
        return runs_by_settings[key]

    return run


# The real-runtime files by their measured work, longest first (`./scripts/test.sh --durations=60`
# on 2 cores, both workers busy: the TLS deployment ~235 s, compose ~225 s, the warm client ~125 s,
# the shared runtime ~100 s, flwr run ~90 s, kill-and-resume ~50 s, the sweep ~35 s, the in-process
# engine ~20 s). An e2e file missing here goes after them; a wrong order costs time, never a result.
LONGEST_E2E_FILES_FIRST = (
    "test_deployment.py", "test_compose.py", "test_warm_client.py", "test_simulation_e2e.py",
    "test_flwr_run.py", "test_reliability.py", "test_sweep.py", "test_inprocess.py",
)


def pytest_collection_modifyitems(config, items):
    """Files with real-runtime (e2e) tests first, longest first, then the rest; a file's tests stay
    together and everything keeps its usual order otherwise.

    With ./scripts/test.sh's two workers a file is one unit of work, handed out in this order
    (test.sh passes --no-loadscope-reorder, else pytest-xdist re-sorts files by their number of
    tests and the few-test e2e files would start last): the long e2e files start at once and the
    many short in-process files fill the gaps, instead of one long file running alone at the end.
    """
    e2e_files = {item.path for item in items if item.get_closest_marker("e2e") is not None}

    def rank(item) -> int:
        if item.path not in e2e_files:
            return len(LONGEST_E2E_FILES_FIRST) + 1
        name = item.path.name
        return LONGEST_E2E_FILES_FIRST.index(name) if name in LONGEST_E2E_FILES_FIRST else len(LONGEST_E2E_FILES_FIRST)

    items.sort(key=rank)
