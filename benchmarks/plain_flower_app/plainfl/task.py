"""Model and data: sklearn's digits (scaled to [0, 1]), 20% held out for the server, the rest split IID."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class MLP(nn.Module):
    def __init__(self, num_features: int = 64, num_classes: int = 10, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def _split(seed: int = 42):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.2 * len(y))
    return (x[order[cut:]], y[order[cut:]]), (x[order[:cut]], y[order[:cut]])


def load_partition(partition_id: int, num_partitions: int):
    """(train, validation) of one client: 80/20 of its IID share."""
    (x, y), _ = _split()
    idx = np.array_split(np.arange(len(y)), num_partitions)[partition_id]
    cut = int(0.8 * len(idx))
    return (x[idx[:cut]], y[idx[:cut]]), (x[idx[cut:]], y[idx[cut:]])


def load_test():
    return _split()[1]


def train(model: nn.Module, x, y, epochs: int, batch_size: int, lr: float, momentum: float) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    total = 0.0
    for _ in range(epochs):
        for batch in torch.randperm(len(ys)).split(batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
    return total / max(1, epochs * len(ys))


def test(model: nn.Module, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
        loss = nn.functional.cross_entropy(out, torch.from_numpy(y)).item()
        return loss, (out.argmax(1).numpy() == y).mean().item()
