"""The pure-numpy IDX reader and writer."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyro_sbp.data import IDXFormatError, read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path: Path, dtype: type, suffix: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 5, 7)) * 100).astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_header_layout_is_big_endian(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.array([1, 2, 3], dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == b"\x00\x00\x0c\x01"
    assert struct.unpack(">I", raw[4:8]) == (3,)
    assert raw[8:] == b"\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x03"


def test_gzip_is_detected_from_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    compressed = tmp_path / "no-suffix"
    write_idx(compressed, array, compress=True)
    plain_named_gz = tmp_path / "plain.gz"
    write_idx(plain_named_gz, array, compress=False)
    np.testing.assert_array_equal(read_idx(compressed), array)
    np.testing.assert_array_equal(read_idx(plain_named_gz), array)


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.dtype(d) for d in DTYPES]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": False},
    ),
    compress=st.booleans(),
)
def test_round_trip_property(array: np.ndarray, compress: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x"
        write_idx(path, array, compress=compress)
        out = read_idx(path)
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "magic",
    [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00"],
    ids=["first-byte", "second-byte", "type-code", "zero-dims"],
)
def test_bad_magic_number(tmp_path: Path, magic: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(magic + struct.pack(">I", 2) + b"\x01\x02")
    with pytest.raises(IDXFormatError, match="bad IDX magic number") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data(tmp_path: Path, gz: bool) -> None:
    path = tmp_path / "images"
    write_idx(path, np.zeros((4, 3, 3), dtype=np.uint8))
    data = path.read_bytes()[:-5]
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(IDXFormatError, match=r"truncated.*needs 36 data bytes, found 31"):
        read_idx(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.zeros(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        read_idx(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 10))
    with pytest.raises(IDXFormatError, match="truncated IDX header"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(IDXFormatError, match="too short"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    write_idx(path, np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(IDXFormatError, match="corrupt gzip stream"):
        read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def test_write_rejects_unstorable_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="1 to 8 dimensions"):
        write_idx(tmp_path / "x", np.zeros((), dtype=np.uint8))
