#!/usr/bin/env python3
"""Benchmark 4: what Opacus DP-SGD costs per local epoch, per grad sample mode, on one client.

For each workload (``mlp`` on digits, ``cnn1d`` on MNIST-1D; client 0 of the default 10-client
IID split, the app's default batch size 16, SGD lr 0.1 momentum 0.9, one torch thread as in the
ClientApp) and each Opacus grad sample mode (``hooks`` (the app's), ``ew`` (expanded weights),
``functorch``, ``ghost`` (ghost clipping)):

1. correctness first: on one fixed batch with noise_multiplier = 0, every mode's clipped, averaged
   gradient (the parameter change of one SGD step with lr 1) is compared with a reference built
   by hand (one autograd call per example, each gradient clipped to C, summed, divided by the
   batch size), at a clip norm that clips about half of the examples and at one that clips none;
   the per-sample gradients themselves are compared too where the mode materialises them. A mode
   that fails, or whose relative error exceeds 1e-4, is reported and not timed.
2. timing: the per-epoch time of the training loop (Poisson batches, noise multiplier 1, clip 1,
   as ``client_app/dpsgd.py`` trains), median over repeats, next to non-private
   ``client_app.training.train_locally``; plus the one-off ``make_private`` set-up, and the whole
   app call ``client_app.dpsgd.train_dpsgd`` (hooks, local-epochs epochs, accountant included).

3. with ``--profile``: where one DP-SGD step (hooks, the app's loop) spends its time next to a
   non-private step, by phase timers on the app's functions, cProfile and torch.profiler (ms per
   step and share of: data loading, forward, Opacus's hooks, backward, per-sample gradients,
   clipping, noise, scale_grad, the accountant hook, the optimizer step, bookkeeping), and the
   cheap fixes tried (batches indexed from Opacus's own Poisson sampler, noise in one draw,
   ``ew``, 2 threads), each checked for correctness first.

The analysis notes (``<!-- dpsgd_cost-notes:start/end -->``) are kept across runs; ``--notes FILE``
replaces them.

    .venv/bin/python benchmarks/dpsgd_cost.py
    .venv/bin/python benchmarks/dpsgd_cost.py --profile                  # + the profile (~+5 min on a quiet machine)
    .venv/bin/python benchmarks/dpsgd_cost.py --profile-only             # only the profile block
    .venv/bin/python benchmarks/dpsgd_cost.py --repeats 5 --epochs 2     # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import logging
import math
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


import benchlib as bench  # noqa: E402  (benchmarks/benchlib.py: this folder is on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from client_app.training import make_optimizer, train_locally  # noqa: E402
from common.config import NodeConfig, RunConfig  # noqa: E402
from common.data.client_data import load_client_data  # noqa: E402
from common.models import build_model  # noqa: E402

MODES = ("hooks", "ew", "functorch", "ghost")
WORKLOADS = {"digits/mlp": {"dataset": "digits", "model": "mlp"},
             "mnist1d/cnn1d": {"dataset": "mnist1d", "model": "cnn1d"}}
TOLERANCE = 1e-4

warnings.filterwarnings("ignore")  # opacus: secure_mode off, full backward hooks, ...


def app_config(overrides: dict) -> RunConfig:
    import tomllib

    defaults = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return RunConfig.from_run_config(defaults | overrides)


def client_data(config: RunConfig):
    from common.data.client_data import central_test_set

    test = central_test_set(config)
    node = NodeConfig.from_node_config({"partition-id": 0, "num-partitions": 10})
    return load_client_data(config, node, test.num_features, test.num_classes), test.num_features, test.num_classes


def _private(mode: str, model: nn.Module, optimizer, loader, sigma: float, clip: float, poisson: bool, seed: int):
    """make_private in ``mode``; returns (model, optimizer, loss function, loader)."""
    from opacus import PrivacyEngine

    logging.getLogger("flwr").propagate = False
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                  max_grad_norm=clip, poisson_sampling=poisson, grad_sample_mode=mode,
                  noise_generator=torch.Generator().manual_seed(seed + 1))
    if mode == "ghost":
        private_model, private_optimizer, criterion, private_loader = engine.make_private(
            criterion=nn.CrossEntropyLoss(), **kwargs)
        return private_model, private_optimizer, criterion, private_loader, engine
    private_model, private_optimizer, private_loader = engine.make_private(**kwargs)

    def loss_fn(logits, y):
        return nn.functional.cross_entropy(logits, y, reduction="mean" if len(y) else "sum")

    return private_model, private_optimizer, loss_fn, private_loader, engine


# ----------------------------------------------------------------------------- correctness


def _flat_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return torch.cat([g.reshape(-1) for g in grads])


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    """Per-example gradients (one autograd call each), their norms, and the clipped mean."""
    per_sample = torch.stack([_flat_grads(model, x[i : i + 1], y[i : i + 1]) for i in range(len(y))])
    norms = per_sample.norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping factor
    return per_sample, norms, (per_sample * factors[:, None]).sum(0) / len(y)


def check_mode(mode: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> tuple[float, float]:
    """(relative error of the clipped mean gradient, of the per-sample gradients or nan); raises if the mode fails."""
    per_sample_ref, _, mean_ref = reference(copy.deepcopy(base), x, y, clip)
    model = copy.deepcopy(base)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y), shuffle=False)
    private_model, private_optimizer, loss_fn, _, _ = _private(mode, model, optimizer, loader, 0.0, clip, False, 0)
    private_optimizer.zero_grad()
    loss = loss_fn(private_model(x), y)
    loss.backward()
    per_sample_err = float("nan")
    samples = [getattr(p, "grad_sample", None) for p in model.parameters()]
    if all(s is not None for s in samples):
        flat = torch.cat([s.reshape(len(y), -1) for s in samples], dim=1)
        per_sample_err = float((flat - per_sample_ref).abs().max() / per_sample_ref.abs().max())
    private_optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    mean = before - after  # lr 1, no momentum: the step is the clipped, averaged (noise-free) gradient
    mean_err = float((mean - mean_ref).abs().max() / mean_ref.abs().max())
    return mean_err, per_sample_err


def check_empty_batch(mode: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    """One step on an EMPTY batch, which Poisson sampling can draw (probability (1-q)^n per step)
    and which DP-SGD must still take as a noise-only step (the accountant counts it): "ok", or
    why the mode fails."""
    model = copy.deepcopy(base)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y), shuffle=False)
    try:
        private_model, private_optimizer, loss_fn, _, _ = _private(mode, model, optimizer, loader, 1.0, 1.0, False, 0)
        private_optimizer.zero_grad()
        loss = loss_fn(private_model(x[:0]), y[:0])
        loss.backward()
        private_optimizer.step()
    except Exception as error:  # noqa: BLE001 - a mode that fails is a result
        return "fails: " + f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:100]
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    moved = bool(torch.isfinite(after).all()) and not torch.equal(before, after)
    return "ok (noise-only step)" if moved else "NO step taken"


# ----------------------------------------------------------------------------- timing


def dp_loop(private_model: nn.Module, optimizer, loss_fn, loader, epochs: int) -> float:
    """The training loop of ``client_app.dpsgd.train_dpsgd``, statement for statement."""
    total, count = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = loss_fn(private_model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            count += len(yb)
    return total / max(count, 1)



def time_nonprivate(config: RunConfig, data, nf: int, nc: int, epochs: int, seed: int) -> float:
    """Per-epoch seconds of one ``train_locally`` run of ``epochs`` epochs."""
    cfg = dataclasses.replace(config, local_epochs=epochs)
    model = build_model(config.model, nf, nc, seed=seed)
    t = time.perf_counter()
    train_locally(model, data.x_train, data.y_train, cfg, 0.0, seed)
    return (time.perf_counter() - t) / epochs


def dp_setup(mode: str, config: RunConfig, data, nf: int, nc: int, seed: int):
    """What ``train_dpsgd`` builds before its loop (model from ``seed``, shuffled loader, make_private)."""
    model = build_model(config.model, nf, nc, seed=seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
                        batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    out = _private(mode, model, make_optimizer(model, config), loader, config.noise_multiplier, config.clipping_norm, True, seed)
    out[0].train()
    return out


def time_private(mode: str, config: RunConfig, data, nf: int, nc: int, epochs: int, seed: int) -> tuple[float, float, float]:
    """The loop of client_app/dpsgd.py in ``mode``: (per-epoch s, make_private s, get_epsilon s) of one run."""
    model = build_model(config.model, nf, nc, seed=seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
                        batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    private_model, optimizer, loss_fn, private_loader, engine = _private(
        mode, model, make_optimizer(model, config), loader, config.noise_multiplier, config.clipping_norm, True, seed)
    private_model.train()
    t1 = time.perf_counter()
    dp_loop(private_model, optimizer, loss_fn, private_loader, epochs)
    t2 = time.perf_counter()
    engine.accountant.get_epsilon(config.target_delta)  # what train_dpsgd reports after training
    t3 = time.perf_counter()
    return (t2 - t1) / epochs, t1 - t0, t3 - t2


def time_app_call(config: RunConfig, data, nf: int, nc: int, repeats: int, seed: int) -> list[float]:
    """client_app.dpsgd.train_dpsgd as the ClientApp calls it (hooks, local-epochs epochs, accountant)."""
    from client_app.dpsgd import train_dpsgd
    from common.privacy.secret_random import SecretRandom

    calls = []
    for r in range(repeats):
        model = build_model(config.model, nf, nc, seed=seed)
        t = time.perf_counter()
        train_dpsgd(model, data.x_train, data.y_train, config, [], SecretRandom(), config.max_epsilon)
        calls.append(time.perf_counter() - t)
    return calls


def time_app_nonprivate(config: RunConfig, data, nf: int, nc: int, repeats: int, seed: int) -> list[float]:
    calls = []
    for r in range(repeats):
        model = build_model(config.model, nf, nc, seed=seed)
        t = time.perf_counter()
        train_locally(model, data.x_train, data.y_train, config, 0.0, seed + r)
        calls.append(time.perf_counter() - t)
    return calls


# ----------------------------------------------------------------------------- profile

# The parts of one training step, in table order.
PARTS = {
    "data": "data loading (DP: `DPDataLoader`'s `__next__`: Poisson mask, one `TensorDataset[i]` per example, "
            "collate; non-private: `x[batch]` inline, counted in *other*)",
    "forward": "forward: the model's modules (DP: with the full-backward-hook plumbing Opacus's hooks add per layer)",
    "fwd_hooks": "forward: Opacus `capture_activations_hook` (keeps each layer's input)",
    "loss": "loss (`cross_entropy`)",
    "backward": "backward: autograd",
    "grad_sample": "backward: Opacus `capture_backprops_hook` (per-sample gradients, `opacus/grad_sample`)",
    "zero_grad": "`zero_grad`",
    "clip": "per-sample norms + clipping (`DPOptimizer.clip_and_accumulate`)",
    "noise": "noise (`DPOptimizer.add_noise`)",
    "scale": "`DPOptimizer.scale_grad`",
    "accountant": "accountant step hook (`IAccountant.get_optimizer_hook_fn`)",
    "opt_step": "optimizer step (DP: `torch.optim.SGD.step`; non-private: `MomentumSGD.step`)",
    "dp_bookkeeping": "`DPOptimizer.step`/`pre_step` own work (`grad_samples` lists built 3x, skip queue)",
    "other": "other: the loop itself, `loss.item()`, `len`; non-private: the batch indexing",
}
_MISSING = object()


CLOCK = time.process_time  # the profile's clock: CPU seconds of this process (see profile_workload)


class PhaseTimer:
    """Exclusive CPU time per part: patched functions add their own time to their part, minus the
    time of the patched functions they call (a stack). ~1 us per call: far below any part here."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[float] = []
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, part: str, fn):
        import functools

        stack, seconds = self._stack, self.seconds

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack.append(0.0)
            t = CLOCK()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = CLOCK() - t
                inner = stack.pop()
                seconds[part] = seconds.get(part, 0.0) + elapsed - inner
                if stack:
                    stack[-1] += elapsed

        return timed

    def patch(self, owner, name: str, part: str) -> None:
        self._patches.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, self.wrap(part, getattr(owner, name)))

    def patch_hook_factory(self) -> None:
        """The accountant's step hook is a closure made by make_private: time what the factory returns."""
        from opacus.accountants.accountant import IAccountant

        original = IAccountant.__dict__["get_optimizer_hook_fn"]
        self._patches.append((IAccountant, "get_optimizer_hook_fn", original))
        IAccountant.get_optimizer_hook_fn = lambda acc, sample_rate: self.wrap("accountant", original(acc, sample_rate))

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._patches.clear()


def _patch_private(timer: PhaseTimer) -> None:
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import dataloader

    for owner, name, part in [
        (dataloader._BaseDataLoaderIter, "__next__", "data"), (DataLoader, "__iter__", "data"),
        (GradSampleModule, "__call__", "forward"), (GradSampleModule, "capture_activations_hook", "fwd_hooks"),
        (GradSampleModule, "capture_backprops_hook", "grad_sample"),
        (torch.nn.functional, "cross_entropy", "loss"), (torch.Tensor, "backward", "backward"),
        (DPOptimizer, "zero_grad", "zero_grad"), (DPOptimizer, "step", "dp_bookkeeping"),
        (DPOptimizer, "clip_and_accumulate", "clip"), (DPOptimizer, "add_noise", "noise"),
        (DPOptimizer, "scale_grad", "scale"), (torch.optim.SGD, "step", "opt_step"),
    ]:
        timer.patch(owner, name, part)
    timer.patch_hook_factory()


def _patch_nonprivate(timer: PhaseTimer, model_class: type) -> None:
    from client_app.sgd import MomentumSGD

    for owner, name, part in [
        (model_class, "__call__", "forward"), (torch.nn.functional, "cross_entropy", "loss"),
        (torch.Tensor, "backward", "backward"), (MomentumSGD, "zero_grad", "zero_grad"),
        (MomentumSGD, "step", "opt_step"),
    ]:
        timer.patch(owner, name, part)


def _run_private(config, data, nf, nc, epochs, seed, timer: PhaseTimer | None = None, wrap=None) -> float:
    """CPU seconds of ``epochs`` epochs of the app's DP-SGD loop (hooks), set-up excluded; ``wrap``
    (a context manager, e.g. a profiler) encloses the loop only."""
    import contextlib

    if timer:
        _patch_private(timer)  # before make_private: Opacus binds its hooks then
    try:
        private_model, optimizer, loss_fn, private_loader, _ = dp_setup("hooks", config, data, nf, nc, seed)
        with wrap or contextlib.nullcontext():
            t = CLOCK()
            dp_loop(private_model, optimizer, loss_fn, private_loader, epochs)
            elapsed = CLOCK() - t
    finally:
        if timer:
            timer.restore()
    return elapsed


def _run_nonprivate(config, data, nf, nc, epochs, seed, timer: PhaseTimer | None = None, wrap=None) -> float:
    import contextlib

    cfg = dataclasses.replace(config, local_epochs=epochs)
    model = build_model(config.model, nf, nc, seed=seed)
    if timer:
        _patch_nonprivate(timer, type(model))
    try:
        with wrap or contextlib.nullcontext():
            t = CLOCK()
            train_locally(model, data.x_train, data.y_train, cfg, 0.0, seed)
            elapsed = CLOCK() - t
    finally:
        if timer:
            timer.restore()
    return elapsed


def _cprofile_parts(profile, private: bool) -> tuple[dict[str, float], float]:
    """Seconds per part from a cProfile of one run, and the loop's cumulative seconds.

    The loop function's (``dp_loop`` / ``train_locally``) cumulative time is split among its
    direct callees by function; Opacus's hooks and the DPOptimizer's sub-steps are then taken out
    of the callee that runs them (forward, backward, ``DPOptimizer.step``) by their own
    cumulative times. What is left (the loop's own time, builtins) is *other*."""
    import pstats

    stats = pstats.Stats(profile).stats

    def keys(suffix: str, func: str) -> list:
        return [k for k in stats if k[2] == func and k[0].replace("\\", "/").endswith(suffix)]

    def cumulative(suffix: str, func: str) -> float:
        return sum(stats[k][3] for k in keys(suffix, func))

    loop = keys("benchmarks/dpsgd_cost.py", "dp_loop") if private else keys("client_app/training.py", "train_locally")
    assert len(loop) == 1, loop
    loop = loop[0]
    callee_parts = [("torch/utils/data/dataloader.py", "__next__", "data"), ("torch/utils/data/dataloader.py", "__iter__", "data"),
                    ("torch/nn/modules/module.py", "_wrapped_call_impl", "forward"),
                    ("benchmarks/dpsgd_cost.py", "loss_fn", "loss"), ("torch/nn/functional.py", "cross_entropy", "loss"),
                    ("torch/_tensor.py", "backward", "backward"),
                    ("opacus/optimizers/optimizer.py", "zero_grad", "zero_grad"), ("client_app/sgd.py", "zero_grad", "zero_grad"),
                    ("opacus/optimizers/optimizer.py", "step", "dp_bookkeeping"),
                    ("torch/utils/_contextlib.py", "decorate_context", "opt_step")]  # MomentumSGD.step's no_grad wrapper
    parts = {p: 0.0 for p in PARTS}
    parts["other"] += stats[loop][2]  # the loop's own time
    for key, (_, _, _, _, callers) in stats.items():
        if loop not in callers:
            continue
        ct = callers[loop][3]
        part = next((p for suffix, func, p in callee_parts
                     if key[2] == func and key[0].replace("\\", "/").endswith(suffix)), "other")
        parts[part] += ct
    if private:
        parts["fwd_hooks"] = cumulative("opacus/grad_sample/grad_sample_module.py", "capture_activations_hook")
        parts["forward"] -= parts["fwd_hooks"]
        parts["grad_sample"] = cumulative("opacus/grad_sample/grad_sample_module.py", "capture_backprops_hook")
        parts["backward"] -= parts["grad_sample"]
        for part, func in [("clip", "clip_and_accumulate"), ("noise", "add_noise"), ("scale", "scale_grad")]:
            parts[part] = cumulative("opacus/optimizers/optimizer.py", func)
        parts["accountant"] = cumulative("opacus/accountants/accountant.py", "hook_fn")
        step = keys("opacus/optimizers/optimizer.py", "step")
        parts["opt_step"] = sum(callers[s][3] for k, (_, _, _, _, callers) in stats.items() for s in step
                                if s in callers and "/torch/optim/" in k[0].replace("\\", "/"))
        parts["dp_bookkeeping"] -= sum(parts[p] for p in ("clip", "noise", "scale", "accountant", "opt_step"))
    return parts, stats[loop][3]


def _top_functions(profile, n: int, steps: int) -> list[list[str]]:
    """The functions with the most own time (tottime) in a cProfile, ms per step."""
    import pstats

    stats = pstats.Stats(profile).stats
    total = sum(v[2] for v in stats.values())
    rows = []
    for key, (_, calls, tt, ct, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]:
        where = key[0].replace("\\", "/")
        for marker in ("site-packages/", "/work/main/"):
            where = where.split(marker, 1)[-1]
        name = key[2] if key[0] == "~" else f"{where}:{key[1]} `{key[2]}`"
        rows.append([name.replace("|", "/"), f"{calls / steps:.1f}", f"{tt / steps * 1e3:.3f}", f"{tt / total:.0%}",
                     f"{ct / steps * 1e3:.3f}"])
    return rows


def _torch_ops(prof, steps: int) -> dict[str, tuple[float, float]]:
    """{op: (self CPU ms per step, calls per step)} from a torch.profiler run."""
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()}


def profile_workload(name: str, config: RunConfig, data, nf: int, nc: int, epochs: int, repeats: int, seed: int) -> dict:
    """Where one DP-SGD step (hooks, the app's loop) and one non-private step spend their time.

    1. phase timers (:class:`PhaseTimer`, ~1 us per timed call): median ms per step of each part
       over ``repeats`` runs of ``epochs`` epochs, interleaved with unprofiled runs (the check
       that the timers do not distort: their sum vs the unprofiled loop);
    2. cProfile of one run each: the same split from cumulative times (cProfile's per-call cost
       inflates Python-heavy parts, so its milliseconds are higher: compare the shares), and the
       functions with the most own time;
    3. torch.profiler (CPU) of one run each: self CPU time per ATen op, and what is left outside
       the ops (Python: Opacus, torch.nn's module machinery, the loop).
    """
    import cProfile

    n = len(data.y_train)
    steps = epochs * math.ceil(n / config.batch_size)  # both loops: ceil(n/B) steps per epoch
    _run_private(config, data, nf, nc, 1, seed)  # warm-up (first calls, allocator)
    _run_nonprivate(config, data, nf, nc, 1, seed)
    timed = {"dp": [], "np": []}
    plain = {"dp": [], "np": []}
    for r in range(repeats):
        for kind, run in (("dp", _run_private), ("np", _run_nonprivate)):
            plain[kind].append(run(config, data, nf, nc, epochs, seed + r) / steps)
            timer = PhaseTimer()
            total = run(config, data, nf, nc, epochs, seed + r, timer=timer)
            parts = {p: timer.seconds.get(p, 0.0) / steps for p in PARTS}
            parts["other"] = total / steps - sum(parts.values())
            timed[kind].append(parts)
    result = {"name": name, "steps_per_epoch": math.ceil(n / config.batch_size), "n": n, "epochs": epochs,
              "repeats": repeats}
    for kind in ("dp", "np"):
        result[kind] = {
            "timer": {p: bench.median(t[p] for t in timed[kind]) for p in PARTS},
            "plain": bench.median(plain[kind]),
        }
        run = _run_private if kind == "dp" else _run_nonprivate
        profile = cProfile.Profile()
        run(config, data, nf, nc, epochs, seed, wrap=_enabled(profile))
        parts, loop_seconds = _cprofile_parts(profile, kind == "dp")
        result[kind]["cprofile"] = {p: v / steps for p, v in parts.items()}
        result[kind]["cprofile_total"] = loop_seconds / steps
        result[kind]["top"] = _top_functions(profile, 12, steps)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        wall = run(config, data, nf, nc, epochs, seed, wrap=prof)
        result[kind]["ops"] = _torch_ops(prof, steps)
        result[kind]["ops_wall"] = wall / steps
    return result


class _enabled:
    """cProfile enabled for a ``with`` block."""

    def __init__(self, profile) -> None:
        self.profile = profile

    def __enter__(self):
        self.profile.enable()
        return self.profile

    def __exit__(self, *exc) -> None:
        self.profile.disable()


def profile_tables(result: dict) -> str:
    """Markdown: the split per part (timers and cProfile), the top functions, the top ATen ops."""
    dp, np_ = result["dp"], result["np"]
    dp_total, np_total = sum(dp["timer"].values()), sum(np_["timer"].values())
    dp_cp, np_cp = sum(dp["cprofile"].values()), sum(np_["cprofile"].values())
    rows = []
    for part, label in PARTS.items():
        d, q = dp["timer"][part], np_["timer"][part]
        if part != "other" and d < 5e-7 and q < 5e-7:
            continue
        rows.append([label, f"{q * 1e3:.3f}", f"{q / np_total:.0%}", f"{d * 1e3:.3f}", f"{d / dp_total:.0%}",
                     f"{(d - q) * 1e3:+.3f}", f"{dp['cprofile'][part] / dp_cp:.0%}", f"{np_['cprofile'][part] / np_cp:.0%}"])
    rows.append(["**total** (sum of the parts' medians)", f"**{np_total * 1e3:.3f}**", "", f"**{dp_total * 1e3:.3f}**", "",
                 f"**{(dp_total - np_total) * 1e3:+.3f}** ({dp_total / np_total:.2f}x)",
                 f"{dp_cp * 1e3:.2f} ms", f"{np_cp * 1e3:.2f} ms"])
    rows.append(["unprofiled loop, median (timers' overhead check)", f"{np_['plain'] * 1e3:.3f}", "",
                 f"{dp['plain'] * 1e3:.3f}", "", f"({dp['plain'] / np_['plain']:.2f}x)", "", ""])
    split = bench.table(["part of one step", "non-private ms/step", "share", "DP-SGD ms/step", "share", "DP - non-private ms",
                         "DP share under cProfile", "non-private share under cProfile"], rows)
    # ATen ops
    dp_ops, np_ops = dp["ops"], np_["ops"]
    top = sorted(dp_ops, key=lambda k: -dp_ops[k][0])[:14]
    op_rows = [[f"`{k}`", f"{dp_ops[k][0]:.3f}", f"{dp_ops[k][1]:.1f}", f"{np_ops.get(k, (0.0, 0.0))[0]:.3f}",
                f"{np_ops.get(k, (0.0, 0.0))[1]:.1f}"] for k in top]
    dp_sum, np_sum = sum(v[0] for v in dp_ops.values()), sum(v[0] for v in np_ops.values())
    op_rows.append(["**all ops** (self CPU summed)", f"**{dp_sum:.3f}**", f"{sum(v[1] for v in dp_ops.values()):.0f}",
                    f"**{np_sum:.3f}**", f"{sum(v[1] for v in np_ops.values()):.0f}"])
    op_rows.append(["wall of the loop under torch.profiler", f"{dp['ops_wall'] * 1e3:.3f}", "", f"{np_['ops_wall'] * 1e3:.3f}", ""])
    ops = bench.table(["ATen op / range (torch.profiler, self CPU)", "DP-SGD ms/step", "DP calls/step",
                       "non-private ms/step", "non-private calls/step"], op_rows)
    functions = bench.table(["function (cProfile, DP-SGD step)", "calls/step", "own ms/step (cProfile)", "share of own time",
                             "cumulative ms/step"], dp["top"])
    return f"""**{result['name']}** ({result['n']} examples, {result['steps_per_epoch']} steps/epoch; medians of
{result['repeats']} runs of {result['epochs']} epochs per loop):

{split}

{ops}

<details><summary>cProfile: the 12 functions with the most own time in the DP-SGD step</summary>

{functions}

</details>
"""


# ----------------------------------------------------------------------------- cheap fixes


def dp_loop_indexed(private_model: nn.Module, optimizer, loss_fn, loader, x_all: torch.Tensor, y_all: torch.Tensor,
                    epochs: int, same_stream: bool = False) -> float:
    """``dp_loop`` with each batch cut from the whole tensors by the indices Opacus's own Poisson
    batch sampler (``loader.batch_sampler``: every example with rate 1/ceil(n/B), ceil(n/B)
    batches, from the loader's generator) draws, instead of the DataLoader fetching the examples
    one by one and collating them. ``same_stream``: also take the one draw per epoch the
    DataLoader's iterator makes from the same generator (its worker base seed), so the batches
    are the very ones ``dp_loop`` gets (for the bit-for-bit check)."""
    total, count = 0.0, 0
    for _ in range(epochs):
        if same_stream:
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        for indices in loader.batch_sampler:
            xb, yb = x_all[indices], y_all[indices]
            optimizer.zero_grad()
            loss = loss_fn(private_model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
            count += len(yb)
    return total / max(count, 1)


def add_noise_one_draw(optimizer) -> None:
    """``DPOptimizer.add_noise`` with one Gaussian draw for all parameters (the same N(0, (sigma C)^2)
    per coordinate, independent) instead of one ``torch.zeros`` + one ``torch.normal`` per tensor."""
    params = optimizer.params
    std = optimizer.noise_multiplier * optimizer.max_grad_norm
    noise = torch.normal(0.0, std, size=(sum(p.summed_grad.numel() for p in params),), generator=optimizer.generator)
    offset = 0
    for p in params:
        k = p.summed_grad.numel()
        p.grad = (p.summed_grad + noise[offset:offset + k].view_as(p.summed_grad)).view_as(p)
        offset += k


def scale_grad_once(optimizer) -> None:
    """``DPOptimizer.scale_grad`` with the divisor computed once (Opacus recomputes
    ``accumulated_iterations``, a loop over every parameter, for each parameter): same division."""
    if optimizer.loss_reduction == "mean":
        divisor = optimizer.expected_batch_size * optimizer.accumulated_iterations
        for p in optimizer.params:
            p.grad /= divisor


VARIANTS = {
    "app": "`app`: the app's loop (`dp_loop` = `train_dpsgd`'s)",
    "indexed": "`indexed`: batches cut from the whole tensors with the Poisson sampler's indices (`dp_loop_indexed`)",
    "lean": "`lean`: the app's loop, noise in one draw (`add_noise_one_draw`), `scale_grad` divisor once (`scale_grad_once`)",
    "indexed+lean": "`indexed+lean`: both",
    "ew": "`ew`: the app's loop, `grad_sample_mode='ew'`",
    "indexed+lean+ew": "`indexed+lean+ew`: all three",
    "app@2": "the app's loop at 2 threads (`torch.set_num_threads(2)`; non-private at 2 threads too)",
}
ONE_THREAD_VARIANTS = [v for v in VARIANTS if not v.endswith("@2")]


def _run_variant(variant: str, config, data, nf, nc, epochs: int, seed: int, same_stream: bool = False):
    """((wall s, CPU s) of the loop, the trained model's flat parameters) for one DP-SGD variant."""
    parts = set(variant.split("+"))
    private_model, optimizer, loss_fn, private_loader, _ = dp_setup(
        "ew" if "ew" in parts else "hooks", config, data, nf, nc, seed)
    if "lean" in parts:
        optimizer.add_noise = lambda: add_noise_one_draw(optimizer)
        optimizer.scale_grad = lambda: scale_grad_once(optimizer)
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    t, c = time.perf_counter(), time.process_time()
    if "indexed" in parts:
        dp_loop_indexed(private_model, optimizer, loss_fn, private_loader, x_all, y_all, epochs, same_stream)
    else:
        dp_loop(private_model, optimizer, loss_fn, private_loader, epochs)
    elapsed = (time.perf_counter() - t, time.process_time() - c)
    return elapsed, torch.cat([p.detach().reshape(-1) for p in private_model.parameters()])


def check_variants(config, data, nf, nc, seed: int) -> dict[str, str]:
    """Correctness of the loop variants against the app's loop, 2 epochs from the same seeds.

    * ``indexed`` (with the DataLoader's per-epoch draw replayed): the same batches and the same
      arithmetic, so the trained parameters must be bit-for-bit those of the app's loop;
    * ``lean``: noise-free (sigma 0), the parameters must be bit-for-bit the app's (only the
      noise's draw changed); and with sigma 1 the noise it adds must be N(0, (sigma C)^2) per
      coordinate: the std of the injected noise, over every coordinate of 200 draws, within 1% of
      sigma*C, the mean within 3 standard errors of 0.
    """
    checks = {}
    _, ref = _run_variant("app", config, data, nf, nc, 2, seed)
    _, got = _run_variant("indexed", config, data, nf, nc, 2, seed, same_stream=True)
    checks["indexed"] = "bit-identical to the app's loop" if torch.equal(ref, got) else \
        f"DIFFERS (max abs {float((ref - got).abs().max()):.2e})"
    quiet = dataclasses.replace(config, noise_multiplier=0.0)
    _, ref0 = _run_variant("app", quiet, data, nf, nc, 2, seed)
    _, got0 = _run_variant("lean", quiet, data, nf, nc, 2, seed)
    same = torch.equal(ref0, got0)
    private_model, optimizer, loss_fn, private_loader, _ = dp_setup("hooks", config, data, nf, nc, seed)
    noises = []
    for p in optimizer.params:
        p.summed_grad = torch.zeros_like(p)
    for _ in range(200):
        add_noise_one_draw(optimizer)
        noises.append(torch.cat([p.grad.reshape(-1) for p in optimizer.params]))
    noise = torch.cat(noises).double()
    target = config.noise_multiplier * config.clipping_norm
    std, mean = float(noise.std()), float(noise.mean())
    ok_std = abs(std / target - 1) < 0.01
    ok_mean = abs(mean) < 3 * target / math.sqrt(noise.numel())
    checks["lean"] = (("bit-identical at sigma 0" if same else "DIFFERS at sigma 0")
                          + f"; noise std {std:.4f} vs sigma*C {target:.4f}, mean {mean:+.1e} ({noise.numel()} draws)"
                          + ("" if ok_std and ok_mean else " OUT OF TOLERANCE"))
    checks["indexed+lean"] = "as its two parts"
    base = build_model(config.model, nf, nc, seed=seed)
    x, y = torch.from_numpy(data.x_train[: config.batch_size]), torch.from_numpy(data.y_train[: config.batch_size])
    empty = check_empty_batch("ew", base, x, y)
    checks["ew"] = "the correctness table above" + ("" if empty.startswith("ok") else "; an empty Poisson batch " + empty)
    checks["indexed+lean+ew"] = "as its three parts" + ("" if empty.startswith("ok") else " (`ew`: not on an empty batch)")
    checks["app@2"] = "the same loop"
    return checks


def _nonprivate_clocks(config, data, nf, nc, epochs: int, seed: int) -> tuple[float, float]:
    cfg = dataclasses.replace(config, local_epochs=epochs)
    model = build_model(config.model, nf, nc, seed=seed)
    t, c = time.perf_counter(), time.process_time()
    train_locally(model, data.x_train, data.y_train, cfg, 0.0, seed)
    return time.perf_counter() - t, time.process_time() - c


def time_variants(config, data, nf, nc, epochs: int, repeats: int, seed: int,
                  variants: list[str]) -> dict[str, dict[str, float]]:
    """{variant: {"wall", "cpu", "np_wall", "np_cpu"}: medians in seconds per step} of the DP-SGD
    loop variants and of non-private ``train_locally`` at the same thread count, interleaved repeat
    by repeat in a rotating order (a warm-up round first, not counted)."""
    steps = epochs * math.ceil(len(data.y_train) / config.batch_size)
    runs = [(v, False) for v in variants] + [(v, True) for v in variants if v in ("app", "app@2")]
    samples = {run: [] for run in runs}
    for r in range(-1, repeats):
        order = runs[r % len(runs):] + runs[:r % len(runs)] if r >= 0 else runs
        for variant, nonprivate in order:
            torch.set_num_threads(2 if variant.endswith("@2") else 1)
            try:
                if nonprivate:
                    clocks = _nonprivate_clocks(config, data, nf, nc, epochs, seed + max(r, 0))
                else:
                    clocks = _run_variant(variant.removesuffix("@2"), config, data, nf, nc, epochs, seed + max(r, 0))[0]
            finally:
                torch.set_num_threads(1)
            if r >= 0:
                samples[(variant, nonprivate)].append(clocks)
    out = {}
    app = samples[("app", False)]
    for variant in variants:
        base = (("app@2" if variant.endswith("@2") else "app"), True)
        mine = samples[(variant, False)]
        out[variant] = {"wall": bench.median(s[0] for s in mine) / steps,
                        "cpu": bench.median(s[1] for s in mine) / steps,
                        "np_wall": bench.median(s[0] for s in samples[base]) / steps,
                        "np_cpu": bench.median(s[1] for s in samples[base]) / steps,
                        # paired: this variant against the app's loop of the same round (load drifts)
                        "vs_app_cpu": bench.median(m[1] / a[1] for m, a in zip(mine, app)),
                        "vs_app_wall": bench.median(m[0] / a[0] for m, a in zip(mine, app)),
                        "vs_np_cpu": bench.median(m[1] / b[1] for m, b in zip(mine, samples[base])),
                        "vs_np_wall": bench.median(m[0] / b[0] for m, b in zip(mine, samples[base]))}
    return out


def variants_table(name: str, checks: dict, timed: dict, load: tuple[float, float]) -> list[list[str]]:
    app = timed["app"]
    rows = []
    for variant, t in timed.items():
        label = VARIANTS[variant]
        if variant == "app@2":  # CPU time counts both threads' busy (and spinning) time: compare walls
            rows.append([name, label, f"wall {t['wall'] * 1e3:.3f}", f"{1 - t['vs_app_wall']:+.0%} (wall)",
                         f"wall {t['np_wall'] * 1e3:.3f}", f"{t['vs_np_wall']:.2f}x (wall)",
                         checks.get(variant, ""), f"{load[0]:.1f} / {load[1]:.1f}"])
            continue
        rows.append([name, label, f"{t['cpu'] * 1e3:.3f} (wall {t['wall'] * 1e3:.3f})",
                     "" if variant == "app" else f"{1 - t['vs_app_cpu']:+.0%}",
                     f"{t['np_cpu'] * 1e3:.3f}", f"{t['vs_np_cpu']:.2f}x",
                     checks.get(variant, ""), f"{load[0]:.1f} / {load[1]:.1f}"])
    return rows


# ----------------------------------------------------------------------------- main


PROFILE_START, PROFILE_END = "<!-- dpsgd_cost-profile:start -->", "<!-- dpsgd_cost-profile:end -->"
NOTES_START, NOTES_END = "<!-- dpsgd_cost-notes:start -->", "<!-- dpsgd_cost-notes:end -->"


def _block(text: str, start: str, end: str) -> str:
    """The block ``start``...``end`` (markers included) in ``text``, or ''."""
    if start not in text or end not in text:
        return ""
    return text[text.index(start):text.index(end) + len(end)]


def _section_body() -> str:
    """The current body of this section in results.md (between its heading and its end marker)."""
    text = bench.RESULTS.read_text() if bench.RESULTS.exists() else ""
    start, end = "<!-- dpsgd_cost:start -->", "<!-- dpsgd_cost:end -->"
    if start not in text:
        return ""
    body = text[text.index(start) + len(start):text.index(end)]
    heading = f"## {bench.SECTIONS['dpsgd_cost']}"
    return body.split(heading, 1)[-1].strip("\n")


def run_profile(workloads: dict, args, seed: int) -> str:
    """The profile of one step per workload, then the cheap fixes: the Markdown block."""
    tables, variant_rows, thread_rows = [], [], []
    for name, (config, data, nf, nc) in workloads.items():
        load = bench.wait_for_quiet(args.max_load, args.max_wait)
        result = profile_workload(name, config, data, nf, nc, args.profile_epochs, args.profile_repeats, seed)
        tables.append(profile_tables(result) + f"\nload {load:.1f} / {bench.load1():.1f}\n")
        print(tables[-1], flush=True)
        checks = check_variants(config, data, nf, nc, seed)
        load = bench.wait_for_quiet(args.max_load, args.max_wait)
        timed = time_variants(config, data, nf, nc, args.epochs, args.variant_repeats, seed, ONE_THREAD_VARIANTS)
        variant_rows += variants_table(name, checks, timed, (load, bench.load1()))
        # A second thread only helps if a core is free: wait for a load of at most max-load - 1.
        load = bench.wait_for_quiet(args.max_load - 1, args.max_wait)
        if load <= args.max_load - 1:
            timed = time_variants(config, data, nf, nc, args.thread_epochs, args.thread_repeats, seed, ["app", "app@2"])
            thread_rows += variants_table(name, checks, timed, (load, bench.load1()))
        else:  # a second thread only competes with the other jobs for the 2 cores: nothing to learn
            thread_rows.append([name, VARIANTS["app@2"], "not measured", "", "", "", "", f"{load:.1f} > {args.max_load - 1}"])
        for row in variant_rows[-len(ONE_THREAD_VARIANTS):] + thread_rows[-2:]:
            print(" | ".join(row), flush=True)
    header = ["workload", "DP-SGD loop", "ms/step: CPU (wall)", "saving vs the app's loop", "non-private ms/step",
              "vs non-private", "correctness", "load"]
    return f"""{PROFILE_START}
### Where one DP-SGD step spends its time (`--profile`)

The app's loop (`hooks`, as `client_app/dpsgd.py` trains: Poisson `DPDataLoader`, noise multiplier 1,
clip 1, `torch.optim.SGD` wrapped by `DPOptimizer`) next to non-private `train_locally` (what the
ClientApp runs without DP: whole-tensor batch indexing, `client_app/sgd.py`'s `MomentumSGD`), one
torch thread. Both take ceil(n/B) steps per epoch. Times are **CPU time** of this process
(`time.process_time`): on this shared 2-core VM the wall time of a single-threaded loop also
counts the time other jobs hold the core, CPU time much less so (contention still slows the
caches: figures at a load above ~2 are inflated, the DP-SGD step more than the non-private one).

* **ms/step, share**: phase timers, i.e. the app's functions wrapped in place (Opacus's hooks,
  `DPOptimizer`'s sub-steps, `Tensor.backward`, the loader's `__next__`, ...) adding their own
  time, exclusive of the wrapped functions they call; medians per part; the unprofiled loop below
  checks their overhead (~1 us per wrapped call);
* **share under cProfile**: the same split from a cProfile of one run (the loop function's
  cumulative time split among its callees, Opacus's hooks and sub-steps taken out of forward,
  backward and `DPOptimizer.step`); cProfile's per-call cost inflates Python-heavy parts;
* **ATen ops**: torch.profiler's self CPU time per op (and per `record_function` range: the
  hooks' Python time lands in `BackwardHookFunctionBackward`); the gap between the ops' sum and
  the loop's wall under the profiler is Python time outside any op.

{chr(10).join(tables)}
### Cheap fixes tried (same privacy guarantee, same Poisson sampling)

Each DP-SGD loop variant, median of {args.variant_repeats} interleaved runs of {args.epochs} epochs
(rotating order, after a warm-up round), one torch thread; *saving* and *vs non-private* are
medians of per-round ratios (each run against the app's loop / `train_locally` of the same round,
so that a drifting load cancels), CPU time unless marked. Correctness
checked first: `indexed` replays the loader's per-epoch generator draw so that its batches are
the app's and must train bit-for-bit the same parameters; `lean` must train bit-for-bit the same
parameters at sigma 0 and inject noise with std sigma*C (200 draws of every coordinate).

{bench.table(header, variant_rows)}

Threads: the app's loop at 1 vs 2 torch threads, median of {args.thread_repeats} interleaved runs of
{args.thread_epochs} epochs, measured only when a core is free (load <= {args.max_load - 1:g} after waiting up to
{args.max_wait:.0f} s); the 2-thread row in wall time (CPU time counts both threads, spinning included):

{bench.table(header, thread_rows)}
{PROFILE_END}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timed repeat")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one DP-SGD step (hooks) against a non-private one, and time the cheap fixes")
    parser.add_argument("--profile-only", action="store_true",
                        help="only the profile and the cheap fixes; replaces only their block in the section")
    parser.add_argument("--profile-epochs", type=int, default=10, help="epochs per profiled run")
    parser.add_argument("--profile-repeats", type=int, default=5, help="runs per loop for the phase timers")
    parser.add_argument("--variant-repeats", type=int, default=21, help="runs per cheap-fix variant")
    parser.add_argument("--thread-repeats", type=int, default=7, help="runs per loop for 1 vs 2 threads")
    parser.add_argument("--thread-epochs", type=int, default=3, help="epochs per run for 1 vs 2 threads")
    parser.add_argument("--notes", metavar="FILE", help="replace the analysis notes with FILE (else they are kept)")
    parser.add_argument("--notes-only", metavar="FILE",
                        help="only replace the analysis notes of this section in results.md with FILE (no measurement)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.notes_only:
        bench.update_notes("dpsgd_cost", Path(args.notes_only).read_text())
        return 0
    modes = [m for m in args.modes.split(",") if m]
    torch.set_num_threads(1)  # as the ClientApp does
    seed = 42

    correctness_rows, timing_rows, verdicts, notes = [], [], [], []
    import opacus  # noqa: F401  (imported once, before any timing)

    logging.getLogger("flwr").propagate = False
    workloads = {}
    for name, overrides in WORKLOADS.items():
        config = app_config(overrides | {"dp": "dpsgd", "noise-multiplier": 1.0, "clipping-norm": 1.0})
        data, nf, nc = client_data(config)
        workloads[name] = (config, data, nf, nc)
    old_body = _section_body()
    notes_block = (f"{NOTES_START}\n{Path(args.notes).read_text().strip()}\n{NOTES_END}" if args.notes
                   else _block(old_body, NOTES_START, NOTES_END))
    if args.profile_only:
        profile_block = run_profile(workloads, args, seed)
        body = old_body
        for block in (_block(body, PROFILE_START, PROFILE_END), notes_block and _block(body, NOTES_START, NOTES_END)):
            if block:
                body = body.replace(block, "")
        body = body.rstrip("\n") + "\n\n" + profile_block + "\n\n" + notes_block
        if args.no_write:
            print(f"(not written: {len(body)} characters, profile block {len(profile_block)}, notes {len(notes_block)})")
        else:
            bench.write_section("dpsgd_cost", body)
        return 0

    for name, (config, data, nf, nc) in workloads.items():
        n = len(data.y_train)
        base = build_model(config.model, nf, nc, seed=seed)
        x = torch.from_numpy(data.x_train[: config.batch_size])
        y = torch.from_numpy(data.y_train[: config.batch_size])
        _, norms, _ = reference(copy.deepcopy(base), x, y, 1.0)
        clip_half = float(norms.median())
        clip_none = float(norms.max()) * 2
        correct, empty = {}, {}
        for mode in modes:
            try:
                errors = [check_mode(mode, base, x, y, c) for c in (clip_half, clip_none)]
                worst_mean = max(e[0] for e in errors)
                worst_ps = max((e[1] for e in errors), default=float("nan"))
                ok = worst_mean <= TOLERANCE and (np.isnan(worst_ps) or worst_ps <= TOLERANCE)
                correct[mode] = ok
                empty[mode] = check_empty_batch(mode, base, x, y)
                correctness_rows.append([name, mode, f"{errors[0][0]:.1e}", f"{errors[1][0]:.1e}",
                                         "not materialised" if np.isnan(worst_ps) else f"{worst_ps:.1e}",
                                         empty[mode], "yes" if ok else "NO"])
            except Exception as error:  # noqa: BLE001 - a mode that fails is a result
                correct[mode] = False
                empty[mode] = ""
                message = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:160]
                correctness_rows.append([name, mode, "fails", "fails", "", "", f"NO ({message})"])
            print(f"[{name}] correctness {mode}: {correctness_rows[-1][2:]}", flush=True)

        load = bench.wait_for_quiet(args.max_load, args.max_wait)
        # Variants interleaved repeat by repeat, so a change in the machine's load hits all alike.
        variants = ["non-private"] + [m for m in modes if correct[m]]
        epoch_times = {v: [] for v in variants}
        setups = {v: [] for v in variants}
        eps_times = []
        failed = set()
        for r in range(args.repeats):
            for variant in variants:
                if variant in failed:
                    continue
                if variant == "non-private":
                    epoch_times[variant].append(time_nonprivate(config, data, nf, nc, args.epochs, seed + r))
                    continue
                try:
                    epoch, setup, eps = time_private(variant, config, data, nf, nc, args.epochs, seed + r)
                except Exception as error:  # noqa: BLE001
                    failed.add(variant)
                    notes.append(f"- {name}, `{variant}`: training loop failed: {type(error).__name__}: {error}")
                    continue
                epoch_times[variant].append(epoch)
                setups[variant].append(setup)
                eps_times.append(eps)
        base_epoch = bench.median(epoch_times["non-private"])
        # ratio: the median of per-repeat ratios (each mode against non-private of the same repeat)
        results = {v: (bench.median(epoch_times[v]), bench.median(setups[v]),
                       bench.median(t / b for t, b in zip(epoch_times[v], epoch_times["non-private"])))
                   for v in variants[1:] if v not in failed and epoch_times[v]}
        load_after = bench.load1()
        timing_rows.append([name, f"{n} train examples, {math.ceil(n / config.batch_size)} steps/epoch",
                            "non-private (`train_locally`)", f"{base_epoch * 1e3:.1f}", "1.00x", "", f"{load:.1f} / {load_after:.1f}"])
        for mode, (epoch, setup, ratio) in results.items():
            timing_rows.append([name, "", f"DP-SGD `{mode}`", f"{epoch * 1e3:.1f}", f"{ratio:.2f}x",
                                f"{setup * 1e3:.1f}", f"{load:.1f} / {load_after:.1f}"])
        eps = bench.median(eps_times)
        timing_rows.append([name, "", "the RDP accountant's `get_epsilon` after training (once per call)",
                            f"{eps * 1e3:.1f} (per call)", f"{eps / base_epoch:.1f} epochs' worth", "",
                            f"{load:.1f} / {load_after:.1f}"])
        calls_dp, calls_np = [], []
        for r in range(max(3, args.repeats // 3)):  # alternating, as above
            calls_dp += time_app_call(config, data, nf, nc, 1, seed + r)
            calls_np += time_app_nonprivate(config, data, nf, nc, 1, seed + r)
        app_dp, app_np = bench.median(calls_dp), bench.median(calls_np)
        timing_rows.append([name, "", f"whole app call, {config.local_epochs} epochs: `train_dpsgd` (hooks) vs `train_locally`",
                            f"{app_dp * 1e3:.0f} vs {app_np * 1e3:.0f} (per call)", f"{app_dp / app_np:.2f}x", "",
                            f"{bench.load1():.1f}"])
        if results:
            fastest = min(results, key=lambda m: results[m][2])
            ratio = results[fastest][2]
            hooks = results.get("hooks", (0, 0, float("nan")))[2]
            usable = [m for m in results if empty.get(m, "").startswith("ok")]
            caveat = "" if fastest in usable else (
                f" (but `{fastest}` fails on an empty Poisson batch; fastest that also handles one: "
                + (f"`{min(usable, key=lambda m: results[m][2])}` at {min(results[m][2] for m in usable):.2f}x)" if usable else "none)"))
            verdicts.append(
                f"- {name}: fastest correct mode `{fastest}` at {ratio:.2f}x non-private per epoch "
                f"({'meets' if ratio <= 2 else 'misses'} the 2x goal"
                + ("" if ratio <= 2 else f" by {ratio / 2:.2f}x") + f"){caveat}; `hooks` (the app's) {hooks:.2f}x."
            )
        print("\n".join(verdicts[-1:]), flush=True)

    text = f"""{bench.machine()}

One client (partition 0 of the default 10-client IID split; 80% of it trains), batch 16, SGD lr 0.1
momentum 0.9, one torch thread (as the ClientApp); DP-SGD as `client_app/dpsgd.py` trains: Poisson
batches, noise multiplier 1, clip norm 1. Per-epoch wall time = median over {args.repeats} repeats of
{args.epochs} epochs, all variants interleaved repeat by repeat (the `make_private` set-up is timed
apart); *vs non-private* = median of the per-repeat ratios. `load` = 1-minute load before / after.

```bash
{bench.command_line()}
```

Correctness (before timing): one batch of 16, noise multiplier 0; the clipped, averaged gradient
each mode applies, against a per-example reference (one autograd call per example, clipped, summed,
divided by the batch size), relative max error, at a clip norm that clips about half the batch and
at one that clips none; and the per-sample gradients where the mode keeps them (`grad_sample`).
Tolerance {TOLERANCE:g}. *Empty Poisson batch*: one step on a batch of 0 examples, which Poisson
sampling draws with probability (1-q)^n per step and which must still be a noise-only step.

{bench.table(["workload", "mode", "error, clip ~median norm", "error, no clipping", "per-sample grads error", "empty Poisson batch", "correct"], correctness_rows)}

{bench.table(["workload", "client data", "training", "ms per epoch", "vs non-private", "make_private ms", "load"], timing_rows)}

{chr(10).join(verdicts)}
{chr(10).join(notes)}
"""
    print(text)
    if args.profile:
        profile_block = run_profile(workloads, args, seed)
    else:  # keep the last profile (it says which command made it)
        profile_block = _block(old_body, PROFILE_START, PROFILE_END)
    text = text.rstrip("\n") + "\n\n" + profile_block + "\n\n" + notes_block
    if args.no_write:
        print(f"(not written: {len(text)} characters, profile block {len(profile_block)}, notes {len(notes_block)})")
    else:
        bench.write_section("dpsgd_cost", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
