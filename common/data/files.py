"""Read a user's own data file (CSV or NPZ) and say exactly what is wrong with a bad one.

CSV: UTF-8 text, comma-separated, a header row, one column named ``label`` (integer classes
0..K-1), every other column a numeric feature; blank lines are skipped. NPZ: arrays ``x``
(n, features) and ``y`` (n,), numeric, saved with ``numpy.savez``.

Why so many checks: a bad file used to get through (values beyond float32's range trained to
NaN, a label of 1e20 wrapped to a negative index, a second ``label`` column became a feature)
or fail with a library's exception that named no file. Every problem is now one
:class:`DataFileError` line naming the file, the line/column (CSV) or index (NPZ) where it
applies, and what to change. The CSV is parsed by numpy's fast reader; only when that fails is
the file scanned line by line to say where and why.
"""

from __future__ import annotations

import csv
import os
import zipfile
from typing import Callable

import numpy as np

LABEL_COLUMN = "label"
# Labels are class indices; anything above this is a mistake, and int64 casts stay exact below it.
LABEL_LIMIT = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
NPZ_MAGIC, NPY_MAGIC = b"PK\x03\x04", b"\x93NUMPY"
SAVE_NPZ = "save it with numpy.savez(path, x=features, y=labels)"
Locate = Callable[[int, "int | None"], str]  # (row, feature column or None for the label) -> where


class DataFileError(ValueError):
    """A data file is missing, empty, or not in the expected layout."""


def load_table(path: str, key: str = "data-path") -> tuple[np.ndarray, np.ndarray]:
    """Return (x float32 (n, d), y int64 (n,)) from a CSV or NPZ file."""
    where = f"{key} = {path!r}"
    _check_file(path, where)
    if not path.endswith((".csv", ".npz")):
        raise DataFileError(f"{where}: unknown file type; use a .csv or .npz file")
    if os.path.getsize(path) == 0:
        raise DataFileError(f"{where}: the file is empty (0 bytes); it needs a header row and data (CSV) or arrays x, y (NPZ)")
    if path.endswith(".npz"):
        x, y, locate = _read_npz(path, where)
    else:
        x, y, locate = _read_csv(path, where)
    return _check(where, x, y, locate)


def _check_file(path: str, where: str) -> None:
    if os.path.isdir(path):
        raise DataFileError(f"{where}: is a directory, not a file; give the path of the CSV or NPZ file itself")
    if not os.path.exists(path):
        raise DataFileError(f"{where}: no such file")
    if not os.path.isfile(path):
        raise DataFileError(f"{where}: is not a regular file; give the path of a CSV or NPZ file")


def _read_bytes(path: str, where: str, size: int = -1) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except PermissionError:
        raise DataFileError(
            f"{where}: cannot be read (permission denied); make it readable by the user running this app "
            "(e.g. chmod a+r on the file)"
        ) from None
    except OSError as error:
        raise DataFileError(f"{where}: cannot be read ({error.strerror or error})") from None


# --- NPZ --------------------------------------------------------------------------------------


def _read_npz(path: str, where: str) -> tuple[np.ndarray, np.ndarray, Locate]:
    head = _read_bytes(path, where, 512)
    if not head.startswith(NPZ_MAGIC):
        if head.startswith(NPY_MAGIC):
            raise DataFileError(f"{where}: is a single .npy array, not an NPZ of x and y; {SAVE_NPZ}")
        if _looks_like_text(head):
            raise DataFileError(
                f"{where}: is not an NPZ file: it holds text (line 1: {head.decode().splitlines()[0][:40]!r}...); "
                "if it is a CSV, name it .csv"
            )
        raise DataFileError(f"{where}: is not an NPZ file (it does not start with a zip header); {SAVE_NPZ}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in ("x", "y") if name not in npz.files]
            if missing:
                raise DataFileError(
                    f"{where}: NPZ lacks array(s) {missing}; it has {npz.files}, "
                    "expected 'x' (n, features) and 'y' (n,)"
                )
            x, y = (_npz_array(npz, name, where) for name in ("x", "y"))
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataFileError(f"{where}: is not a complete NPZ file (truncated or corrupt: {error}); {SAVE_NPZ}") from None
    return x, y, lambda row, column: f"x[{row}, {column}]" if column is not None else f"y[{row}]"


def _npz_array(npz, name: str, where: str) -> np.ndarray:
    try:
        value = np.asarray(npz[name])
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise DataFileError(
                f"{where}: array {name!r} holds Python objects (dtype=object), which are never loaded "
                "(that would unpickle it, which can run code); save numeric arrays"
            ) from None
        raise DataFileError(f"{where}: array {name!r} cannot be read (truncated or corrupt: {error}); {SAVE_NPZ}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataFileError(f"{where}: array {name!r} cannot be read (truncated or corrupt: {error}); {SAVE_NPZ}") from None
    if value.dtype.kind not in "biuf":
        what = {"U": "strings", "S": "byte strings", "c": "complex numbers", "O": "Python objects",
                "M": "dates", "m": "time spans"}.get(value.dtype.kind, "records")
        fix = "class indices 0..K-1 (whole numbers)" if name == "y" else f"a numeric array (e.g. {name}.astype(float))"
        raise DataFileError(f"{where}: array {name!r} holds {what} (dtype {value.dtype}), not real numbers; save it as {fix}")
    return value


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


# --- CSV --------------------------------------------------------------------------------------


def _read_csv(path: str, where: str) -> tuple[np.ndarray, np.ndarray, Locate]:
    raw = _read_bytes(path, where)
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is fine
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataFileError(
            f"{where}: line {line} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}, e.g. a "
            "Latin-1 accent); save the file as UTF-8"
        ) from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataFileError(f"{where}: line 1 is empty; the first line must be the header, with a {LABEL_COLUMN!r} column")
    names = [name.strip() for name in next(csv.reader([lines[0]]))]
    label_index = _check_header(where, lines[0], names)
    numbers = [(number, line) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    if not numbers:
        raise DataFileError(f"{where}: the file has a header but no rows")
    try:
        table = np.loadtxt([line for _, line in numbers], delimiter=",", ndmin=2, comments=None, quotechar='"')
    except ValueError as error:
        _diagnose(where, names, numbers)
        raise DataFileError(f"{where}: not all values are numbers ({error})") from None
    if table.shape[1] != len(names):
        _diagnose(where, names, numbers)
        raise DataFileError(
            f"{where}: rows have {table.shape[1]} values but the header has {len(names)} columns (line {numbers[0][0]}); "
            "give every row one value per header column"
        )
    features = [c for c in range(len(names)) if c != label_index]

    def locate(row: int, column: int | None) -> str:
        c = label_index if column is None else features[column]
        return f"line {numbers[row][0]}, column {c + 1} ({names[c]!r})"

    return table[:, features], table[:, label_index], locate


def _check_header(where: str, line: str, names: list[str]) -> int:
    """The label column's index, or a DataFileError saying what is wrong with the header."""
    if len(names) == 1:
        for delimiter, called in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if delimiter in line:
                raise DataFileError(
                    f"{where}: line 1 separates its columns with {called}, not commas; save the file "
                    "comma-separated (e.g. a spreadsheet's 'CSV (comma delimited)')"
                )
    if names and names[-1] == "" and len(names) > 1:
        raise DataFileError(
            f"{where}: line 1 ends with a comma (an empty column {len(names)}); remove the trailing comma "
            "from every line"
        )
    if "" in names:
        raise DataFileError(f"{where}: column {names.index('') + 1} has no name in the header (line 1); name it")
    labels = [i + 1 for i, name in enumerate(names) if name == LABEL_COLUMN]
    if not labels:
        close = [name for name in names if name.lower() in (LABEL_COLUMN, "class", "target", "y")]
        hint = f" (is {close[0]!r} it?)" if close else ""
        raise DataFileError(
            f"{where}: no {LABEL_COLUMN!r} column in the header {names[:8]}{'...' if len(names) > 8 else ''}{hint}; "
            f"name the class column {LABEL_COLUMN!r}"
        )
    if len(labels) > 1:
        raise DataFileError(
            f"{where}: the header has {len(labels)} {LABEL_COLUMN!r} columns (columns {', '.join(map(str, labels))}); "
            "keep one and rename or drop the others (a second one would be used as a feature)"
        )
    return labels[0] - 1


def _diagnose(where: str, names: list[str], numbers: list[tuple[int, str]]) -> None:
    """Find the first line numpy could not read and raise a DataFileError saying where and why."""
    for number, line in numbers:
        values = [value.strip() for value in next(csv.reader([line]))]
        if len(values) != len(names):
            if len(values) == 1 and any(d in line for d in ";\t|"):
                why = "its values are not separated by commas; save the file comma-separated"
            elif len(values) == len(names) + 1 and values[-1] == "":
                why = "it ends with a comma; remove the trailing comma from every line"
            elif len(values) < len(names):
                why = "values are missing: give every row one value per header column"
            else:
                why = "it has extra values: give every row one value per header column"
            raise DataFileError(
                f"{where}: line {number} has {len(values)} values but the header has {len(names)} columns; {why}"
            )
        for column, value in enumerate(values):
            if value == "":
                raise DataFileError(
                    f"{where}: line {number}, column {column + 1} ({names[column]!r}) is empty; fill in a number "
                    "or drop the row"
                )
            try:
                float(value)
            except ValueError:
                raise DataFileError(
                    f"{where}: not all values are numbers: line {number}, column {column + 1} ({names[column]!r}) "
                    f"holds {value[:40]!r}; use numbers only (a decimal point, not a comma)"
                ) from None


# --- values -----------------------------------------------------------------------------------


def _check(where: str, x: np.ndarray, y: np.ndarray, locate: Locate) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataFileError(
            f"{where}: expected features (n, d) and labels (n,), got {x.shape} and {y.shape}"
        )
    if y.shape[0] == 0:
        raise DataFileError(f"{where}: the file holds no examples")
    _check_labels(where, y, locate)
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32)  # checked AFTER the cast: 1e39 is finite in float64, inf in float32
    bad = np.argwhere(~np.isfinite(x32))
    if bad.size:
        row, column = (int(i) for i in bad[0])
        value = x[row, column]
        if np.isfinite(value):
            raise DataFileError(
                f"{where}: {locate(row, column)} is {float(value):g}, beyond float32's range (about "
                f"+-{FLOAT32_MAX:.3g}); rescale that feature (e.g. divide it by a constant or take its log)"
            )
        raise DataFileError(
            f"{where}: features contain NaN or infinite values: {locate(row, column)} is {_number(value)}; fill in a number "
            "or drop the row"
        )
    return x32, y.astype(np.int64)


def _check_labels(where: str, y: np.ndarray, locate: Locate) -> None:
    if y.dtype.kind == "b":
        return
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(y) | (np.mod(y, 1) != 0) | (y < 0) if y.dtype.kind == "f" else (y < 0)
        bad |= y > LABEL_LIMIT
    if not bad.any():
        return
    row = int(np.argmax(bad))
    value = y[row]
    if np.isfinite(value) and value > LABEL_LIMIT and float(value).is_integer():
        raise DataFileError(
            f"{where}: {locate(row, None)} is {_number(value)}, far beyond any class index (labels are classes "
            "0..K-1); check the label column"
        )
    raise DataFileError(
        f"{where}: labels must be whole numbers >= 0 (classes 0..K-1): {locate(row, None)} is {_number(value)}"
    )


def _number(value) -> str:
    if np.isfinite(value) and float(value).is_integer() and abs(value) <= LABEL_LIMIT**2:
        return str(int(value))
    return f"{float(value):g}"


def save_table(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Write a file :func:`load_table` reads back (used by tests and deployment demos)."""
    if path.endswith(".npz"):
        np.savez(path, x=x, y=y)
        return
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + [LABEL_COLUMN])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
