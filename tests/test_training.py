"""Local training: the torch.optim-free SGD is bit-identical, and a cold client stays light."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client_app.sgd import MomentumSGD
from common.models import build_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_momentum_sgd_matches_torch_optim_bit_for_bit(momentum):
    ours, reference = (build_model("cnn1d", 40, 10, seed=1) for _ in range(2))
    mine = MomentumSGD(ours.parameters(), lr=0.1, momentum=momentum)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=momentum)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        x, y = torch.randn(16, 40, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        for model, optimizer in ((ours, mine), (reference, theirs)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    initial = build_model("cnn1d", 40, 10, seed=1).state_dict()
    trained = ours.state_dict()
    assert all(torch.equal(trained[k], reference.state_dict()[k]) for k in trained)
    assert not all(torch.equal(trained[k], initial[k]) for k in trained)  # it did train


COLD_CLIENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
from client_calls import make_context, train_once
context = make_context({"dataset": "digits"}, {"partition-id": 0, "num-partitions": 10})
reply = train_once(context, 1)
assert not reply.has_error(), reply.error
heavy = ["sklearn", "scipy", "opacus", "dp_accounting", "matplotlib", "torch._dynamo", "sympy"]
print(json.dumps({name: name in sys.modules for name in heavy}))
"""


PRIME_CACHE = """
import sys
sys.path.insert(0, sys.argv[1])
from common.config import NodeConfig, RunConfig
from common.data.client_data import load_client_data
load_client_data(RunConfig.from_run_config({"dataset": "digits"}), NodeConfig(0, 10), 64, 10)
"""


def test_a_cold_non_private_client_imports_nothing_heavy(tmp_path):
    """A fresh process (as every deployment message is) trains without sklearn, opacus & co.

    The data cache is built first by the same loader a ClientApp calls (the very first load on a
    machine builds it from sklearn), in a fresh process of its own: this test process may already
    hold the dataset in memory from an earlier test and would then write no cache at all (seen on
    two xdist workers: the cold process rebuilt digits and imported sklearn and scipy). Both run in a
    clean environment, as a SuperNode gives its ClientApp process.
    """
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}
    env |= {"FL_DP_CACHE": str(tmp_path), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    subprocess.run([sys.executable, "-c", PRIME_CACHE, str(ROOT)], env=env, capture_output=True, text=True, check=True)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # the dataset and the partition table: what a client reads
    run = subprocess.run([sys.executable, "-c", COLD_CLIENT, str(ROOT)], env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert loaded == {name: False for name in loaded}, loaded
