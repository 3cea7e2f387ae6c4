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


def pytest_collection_modifyitems(config, items):
    """Files with real-runtime (e2e) tests first, the rest after; a file's tests stay together and
    everything keeps its usual order otherwise.

    With ./scripts/test.sh's two workers a file is one unit of work, handed out in this order: the
    few long e2e files start at once and the many short in-process files fill the gaps, instead of
    one long file starting last and running alone at the end.
    """
    e2e_files = {item.path for item in items if item.get_closest_marker("e2e") is not None}
    items.sort(key=lambda item: item.path not in e2e_files)
