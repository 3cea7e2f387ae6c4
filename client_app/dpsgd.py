"""Sample-level DP-SGD on one client with Opacus, accounted across every round it trains in.

Mechanism (Abadi et al., CCS 2016): each step samples a batch by Poisson sampling with rate
q = batch-size / n_local, clips every per-example gradient to L2 norm ``clipping-norm``, sums,
and adds Gaussian noise with std ``noise-multiplier * clipping-norm``. Neighbouring relation:
this client's dataset with one example added or removed (sample-level). Accountant: Opacus's
RDP accountant (``opacus.accountants.RDPAccountant``), whose history of (sigma, q, steps) is
saved after every round and restored before the next, so the epsilon a client reports is
cumulative over all rounds it trained in (Flower's Opacus example builds a fresh engine per
round and reports one round only). The local dataset size n_local is treated as public.

With ``target-epsilon`` the noise multiplier is solved before training so that training in
EVERY planned round (the worst case for this client) ends at the target, with the sample
rate and step count Opacus's Poisson loader really uses (:func:`sampling_per_epoch`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client_app.training import make_optimizer

# Opacus's hooks fire on the first layer, whose input needs no gradient: harmless, and noisy.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
from common.config import RunConfig


@dataclass
class DPSGDResult:
    train_loss: float
    epsilon: float
    noise_multiplier: float
    refused: str = ""  # why training was refused (budget exhausted), or ""


def sampling_per_epoch(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps) of one epoch exactly as Opacus's DPDataLoader does them.

    It takes ceil(n/B) Poisson-sampled batches per epoch, each example with rate 1/ceil(n/B)
    (not B/n, and not floor(n/B) steps): the accountant must be told the same, or the
    epsilon it reports misses the target whenever B does not divide n.
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


def _accountant(history: list):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in history]
    return accountant


def train_dpsgd(model: nn.Module, x: np.ndarray, y: np.ndarray, config: RunConfig, history: list, seed: int) -> tuple[DPSGDResult, list]:
    """Train ``model`` in place with DP-SGD; return the result and the extended accountant history."""
    from opacus import PrivacyEngine

    logging.getLogger("flwr").propagate = False  # opacus calls logging.basicConfig on import
    sigma = noise_for(config, len(y))
    sample_rate, batches = sampling_per_epoch(len(y), config.batch_size)
    steps = config.local_epochs * batches
    if config.max_epsilon:
        projected = _accountant(history + [(sigma, sample_rate, steps)]).get_epsilon(config.target_delta)
        if projected > config.max_epsilon:
            spent = _accountant(history).get_epsilon(config.target_delta) if history else 0.0
            reason = (
                f"privacy budget exhausted: epsilon spent {spent:.3f}, another round would reach "
                f"{projected:.3f} > max-epsilon {config.max_epsilon}"
            )
            return DPSGDResult(float("nan"), spent, sigma, reason), history

    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns that secure_mode (a CSPRNG) is off
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        engine.accountant = _accountant(history)
        private_model, optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=make_optimizer(model, config),
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=config.clipping_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
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
