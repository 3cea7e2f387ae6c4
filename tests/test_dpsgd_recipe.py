"""benchmarks/dpsgd_recipe.py's emulated federation does the app's DP-SGD arithmetic.

With every example in every batch (batch size >= a client's data, so q = 1) and no noise, nothing is
random: the emulation must release the model that the app's ``train_dpsgd`` on every client and the
server's plain mean release (clip factor, division by the expected batch, local steps, rounds).
"""

import copy
import importlib.util
from pathlib import Path

import torch

from client_app.dpsgd import train_dpsgd
from common.config import NodeConfig
from common.data.client_data import load_client_data
from common.models import build_model
from common.privacy.secret_random import SecretRandom
from fl_dp.run_config import validate

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "dpsgd_recipe.py"


def _recipe_module():
    spec = importlib.util.spec_from_file_location("dpsgd_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emulation_releases_the_apps_model_without_noise():
    recipe = _recipe_module()
    settings = dict(recipe.RECIPE, rounds=2, epochs=2, lr=2.0, clip=0.5)  # C = 0.5: most gradients are clipped
    _, emulated = recipe.emulate(settings, 42, 0.0, clip_only=True)

    config = validate(recipe.run_config(settings, 42, 3.0))  # dp = 'dpsgd'; sigma 0 is passed below
    clients = [load_client_data(config, NodeConfig.from_node_config({"partition-id": i, "num-partitions": 10}), 64, 10)
               for i in range(10)]
    model = build_model(config.model, 64, 10, seed=42)
    for _ in range(config.num_server_rounds):
        states = []
        for data in clients:
            local = copy.deepcopy(model).train()
            train_dpsgd(local, data.x_train, data.y_train, config, [], SecretRandom(), 0.0, sigma=0.0)
            states.append(local.state_dict())
        model.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    for name, value in model.state_dict().items():
        torch.testing.assert_close(emulated.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model.state_dict()["linear.weight"], build_model("logreg", 64, 10, seed=42).linear.weight)
