"""Strategy registry: a name from the run config -> a Flower 1.41 Message-API strategy.

Client sampling is done by the round loop (:mod:`server_app.sampling`), which hands each
strategy exactly the nodes chosen for the round; so every strategy is built to take all
the nodes it is offered (fraction 1.0, no minimum of its own).
"""

from __future__ import annotations

from typing import Callable

from flwr.serverapp import strategy as fl

from common.config import RunConfig
from common.names import STRATEGIES

# Every strategy takes whatever nodes the sampler offers it.
_TAKE_OFFERED = dict(min_train_nodes=0, min_evaluate_nodes=0, min_available_nodes=0)


def _fedopt(cls):
    def build(c: RunConfig, **kw):
        return cls(eta=c.server_learning_rate, eta_l=c.learning_rate, tau=c.server_tau, **kw)

    return build


def _adaptive_moments(cls):
    def build(c: RunConfig, **kw):
        return cls(
            eta=c.server_learning_rate,
            eta_l=c.learning_rate,
            tau=c.server_tau,
            beta_1=c.server_beta_1,
            beta_2=c.server_beta_2,
            **kw,
        )

    return build


BUILDERS: dict[str, Callable[..., fl.Strategy]] = {
    "fedavg": lambda c, **kw: fl.FedAvg(**kw),
    "fedavgm": lambda c, **kw: fl.FedAvgM(
        server_learning_rate=c.server_learning_rate, server_momentum=c.server_momentum, **kw
    ),
    "fedprox": lambda c, **kw: fl.FedProx(proximal_mu=c.proximal_mu, **kw),
    "fedadam": _adaptive_moments(fl.FedAdam),
    "fedyogi": _adaptive_moments(fl.FedYogi),
    "fedadagrad": _fedopt(fl.FedAdagrad),
    "fedmedian": lambda c, **kw: fl.FedMedian(**kw),
    "fedtrimmedavg": lambda c, **kw: fl.FedTrimmedAvg(beta=c.trim_beta, **kw),
    "krum": lambda c, **kw: fl.Krum(num_malicious_nodes=c.num_malicious_nodes, **kw),
    "multikrum": lambda c, **kw: fl.MultiKrum(
        num_malicious_nodes=c.num_malicious_nodes, num_nodes_to_select=c.num_nodes_to_select, **kw
    ),
    "bulyan": lambda c, **kw: fl.Bulyan(num_malicious_nodes=c.num_malicious_nodes, **kw),
    "qfedavg": lambda c, **kw: fl.QFedAvg(client_learning_rate=c.learning_rate, q=c.qfedavg_q, **kw),
}
assert tuple(BUILDERS) == STRATEGIES, "the registry and common.names.STRATEGIES must list the same names"


def build_strategy(config: RunConfig, federated_evaluation: bool = True) -> fl.Strategy:
    return BUILDERS[config.strategy](
        config,
        fraction_train=1.0,
        fraction_evaluate=1.0 if federated_evaluation else 0.0,
        **_TAKE_OFFERED,
    )
