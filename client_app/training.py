"""Local training on one client: plain mini-batch SGD/Adam, with FedProx's proximal term.

FedProx (Li et al. 2020) adds (mu/2)*||w - w_global||^2 to the local loss; Flower's FedProx
strategy only sends ``proximal-mu``, so the term is added here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from client_app.sgd import MomentumSGD
from common.config import RunConfig


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimizer: what Opacus's DP-SGD wraps."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)


def local_optimizer(model: nn.Module, config: RunConfig) -> MomentumSGD | torch.optim.Optimizer:
    """The same update as :func:`make_optimizer`, with SGD built without ``torch.optim`` (see sgd.py)."""
    if config.optimizer == "sgd":
        return MomentumSGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    return make_optimizer(model, config)


def train_locally(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: RunConfig,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> float:
    """Train ``model`` in place for ``local-epochs``; return the mean training loss."""
    generator = np.random.default_rng(seed)
    optimizer = local_optimizer(model, config)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    x_all, y_all = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    total, count = 0.0, 0
    for _ in range(config.local_epochs):
        order = torch.from_numpy(generator.permutation(len(y)))
        for start in range(0, len(y), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_all[batch]), y_all[batch])
            total += loss.item() * len(batch)
            count += len(batch)
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * sum(
                    (p - g).pow(2).sum() for p, g in zip(model.parameters(), global_params)
                )
            loss.backward()
            optimizer.step()
    return total / max(count, 1)
