"""Feature standardisation for users' own tables, fitted on the server's held-out data only.

Why: users bring tables whose columns differ in scale by orders of magnitude (an income next
to an age). Plain SGD on such features diverges or collapses to one class; standardised, the
same data trains well. Users do not preprocess, so the app does it for ``dataset = 'file'``.

How: the server fits the per-feature mean and standard deviation on ITS OWN held-out data
(``central-data-path``, or the held-out split of ``dataset-path``) once at start, uses them for
its central evaluation, and sends them to every client with each round's instructions; every
client maps its features to ``(x - mean) / std`` before training. A constant column keeps
scale 1.

Privacy: no statistic of any client's data is computed or sent, so nothing here leaks a
client's data, and each client's training stays a function of its own examples and a fixed
transform: the sensitivity that user-level clipping and DP-SGD's per-example clipping bound is
unchanged. The server's held-out data is the server's own (no guarantee covers it); its mean
and standard deviation are disclosed to the clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureScaling:
    shift: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def fit(cls, x: np.ndarray) -> "FeatureScaling":
        values = np.asarray(x, dtype=np.float64)
        mean = values.mean(axis=0)
        std = values.std(axis=0)
        std[~(std > 0) | ~np.isfinite(std)] = 1.0
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def apply(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] != len(self.shift):
            raise ValueError(f"{x.shape[1]} features, but the scaling was fitted on {len(self.shift)}")
        shift = np.asarray(self.shift, dtype=np.float64)
        scale = np.asarray(self.scale, dtype=np.float64)
        return ((np.asarray(x, dtype=np.float64) - shift) / scale).astype(np.float32)
