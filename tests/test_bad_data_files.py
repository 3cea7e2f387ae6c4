"""Every malformed data file gets one clear DataFileError naming the file, where the problem is, and
what to change (issue 12): never a library's exception, never a silent pass (values beyond
float32's range, labels that wrap, a second label column used as a feature)."""

import os
import stat
import zipfile

import numpy as np
import pytest

from common.data.files import DataFileError, load_table

HEADER = "f0,f1,f2,label\n"
ROWS = "0.5,1.0,2.0,1\n0.1,0.2,0.3,0\n"


def _text(content: str, name: str = "data.csv", encoding: str = "utf-8"):
    def make(directory):
        path = directory / name
        path.write_bytes(content.encode(encoding))
        return path

    return make


def _raw(data: bytes, name: str):
    def make(directory):
        path = directory / name
        path.write_bytes(data)
        return path

    return make


def _npz(**arrays):
    def make(directory):
        path = directory / "data.npz"
        np.savez(path, **arrays)
        return path

    return make


def _truncated_npz(directory):
    path = directory / "data.npz"
    np.savez(path, x=np.zeros((50, 4)), y=np.zeros(50))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _object_npz(directory):
    path = directory / "data.npz"
    np.savez(path, x=np.array([[1.0], [{"a": 1}]], dtype=object), y=np.zeros(2))
    return path


def _zip_of_text(directory):
    path = directory / "data.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", "not an array")
        archive.writestr("y.npy", "not an array either")
    return path


def _directory(directory):
    path = directory / "data.csv"
    path.mkdir()
    return path


def _npy_as_npz(directory):
    np.save(directory / "a.npy", np.zeros((3, 4)))
    return (directory / "a.npy").rename(directory / "data.npz")


def _unreadable(directory):
    path = _text(HEADER + ROWS)(directory)
    path.chmod(0)
    return path


X = np.zeros((3, 4))
Y = np.array([0, 1, 2])
CASES = {
    # file system
    "missing file": (lambda directory: directory / "nope.csv", "no such file"),
    "a directory": (_directory, "is a directory, not a file"),
    "unreadable (permissions)": (_unreadable, "permission denied"),
    "0-byte csv": (_text(""), "the file is empty (0 bytes)"),
    "0-byte npz": (_raw(b"", "data.npz"), "the file is empty (0 bytes)"),
    "unknown extension": (_text(HEADER + ROWS, "data.txt"), "unknown file type"),
    # CSV: encoding and header
    "latin-1 header": (_text("caf\xe9,label\n1,0\n", encoding="latin-1"), "line 1 is not UTF-8"),
    "latin-1 in a row": (_text("a,label\n1,0\n\xe9,1\n", encoding="latin-1"), "line 3 is not UTF-8"),
    "blank first line": (_text("\n" + HEADER + ROWS), "line 1 is empty"),
    "semicolon-separated": (_text("f0;f1;label\n0,5;1,0;1\n"), "separates its columns with semicolons"),
    "tab-separated": (_text("f0\tf1\tlabel\n0.5\t1.0\t1\n"), "separates its columns with tabs"),
    "trailing comma on every line": (_text("f0,f1,label,\n0.5,1.0,1,\n"), "ends with a comma"),
    "trailing comma on the rows only": (_text("f0,f1,label\n0.5,1.0,1,\n"), "line 2 has 4 values but the header has 3 columns; it ends with a comma"),
    "unnamed column": (_text("f0,,label\n0.5,1.0,1\n"), "column 2 has no name"),
    "no label column": (_text("f0,f1\n1,2\n"), "no 'label' column"),
    "Label capitalised": (_text("f0,Label\n1,2\n"), "(is 'Label' it?)"),
    "two label columns": (_text("f0,label,f1,label\n1,0,2,0\n"), "2 'label' columns (columns 2, 4)"),
    "header only": (_text(HEADER), "header but no rows"),
    # CSV: rows
    "short row": (_text(HEADER + "0.5,1.0,1\n"), "line 2 has 3 values but the header has 4 columns; values are missing"),
    "long row": (_text(HEADER + ROWS + "1,2,3,4,5\n"), "line 4 has 5 values but the header has 4 columns; it has extra"),
    "every row short": (_text("f0,f1,f2,label\n1,2\n3,4\n"), "line 2 has 2 values but the header has 4 columns"),
    "empty value": (_text(HEADER + "0.5,,2.0,1\n"), "line 2, column 2 ('f1') is empty"),
    "a word": (_text(HEADER + ROWS + "0.5,abc,2.0,1\n"), "line 4, column 2 ('f1') holds 'abc'"),
    "decimal comma in quotes": (_text(HEADER + '"0,5",1.0,2.0,1\n'), "line 2, column 1 ('f0') holds '0,5'"),
    "NaN feature": (_text(HEADER + "nan,1.0,2.0,1\n"), "line 2, column 1 ('f0') is nan"),
    "infinite feature": (_text(HEADER + ROWS + "0.5,1.0,inf,1\n"), "line 4, column 3 ('f2') is inf"),
    "1e39 beyond float32": (_text(HEADER + "0.5,1e39,2.0,1\n"), "line 2, column 2 ('f1') is 1e+39, beyond float32's range"),
    "1e308 beyond float32": (_text(HEADER + ROWS + "1e308,1.0,2.0,1\n"), "line 4, column 1 ('f0') is 1e+308, beyond float32's range"),
    "-1e39 beyond float32": (_text(HEADER + "0.5,1.0,-1e39,1\n"), "is -1e+39, beyond float32's range"),
    "1e400 (inf in float64)": (_text(HEADER + "1e400,1.0,2.0,1\n"), "NaN or infinite values: line 2, column 1"),
    "negative label": (_text(HEADER + "0.5,1.0,2.0,-1\n"), "line 2, column 4 ('label') is -1"),
    "fractional label": (_text(HEADER + ROWS + "0.5,1.0,2.0,1.5\n"), "line 4, column 4 ('label') is 1.5"),
    "huge label 1e20": (_text(HEADER + "0.5,1.0,2.0,1e20\n"), "line 2, column 4 ('label') is 1e+20, far beyond any class"),
    "NaN label": (_text(HEADER + "0.5,1.0,2.0,nan\n"), "labels must be whole numbers >= 0"),
    "blank lines are skipped, lines still counted": (_text(HEADER + "\n0.5,1.0,2.0,1\n\n0.5,1.0,2.0,x\n"), "line 5, column 4"),
    # NPZ
    "CSV saved as .npz": (_text(HEADER + ROWS, "data.npz"), "is not an NPZ file: it holds text"),
    "a .npy saved as .npz": (_npy_as_npz, "single .npy array"),
    "random bytes as .npz": (_raw(b"\x00\x01\x02garbage" * 10, "data.npz"), "does not start with a zip header"),
    "truncated NPZ": (_truncated_npz, "is not a complete NPZ file (truncated or corrupt"),
    "zip of non-arrays": (_zip_of_text, "array 'x' holds byte strings"),
    "NPZ without x and y": (_npz(features=X), "lacks array(s) ['x', 'y']"),
    "NPZ without y": (_npz(x=X), "lacks array(s) ['y']"),
    "string features": (_npz(x=np.array([["a", "b"], ["c", "d"]]), y=np.array([0, 1])), "array 'x' holds strings"),
    "string labels": (_npz(x=np.zeros((2, 2)), y=np.array(["cat", "dog"])), "array 'y' holds strings"),
    "object features": (_object_npz, "holds Python objects (dtype=object), which are never loaded"),
    "complex features": (_npz(x=np.zeros((2, 2), dtype=complex), y=np.array([0, 1])), "holds complex numbers"),
    "1-D x": (_npz(x=np.zeros(3), y=Y), "expected features (n, d) and labels (n,)"),
    "x and y of different lengths": (_npz(x=X, y=np.array([0, 1])), "expected features (n, d) and labels (n,), got (3, 4) and (2,)"),
    "no examples": (_npz(x=np.zeros((0, 4)), y=np.zeros(0)), "holds no examples"),
    "NPZ 1e39 feature (float64)": (_npz(x=np.array([[0.0, 1e39]]), y=np.array([0])), "x[0, 1] is 1e+39, beyond float32's range"),
    "NPZ NaN feature": (_npz(x=np.array([[0.0, 1.0], [np.nan, 0.0]]), y=np.array([0, 1])), "x[1, 0] is nan"),
    "NPZ huge float label": (_npz(x=np.zeros((2, 2)), y=np.array([0.0, 1e20])), "y[1] is 1e+20, far beyond any class"),
    "NPZ huge int label": (_npz(x=np.zeros((2, 2)), y=np.array([0, 2**40])), "y[1] is 1099511627776, far beyond"),
    "NPZ negative label": (_npz(x=np.zeros((2, 2)), y=np.array([0, -3])), "y[1] is -3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_data_file_gets_one_clear_error_naming_it(tmp_path, case, monkeypatch):
    make, expected = CASES[case]
    path = make(tmp_path)
    if case.startswith("unreadable") and os.geteuid() == 0:  # root reads anything: refuse it as the OS would
        real_open = open
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                            if str(p) == str(path) else real_open(p, *a, **k))
    try:
        with pytest.raises(DataFileError) as error:
            load_table(str(path))
    finally:
        if path.exists() and not path.is_dir():
            path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    message = str(error.value)
    assert type(error.value) is DataFileError
    assert str(path) in message, message
    assert expected in message, message
    assert "\n" not in message, message


def test_the_table_has_at_least_30_malformed_files():
    assert len(CASES) >= 30


def test_well_formed_files_still_load(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeff".encode() + (HEADER + "\n" + ROWS).encode())  # Excel's CSV UTF-8
    x, y = load_table(str(tmp_path / "bom.csv"))
    assert x.shape == (2, 3) and x.dtype == np.float32 and y.tolist() == [1, 0]
    (tmp_path / "quoted.csv").write_text('"f0","label"\n"0.5","2"\n')
    x, y = load_table(str(tmp_path / "quoted.csv"))
    assert x.tolist() == [[0.5]] and y.tolist() == [2]
    np.savez(tmp_path / "ints.npz", x=np.arange(6).reshape(3, 2), y=np.array([0, 1, 1], dtype=np.uint8))
    x, y = load_table(str(tmp_path / "ints.npz"))
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.tolist() == [0, 1, 1]
