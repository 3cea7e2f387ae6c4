"""Loss and accuracy of a model on arrays: used by the server (central) and clients (local)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predicted_classes: int  # how many distinct classes the model predicted (1: it has collapsed)


@torch.no_grad()
def evaluate_in_detail(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> Evaluation:
    """Mean cross-entropy loss, accuracy and the number of distinct predictions; nan for an empty set."""
    if len(y) == 0:
        return Evaluation(float("nan"), float("nan"), 0)
    model.eval()
    total_loss, correct, predicted = 0.0, 0, set()
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[start : start + batch_size])
        yb = torch.from_numpy(y[start : start + batch_size])
        logits = model(xb)
        total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        guesses = logits.argmax(1)
        correct += int((guesses == yb).sum())
        predicted.update(guesses.unique().tolist())
    return Evaluation(total_loss / len(y), correct / len(y), len(predicted))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy); (nan, nan) for an empty set."""
    result = evaluate_in_detail(model, x, y, batch_size)
    return result.loss, result.accuracy
