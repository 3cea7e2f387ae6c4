import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest


@pytest.fixture(scope="session")
def federation_run(tmp_path_factory):
    """Run a federation on the real simulation runtime once per distinct config;
    tests that need the same run (e.g. a strategy's clean baseline) share it."""
    from simulation import run_app

    done: dict[tuple, object] = {}

    def run(num_clients: int = 10, **overrides):
        """The output directory of the run with these run-config overrides."""
        key = (num_clients, *sorted(overrides.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("federation")
            done[key] = run_app({"output-dir": str(out)} | overrides, num_clients=num_clients)
        return done[key]

    return run
