#!/usr/bin/env python3
"""Where does user-level DP-FedAvg lose accuracy on MNIST-1D? (issue 15, item 1)

A minimal plain-torch DP-FedAvg loop (Poisson sampling of clients, each trains locally, the
server clips every delta to C, sums, divides by the FIXED expected count m, adds N(0, (zC/m)^2)
per coordinate, then steps) in which each factor can be swapped, one at a time, for the app's
own function:

    data     plain: mnist1d's generator, own shuffle and split | app: RunConfig + common.data
             (central_split, IID partitions) | std: app data, standardised (fit on the test split)
    model    app: common.models CNN1D (32 channels) | c16 / c8: the same class, fewer channels |
             plain: MNIST-1D's own CNN (stride 2 from the first layer) with GroupNorm
    local    plain: SGD (shuffle, batches, p -= lr * grad), all clients at once with vmap | app: client_app.training.train_locally
    mech     plain: flat vector, clip, sum / m, torch noise | app: server_app.user_level_dp.UserLevelDP
             (SecretRandom noise)
    server   plain: w += lr * noisy mean | app: the strategy's aggregate_train (server_app.strategies)

and the whole app in process (``--inprocess``: tests/inprocess.run_inprocess, the real
ServerApp and ClientApp, no Ray) for the reference. The noise multiplier is solved with the
app's calibration (common.privacy.calibration) for the target epsilon unless ``--z`` is given.

    .venv/bin/python benchmarks/dp_gap_mnist1d.py --rounds 50 --seeds 1 2 3 --set data=app model=app
    .venv/bin/python benchmarks/dp_gap_mnist1d.py --rounds 50 --inprocess
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # inprocess.py
torch.set_num_threads(1)

DEFAULTS = {"data": "app", "model": "app", "local": "plain", "mech": "plain", "server": "plain"}


def app_config(args, seed: int, **extra):
    from common.config import RunConfig

    return RunConfig.from_run_config({
        "dataset": "mnist1d", "model": "cnn1d", "dataset-samples": args.samples, "val-fraction": 0.0,
        "local-epochs": 1, "batch-size": args.batch_size, "learning-rate": args.lr, "momentum": 0.0, "seed": seed,
        **extra})


def load_data(kind: str, args, seed: int):
    """[(x_i, y_i) for each client], (x_test, y_test)."""
    if kind == "plain":
        from mnist1d.data import get_dataset_args, make_dataset

        from common.data.cache import cached_arrays

        def generate():
            a = get_dataset_args()
            a.num_samples, a.seed = args.samples, seed
            d = make_dataset(a)
            return {"x": np.concatenate([d["x"], d["x_test"]]).astype(np.float32),
                    "y": np.concatenate([d["y"], d["y_test"]]).astype(np.int64)}

        d = cached_arrays(f"bench-plain-mnist1d|{args.samples}|{seed}", generate)
        x, y = d["x"], d["y"]
        order = np.random.default_rng(seed).permutation(len(y))
        n_test = len(y) // 5
        test, pool = order[:n_test], order[n_test:]
        per = len(pool) // args.num_clients
        clients = [(x[pool[i * per:(i + 1) * per]], y[pool[i * per:(i + 1) * per]]) for i in range(args.num_clients)]
        return clients, (x[test], y[test])
    from common.config import NodeConfig
    from common.data.client_data import central_test_set, load_client_data

    config = app_config(args, seed)
    test = central_test_set(config)
    clients = []
    for i in range(args.num_clients):
        c = load_client_data(config, NodeConfig(i, args.num_clients), 40, 10)
        clients.append((c.x_train, c.y_train))
    tx, ty = test.x, test.y
    if kind == "std":
        from common.data.scaling import FeatureScaling

        s = FeatureScaling.fit(tx)
        clients = [(s.apply(x), y) for x, y in clients]
        tx = s.apply(tx)
    return clients, (tx, ty)


class PlainCNN(nn.Module):
    """MNIST-1D's own CNN (Greydanus 2020, ``ConvBase``: 25 channels, kernels 5/3/3, stride 2, padding 1, a
    linear head on 25 x 5) with GroupNorm after each convolution: the plain loop's model."""

    def __init__(self, channels: int = 25):
        super().__init__()
        layers, width = [], 1
        for kernel in (5, 3, 3):
            layers += [nn.Conv1d(width, channels, kernel, stride=2, padding=1), nn.GroupNorm(5, channels), nn.ReLU()]
            width = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 5, 10)

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


def build(kind: str, seed: int) -> nn.Module:
    from common.models import CNN1D, build_model

    if kind == "app":
        return build_model("cnn1d", 40, 10, seed=seed)
    torch.manual_seed(seed)
    if kind == "plain":
        return PlainCNN()
    if kind.startswith("pool"):  # CNN1D's features, global average pooling, a linear head on the channels
        model = CNN1D(40, 10, channels=int(kind[4:] or 32))
        width = model.head.in_features // 10
        model.features.append(nn.AdaptiveAvgPool1d(1))
        model.head = nn.Linear(width, 10)
        return model
    return CNN1D(40, 10, channels=int(kind[1:]))


def plain_local_all(model, glob: dict, data: list, args, gens) -> list[dict]:
    """Plain SGD (shuffle, mini-batches, p -= lr * grad) on every sampled client at once (torch.func.vmap:
    the same arithmetic as a loop over clients, ~20x faster); every client holds the same number of examples."""
    from torch.func import functional_call, grad, vmap

    def loss(params, xb, yb):
        return nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    step = vmap(grad(loss))
    k, n = len(data), len(data[0][1])
    xs = torch.from_numpy(np.stack([x for x, _ in data]))
    ys = torch.from_numpy(np.stack([y for _, y in data]))
    order = torch.from_numpy(np.stack([g.permutation(n) for g in gens]))
    params = {name: v.unsqueeze(0).repeat(k, *([1] * v.dim())) for name, v in glob.items()}
    rows = torch.arange(k)[:, None]
    for start in range(0, n, args.batch_size):
        b = order[:, start:start + args.batch_size]
        grads = step(params, xs[rows, b], ys[rows, b])
        params = {name: params[name] - args.lr * grads[name] for name in params}
    return [{name: (params[name][i] - glob[name]).numpy().astype(np.float32) for name in glob} for i in range(k)]


def accuracy(model, test) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(test[0])).argmax(1) == torch.from_numpy(test[1])).float().mean())


def run_plain(args, f: dict, seed: int, z: float) -> float:
    from common.privacy.secret_random import SecretRandom
    from server_app.user_level_dp import UserLevelDP

    clients, test = load_data(f["data"], args, seed)
    model = build(f["model"], seed)
    names = [k for k, _ in model.named_parameters()]
    m = args.num_clients * args.q
    rng = np.random.default_rng(seed + 1000)
    noise_gen = torch.Generator().manual_seed(seed + 2000)
    config = app_config(args, seed, strategy=args.strategy, **{"server-learning-rate": args.server_lr})
    adaptive = None
    if args.adaptive:
        from common.privacy.adaptive_clipping import AdaptiveClipping

        adaptive = AdaptiveClipping(args.clip, args.quantile)
    mech = UserLevelDP(z, args.clip, m, True, SecretRandom(), adaptive) if f["mech"] == "app" or adaptive else None
    strategy = None
    if f["server"] == "app":
        from server_app.strategies import build_strategy

        strategy = build_strategy(config, federated_evaluation=False)
    for rnd in range(1, args.rounds + 1):
        glob = {k: v.detach().clone() for k, v in model.named_parameters()}
        chosen = np.flatnonzero(rng.random(args.num_clients) < args.q)
        deltas = []
        if f["local"] == "plain" and len(chosen):
            gens = [np.random.default_rng([seed, rnd, int(i)]) for i in chosen]
            deltas = plain_local_all(model, glob, [clients[i] for i in chosen], args, gens)
        for i in chosen if f["local"] == "app" else []:
            from client_app.training import train_locally

            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(glob[k])
            x, y = clients[i]
            train_locally(model, x, y, config, 0.0, seed * 100003 + rnd * 1009 + int(i))
            deltas.append({k: (p.detach() - glob[k]).numpy().astype(np.float32) for k, p in model.named_parameters()})
        g_np = {k: v.numpy() for k, v in glob.items()}
        if mech is not None:
            new, _ = mech.aggregate(g_np, [{k: g_np[k] + d[k] for k in names} for d in deltas])
            step = {k: new[k].astype(np.float64) - g_np[k] for k in names}
        else:
            total = torch.zeros(sum(v.numel() for v in glob.values()), dtype=torch.float64)
            for d in deltas:
                flat = torch.cat([torch.from_numpy(d[k]).double().ravel() for k in names])
                total += flat * min(1.0, args.clip / max(float(flat.norm()), 1e-12))
            noisy = total / m + torch.randn(total.shape, generator=noise_gen, dtype=torch.float64) * z * args.clip / m
            step, at = {}, 0
            for k in names:
                n = glob[k].numel()
                step[k] = noisy[at:at + n].reshape(glob[k].shape).numpy()
                at += n
        if strategy is not None:
            new = strategy_step(strategy, rnd, g_np, step)
        else:
            new = {k: g_np[k] + args.server_lr * step[k] for k in names}
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(new[k], dtype=np.float32)))
        if args.verbose and rnd % 10 == 0:
            print(f"  round {rnd}: {accuracy(model, test):.3f}", flush=True)
    return accuracy(model, test)


def strategy_step(strategy, rnd: int, glob: dict, step: dict) -> dict:
    """The app's server step on the noisy mean, as server_app/federation.py's _private_step does it."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.common import MessageType

    from common.privacy.clipping import arrays_from_record, record_from_arrays
    from server_app.sampling import OfferedNodes

    record = record_from_arrays({k: v.astype(np.float32) for k, v in glob.items()})
    list(strategy.configure_train(rnd, record, ConfigRecord(), OfferedNodes([])))  # keeps the current model
    noisy = {k: (glob[k] + step[k]).astype(np.float32) for k in glob}
    reply = Message(RecordDict({"arrays": record_from_arrays(noisy), "metrics": MetricRecord({"num-examples": 1})}),
                    dst_node_id=0, message_type=MessageType.TRAIN)
    stepped, _ = strategy.aggregate_train(rnd, [reply])
    return arrays_from_record(stepped)


def run_inprocess_app(args, seed: int, extra: dict) -> float:
    from inprocess import run_inprocess

    with tempfile.TemporaryDirectory() as out:
        overrides = {"dataset": "mnist1d", "model": "cnn1d", "dataset-samples": args.samples, "val-fraction": 0.0,
                     "fraction-evaluate": 0.0, "num-server-rounds": args.rounds,
                     "clients-per-round": int(round(args.num_clients * args.q)), "local-epochs": 1,
                     "batch-size": args.batch_size, "learning-rate": args.lr, "momentum": 0.0,
                     "strategy": args.strategy, "seed": seed, "output-dir": out, "identify-clients": False,
                     "server-learning-rate": args.server_lr}
        if args.adaptive:
            overrides |= {"clipping": "adaptive", "adaptive-target-quantile": args.quantile}
        if args.epsilon:
            overrides |= {"dp": "server", "sampling": "poisson", "clipping-norm": args.clip,
                          "target-epsilon": args.epsilon, "target-delta": 1e-5}
        overrides |= extra
        run_inprocess(overrides, num_clients=args.num_clients)
        return json.loads((Path(out) / "summary.json").read_text())["final_central_accuracy"]


def solve_z(args) -> float:
    if args.z is not None:
        return args.z
    if not args.epsilon:
        return 0.0
    from common.privacy.calibration import solve_noise_multiplier

    m = int(round(args.num_clients * args.q))
    return solve_noise_multiplier(args.epsilon, 1e-5, args.rounds, "poisson", args.num_clients, m, "rdp")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clients", type=int, default=1000)
    p.add_argument("--q", type=float, default=0.05, help="Poisson rate (expected m = q * N)")
    p.add_argument("--samples", type=int, default=60000)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--epsilon", type=float, default=4.0, help="0: non-private (no clipping, no noise)")
    p.add_argument("--z", type=float, default=None, help="noise multiplier (default: solved for --epsilon)")
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--adaptive", action="store_true", help="adaptive clipping (the app's; --clip is the initial C)")
    p.add_argument("--quantile", type=float, default=0.5, help="adaptive clipping's target unclipped quantile")
    p.add_argument("--strategy", default="fedavg", help="server=app / --inprocess: the app's strategy")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--set", nargs="*", default=[], help="factor=choice, e.g. data=plain model=c16 mech=app")
    p.add_argument("--inprocess", action="store_true", help="the whole app in process instead of the loop")
    p.add_argument("--run-config", nargs="*", default=[], help="--inprocess: extra key=json-value overrides")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    factors = DEFAULTS | dict(kv.split("=", 1) for kv in args.set)
    z = solve_z(args)
    if not args.epsilon and args.z is None:
        args.clip = 1e9  # non-private: nothing is clipped, no noise
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.run_config)}
    label = "app in process " + json.dumps(extra) if args.inprocess else " ".join(f"{k}={v}" for k, v in factors.items())
    results = []
    for seed in args.seeds:
        started = time.monotonic()
        if args.inprocess:
            acc = run_inprocess_app(args, seed, extra)
        else:
            from flower_messages import task_identity

            with task_identity():  # Flower's Message needs it (server_app's strategy step)
                acc = run_plain(args, factors, seed, z)
        results.append(acc)
        print(f"seed {seed}: {acc:.4f} ({time.monotonic() - started:.0f}s) [{label}; eps {args.epsilon} z {z:.4f} "
              f"C {args.clip:g} rounds {args.rounds}]", flush=True)
    spread = statistics.stdev(results) if len(results) > 1 else 0.0
    adaptive = f" adaptive q={args.quantile:g}" if args.adaptive else ""
    print(f"RESULT {label} eps={args.epsilon} z={z:.4f} C={args.clip:g} rounds={args.rounds} strategy={args.strategy} "
          f"server_lr={args.server_lr}{adaptive} q={args.q:g}: mean {100 * statistics.mean(results):.1f}% "
          f"sd {100 * spread:.1f} min {100 * min(results):.1f} max {100 * max(results):.1f} n={len(results)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
