#!/usr/bin/env python3
"""Issue 15.3, "DP-SGD on small clients": where federated DP-SGD's plateau on digits came from, and the recipe.

    .venv/bin/python benchmarks/dpsgd_recipe.py              # the recipe through the real apps: 3 seeds, epsilon 3 and 8
    .venv/bin/python benchmarks/dpsgd_recipe.py --study      # the factor table (emulated, below), one seed
    .venv/bin/python benchmarks/dpsgd_recipe.py --quick      # a check: 2 rounds of each

Digits, 10 IID clients (~144 examples each), val-fraction 0, sample-level (epsilon, 1e-5).
The default runs the real ServerApp and ClientApp in this process (``tests/inprocess.run_inprocess``, no Ray).
``--study`` emulates the same federation, all 10 clients at once (torch.func per-example gradients), with the
arithmetic of client_app/dpsgd.py: ceil(n/B) Poisson batches an epoch at q = 1/ceil(n/B) from SecretRandom,
every per-example gradient clipped to C, N(0, (sigma C)^2) noise from SecretRandom, the sum divided by Opacus's
expected batch int(n q), plain SGD (momentum as torch's), sigma from the app's ``noise_for``, then the server's
unweighted mean (a dpsgd client reports one example). It can also clip without noise (sigma 0, "clip only"),
which the app refuses. Prints markdown; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # inprocess.py

from client_app.dpsgd import noise_for, sampling_per_epoch  # noqa: E402
from common.config import NodeConfig  # noqa: E402
from common.data.client_data import central_test_set, load_client_data  # noqa: E402
from common.evaluation import evaluate  # noqa: E402
from common.models import build_model  # noqa: E402
from common.privacy.secret_random import SecretRandom  # noqa: E402
from fl_dp.run_config import validate  # noqa: E402

CLIENTS = 10
OLD = dict(model="mlp", rounds=60, epochs=1, batch=16, lr=0.2, clip=0.5, momentum=0.0)  # issue 3's tuned recipe
RECIPE = dict(model="logreg", rounds=20, epochs=2, batch=144, lr=4.0, clip=1.0, momentum=0.0)
STUDY = [  # (factor, changes to OLD): one factor at a time, then the logistic-regression recipes
    ("old recipe", {}), ("no clipping (no noise)", dict(clip=1e6)), ("learning rate", dict(lr=0.1)), ("learning rate", dict(lr=0.5)),
    ("clip (same lr x C)", dict(lr=0.05, clip=2.0)), ("momentum", dict(lr=0.02, momentum=0.9)),
    ("local epochs", dict(rounds=20, epochs=3)), ("batch (+lr)", dict(rounds=20, batch=48, lr=0.5)),
    ("full batch (mlp)", dict(rounds=40, batch=144, lr=1.0, clip=1.0)), ("model", dict(model="logreg")),
    ("logreg, README example", dict(model="logreg", rounds=20, batch=48, lr=1.0, clip=1.0)),
    ("logreg lr", dict(model="logreg", rounds=20, batch=48, lr=2.0, clip=1.0)),
    ("logreg lr", dict(model="logreg", rounds=20, batch=48, lr=4.0, clip=1.0)),
    ("logreg rounds", dict(model="logreg", rounds=40, batch=48, lr=1.0, clip=1.0)),
    ("logreg rounds", dict(model="logreg", rounds=80, batch=48, lr=1.0, clip=1.0)),
    ("logreg clip", dict(model="logreg", rounds=40, batch=48, lr=4.0, clip=0.5)),
    ("logreg clip", dict(model="logreg", rounds=40, batch=48, lr=1.0, clip=2.0)),
    ("logreg clip", dict(model="logreg", rounds=40, batch=48, lr=0.5, clip=4.0)),
    ("logreg momentum", dict(model="logreg", rounds=40, batch=48, lr=0.2, clip=1.0, momentum=0.9)),
    ("logreg local epochs", dict(model="logreg", rounds=20, batch=48, lr=2.0, clip=1.0, epochs=3)),
    ("logreg batch", dict(model="logreg", rounds=40, batch=16, lr=1.0, clip=1.0)),
    ("logreg batch", dict(model="logreg", rounds=40, batch=72, lr=2.0, clip=1.0)),
    ("logreg batch = client", dict(RECIPE, rounds=40, epochs=1)),
    ("logreg batch = client, 2 local epochs (recipe)", {**RECIPE}),
]


def run_config(s: dict, seed: int, epsilon: float, output_dir: str = "") -> dict:
    """The app's run config for settings ``s`` (epsilon 0: dp='none')."""
    config = {"dataset": "digits", "partitioner": "iid", "seed": seed, "val-fraction": 0.0, "model": s["model"],
              "num-server-rounds": s["rounds"], "local-epochs": s["epochs"], "batch-size": s["batch"],
              "learning-rate": float(s["lr"]), "clipping-norm": float(s["clip"]), "momentum": float(s["momentum"]),
              "clients-per-round": 1.0, "dp": "dpsgd" if epsilon else "none"}
    if epsilon:
        config["target-epsilon"] = float(epsilon)
    return config | ({"output-dir": output_dir} if output_dir else {})


def emulate(s: dict, seed: int, epsilon: float, clip_only: bool = False) -> tuple[float, torch.nn.Module]:
    """The emulated federation's final central accuracy and model (module docstring); ``clip_only``: sigma 0."""
    config = validate(run_config(s, seed, epsilon))
    data = [load_client_data(config, NodeConfig.from_node_config({"partition-id": i, "num-partitions": CLIENTS}),
                             64, 10) for i in range(CLIENTS)]
    test = central_test_set(config)
    model = build_model(config.model, 64, 10, seed=seed)
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    glob = {k: p.detach().clone() for k, p in model.named_parameters()}

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per_example = vmap(vmap(grad(loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))  # clients x examples
    n = [len(d.y_train) for d in data]
    sample_rates, batches = zip(*[sampling_per_epoch(k, config.batch_size) for k in n])
    assert len(set(batches)) == 1, "clients with different step counts"
    expected = torch.tensor([int(k * r) for k, r in zip(n, sample_rates)], dtype=torch.float32)[:, None]
    std = torch.tensor([0.0 if clip_only else noise_for(config, k) for k in n])[:, None] * config.clipping_norm
    x = torch.stack([torch.nn.functional.pad(torch.from_numpy(d.x_train), (0, 0, 0, max(n) - k)) for d, k in zip(data, n)])
    y = torch.stack([torch.nn.functional.pad(torch.from_numpy(d.y_train), (0, max(n) - k)) for d, k in zip(data, n)])
    rng, steps, c = SecretRandom(), batches[0] * config.local_epochs, config.clipping_norm
    for _ in range(config.num_server_rounds):
        p = {k: v.expand(CLIENTS, *v.shape).clone() for k, v in glob.items()}
        buf = None
        coins = np.stack([np.pad(rng.bernoulli(r, (steps, k)), ((0, 0), (0, max(n) - k))) for r, k in zip(sample_rates, n)])
        noise = torch.from_numpy(rng.gaussian((steps, CLIENTS, sum(sizes)), 1.0)).float()
        for t in range(steps):
            width = max(1, int(coins[:, t].sum(1).max()))
            index, mask = np.zeros((CLIENTS, width), dtype=np.int64), np.zeros((CLIENTS, width), dtype=np.float32)
            for i in range(CLIENTS):
                rows = np.flatnonzero(coins[i, t])
                index[i, :len(rows)], mask[i, :len(rows)] = rows, 1.0
            index = torch.from_numpy(index)
            g = per_example(p, torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[2])), torch.gather(y, 1, index))
            norms = torch.sqrt(sum((g[k].flatten(2) ** 2).sum(2) for k in names))
            scale = (c / (norms + 1e-6)).clamp(max=1.0) * torch.from_numpy(mask)  # Opacus's clip factor
            summed = torch.cat([torch.einsum("ke,ke...->k...", scale, g[k]).flatten(1) for k in names], 1)
            step = (summed + noise[t] * std) / expected
            buf = step if buf is None or not config.momentum else config.momentum * buf + step
            p = {k: p[k] - config.learning_rate * part.view_as(p[k]) for k, part in zip(names, buf.split(sizes, 1))}
        glob = {k: p[k].mean(0) for k in names}
    model.load_state_dict(glob)
    return evaluate(model, test.x, test.y)[1], model


def real_run(s: dict, seed: int, epsilon: float, output_dir: Path) -> dict:
    """The real ServerApp and ClientApp in this process; the run's summary.json."""
    import contextlib
    import json

    from inprocess import run_inprocess

    out = output_dir / f"eps{epsilon:g}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as log, contextlib.redirect_stdout(log):  # the apps' progress lines
        run_inprocess(run_config(s, seed, epsilon, str(out)), CLIENTS)
    return json.loads((out / "summary.json").read_text())


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}%"
    return f"{100 * statistics.mean(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"


def _settings(s: dict) -> str:
    return f"{s['model']} {s['rounds']}x{s['epochs']}, batch {s['batch']}, lr {s['lr']:g}, C {s['clip']:g}, m {s['momentum']:g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="store_true", help="the emulated factor table instead of the real runs")
    parser.add_argument("--seeds", default="", help="comma-separated (default: 42 for --study, 42,43,44 otherwise)")
    parser.add_argument("--quick", action="store_true", help="a check: 2 rounds of each")
    parser.add_argument("--output-dir", default="", help="real runs (default ./outputs/dpsgd-recipe-<time>)")
    args = parser.parse_args(argv)
    seeds = [int(v) for v in (args.seeds or ("42" if args.study else "42,43,44")).split(",")]
    torch.set_num_threads(1)
    started = time.monotonic()
    if args.study:
        print("| factor | setting | eps 3 | eps 8 | clip only (sigma 0) |\n|---|---|---|---|---|")
        for factor, changes in STUDY:
            s = dict(OLD, **changes) | ({"rounds": 2} if args.quick else {})
            epsilons = (0.0,) if s["clip"] >= 1e6 else (3.0, 8.0, 0.0)  # no clipping: no finite noise
            cells = [[emulate(s, seed, eps, clip_only=eps == 0)[0] for seed in seeds] if eps in epsilons else []
                     for eps in (3.0, 8.0, 0.0)]
            print(f"| {factor} | {_settings(s)} | " + " | ".join(_pct(c) for c in cells) + " |", flush=True)
    else:
        out = Path(args.output_dir or REPO / "outputs" / time.strftime("dpsgd-recipe-%Y%m%d-%H%M%S"))
        s = dict(RECIPE, **({"rounds": 2} if args.quick else {}))
        print(f"recipe: {_settings(s)}\n\n| epsilon target | final accuracy, mean (min-max) over seeds {seeds} "
              "| sample epsilon reached (max over clients and seeds) | noise multiplier |\n|---|---|---|---|")
        for eps in (3.0, 8.0, 0.0):
            runs = [real_run(s, seed, eps, out) for seed in seeds]
            accuracy = _pct([r["final_central_accuracy"] for r in runs])
            if not eps:
                print(f"| none (dp='none') | {accuracy} | - | - |", flush=True)
                continue
            reached = max(r["sample_epsilon_max"] for r in runs)
            print(f"| {eps:g} | {accuracy} | {reached:.3f} | {runs[0]['noise_multiplier']:.3f} |", flush=True)
    print(f"\n{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
