"""Plain SGD with heavy-ball momentum, without ``torch.optim``.

Why not ``torch.optim.SGD``: in torch 2.13 the first optimizer a process builds imports
``torch._dynamo`` (and sympy) through ``Optimizer.add_param_group``'s ``_disable_dynamo``
wrapper, about 1 s. Every deployment message runs in a fresh process, and every simulation
worker pays it once, for an optimizer that is two lines of arithmetic. The update below is
``torch.optim.SGD(lr, momentum)``'s single-tensor path (dampening 0, no Nesterov, no weight
decay, the CPU default) operation for operation, so results are bit-identical
(``tests/test_training.py`` checks it). DP-SGD still uses ``torch.optim``: Opacus wraps it.
"""

from __future__ import annotations

from typing import Iterable

import torch


class MomentumSGD:
    """``p <- p - lr * b`` with ``b <- momentum * b + grad`` (``b`` starts as the first gradient)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum = lr, momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            step = p.grad
            if self.momentum != 0:
                momentum_buffer = self.buffers[i]
                if momentum_buffer is None:
                    momentum_buffer = self.buffers[i] = torch.clone(step).detach()
                else:
                    momentum_buffer.mul_(self.momentum).add_(step)
                step = momentum_buffer
            p.add_(step, alpha=-self.lr)
