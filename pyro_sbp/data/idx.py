"""A small pure-numpy reader and writer for the IDX format of (Fashion-)MNIST.

An IDX file is a 4-byte magic number -- two zero bytes, a type code and the number of
dimensions -- followed by one big-endian ``uint32`` per dimension and then the array itself in
row-major (C) order, big-endian. Files may be gzip-compressed; compression is recognised from
the file's first bytes, not from its name.

Reference: Y. LeCun, C. Cortes, C. J. C. Burges, "The MNIST database of handwritten digits"
(section "File formats for the MNIST database").
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

__all__ = ["IDXFormatError", "read_idx", "write_idx"]

#: IDX type code -> numpy dtype (big-endian where it matters).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 8


class IDXFormatError(ValueError):
    """Raised when a file is not a well-formed IDX file (bad magic number, wrong size, ...)."""


def _read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise IDXFormatError(f"{os.fspath(path)}: corrupt gzip stream ({e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """
    Read an IDX file (plain or gzip-compressed) into a numpy array.

    The header is checked strictly: the magic number must start with two zero bytes and name a
    known type code and between 1 and 8 dimensions, and the payload must hold exactly the number
    of bytes the dimensions call for (a truncated or padded file is an error).

    :param path: Path of the file.
    :type path: str or os.PathLike
    :return: The array, in native byte order, with the shape given in the header.
    :rtype: numpy.ndarray
    :raises IDXFormatError: if the file is not a well-formed IDX file.
    :raises FileNotFoundError: if the file does not exist.
    """
    name = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{name}: file too short for an IDX header ({len(data)} bytes)")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or not 1 <= ndim <= _MAX_NDIM:
        raise IDXFormatError(
            f"{name}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTNN with a type "
            f"code TT in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and 1 <= NN <= "
            f"{_MAX_NDIM} dimensions)"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IDXFormatError(
            f"{name}: truncated IDX header ({len(data)} bytes, expected {header_size})"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{name}: IDX file {what}: header shape {tuple(shape)} of {dtype.name} needs "
            f"{expected} data bytes, found {actual}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """
    Write a numpy array as an IDX file.

    :param path: Destination path.
    :type path: str or os.PathLike
    :param numpy.ndarray array: Array of dtype ``uint8``, ``int8``, ``int16``, ``int32``,
        ``float32`` or ``float64`` with 1 to 8 dimensions.
    :param compress: Whether to gzip the file; by default, if and only if ``path`` ends in
        ``.gz``.
    :type compress: bool or None
    :raises ValueError: if the array's dtype or number of dimensions cannot be stored.
    """
    array = np.asarray(array)
    codes = {dt.str.lstrip("<>|="): code for code, dt in _IDX_DTYPES.items()}
    key = array.dtype.str.lstrip("<>|=")
    if key not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if not 1 <= array.ndim <= _MAX_NDIM:
        raise ValueError(f"IDX stores 1 to {_MAX_NDIM} dimensions, got {array.ndim}")
    code = codes[key]
    payload = (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    )
    if compress is None:
        compress = os.fspath(path).endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)
    with open(path, "wb") as f:
        f.write(payload)
