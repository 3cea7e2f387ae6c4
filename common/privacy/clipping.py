"""Clipping, deltas and Gaussian noise on model updates, for user-level DP-FedAvg.

A model (or a model update) is a ``dict[str, np.ndarray]`` keyed like a torch ``state_dict``
and like the server's Flower ``ArrayRecord``; every function here takes and returns that
form. Convert at the edges with :func:`arrays_from_record` / :func:`record_from_arrays`.

Norms are computed in float64 over all arrays at once (one global L2 norm, the "flat
clipping" of McMahan et al. 2018), and results keep each input array's dtype.

Why not Flower's helpers (``flwr.supercore.differential_privacy``): they compute
``min(1, C / norm)`` and so raise ``ZeroDivisionError`` on an all-zero update (a client
that did not move, e.g. zero learning rate or an empty partition). :func:`clip_update`
only divides when ``norm > C > 0``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import ArrayRecord

    from common.privacy.secret_random import SecretRandom

Arrays = dict[str, np.ndarray]


def _check_same_keys(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], what: str) -> None:
    if list(a.keys()) != list(b.keys()):
        missing = sorted(set(b) - set(a))
        extra = sorted(set(a) - set(b))
        raise ValueError(f"{what}: array names differ (missing {missing}, extra {extra}, or order)")
    for key in a:
        if np.shape(a[key]) != np.shape(b[key]):
            raise ValueError(f"{what}: shape of {key!r} differs: {np.shape(a[key])} vs {np.shape(b[key])}")


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """Floating arrays keep their dtype; integer/bool buffers become float64 in a delta."""
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over all arrays of ``delta`` (as if flattened and concatenated)."""
    total = 0.0
    for array in delta.values():
        flat = np.asarray(array, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_update(delta: Mapping[str, np.ndarray], clipping_norm: float) -> tuple[Arrays, float, int]:
    """Scale ``delta`` to L2 norm at most ``clipping_norm``.

    Returns ``(clipped, norm, unclipped_bit)``: ``norm`` is the norm BEFORE clipping and
    ``unclipped_bit`` is 1 when ``norm <= clipping_norm`` (the update is returned unchanged),
    0 when it was scaled down. That bit is what adaptive clipping (Andrew et al. 2021) counts.
    A zero update stays zero with bit 1; nothing is divided by zero. The input is not modified.

    An update with a NaN/inf entry raises ``ValueError``: it cannot be clipped meaningfully.
    (A server may instead treat that client as sending a zero update, which is within the
    sensitivity bound.)
    """
    clipping_norm = float(clipping_norm)
    if not (math.isfinite(clipping_norm) and clipping_norm > 0.0):
        raise ValueError(f"clipping_norm must be positive and finite, got {clipping_norm}")
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("update has a non-finite entry (NaN or inf); refusing to clip it")
    if norm <= clipping_norm:
        return {k: np.array(v, copy=True) for k, v in delta.items()}, norm, 1
    scale = clipping_norm / norm  # norm > clipping_norm > 0 here
    clipped = {}
    for key, value in delta.items():
        value = np.asarray(value)
        dtype = _float_dtype(value.dtype)
        clipped[key] = (value.astype(np.float64) * scale).astype(dtype)
    return clipped, norm, 0


def model_delta(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> Arrays:
    """``new - old`` per array (computed in float64, returned in the float dtype of ``new``)."""
    _check_same_keys(new, old, "model_delta")
    out = {}
    for key in new:
        a, b = np.asarray(new[key]), np.asarray(old[key])
        out[key] = (a.astype(np.float64) - b.astype(np.float64)).astype(_float_dtype(a.dtype))
    return out


def apply_delta(old: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Arrays:
    """``old + delta`` per array, in the dtype of ``old`` (integer buffers are rounded)."""
    _check_same_keys(delta, old, "apply_delta")
    out = {}
    for key in old:
        a = np.asarray(old[key])
        summed = a.astype(np.float64) + np.asarray(delta[key], dtype=np.float64)
        if not np.issubdtype(a.dtype, np.floating):
            summed = np.rint(summed)
        out[key] = summed.astype(a.dtype)
    return out


def gaussian_noise_like(delta: Mapping[str, np.ndarray], std: float, rng: "SecretRandom") -> Arrays:
    """Independent N(0, std^2) noise with the names, shapes and float dtypes of ``delta``.

    For DP-FedAvg over a fixed denominator m: ``std = z * C / m`` added to the mean update.
    ``rng`` is the server's secret CSPRNG (:class:`common.privacy.secret_random.SecretRandom`):
    noise an observer could regenerate (e.g. from the public seed) could be subtracted.
    """
    std = float(std)
    if not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"std must be non-negative and finite, got {std}")
    return {
        key: rng.gaussian(np.shape(value), std).astype(_float_dtype(np.asarray(value).dtype))
        for key, value in delta.items()
    }


def fixed_denominator_mean(updates: Sequence[Mapping[str, np.ndarray]], denominator: float) -> Arrays:
    """Unweighted sum of (already clipped) updates divided by a FIXED ``denominator``.

    With the denominator set to the EXPECTED number of sampled clients m (not the number of
    replies, not example counts), one client changes the result by at most C/m (add/remove)
    or 2C/m (replace-one), which is what noise ``z * C / m`` is calibrated for. An
    example-weighted mean (Flower's FedAvg) does not have that bound.
    """
    if not updates:
        raise ValueError("no updates to average")
    denominator = float(denominator)
    if not (math.isfinite(denominator) and denominator > 0.0):
        raise ValueError(f"denominator must be positive, got {denominator}")
    first = updates[0]
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in first.items()}
    for update in updates:
        _check_same_keys(update, first, "fixed_denominator_mean")
        for key in total:
            total[key] += np.asarray(update[key], dtype=np.float64)
    return {k: (v / denominator).astype(_float_dtype(np.asarray(first[k]).dtype)) for k, v in total.items()}


def arrays_from_record(record: "ArrayRecord") -> Arrays:
    """Flower ``ArrayRecord`` -> ``dict[str, np.ndarray]`` (same names and order)."""
    return {key: array.numpy() for key, array in record.items()}


def record_from_arrays(arrays: Mapping[str, np.ndarray]) -> "ArrayRecord":
    """``dict[str, np.ndarray]`` -> Flower ``ArrayRecord`` (same names and order)."""
    from flwr.app import Array, ArrayRecord

    # np.asarray(order="C") keeps 0-d buffers 0-d (np.ascontiguousarray would make them 1-d)
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in arrays.items()})
