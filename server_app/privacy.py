"""The server's side of differential privacy: sampling, noise calibration and the ledger.

Built once, when the clients are connected (the population size N enters the accounting):

* ``none``: no privacy; fixed-size sampling of ``clients-per-round``.
* ``server`` / ``client``: user-level DP-FedAvg (:mod:`server_app.user_level_dp`), accounted
  by :class:`common.privacy.accounting.UserLevelLedger` with the sampling the server really
  does (``sampling``: Poisson with rate q = m/N, fixed m of N, or all N every round).
* ``dpsgd`` / ``local``: the clients privatise their own updates and keep their own ledgers;
  the server collects the epsilons they report.

User-level modes draw every random bit their guarantee rests on (client sampling, update
noise, adaptive-clipping count noise) from one :class:`SecretRandom` keyed from the OS's
entropy on the server, never from ``seed``. ``debug-noise-key`` replaces that key with one
the operator chose (reproducible noise for debugging) and the guarantee says there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from common.config import ConfigError, RunConfig
from common.privacy.adaptive_clipping import AdaptiveClipping
from common.privacy.secret_random import SecretRandom
from server_app.dp_strategy import UserLevelDPStrategy
from server_app.sampling import ClientSampler, EveryoneSampler, PoissonSampler, Sampler, SeededChoices
from server_app.user_level_dp import UserLevelDP

if TYPE_CHECKING:
    from common.privacy.accounting import UserLevelLedger


@dataclass
class PrivacyPlan:
    """How the server samples clients and, in user-level modes, privatises their updates."""

    sampler: Sampler
    expected_clients: float
    noise_multiplier: float | None = None
    ledger: UserLevelLedger | None = None
    mechanism: UserLevelDP | None = None  # clip, fixed-denominator mean, Gaussian noise
    secret: SecretRandom | None = None  # the server's CSPRNG (user-level modes); checkpointed 0600
    # Fixed-size DP sampling is accounted as m of this many clients: never sample from fewer.
    population: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def insecure(self) -> bool:
        """True when the noise is reproducible from an operator-chosen debug key: no guarantee."""
        return self.secret is not None and self.secret.debug

    def wrap(self, strategy: Strategy) -> Strategy:
        """The strategy the round loop drives: in user-level modes ``strategy`` behind the DP wrapper."""
        if self.mechanism is None or self.ledger is None:
            return strategy
        return UserLevelDPStrategy(strategy, self.mechanism, self.ledger)


def expected_clients_per_round(config: RunConfig, num_clients: int) -> int:
    if config.sampling == "all" and config.privacy.server_noise:
        return num_clients
    return ClientSampler(config.clients_per_round, SeededChoices(0)).sample_size(num_clients)


# Byzantine-robust aggregators need enough honest replies to outvote f = num-malicious-nodes.
MIN_CLIENTS_FOR = {"krum": (2, 3), "multikrum": (2, 3), "bulyan": (4, 3)}  # n >= a*f + b


def check_robust_quorum(config: RunConfig, clients_per_round: int) -> None:
    if config.strategy not in MIN_CLIENTS_FOR:
        return
    a, b = MIN_CLIENTS_FOR[config.strategy]
    needed = a * config.num_malicious_nodes + b
    if clients_per_round < needed:
        raise ConfigError(
            f"strategy = {config.strategy!r} with num-malicious-nodes = {config.num_malicious_nodes} needs at least "
            f"{a}*{config.num_malicious_nodes}+{b} = {needed} clients per round, but the round has {clients_per_round}; "
            "lower num-malicious-nodes or sample more clients (clients-per-round, more clients)"
        )


def plan_privacy(config: RunConfig, num_clients: int) -> PrivacyPlan:
    """Choose sampling, solve or take the noise multiplier, and open the ledger."""
    m = expected_clients_per_round(config, num_clients)
    check_robust_quorum(config, m)
    if not config.privacy.server_noise:
        # Client-side mechanisms: the server's sampling adds no guarantee of its own.
        sampler: Sampler = (
            EveryoneSampler() if config.sampling == "all" else ClientSampler(config.clients_per_round, SeededChoices(config.seed))
        )
        return PrivacyPlan(sampler, m)

    # Imported here: dp-accounting (and scipy) cost ~0.8 s of start-up, only needed with user-level DP.
    from common.privacy.accounting import UserLevelLedger
    from common.privacy.calibration import solve_noise_multiplier

    secret = SecretRandom.from_debug_key(config.debug_noise_key) if config.debug_noise_key else SecretRandom()
    if config.debug_noise_key:
        log(WARNING, "debug-noise-key is set: the DP noise and sampling are reproducible from it; NO privacy guarantee")
    if config.sampling == "poisson":
        sampler = PoissonSampler(m / num_clients, secret)
    elif config.sampling == "fixed":
        sampler = ClientSampler(m, secret)
    else:
        sampler = EveryoneSampler()

    z = config.noise_multiplier
    if config.target_epsilon:
        z = solve_noise_multiplier(
            config.target_epsilon,
            config.target_delta,
            config.num_server_rounds,
            config.sampling,
            num_clients,
            m,
            config.accountant,
        )
        log(
            INFO,
            "Calibrated noise multiplier z = %.4f for epsilon <= %.3f (delta %g) after %d rounds "
            "(%s sampling, %d of %d clients, %s accountant)",
            z, config.target_epsilon, config.target_delta, config.num_server_rounds,
            config.sampling, m, num_clients, config.accountant,
        )
    adaptive = None
    if config.clipping == "adaptive":
        adaptive = AdaptiveClipping(
            initial_clipping_norm=config.clipping_norm,
            target_unclipped_quantile=config.adaptive_target_quantile,
            learning_rate=config.adaptive_clip_lr,
            count_noise_std=config.adaptive_count_stddev or None,
        )
    if adaptive is not None and z >= 2 * adaptive.count_noise_std_for(m):
        raise ConfigError(
            f"noise-multiplier = {z:.4g} is too large for adaptive clipping with {m} clients per round: "
            f"it must stay below 2 * adaptive-count-stddev = {2 * adaptive.count_noise_std_for(m):.4g} "
            f"(the default stddev is clients per round / 20). Raise adaptive-count-stddev, sample more "
            "clients per round, lower the noise, or use clipping = 'fixed'"
        )
    mechanism = UserLevelDP(
        noise_multiplier=z,
        clipping_norm=config.clipping_norm,
        expected_clients=m,
        clip_on_server=not config.privacy.client_clips,
        rng=secret,
        adaptive=adaptive,
    )
    ledger = UserLevelLedger(z, config.sampling, num_clients, m, config.target_delta, config.accountant)
    population = num_clients if config.sampling == "fixed" else 0
    return PrivacyPlan(sampler, m, z, ledger, mechanism, secret, population)


USER_LEVEL_RELEASE = (
    "released: the global model after every round, metrics on the server's own held-out data, "
    "the ledger (epsilon, delta, noise multiplier) and the clip norm (adaptive clipping moves it by the noisy "
    "clipped count only); not released: exact counts of replies, clipped, rejected or failed clients "
    "(operator-only diagnostics.jsonl) and per-client metrics"
)
CLIENT_RELEASE = (
    "released by each client: its noised model updates and its own epsilon and noise multiplier; "
    "it answers no evaluation request in a DP mode; not released by the server: exact counts "
    "(operator-only diagnostics.jsonl)"
)
NO_GUARANTEE = "NO privacy guarantee: {who} set a debug-noise-key, so the noise can be regenerated from it. "


def guarantee_sentence(config: RunConfig, plan: PrivacyPlan | None, rounds: int, epsilon: float | None,
                       sample_epsilon: float | None, debug_clients: bool = False) -> str:
    """One sentence a reader can quote: what is protected, how strongly, under which assumptions,
    and exactly what was released."""
    if not config.privacy.private:
        return "No differential privacy: dp = 'none'."
    if rounds == 0:
        return "No round ran, so no model update was released (epsilon 0)."
    if config.privacy.server_noise:
        assert plan is not None and plan.ledger is not None, "user-level modes always have a plan with a ledger"
        described = plan.ledger.describe()
        clip = "adaptive" if config.clipping == "adaptive" else f"fixed at {config.clipping_norm}"
        where = "each client" if config.privacy.client_clips else "the server"
        warning = NO_GUARANTEE.format(who="the server") if plan.insecure else ""
        return warning + (
            f"The released global models of all {rounds} rounds satisfy ({epsilon:.3f}, {config.target_delta:g})-DP "
            f"at the user level (neighbouring datasets differ in all data of one client, "
            f"{described['neighbouring_relation']}; the adversary sees everything released, the server is trusted), "
            f"by the Gaussian mechanism on updates clipped by {where} "
            f"(L2 norm {clip}) with noise multiplier {plan.noise_multiplier:.4f} over a fixed denominator of "
            f"{plan.expected_clients} clients, {config.sampling} sampling of clients (rate {described['sample_rate']:.4g}), "
            f"noise and sampling drawn from a CSPRNG keyed from the server's OS entropy, "
            f"accounted with dp-accounting's {config.accountant.upper()} accountant; {USER_LEVEL_RELEASE}."
        )
    warning = NO_GUARANTEE.format(who="a client") if debug_clients else ""
    if config.dp == "dpsgd":
        eps = "n/a" if sample_epsilon is None else f"{sample_epsilon:.3f}"
        return warning + (
            f"Each client's model updates over all rounds it trained in satisfy ({eps}, {config.target_delta:g})-DP "
            f"at the sample level (one example added or removed from that client's data; the maximum over clients; "
            f"the adversary is everyone else, the server included), "
            f"by DP-SGD with Poisson-sampled batches and per-example clipping at {config.clipping_norm}, "
            f"batches and noise drawn from each client's own CSPRNG, each client enforcing its own policy "
            f"(epsilon cap, minimum noise, maximum delta), "
            f"accounted with Opacus's RDP accountant across rounds; local dataset sizes are treated as public; "
            f"{CLIENT_RELEASE}."
        )
    eps = "n/a" if epsilon is None else f"{epsilon:.3f}"
    return warning + (
        f"Each client's released updates over all rounds it took part in satisfy ({eps}, {config.target_delta:g})-local DP "
        f"(any two updates of that client are neighbours; the maximum over clients), by the {config.local_mechanism} "
        f"mechanism each client applies itself after clipping to {config.clipping_norm}, with noise from its own "
        f"CSPRNG, composed over every release (a repeated request included) with dp-accounting; each client "
        f"enforces its own policy, so no one else needs to be trusted; {CLIENT_RELEASE}."
    )


def privacy_columns(config: RunConfig, plan: PrivacyPlan | None) -> dict:
    """The columns that are the same in every round's row: what the epsilon means."""
    if not config.privacy.private or plan is None:
        return {"delta": None, "accountant": None, "sampling": config.sampling, "neighbouring_relation": None}
    if plan.ledger is not None:
        described = plan.ledger.describe()
        return {
            "delta": config.target_delta,
            "accountant": f"dp-accounting {described['accountant']}",
            "sampling": config.sampling,
            "neighbouring_relation": f"user-level, {described['neighbouring_relation']}",
        }
    if config.dp == "dpsgd":
        return {
            "delta": config.target_delta,
            "accountant": "opacus rdp (per client, cumulative)",
            "sampling": "poisson (examples within each client)",
            "neighbouring_relation": "sample-level, add/remove one example",
        }
    return {
        "delta": config.target_delta,
        "accountant": f"dp-accounting {'rdp' if config.local_mechanism == 'gaussian' else 'pld'} (per client)",
        "sampling": "none (local randomizer)",
        "neighbouring_relation": "local, any two updates of one client",
    }
