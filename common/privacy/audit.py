"""Empirical privacy auditing: a measured LOWER bound on epsilon from canaries in one run.

The accountant's epsilon is an upper bound that holds only if the code does what the proof
assumes. An audit attacks the real run: canaries (records the auditor chose) are inserted
independently with probability 1/2, the released outputs are scored for each canary, and a
guess of which canaries were inserted that is right too often disproves every epsilon below
the bound computed here. A lower bound above the ledger's epsilon means the mechanism (or
its accounting) is broken. Everything here is numpy/scipy math; scipy is imported only when
a bound is computed.

**One-run bound** (Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training
run", NeurIPS 2023, arXiv 2305.08846). m canaries, S_i in {in, out} independent fair coins;
the auditor looks at the output and guesses r of them (abstaining on the rest), v correct.
Theorem 3.1 (pure DP): if the mechanism is epsilon-DP in each canary, the number of correct
guesses W is stochastically dominated by Binomial(r, p), p = e^eps / (1 + e^eps), so
P[W >= v] <= P[Bin(r, p) >= v]. Theorem 5.2 (approximate DP, the form of their Appendix D
algorithm) adds the delta term:

    P[W >= v] <= beta + 2 m delta alpha,   beta = P[Bin(r, p) >= v],
    alpha = max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i.

:func:`one_run_p_value` is that right-hand side (capped at 1); :func:`one_run_epsilon` is the
largest epsilon whose p-value is still below the significance 1 - confidence: with that
confidence the mechanism is NOT (eps', delta)-DP for any eps' below it. Worked numbers, from
Theorem 3.1 alone (delta = 0): r guesses all correct give the closed form
eps = log(b / (1 - b)), b = significance^(1/r); r = 100 at 95% gives 3.4930 (tests/test_audit.py
checks the implementation against it and against a term-by-term evaluation of the sums).

The guesses: the canaries are ranked by score, the top k are guessed "in" and (two-sided
games) the bottom k "out". Which k to use is chosen after seeing the scores, so the bound is
taken over a FIXED grid of games (k = 1, 2, 4, ..., one- and two-sided, times the number of
score statistics tried) with the significance split evenly between them (Bonferroni): the
confidence statement holds for the maximum. Canaries with a NaN score are never guessed.

**Gaussian-fit estimate** (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot
empirical privacy estimation for federated learning", ICLR 2024, arXiv 2302.03098). Canary
CLIENTS send a random unit direction c_i (isotropic, so for d parameters the cosine of a
canary that never touched the model with any released vector is ~N(0, 1/d): their Section 3);
the statistic is the cosine between the released model change and c_i: for the final model
cos(theta_T - theta_0, c_i), and for the "all iterates" adversary (our release: every round's
model) max_t cos(theta_t - theta_{t-1}, c_i). Their estimator fits a Gaussian to the
inserted canaries' statistics and one to the held-out ones and reports the epsilon at delta
of that pair of Gaussians (for the Gaussian mechanism the cosines are asymptotically such a
pair with EQUAL variances, their Theorem 3.2). :func:`gaussian_fit_estimate` uses the pooled
variance, i.e. the Gaussian mechanism with mu = (mean_in - mean_out) / s_pooled: with a few
hundred canaries the two fitted variances differ by sampling noise alone, and unequal
variances make epsilon at small delta jump (std ratio 1.05 alone gives 0.72 at delta 1e-5).
:func:`two_gaussians_epsilon` handles unequal variances exactly (the privacy-loss region of
two normals is bounded by the roots of a quadratic). It is an ESTIMATE (no confidence
statement): reported beside the bound, never as it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

DIRECTION_BLOCK = 64  # canary directions generated (and scored) this many at a time


# --- canaries: the auditor's own choice, derived from its key ------------------------------------


def _generator(key: bytes, purpose: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(key + f"|{purpose}|{index}".encode()).digest()
    return np.random.default_rng(np.random.SeedSequence(list(np.frombuffer(digest, dtype="<u4"))))


def canary_included(key: bytes, index: int) -> bool:
    """Whether canary ``index`` is inserted: a fair coin per canary, from the audit key."""
    return bool(hashlib.sha256(key + f"|included|{index}".encode()).digest()[0] & 1)


def canary_direction(key: bytes, index: int, dimension: int) -> np.ndarray:
    """Canary ``index``'s unit direction in R^dimension (isotropic: a normalised Gaussian vector)."""
    vector = _generator(key, "direction", index).standard_normal(dimension)
    return vector / np.linalg.norm(vector)


def canary_examples(key: bytes, count: int, num_features: int, num_classes: int, low: float, high: float):
    """``count`` out-of-distribution canary examples: inputs uniform in [low, high]^features and a
    random label each (float32 inputs, int64 labels), canary i always the same for a key."""
    x = np.empty((count, num_features), dtype=np.float32)
    y = np.empty(count, dtype=np.int64)
    for i in range(count):
        rng = _generator(key, "example", i)
        x[i] = rng.uniform(low, high, num_features)
        y[i] = rng.integers(num_classes)
    return x, y


def cosine_scores(key: bytes, count: int, changes: np.ndarray) -> np.ndarray:
    """cos(change_t, c_i) for every canary i (rows) and every change t (columns).

    ``changes``: (T, d) released model changes, flattened in the model's array order. A zero
    change has cosine 0 with everything.
    """
    changes = np.atleast_2d(np.asarray(changes, dtype=np.float64))
    norms = np.linalg.norm(changes, axis=1)
    unit = np.divide(changes, norms[:, None], out=np.zeros_like(changes), where=norms[:, None] > 0)
    scores = np.empty((count, len(changes)))
    for start in range(0, count, DIRECTION_BLOCK):
        block = range(start, min(count, start + DIRECTION_BLOCK))
        directions = np.stack([canary_direction(key, i, changes.shape[1]) for i in block])
        scores[start : start + len(block)] = directions @ unit.T
    return scores


# --- the one-run bound ----------------------------------------------------------------------------


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v of r guesses correct] bound if the mechanism is (epsilon, delta)-DP in each of m
    canaries (Steinke et al. 2023, Theorem 5.2 / Appendix D; see the module docstring)."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    beta = float(binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    window = binom.cdf(v - 1, r, p) - binom.cdf(v - i - 1, r, p)  # P[v - i <= Bin < v]
    alpha = float(np.max(window / i))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest epsilon that r guesses with v correct reject at ``significance`` (0 if none)."""
    from scipy.optimize import brentq

    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")

    def excess(epsilon: float) -> float:  # > 0: (epsilon, delta)-DP is rejected
        return significance - one_run_p_value(m, r, v, epsilon, delta)

    if v == 0 or excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        if high > 1e3:  # every epsilon rejected: only if the p-value bound were 0
            return math.inf
        high *= 2
    return float(brentq(excess, high / 2 if excess(high / 2) > 0 else 0.0, high, xtol=1e-9))


@dataclass(frozen=True)
class GuessingGame:
    """The best game of the grid: its bound and what it guessed."""

    epsilon: float  # lower bound at the stated confidence (0: nothing rejected)
    guesses: int  # r
    correct: int  # v
    guessed_in: int  # k+
    guessed_out: int  # k-
    games: int  # how many games the significance was split over (incl. other statistics)

    def to_dict(self) -> dict:
        return asdict(self)


def guess_counts(scored: int) -> list[int]:
    """k = 1, 2, 4, ... up to the number of canaries that can be guessed (and that number)."""
    counts, k = [], 1
    while k < scored:
        counts.append(k)
        k *= 2
    if scored:
        counts.append(scored)
    return counts


def games_for(scored: int) -> list[tuple[int, int]]:
    """The fixed grid of (k+, k-): top k guessed in, and top k in + bottom k out while 2k fits."""
    return [(k, 0) for k in guess_counts(scored)] + [(k, k) for k in guess_counts(scored // 2)]


def one_run_lower_bound(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95, statistics: int = 1
) -> GuessingGame:
    """The one-run lower bound on epsilon from one score per canary (higher: more likely inserted).

    NaN scores abstain. ``statistics``: how many score statistics the caller tries in all (each
    with this function); the significance is split over all their games, so the maximum of the
    returned bounds holds at ``confidence``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    scored = np.flatnonzero(~np.isnan(scores))
    order = scored[np.argsort(-scores[scored], kind="stable")]  # best first
    games = games_for(len(order))
    total = max(1, len(games)) * statistics
    significance = (1.0 - confidence) / total
    best = GuessingGame(0.0, 0, 0, 0, 0, total)
    for k_in, k_out in games:
        guessed_in, guessed_out = order[:k_in], order[len(order) - k_out:] if k_out else order[:0]
        correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
        r = k_in + k_out
        if correct <= r * 0.5:
            continue  # no better than chance: rejects nothing
        epsilon = one_run_epsilon(m, r, correct, delta, significance)
        if epsilon > best.epsilon:
            best = GuessingGame(epsilon, r, correct, k_in, k_out, total)
    return best


def perfect_guess_bound(m: int, delta: float, confidence: float = 0.95, statistics: int = 1,
                        inserted: int | None = None) -> float:
    """The largest bound m canaries (``inserted`` of them inserted, default half) can give: scores
    that rank every inserted canary above every held-out one."""
    included = np.zeros(m, dtype=bool)
    included[: m // 2 if inserted is None else inserted] = True
    return one_run_lower_bound(-np.arange(m, dtype=float), included, delta, confidence, statistics).epsilon


# --- the Gaussian-fit estimate ---------------------------------------------------------------------


def _hockey_stick(epsilon: float, mean_p: float, std_p: float, mean_q: float, std_q: float) -> float:
    """sup_A P(A) - e^eps Q(A) for P = N(mean_p, std_p^2), Q = N(mean_q, std_q^2).

    A = {x : log p(x) - log q(x) > eps} = {a2 x^2 + a1 x + a0 > 0}.
    """
    from scipy.stats import norm

    a2 = 0.5 / std_q**2 - 0.5 / std_p**2
    a1 = mean_p / std_p**2 - mean_q / std_q**2
    a0 = 0.5 * mean_q**2 / std_q**2 - 0.5 * mean_p**2 / std_p**2 + math.log(std_q / std_p) - epsilon

    def mass(mean: float, std: float, intervals: list[tuple[float, float]]) -> float:
        return sum(float(norm.cdf((hi - mean) / std) - norm.cdf((lo - mean) / std)) for lo, hi in intervals)

    inf = math.inf
    if abs(a2) < 1e-12 * max(abs(a1), 1e-300):  # equal variances: a half-line
        if a1 == 0:
            intervals = [(-inf, inf)] if a0 > 0 else []
        else:
            root = -a0 / a1
            intervals = [(root, inf)] if a1 > 0 else [(-inf, root)]
    else:
        disc = a1 * a1 - 4 * a2 * a0
        if disc <= 0:
            intervals = [(-inf, inf)] if a2 > 0 else []
        else:
            lo, hi = sorted(((-a1 - math.sqrt(disc)) / (2 * a2), (-a1 + math.sqrt(disc)) / (2 * a2)))
            intervals = [(-inf, lo), (hi, inf)] if a2 > 0 else [(lo, hi)]
    if not intervals:
        return 0.0
    p_mass, q_mass = mass(mean_p, std_p, intervals), mass(mean_q, std_q, intervals)
    return max(0.0, p_mass - math.exp(epsilon) * q_mass) if q_mass > 0 else p_mass


def two_gaussians_delta(epsilon: float, mean_out: float, std_out: float, mean_in: float, std_in: float) -> float:
    """delta(epsilon) of the pair N(mean_out, std_out^2), N(mean_in, std_in^2), both directions."""
    return max(
        _hockey_stick(epsilon, mean_in, std_in, mean_out, std_out),
        _hockey_stick(epsilon, mean_out, std_out, mean_in, std_in),
    )


def two_gaussians_epsilon(mean_out: float, std_out: float, mean_in: float, std_in: float, delta: float) -> float:
    """The smallest epsilon >= 0 with delta(epsilon) <= delta for that pair of Gaussians.

    Equal standard deviations s give the Gaussian mechanism with mu = |mean_in - mean_out| / s
    (Balle and Wang 2018: delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)).
    """
    from scipy.optimize import brentq

    if not (std_out > 0 and std_in > 0):
        return math.inf if mean_in != mean_out else 0.0

    def excess(epsilon: float) -> float:
        return two_gaussians_delta(epsilon, mean_out, std_out, mean_in, std_in) - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
        if high > 1e4:
            return math.inf
    return float(brentq(excess, 0.0, high, xtol=1e-9))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """epsilon at delta of the Gaussian mechanism with sensitivity/noise ratio mu (N(0,1) vs N(mu,1))."""
    return two_gaussians_epsilon(0.0, 1.0, abs(mu), 1.0, delta)


def gaussian_fit_estimate(in_scores: np.ndarray, out_scores: np.ndarray, delta: float) -> dict:
    """Andrew et al.'s estimate from inserted (``in``) and held-out (``out``) canary statistics."""
    in_scores = np.asarray(in_scores, dtype=np.float64)
    out_scores = np.asarray(out_scores, dtype=np.float64)
    in_scores, out_scores = in_scores[~np.isnan(in_scores)], out_scores[~np.isnan(out_scores)]
    if len(in_scores) < 2 or len(out_scores) < 2:
        return {"epsilon_estimate": None, "inserted": _stats(in_scores), "held_out": _stats(out_scores)}
    pooled = math.sqrt(
        ((len(in_scores) - 1) * in_scores.var(ddof=1) + (len(out_scores) - 1) * out_scores.var(ddof=1))
        / (len(in_scores) + len(out_scores) - 2)
    )
    mu = (float(in_scores.mean()) - float(out_scores.mean())) / pooled if pooled > 0 else math.inf
    return {
        # one-sided, like the attack: inserted canaries scoring LOWER is no evidence of leakage
        "epsilon_estimate": (gaussian_epsilon(mu, delta) if mu > 0 else 0.0) if math.isfinite(mu) else math.inf,
        "mu": mu,
        "inserted": _stats(in_scores),
        "held_out": _stats(out_scores),
        "auc": auc(in_scores, out_scores),
    }


def auc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P[an inserted canary scores above a held-out one] (ties count half)."""
    in_scores, out_scores = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if not len(in_scores) or not len(out_scores):
        return float("nan")
    both = np.concatenate([in_scores, out_scores])
    ranks = _average_ranks(both)
    return float((ranks[: len(in_scores)].sum() - len(in_scores) * (len(in_scores) + 1) / 2)
                 / (len(in_scores) * len(out_scores)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _stats(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {"n": 0, "mean": None, "std": None}
    return {"n": int(len(values)), "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
