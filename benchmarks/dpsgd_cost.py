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

    .venv/bin/python benchmarks/dpsgd_cost.py
    .venv/bin/python benchmarks/dpsgd_cost.py --repeats 5 --epochs 2     # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import logging
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def _load_bench_common():
    """benchmarks/common.py, loaded by path (an installed package ships a top-level `benchmarks`,
    and the app's own package is `common`)."""
    import importlib.util

    if "bench_common" in sys.modules:
        return sys.modules["bench_common"]
    spec = importlib.util.spec_from_file_location("bench_common", Path(__file__).with_name("common.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench_common()

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


# ----------------------------------------------------------------------------- timing


def time_nonprivate(config: RunConfig, data, nf: int, nc: int, epochs: int, seed: int) -> float:
    """Per-epoch seconds of one ``train_locally`` run of ``epochs`` epochs."""
    cfg = dataclasses.replace(config, local_epochs=epochs)
    model = build_model(config.model, nf, nc, seed=seed)
    t = time.perf_counter()
    train_locally(model, data.x_train, data.y_train, cfg, 0.0, seed)
    return (time.perf_counter() - t) / epochs


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
    for _ in range(epochs):
        for xb, yb in private_loader:
            optimizer.zero_grad()
            loss = loss_fn(private_model(xb), yb)
            loss.backward()
            optimizer.step()
            float(loss.item())
    t2 = time.perf_counter()
    engine.accountant.get_epsilon(config.target_delta)  # what train_dpsgd reports after training
    t3 = time.perf_counter()
    return (t2 - t1) / epochs, t1 - t0, t3 - t2


def time_app_call(config: RunConfig, data, nf: int, nc: int, repeats: int, seed: int) -> list[float]:
    """client_app.dpsgd.train_dpsgd as the ClientApp calls it (hooks, local-epochs epochs, accountant)."""
    from client_app.dpsgd import train_dpsgd

    calls = []
    for r in range(repeats):
        model = build_model(config.model, nf, nc, seed=seed)
        t = time.perf_counter()
        train_dpsgd(model, data.x_train, data.y_train, config, [], seed + r)
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


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timed repeat")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--max-wait", type=float, default=600.0)
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
    for name, overrides in WORKLOADS.items():
        config = app_config(overrides | {"dp": "dpsgd", "noise-multiplier": 1.0, "clipping-norm": 1.0})
        data, nf, nc = client_data(config)
        n = len(data.y_train)
        base = build_model(config.model, nf, nc, seed=seed)
        x = torch.from_numpy(data.x_train[: config.batch_size])
        y = torch.from_numpy(data.y_train[: config.batch_size])
        _, norms, _ = reference(copy.deepcopy(base), x, y, 1.0)
        clip_half = float(norms.median())
        clip_none = float(norms.max()) * 2
        correct = {}
        for mode in modes:
            try:
                errors = [check_mode(mode, base, x, y, c) for c in (clip_half, clip_none)]
                worst_mean = max(e[0] for e in errors)
                worst_ps = max((e[1] for e in errors), default=float("nan"))
                ok = worst_mean <= TOLERANCE and (np.isnan(worst_ps) or worst_ps <= TOLERANCE)
                correct[mode] = ok
                correctness_rows.append([name, mode, f"{errors[0][0]:.1e}", f"{errors[1][0]:.1e}",
                                         "not materialised" if np.isnan(worst_ps) else f"{worst_ps:.1e}",
                                         "yes" if ok else "NO"])
            except Exception as error:  # noqa: BLE001 - a mode that fails is a result
                correct[mode] = False
                message = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:160]
                correctness_rows.append([name, mode, "fails", "fails", "", f"NO ({message})"])
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
        results = {v: (bench.median(epoch_times[v]), bench.median(setups[v]))
                   for v in variants[1:] if v not in failed and epoch_times[v]}
        load_after = bench.load1()
        timing_rows.append([name, f"{n} train examples, {max(1, n // config.batch_size)} steps/epoch",
                            "non-private (`train_locally`)", f"{base_epoch * 1e3:.1f}", "1.00x", "", f"{load:.1f} / {load_after:.1f}"])
        for mode, (epoch, setup) in results.items():
            timing_rows.append([name, "", f"DP-SGD `{mode}`", f"{epoch * 1e3:.1f}", f"{epoch / base_epoch:.2f}x",
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
            fastest = min(results, key=lambda m: results[m][0])
            ratio = results[fastest][0] / base_epoch
            hooks = results.get("hooks", (float("nan"),))[0]
            verdicts.append(
                f"- {name}: fastest correct mode `{fastest}` at {ratio:.2f}x non-private per epoch "
                f"({'meets' if ratio <= 2 else 'misses'} the 2x goal"
                + ("" if ratio <= 2 else f" by {ratio / 2:.2f}x") + f"); `hooks` (the app's) {hooks / base_epoch:.2f}x."
            )
        print("\n".join(verdicts[-1:]), flush=True)

    text = f"""{bench.machine()}

One client (partition 0 of the default 10-client IID split; 80% of it trains), batch 16, SGD lr 0.1
momentum 0.9, one torch thread (as the ClientApp); DP-SGD as `client_app/dpsgd.py` trains: Poisson
batches, noise multiplier 1, clip norm 1. Per-epoch time = median over {args.repeats} repeats of
{args.epochs} epochs (the `make_private` set-up is timed apart). `load` = 1-minute load before / after.

```bash
{bench.command_line()}
```

Correctness (before timing): one batch of 16, noise multiplier 0; the clipped, averaged gradient
each mode applies, against a per-example reference (one autograd call per example, clipped, summed,
divided by the batch size), relative max error, at a clip norm that clips about half the batch and
at one that clips none; and the per-sample gradients where the mode keeps them (`grad_sample`).
Tolerance {TOLERANCE:g}.

{bench.table(["workload", "mode", "error, clip ~median norm", "error, no clipping", "per-sample grads error", "correct"], correctness_rows)}

{bench.table(["workload", "client data", "training", "ms per epoch", "vs non-private", "make_private ms", "load"], timing_rows)}

{chr(10).join(verdicts)}
{chr(10).join(notes)}
"""
    print(text)
    if not args.no_write:
        bench.write_section("dpsgd_cost", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
