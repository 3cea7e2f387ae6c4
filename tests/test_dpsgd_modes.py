"""Each registry model's Opacus grad-sample mode (client_app/dpsgd.py GRAD_SAMPLE_MODES) is DP-SGD as
Opacus's default "hooks" mode does it, with the noise from SecretRandom only.

* Same accounting: the chosen mode and "hooks", trained for 3 rounds with the same debug key (so
  the same Poisson batches and the same noise), give the same accountant history and the same
  epsilon after every round, and the same weights (to float32 rounding of the per-example
  gradients, which each mode computes in its own order).
* Same noise, nothing else: with sigma > 0 and sigma = 0 on the same batches (q = 1), the weights
  differ by exactly lr * (SecretRandom's draw) / expected batch size; Opacus's own generator is
  never called, and changing torch's seed changes nothing.
* An empty Poisson batch is a noise-only step in every chosen mode (it never reaches the model).
"""

import numpy as np
import opacus.optimizers.optimizer
import pytest
import torch

from client_app.dpsgd import GRAD_SAMPLE_MODES, grad_sample_mode_for, train_dpsgd
from common.config import RunConfig
from common.models import MODELS, build_model
from common.privacy.secret_random import SecretRandom

FEATURES, CLASSES, DELTA = 40, 10, 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """As the ClientApp trains (client_app/app.py): one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_opacus_noise(monkeypatch):
    def opacus_noise(*args, **kwargs):
        raise AssertionError("Opacus drew noise from its own generator")

    monkeypatch.setattr(opacus.optimizers.optimizer, "_generate_noise", opacus_noise)


def _config(model: str, **overrides) -> RunConfig:
    base = {"dp": "dpsgd", "model": model, "clipping-norm": 1.0, "noise-multiplier": 1.1, "local-epochs": 1,
            "batch-size": 16, "target-delta": DELTA}
    return RunConfig.from_run_config(base | overrides)


def _data(n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, FEATURES)).astype(np.float32), g.integers(0, CLASSES, n).astype(np.int64)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_every_registry_model_has_a_mode():
    assert set(GRAD_SAMPLE_MODES) == set(MODELS)
    assert all(grad_sample_mode_for(name) in ("hooks", "ew", "functorch") for name in MODELS)


def _rounds(model_name: str, mode: str, rounds: int = 3):
    """``rounds`` rounds as the app runs them: a fresh model per round from the last weights, the history carried."""
    x, y = _data(50)  # s = 4 steps per epoch, q = 1/4
    config = _config(model_name, **{"num-server-rounds": rounds})
    weights, history, epsilons = build_model(model_name, FEATURES, CLASSES, seed=0).state_dict(), [], []
    rng = SecretRandom.from_debug_key(f"modes {model_name}")  # the same batches and noise for both modes
    for _ in range(rounds):
        model = build_model(model_name, FEATURES, CLASSES)
        model.load_state_dict(weights)
        result, history = train_dpsgd(model, x, y, config, history, rng, 0.0, grad_sample_mode=mode)
        weights = model.state_dict()
        epsilons.append(result.epsilon)
    return history, epsilons, torch.cat([w.reshape(-1) for w in weights.values()])


@pytest.mark.parametrize("model_name", sorted(GRAD_SAMPLE_MODES))
def test_the_chosen_mode_trains_and_accounts_as_the_default_mode(model_name):
    chosen = grad_sample_mode_for(model_name)
    history, epsilons, weights = _rounds(model_name, chosen)
    reference_history, reference_epsilons, reference_weights = _rounds(model_name, "hooks")
    assert history == reference_history == [[1.1, 0.25, 12]]
    assert epsilons == reference_epsilons and epsilons[0] < epsilons[1] < epsilons[2]
    torch.testing.assert_close(weights, reference_weights, rtol=1e-4, atol=1e-5)


class _Recording(SecretRandom):
    """A debug-keyed stream that keeps every Gaussian draw it hands out."""

    def __init__(self, text: str):
        other = SecretRandom.from_debug_key(text)
        super().__init__(bytes.fromhex(other.state_dict()["key"]), debug=True)
        self.draws: list[np.ndarray] = []

    def gaussian(self, shape, std):
        out = super().gaussian(shape, std)
        self.draws.append(out.copy())
        return out


@pytest.mark.parametrize("model_name", sorted(GRAD_SAMPLE_MODES))
def test_the_only_noise_is_secret_randoms_draw(model_name):
    """q = 1 (B = n): one step on all n examples, with sigma 1.1 and with sigma 0, same batch.

    SGD, lr 1, no momentum, loss "mean" over the expected batch n: w(sigma) - w(0) = -noise / n,
    where noise is exactly what SecretRandom.gaussian returned (rounded to float32).
    """
    n, clip = 24, 0.5
    config = _config(model_name, **{"batch-size": n, "clipping-norm": clip, "learning-rate": 1.0, "momentum": 0.0})
    x, y = _data(n)
    trained = {}
    for sigma, seed in ((1.1, 1), (0.0, 2)):  # a different torch seed in each: it must not matter
        torch.manual_seed(seed)
        model = build_model(model_name, FEATURES, CLASSES, seed=0)
        rng = _Recording("noise")
        train_dpsgd(model, x, y, config, [], rng, 0.0, sigma=sigma, grad_sample_mode=grad_sample_mode_for(model_name))
        trained[sigma] = (_flat(model), rng.draws)
    (noisy, draws), (clean, _) = trained[1.1], trained[0.0]
    assert len(draws) == 1 and draws[0].shape == (1, noisy.numel())  # one draw: all parameters of the one step
    noise = torch.from_numpy(draws[0][0]).to(torch.float32)
    assert abs(noise.std().item() - 1.1 * clip) < 0.1 * 1.1 * clip
    torch.testing.assert_close(clean - noisy, noise / n, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_name", sorted(GRAD_SAMPLE_MODES))
def test_replaying_with_another_torch_seed_gives_the_same_release(model_name):
    """Same debug key, different torch seeds: identical weights, so no draw comes from torch's generator."""
    x, y = _data(40)
    config = _config(model_name)
    released = []
    for seed in (0, 1):
        model = build_model(model_name, FEATURES, CLASSES, seed=3)
        torch.manual_seed(seed)
        train_dpsgd(model, x, y, config, [], SecretRandom.from_debug_key("same"), 0.0)
        released.append(_flat(model))
    assert torch.equal(*released)


class _EmptyFirst(SecretRandom):
    """Every Poisson batch empty."""

    def bernoulli(self, p, size):
        return np.zeros(size, dtype=bool)


@pytest.mark.parametrize("model_name", sorted(GRAD_SAMPLE_MODES))
def test_an_empty_batch_is_a_counted_noise_only_step_in_the_chosen_mode(model_name):
    n = 8  # B = n: one step, q = 1, and it draws no example
    config = _config(model_name, **{"batch-size": n, "learning-rate": 1.0, "momentum": 0.0})
    x, y = _data(n)
    model = build_model(model_name, FEATURES, CLASSES, seed=0)
    before = _flat(model)
    result, history = train_dpsgd(model, x, y, config, [], _EmptyFirst(), 0.0)
    assert history == [[1.1, 1.0, 1]] and result.train_loss == 0.0 and result.epsilon > 0
    moved = (before - _flat(model)) * n  # = the noise: N(0, (1.1 * 1)^2) per coordinate
    assert 0.9 * 1.1 < moved.std().item() < 1.1 * 1.1
