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
reported is cumulative over all rounds. With ``target-epsilon``, sigma is solved (with that
accountant, :func:`solve_noise`) so that training in EVERY planned round (the worst case for
this client) ends in [target - 0.01, target].

Cost: per-example gradients in the Opacus mode :data:`GRAD_SAMPLE_MODES` picks per model; the
Poisson coins and the noise of many steps in one SecretRandom call each (same distributions,
fewer calls); batches cut from the whole tensors; an empty batch skips the model. What is left
(Opacus's per-step work, the float-safe noise) is in benchmarks/results.md, section 4.
"""

from __future__ import annotations

import functools
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


# Opacus's way of computing per-example gradients (``make_private``'s ``grad_sample_mode``) for each
# model of the registry: the fastest that is exact for it (tests/test_dpsgd_modes.py checks each
# against "hooks": same trained weights, same epsilon history, only SecretRandom noise), measured by
# benchmarks/dpsgd_cost.py (benchmarks/results.md, section 4). Empty Poisson batches never reach the
# model (:func:`train_dpsgd` takes their noise-only step itself), so a mode need not handle them.
GRAD_SAMPLE_MODES = {
    "mlp": "ew",  # PyTorch's ExpandedWeights: no per-layer Python hooks; the fastest for Linear layers
    "logreg": "ew",  # one Linear layer: as mlp
    "cnn1d": "hooks",  # ew is no faster on Conv1d + GroupNorm; functorch and ghost are slower (results.md)
}
DEFAULT_GRAD_SAMPLE_MODE = "hooks"  # a model not in the table: Opacus's default, which supports the most layers
SUPPORTED_MODES = ("hooks", "ew", "functorch")  # the modes that keep per-example gradients in p.grad_sample
MAX_SIGMA = 1e6  # as Opacus's solver: a larger sigma means the budget is too small
SOLVER_TOLERANCE = 0.01  # solved epsilon in [target - this, target], as Opacus's get_noise_multiplier
BLOCK = 1 << 20  # values per SecretRandom draw (noise coordinates, Poisson coins): 8 MiB of float64


def noise_for(config: RunConfig, num_examples: int) -> float:
    """The DP-SGD noise multiplier: as configured, or solved from target-epsilon."""
    if not config.target_epsilon:
        return config.noise_multiplier
    sample_rate, batches = sampling_per_epoch(num_examples, config.batch_size)
    steps = config.local_epochs * batches * config.num_server_rounds
    return solve_noise(config.target_epsilon, config.target_delta, sample_rate, steps)


@functools.lru_cache(maxsize=1024)
def solve_noise(target_epsilon: float, target_delta: float, sample_rate: float, steps: int) -> float:
    """A sigma whose RDP epsilon after ``steps`` steps at rate ``sample_rate`` is in [target - 0.01, target].

    The contract of Opacus's ``get_noise_multiplier`` (tolerance 0.01), with the same accountant
    (Opacus's RDP, its default orders), and only a sigma whose epsilon that accountant computed is
    returned. Opacus bisects from [0, 20]: 14-16 epsilons of 151 RDP orders each, 0.4-6 s. Epsilon
    is close to a power of sigma, so steps on log(epsilon) against log(sigma) (a secant, then
    Illinois regula falsi once the band is bracketed) need 5-8. The answer lies in the same band
    as Opacus's, not necessarily at the same point.
    """
    goal = math.log(max(target_epsilon - SOLVER_TOLERANCE / 2, target_epsilon / 2))  # the middle of the band
    x, previous, last_side = 0.0, None, ""  # x = log(sigma), starting at sigma = 1
    low = high = None  # (x, log(epsilon) - goal): epsilon above the band at low, below it at high
    for _ in range(100):
        sigma = math.exp(x)
        eps = _accountant([(sigma, sample_rate, steps)]).get_epsilon(target_delta)
        if target_epsilon - SOLVER_TOLERANCE <= eps <= target_epsilon:
            return sigma
        if sigma > MAX_SIGMA:
            raise ValueError(f"no noise multiplier up to {MAX_SIGMA:g} reaches epsilon {target_epsilon}")
        y = math.log(eps) - goal if eps > 0 else -math.inf
        side = "low" if eps > target_epsilon else "high"
        if side == "low":
            low = (x, y)
        else:
            high = (x, y)
        if low and high:
            (x0, y0), (x1, y1) = low, high
            if side == last_side:  # Illinois: the same end moved twice, so halve the other's value
                if side == "low":
                    high = (x1, y1 := y1 / 2)
                else:
                    low = (x0, y0 := y0 / 2)
            new_x = x0 - y0 * (x1 - x0) / (y1 - y0) if math.isfinite(y0) and math.isfinite(y1) else (x0 + x1) / 2
            new_x = new_x if x0 < new_x < x1 else (x0 + x1) / 2
        else:  # not bracketed yet: a secant step (slope -1 at first: epsilon ~ 1/sigma), at most x4
            slope = -1.0
            if previous and math.isfinite(y) and math.isfinite(previous[1]) and previous[0] != x:
                slope = min((y - previous[1]) / (x - previous[0]), -0.25)
            step = -y / slope if math.isfinite(y) else math.log(4)
            new_x = x + max(-math.log(4), min(math.log(4), step))
        previous, last_side, x = (x, y), side, new_x
    raise RuntimeError(f"noise solve did not converge: epsilon {target_epsilon}, q {sample_rate}, {steps} steps")


class PoissonBatches(Sampler[list[int]]):
    """``steps`` batches; each holds every index in range(n) independently with probability q.

    The coins of several batches are drawn in one ``bernoulli`` call (up to ``BLOCK`` coins).
    """

    def __init__(self, num_examples: int, sample_rate: float, steps: int, rng: SecretRandom):
        self.num_examples, self.sample_rate, self.steps, self.rng = num_examples, sample_rate, steps, rng

    def __len__(self) -> int:
        return self.steps

    def index_batches(self):
        """The epoch's batches as int64 index arrays (what :func:`train_dpsgd` indexes the data with)."""
        per_draw = max(1, BLOCK // max(self.num_examples, 1))
        for start in range(0, self.steps, per_draw):
            coins = self.rng.bernoulli(self.sample_rate, (min(per_draw, self.steps - start), self.num_examples))
            for row in coins:
                yield np.flatnonzero(row)

    def __iter__(self):
        for batch in self.index_batches():
            yield batch.tolist()


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


def _noise_rows(rng: SecretRandom, steps: int, dim: int, std, dtype: torch.dtype):
    """``steps`` rows of ``dim`` N(0, std()^2) noise: ``rng.gaussian`` for several steps per draw (up to ``BLOCK``)."""
    per_draw = max(1, BLOCK // max(dim, 1))
    for start in range(0, steps, per_draw):
        yield from torch.from_numpy(rng.gaussian((min(per_draw, steps - start), dim), std())).to(dtype)


def draw_noise_from(optimizer, rng: SecretRandom, steps: int) -> None:
    """Make Opacus's DPOptimizer add noise from ``rng`` in its next ``steps`` steps: its ``add_noise``,
    statement for statement, with one draw of all parameters' noise instead of one per parameter.

    Each coordinate gets N(0, (sigma C)^2) as before (``SecretRandom.gaussian``, rounded once to the
    parameters' dtype); drawing many steps at once only saves the per-call cost. A step beyond
    ``steps`` raises StopIteration rather than add noise from anywhere else.
    """
    from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

    if type(optimizer).add_noise is not DPOptimizer.add_noise:
        raise TypeError(f"{type(optimizer).__name__} adds noise its own way; its noise would not be secret")
    params = optimizer.params
    sizes = [p.numel() for p in params]
    rows = _noise_rows(rng, steps, sum(sizes), lambda: optimizer.noise_multiplier * optimizer.max_grad_norm,
                       params[0].dtype)

    def add_noise() -> None:
        for p, noise in zip(params, next(rows).split(sizes)):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + noise.view_as(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def _accountant(history: list):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in history]
    return accountant


def _after_steps(history: list, sigma: float, sample_rate: float, steps: int) -> list:
    """``history`` after ``steps`` more steps, merged as Opacus's RDP accountant merges them (same sigma and q)."""
    history = [list(entry) for entry in history]
    if history and history[-1][:2] == [sigma, sample_rate]:
        history[-1][2] += steps
    else:
        history.append([sigma, sample_rate, steps])
    return history


def grad_sample_mode_for(model_name: str) -> str:
    """:data:`GRAD_SAMPLE_MODES`' choice for a registry model, else Opacus's default."""
    return GRAD_SAMPLE_MODES.get(model_name, DEFAULT_GRAD_SAMPLE_MODE)


def _noise_only_step(optimizer) -> None:
    """The step of an empty Poisson batch: no example, so no per-example gradient, clipped sum 0.

    Opacus's own code path for an empty batch (``clip_and_accumulate`` on per-example gradients
    of length 0), without running the model on it: "ew" and "functorch" fail on a batch of 0.
    The step adds the noise, and the accountant's hook counts it, as for any other batch.
    """
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


def train_dpsgd(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: RunConfig,
    history: list,
    rng: SecretRandom,
    max_epsilon: float,
    sigma: float | None = None,
    grad_sample_mode: str | None = None,
) -> tuple[DPSGDResult, list]:
    """Train ``model`` in place with DP-SGD; return the result and the extended accountant history.

    ``rng`` draws the batches and the noise; ``max_epsilon`` is the budget cap (0: none);
    ``sigma`` is :func:`noise_for`'s answer when the caller has it already (solving takes seconds);
    ``grad_sample_mode`` overrides :data:`GRAD_SAMPLE_MODES` (tests compare the modes).
    """
    from opacus import PrivacyEngine

    logging.getLogger("flwr").propagate = False  # opacus calls logging.basicConfig on import
    mode = grad_sample_mode or grad_sample_mode_for(config.model)
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"grad_sample_mode {mode!r}: the supported modes are {SUPPORTED_MODES}")
    sigma = noise_for(config, len(y)) if sigma is None else sigma
    sample_rate, batches = sampling_per_epoch(len(y), config.batch_size)
    steps = config.local_epochs * batches
    projected_history = _after_steps(history, sigma, sample_rate, steps)
    projected = None
    if max_epsilon:
        projected = _accountant(projected_history).get_epsilon(config.target_delta)
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
        grad_sample_mode=mode,
    )
    assert private_loader is loader and len(loader) == batches
    private_model.forbid_grad_accumulation()  # one batch per step, as make_private does for Poisson
    draw_noise_from(optimizer, rng, steps)
    private_model.train()
    x_all, y_all = loader.dataset.tensors
    total, count = 0.0, 0
    for _ in range(config.local_epochs):
        # The loader's batches, as index arrays: cut from the whole tensors, as train_locally does.
        for index in loader.batch_sampler.index_batches():
            optimizer.zero_grad(set_to_none=True)  # Opacus's default (False) zero-fills every .grad
            if not len(index):  # Poisson sampling drew no example: still a (noise-only) counted step
                _noise_only_step(optimizer)
                continue
            index = torch.from_numpy(index)
            loss = nn.functional.cross_entropy(private_model(x_all[index]), y_all[index])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            count += len(index)
    history = [list(entry) for entry in engine.accountant.history]
    if projected is None or history != projected_history:  # the budget check computed this epsilon already
        projected = engine.accountant.get_epsilon(config.target_delta)
    epsilon = projected
    return DPSGDResult(total / max(count, 1), float(epsilon), sigma), history
