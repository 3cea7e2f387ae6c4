"""Read a user's own data file (CSV or NPZ) and say exactly what is wrong with a bad one.

CSV: a header row, one column named ``label`` (integer classes 0..K-1), every other
column a numeric feature. NPZ: arrays ``x`` (n, features) and ``y`` (n,).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

LABEL_COLUMN = "label"


class DataFileError(ValueError):
    """A data file is missing, empty, or not in the expected layout."""


def load_table(path: str, key: str = "data-path") -> tuple[np.ndarray, np.ndarray]:
    """Return (x float32 (n, d), y int64 (n,)) from a CSV or NPZ file."""
    if not os.path.isfile(path):
        raise DataFileError(f"{key} = {path!r}: no such file")
    if path.endswith(".npz"):
        x, y = _read_npz(path, key)
    elif path.endswith(".csv"):
        x, y = _read_csv(path, key)
    else:
        raise DataFileError(f"{key} = {path!r}: unknown file type; use a .csv or .npz file")
    return _check(path, key, x, y)


def _read_npz(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        missing = [name for name in ("x", "y") if name not in npz.files]
        if missing:
            raise DataFileError(
                f"{key} = {path!r}: NPZ lacks array(s) {missing}; it has {npz.files}, "
                "expected 'x' (n, features) and 'y' (n,)"
            )
        return np.asarray(npz["x"]), np.asarray(npz["y"])


def _read_csv(path: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    if LABEL_COLUMN not in header:
        raise DataFileError(
            f"{key} = {path!r}: no {LABEL_COLUMN!r} column in the header {header}; "
            f"name the class column {LABEL_COLUMN!r}"
        )
    try:
        with warnings.catch_warnings():  # an empty file is reported below, not as a warning
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as error:
        raise DataFileError(f"{key} = {path!r}: not all values are numbers ({error})") from None
    if table.shape[0] == 0:
        raise DataFileError(f"{key} = {path!r}: the file has a header but no rows")
    if table.shape[1] != len(header):
        raise DataFileError(
            f"{key} = {path!r}: rows have {table.shape[1]} values but the header has {len(header)}"
        )
    label_index = header.index(LABEL_COLUMN)
    return np.delete(table, label_index, axis=1), table[:, label_index]


def _check(path: str, key: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataFileError(
            f"{key} = {path!r}: expected features (n, d) and labels (n,), got {x.shape} and {y.shape}"
        )
    if y.shape[0] == 0:
        raise DataFileError(f"{key} = {path!r}: the file holds no examples")
    if not np.all(np.isfinite(x)):
        raise DataFileError(f"{key} = {path!r}: features contain NaN or infinite values")
    if not np.all(np.mod(y, 1) == 0) or y.min() < 0:
        raise DataFileError(f"{key} = {path!r}: labels must be whole numbers >= 0, got e.g. {y[:5]}")
    return x.astype(np.float32), y.astype(np.int64)


def save_table(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write a file :func:`load_table` reads back (used by tests and deployment demos)."""
    if path.endswith(".npz"):
        np.savez(path, x=x, y=y)
        return
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + [LABEL_COLUMN])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
