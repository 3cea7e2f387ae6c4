"""Local DP ledger: a client that trusts no one noises its own update before sending it.

Why: in ``local`` mode nobody else adds noise or clips, so the client's guarantee is exactly
the mechanism it runs itself, composed over every round it releases an update. The noise the
client adds and the epsilon it reports must come from the same (C, z): client code calls
``gaussian_noise_std`` / ``laplace_noise_scale`` and the ledger accounts the same numbers.

Mechanism per release: clip the update to norm C (L2 for Gaussian, L1 for Laplace), add noise
(Gaussian std sigma = z*C per coordinate, or Laplace scale b = z*C per coordinate).
Neighbouring relation: any two possible updates of THIS client (its whole data replaced), so
the L2 (resp. L1) sensitivity is 2C -- the distance between two points of the C-ball.
Sampling: none. A round the client sits out releases nothing and is not stepped; a round it
takes part in is a full release (the receiver knows who sent, so no amplification).
Accountant: the per-round event is GaussianDpEvent(sigma / 2C = z/2) or
LaplaceDpEvent(b / 2C = z/2), i.e. the mechanism with its sensitivity made explicit. It is fed
to dp_accounting under NeighborRel.ADD_OR_REMOVE_ONE, whose formulas for these events are
"output shifted by one sensitivity" -- exactly our 2C shift; this is not a claim that the local
relation is add/remove. Epsilon comes from RDP or PLD composition, valid for ANY epsilon (the
classic sigma = sqrt(2 ln(1.25/delta)) * sensitivity / eps bound that Flower's LocalDpMod uses
holds only for eps < 1 and is never composed over rounds). Laplace is pure 2/z-DP per round;
its composition over rounds is reported with PLD at ``delta`` by default (tighter than T*2/z).
"""

from __future__ import annotations

from typing import Any

from dp_accounting import dp_event

from common.privacy.composition import ComposedLedger, NeighborRel, check_noise_multiplier

MECHANISMS = ("gaussian", "laplace")


def _check_clip(clip_norm: float) -> float:
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not (
        0.0 < float(clip_norm) < float("inf")
    ):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    return float(clip_norm)


def gaussian_noise_std(clip_norm: float, noise_multiplier: float) -> float:
    """Per-coordinate Gaussian std the client adds after L2-clipping to ``clip_norm``: z*C."""
    return check_noise_multiplier(noise_multiplier) * _check_clip(clip_norm)


def laplace_noise_scale(clip_norm: float, noise_multiplier: float) -> float:
    """Per-coordinate Laplace scale b the client adds after L1-clipping to ``clip_norm``: z*C."""
    return check_noise_multiplier(noise_multiplier) * _check_clip(clip_norm)


def laplace_noise_multiplier(epsilon_per_round: float) -> float:
    """Laplace z giving pure ``epsilon_per_round``-DP per release: eps = 2C/b = 2/z, so z = 2/eps."""
    eps = float(epsilon_per_round)
    if not (0.0 < eps < float("inf")):
        raise ValueError(f"epsilon_per_round must be a finite number > 0, got {epsilon_per_round!r}")
    return 2.0 / eps


class LocalDpLedger(ComposedLedger):
    """Cumulative local-DP epsilon of one client over the rounds it released a noised update."""

    _relation = NeighborRel.ADD_OR_REMOVE_ONE  # "shift by one sensitivity" formulas; see module doc

    def __init__(
        self,
        mechanism: str,
        noise_multiplier: float,
        delta: float,
        accountant: str | None = None,
    ) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        self.mechanism = mechanism
        if accountant is None:
            accountant = "rdp" if mechanism == "gaussian" else "pld"
        super().__init__(noise_multiplier, delta, accountant)

    def _event(self, z: float) -> dp_event.DpEvent:
        # Sensitivity 2C (replace this client's update by any other), noise z*C: ratio z/2.
        if self.mechanism == "gaussian":
            return dp_event.GaussianDpEvent(z / 2.0)
        return dp_event.LaplaceDpEvent(z / 2.0)

    def _event_gaussian_z(self, z: float) -> float | None:
        return z / 2.0 if self.mechanism == "gaussian" else None

    def _params(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "accountant": self.accountant,
        }

    def pure_epsilon_per_round(self) -> float | None:
        """Laplace only: the pure-DP epsilon of one release, 2C/b = 2/z (inf at z=0)."""
        if self.mechanism != "laplace":
            return None
        return float("inf") if self.noise_multiplier == 0.0 else 2.0 / self.noise_multiplier

    def describe(self) -> dict[str, Any]:
        """What the epsilon means: accountant, mechanism, relation, z, delta (for logs/metrics)."""
        norm = "L2" if self.mechanism == "gaussian" else "L1"
        return {
            "accountant": self.accountant,
            "sampling": "none",
            "neighbouring_relation": "replace-one-update (any two updates of this client)",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": 1.0,
            "delta": self.delta,
            "level": "local",
            "mechanism": f"{self.mechanism} (client clips to {norm} norm C, adds noise z*C; "
            f"sensitivity 2C)",
            "rounds": self.rounds,
        }
