"""A client's own data file: read when well-formed, a clear error naming the problem when not."""

import numpy as np
import pytest

from common.data.files import DataFileError, load_table, save_table


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_round_trip(tmp_path, suffix):
    x = np.random.default_rng(0).random((20, 5)).astype(np.float32)
    y = np.arange(20) % 3
    path = str(tmp_path / f"data{suffix}")
    save_table(path, x, y)
    x2, y2 = load_table(path)
    assert np.allclose(x, x2, atol=1e-5) and np.array_equal(y, y2)
    assert x2.dtype == np.float32 and y2.dtype == np.int64


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("no_label.csv", "a,b\n1,2\n", "no 'label' column"),
        ("empty.csv", "a,label\n", "header but no rows"),
        ("words.csv", "a,label\nx,1\n", "not all values are numbers"),
        ("negative.csv", "a,label\n0.5,-1\n", "labels must be whole numbers >= 0"),
        ("fraction.csv", "a,label\n0.5,1.5\n", "labels must be whole numbers >= 0"),
        ("nan.csv", "a,label\nnan,1\n", "NaN or infinite"),
        ("data.parquet", "", "unknown file type"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFileError, match=message) as error:
        load_table(str(path))
    assert str(path) in str(error.value)


def test_missing_file_and_npz_without_arrays(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        load_table(str(tmp_path / "nope.csv"))
    np.savez(tmp_path / "bad.npz", features=np.zeros((2, 2)))
    with pytest.raises(DataFileError, match=r"lacks array\(s\) \['x', 'y'\]"):
        load_table(str(tmp_path / "bad.npz"))
