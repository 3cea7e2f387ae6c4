"""Sample-level DP-SGD on one client with Opacus, accounted across every round it trains in.

Mechanism (Abadi et al., CCS 2016): every step forms a batch by Poisson sampling (each local
example included independently with probability q), clips every per-example gradient to L2
norm C = ``clipping-norm``, sums, and adds Gaussian noise N(0, (sigma * C)^2) per coordinate.
An epoch is exactly s = ceil(n/B) such steps with q = 1/s (mean batch n/s <= B), n = local
examples, B = ``batch-size`` (:func:`sampling_per_epoch`); an empty batch is a noise-only step.
Neighbouring relation: this client's dataset with one example added or removed (sample-level);
n is treated as public.

Randomness: batches and noise both come from a :class:`SecretRandom` (AES-256-CTR keyed from
os.urandom on this client), never from the run seed, so nobody can replay them: that secrecy
is what the sampled Gaussian analysis assumes. Opacus draws neither: we hand ``make_private``
our own Poisson batch sampler (``poisson_sampling=False`` keeps it; Opacus's DPDataLoader
takes int(1/q) steps, e.g. 92 instead of 93 for n=1480, B=16, and its accountant then uses
1/92, ending a run calibrated for 3 at 3.01) and replace the optimizer's ``add_noise`` by the
same code with the noise from ``SecretRandom.gaussian`` (sum of 4 draws / 2 against
floating-point attacks; torch's generator is not a CSPRNG and Opacus's secure_mode needs
torchcsprng, which is not installed).

Accountant: Opacus's RDP accountant (sampled Gaussian mechanism, Mironov et al. 2019), stepped
by Opacus's own optimizer hook with sample rate 1/len(loader) = q, once per step. Its history
of (sigma, q, steps) is saved after every round and restored before the next, so the epsilon
reported is cumulative over all rounds. With ``target-epsilon``, sigma is solved so that
training in EVERY planned round (the worst case for this client) ends at or below the target.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from client_app.training import make_optimizer
from common.config import RunConfig
from common.privacy.secret_random import SecretRandom

# Opacus's hooks fire on the first layer, whose input needs no gradient: harmless, and noisy.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@dataclass
class DPSGDResult:
    train_loss: float
    epsilon: float
    noise_multiplier: float
    refused: str = ""  # why training was refused (budget exhausted), or ""


def sampling_per_epoch(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(q, s) of one epoch: s = ceil(n/B) Poisson batches, each example in each with rate q = 1/s.

    :class:`PoissonBatches` takes exactly these steps and Opacus's accountant is told exactly
    this q (``make_private`` uses 1/len(loader)), so the calibration below sees what happens.
    """
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / batches, batches


def noise_for(config: RunConfig, num_examples: int) -> float:
    """The DP-SGD noise multiplier: as configured, or solved from target-epsilon."""
    if not config.target_epsilon:
        return config.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    sample_rate, batches = sampling_per_epoch(num_examples, config.batch_size)
    steps = config.local_epochs * batches * config.num_server_rounds
    return float(
        get_noise_multiplier(
            target_epsilon=config.target_epsilon,
            target_delta=config.target_delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
        )
    )


class PoissonBatches(Sampler[list[int]]):
    """``steps`` batches; each holds every index in range(n) independently with probability q."""

    def __init__(self, num_examples: int, sample_rate: float, steps: int, rng: SecretRandom):
        self.num_examples, self.sample_rate, self.steps, self.rng = num_examples, sample_rate, steps, rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield np.flatnonzero(self.rng.bernoulli(self.sample_rate, self.num_examples)).tolist()


class _Examples(TensorDataset):
    """Fetches a whole batch by one index: an empty batch keeps the feature shape, (0, ...)."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def _fetched(batch):
    return batch  # collate: __getitems__ already built the batch


def poisson_loader(x: np.ndarray, y: np.ndarray, batch_size: int, rng: SecretRandom) -> DataLoader:
    """One epoch = s Poisson batches at rate q (:func:`sampling_per_epoch`), drawn from ``rng``."""
    sample_rate, batches = sampling_per_epoch(len(y), batch_size)
    return DataLoader(
        _Examples(torch.from_numpy(x), torch.from_numpy(y)),
        batch_sampler=PoissonBatches(len(y), sample_rate, batches, rng),
        collate_fn=_fetched,
    )


def draw_noise_from(optimizer, rng: SecretRandom) -> None:
    """Make Opacus's DPOptimizer add noise from ``rng``: its ``add_noise``, statement for statement."""
    from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

    if type(optimizer).add_noise is not DPOptimizer.add_noise:
        raise TypeError(f"{type(optimizer).__name__} adds noise its own way; its noise would not be secret")

    def add_noise() -> None:
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            noise = rng.torch_gaussian_like(p.summed_grad, optimizer.noise_multiplier * optimizer.max_grad_norm)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def _accountant(history: list):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in history]
    return accountant


def train_dpsgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: RunConfig,
    history: list,
    rng: SecretRandom,
    max_epsilon: float,
    sigma: float | None = None,
) -> tuple[DPSGDResult, list]:
    """Train ``model`` in place with DP-SGD; return the result and the extended accountant history.

    ``rng`` draws the batches and the noise; ``max_epsilon`` is the budget cap (0: none);
    ``sigma`` is :func:`noise_for`'s answer when the caller has it already (solving takes seconds).
    """
    from opacus import PrivacyEngine

    logging.getLogger("flwr").propagate = False  # opacus calls logging.basicConfig on import
    sigma = noise_for(config, len(y)) if sigma is None else sigma
    sample_rate, batches = sampling_per_epoch(len(y), config.batch_size)
    steps = config.local_epochs * batches
    if max_epsilon:
        projected = _accountant(history + [(sigma, sample_rate, steps)]).get_epsilon(config.target_delta)
        if projected > max_epsilon:
            spent = _accountant(history).get_epsilon(config.target_delta) if history else 0.0
            reason = (
                f"privacy budget exhausted: epsilon spent {spent:.3f}, another round would reach "
                f"{projected:.3f} > max-epsilon {max_epsilon}"
            )
            return DPSGDResult(float("nan"), spent, sigma, reason), history

    loader = poisson_loader(x, y, config.batch_size, rng)
    with warnings.catch_warnings():
        # "Secure RNG turned off": secure_mode would make Opacus draw batches and noise from
        # torchcsprng. Opacus draws neither here: both come from ``rng`` (a CSPRNG, with the
        # same sum-of-4 noise), so the warning does not apply.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    engine.accountant = _accountant(history)
    private_model, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, config),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=config.clipping_norm,
        poisson_sampling=False,  # keep our sampler: Opacus accounts q = 1/len(loader) = 1/s
    )
    assert private_loader is loader and len(loader) == batches
    private_model.forbid_grad_accumulation()  # one batch per step, as make_private does for Poisson
    draw_noise_from(optimizer, rng)
    private_model.train()
    total, count = 0.0, 0
    for _ in range(config.local_epochs):
        for xb, yb in private_loader:
            optimizer.zero_grad()
            # Poisson sampling can draw an empty batch: it still takes a (noise-only) step, and
            # the accountant counts it; "sum" keeps its loss 0 instead of the NaN mean of nothing.
            loss = nn.functional.cross_entropy(private_model(xb), yb, reduction="mean" if len(yb) else "sum")
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            count += len(yb)
    history = [list(entry) for entry in engine.accountant.history]
    epsilon = engine.accountant.get_epsilon(config.target_delta)
    return DPSGDResult(total / max(count, 1), float(epsilon), sigma), history
