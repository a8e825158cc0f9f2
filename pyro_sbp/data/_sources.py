"""Where the raw examples of each data set come from.

Each loader here returns a :class:`RawData`: float32 inputs in ``[0, 1]`` of shape
``(N, *input_shape)``, int64 labels, the data set's own test split if it has one, and a short
description of where the data were read from. Splitting, resizing and statistics are done by
:func:`pyro_sbp.data.load_dataset`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .idx import IDXFormatError, read_idx

__all__ = [
    "FASHION_MNIST_SYSTEM_DIRS",
    "SYNTHETIC_DEFAULTS",
    "RawData",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "make_synthetic",
]

#: Directories searched for the Fashion-MNIST IDX files after the user's ``data_dir``. The first
#: is where Debian's ``dataset-fashion-mnist`` package installs them (gzip'd).
FASHION_MNIST_SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)

#: Default keyword arguments of :func:`make_synthetic`.
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "n": 1000,
    "d": 20,
    "informative": 4,
    "num_classes": 3,
    "class_sep": 2.0,
    "data_seed": None,
}

# The four files of an MNIST-style data set, in the order train images, train labels, test
# images, test labels.
_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


@dataclass
class RawData:
    """
    The examples of a data set before splitting.

    :param torch.Tensor x: Float32 inputs in ``[0, 1]``, shape ``(N, *input_shape)``.
    :param torch.Tensor y: Int64 labels in ``[0, num_classes)``, shape ``(N,)``.
    :param x_test: The data set's own test inputs, or ``None`` if it has no test split.
    :type x_test: torch.Tensor or None
    :param y_test: The data set's own test labels, or ``None``.
    :type y_test: torch.Tensor or None
    :param int num_classes: Number of classes.
    :param str source: Where the data were read from (a path, or a generator's name).
    :param dict params: JSON-serialisable parameters needed to rebuild the data (synthetic).
    """

    x: Tensor
    y: Tensor
    x_test: Tensor | None
    y_test: Tensor | None
    num_classes: int
    source: str
    params: dict[str, Any] = field(default_factory=dict)


def _images_to_float(images: np.ndarray | Tensor) -> Tensor:
    """``(N, H, W)`` uint8 -> ``(N, 1, H, W)`` float32 in ``[0, 1]``."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    return t.unsqueeze(1).to(torch.float32).div_(255.0)


def load_digits() -> RawData:
    """
    scikit-learn's 8x8 hand-written digits (1797 examples, 10 classes, no test split).

    Pixel values are integers 0..16 and are divided by 16.

    :rtype: RawData
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return RawData(
        x=x.unsqueeze(1).contiguous(),
        y=y,
        x_test=None,
        y_test=None,
        num_classes=10,
        source="sklearn.datasets.load_digits",
    )


# ----------------------------------------------------------------------------------------------
# MNIST-style IDX data sets


def _find_idx_files(directory: Path) -> tuple[list[Path] | None, list[str]]:
    """The four IDX files in ``directory`` (plain or ``.gz``), or ``None`` and what's missing."""
    found: list[Path] = []
    missing: list[str] = []
    for stem in _IDX_STEMS:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            missing.append(f"{stem}[.gz]")
    return (found if not missing else None), missing


def _torchvision_layout_present(root: Path, folder: str) -> bool:
    """Whether ``torchvision.datasets.<folder>(root, download=False)`` would find its files."""
    raw = root / folder / "raw"
    processed = root / folder / "processed"
    if all((raw / stem).is_file() for stem in _IDX_STEMS):
        return True
    return (processed / "training.pt").is_file() and (processed / "test.pt").is_file()


def _check_idx_arrays(
    where: str, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, k: int
) -> None:
    for part, images, labels in (("train", x, y), ("test", x_test, y_test)):
        if images.dtype != np.uint8 or images.ndim != 3:
            raise IDXFormatError(
                f"{where}: {part} images must be a 3-d uint8 array, got {images.ndim}-d "
                f"{images.dtype}"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise IDXFormatError(f"{where}: {part} labels must be a 1-d integer array")
        if len(images) != len(labels):
            raise IDXFormatError(
                f"{where}: {len(images)} {part} images but {len(labels)} {part} labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise IDXFormatError(f"{where}: {part} labels outside 0..{k - 1}")
    if x.shape[1:] != x_test.shape[1:]:
        raise IDXFormatError(
            f"{where}: train images are {x.shape[1:]} but test images are {x_test.shape[1:]}"
        )


def _from_idx_files(paths: list[Path], num_classes: int) -> RawData:
    x, y, x_test, y_test = (read_idx(p) for p in paths)
    where = os.fspath(paths[0].parent)
    _check_idx_arrays(where, x, y, x_test, y_test, num_classes)
    return RawData(
        x=_images_to_float(x),
        y=torch.from_numpy(y.astype(np.int64)),
        x_test=_images_to_float(x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=num_classes,
        source=where,
    )


def _from_torchvision_mnist(folder: str, root: Path, download: bool) -> RawData:
    # torchvision is imported only when needed: importing it takes seconds.
    import torchvision.datasets

    cls = getattr(torchvision.datasets, folder)
    try:
        train = cls(os.fspath(root), train=True, download=download)
        test = cls(os.fspath(root), train=False, download=download)
    except RuntimeError as e:
        raise RuntimeError(f"torchvision could not load {cls.__name__} from {root}: {e}") from e
    x, y = train.data.numpy(), train.targets.numpy()
    x_test, y_test = test.data.numpy(), test.targets.numpy()
    where = os.fspath(Path(train.raw_folder))
    _check_idx_arrays(where, x, y, x_test, y_test, len(cls.classes))
    return RawData(
        x=_images_to_float(x),
        y=torch.from_numpy(y.astype(np.int64)),
        x_test=_images_to_float(x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=len(cls.classes),
        source=where,
    )


def _load_mnist_like(
    name: str,
    folder: str,
    data_dir: str | os.PathLike | None,
    download: bool,
    system_dirs: tuple[str, ...],
    how_to_get: str,
) -> RawData:
    looked: list[str] = []
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is not None:
        paths, missing = _find_idx_files(root)
        if paths is not None:
            return _from_idx_files(paths, 10)
        looked.append(f"{root} (missing {', '.join(missing)})")
        raw = root / folder / "raw"
        if _torchvision_layout_present(root, folder):
            return _from_torchvision_mnist(folder, root, download=False)
        paths, missing = _find_idx_files(raw)
        if paths is not None:
            return _from_idx_files(paths, 10)
        looked.append(f"{raw} (missing {', '.join(missing)})")
        if not download:
            # A directory the user named is where the data must be: falling back to another
            # copy would train on data the user did not point at.
            places = "\n".join(f"  - {p}" for p in looked)
            raise FileNotFoundError(
                f"{name}: data_dir {root} holds no {name} data set: the IDX files "
                f"({', '.join(_IDX_STEMS)}, each plain or .gz) were not found. Looked in:\n"
                f"{places}\nTo get them: {how_to_get}"
            )
    for directory in system_dirs if root is None else ():
        paths, missing = _find_idx_files(Path(directory))
        if paths is not None:
            return _from_idx_files(paths, 10)
        looked.append(f"{directory} (missing {', '.join(missing)})")
    if download:
        if root is None:
            raise ValueError(f"download=True needs a data_dir to download {name!r} into")
        return _from_torchvision_mnist(folder, root, download=True)
    if root is None:
        looked.insert(0, "no data_dir was given")
    places = "\n".join(f"  - {p}" for p in looked)
    raise FileNotFoundError(
        f"{name}: the IDX files ({', '.join(_IDX_STEMS)}, each plain or .gz) were not found. "
        f"Looked in:\n{places}\nTo get them: {how_to_get}"
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    system_dirs: tuple[str, ...] | None = None,
) -> RawData:
    """
    Fashion-MNIST (60000 train + 10000 test 28x28 grey-scale images, 10 classes).

    With a ``data_dir``: the IDX files directly in it, or a torchvision root
    ``data_dir/FashionMNIST/raw`` (through :class:`torchvision.datasets.FashionMNIST` when
    torchvision's own layout is there, else the ``.gz`` files with :func:`read_idx`); a
    ``data_dir`` that holds neither is an error (no other copy is used instead). Without one:
    ``system_dirs`` (by default :data:`FASHION_MNIST_SYSTEM_DIRS`, i.e.
    ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package puts
    them). Only with ``download=True`` is anything downloaded, by torchvision into ``data_dir``.

    :param data_dir: The user's data directory.
    :type data_dir: str or os.PathLike or None
    :param bool download: Download with torchvision into ``data_dir`` if not found.
    :param system_dirs: Directories searched when no ``data_dir`` is given.
    :type system_dirs: tuple[str, ...] or None
    :rtype: RawData
    :raises FileNotFoundError: if the files are found nowhere (the message lists every place
        looked in and how to get the files).
    """
    return _load_mnist_like(
        "fashion-mnist",
        "FashionMNIST",
        data_dir,
        download,
        FASHION_MNIST_SYSTEM_DIRS if system_dirs is None else tuple(system_dirs),
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them in "
        "/usr/share/datasets/fashion-mnist), or pass data_dir=DIR with download=True to "
        "download them with torchvision into DIR/FashionMNIST/raw.",
    )


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> RawData:
    """
    MNIST (60000 train + 10000 test 28x28 grey-scale digits, 10 classes).

    Read through :class:`torchvision.datasets.MNIST` from the torchvision root ``data_dir``
    (``data_dir/MNIST/raw``); the IDX files directly in ``data_dir``, or gzip'd ones in
    ``data_dir/MNIST/raw``, are read with :func:`read_idx`. Only with ``download=True`` is
    anything downloaded, by torchvision into ``data_dir``.

    :param data_dir: The torchvision root (or the directory holding the four IDX files).
    :type data_dir: str or os.PathLike or None
    :param bool download: Download with torchvision into ``data_dir`` if not found.
    :rtype: RawData
    :raises FileNotFoundError: if the files are not found.
    """
    return _load_mnist_like(
        "mnist",
        "MNIST",
        data_dir,
        download,
        (),
        "pass data_dir=DIR with download=True to download them with torchvision into "
        "DIR/MNIST/raw, or copy the four files into DIR/MNIST/raw.",
    )


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> RawData:
    """
    CIFAR-10 (50000 train + 10000 test 32x32 colour images, 10 classes).

    Read from the root ``data_dir`` (which holds ``cifar-10-batches-py/``, the layout of
    :class:`torchvision.datasets.CIFAR10`) with :func:`read_cifar_batch`, which unpickles NumPy
    arrays and plain values only. Only with ``download=True`` is anything downloaded, by
    torchvision.

    :param data_dir: The torchvision root.
    :type data_dir: str or os.PathLike or None
    :param bool download: Download with torchvision into ``data_dir`` if not found.
    :rtype: RawData
    :raises FileNotFoundError: if the files are not found.
    """
    how = (
        "pass data_dir=DIR with download=True to download them with torchvision, or extract "
        "cifar-10-python.tar.gz into DIR (giving DIR/cifar-10-batches-py/)."
    )
    if data_dir is None:
        if download:
            raise ValueError("download=True needs a data_dir to download 'cifar10' into")
        raise FileNotFoundError(
            f"cifar10: no data_dir was given, so nowhere to look. To get it: {how}"
        )
    root = Path(data_dir).expanduser()
    folder = root / "cifar-10-batches-py"
    missing = [f for f in _CIFAR10_FILES if not (folder / f).is_file()]
    if missing and not download:
        raise FileNotFoundError(
            f"cifar10: the python-version batches were not found. Looked in:\n  - {folder} "
            f"(missing {', '.join(missing)})\nTo get them: {how}"
        )
    import torchvision.datasets
    from torchvision.datasets import cifar

    if missing:
        # torchvision downloads and checks the archive's md5; the batches are read below.
        try:
            torchvision.datasets.CIFAR10(os.fspath(root), train=True, download=True)
        except RuntimeError as e:
            raise RuntimeError(f"torchvision could not download CIFAR10 into {root}: {e}") from e
    for name, md5 in (*cifar.CIFAR10.train_list, *cifar.CIFAR10.test_list):
        if not cifar.check_integrity(os.fspath(folder / name), md5):
            raise ValueError(f"cifar10: {folder / name} is corrupt (its md5 is not {md5})")

    def part(names: list[str]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for name in names:
            batch = read_cifar_batch(folder / name)
            images.append(batch["data"])
            labels.extend(batch["labels"])
        x = np.concatenate(images).reshape(-1, 3, 32, 32)
        return torch.from_numpy(x).to(torch.float32).div_(255.0), torch.as_tensor(
            np.asarray(labels, dtype=np.int64)
        )

    x, y = part([f"data_batch_{i}" for i in range(1, 6)])
    x_test, y_test = part(["test_batch"])
    for split, labels in (("train", y), ("test", y_test)):
        if labels.numel() and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"cifar10: {split} labels outside 0..9 in {folder}")
    return RawData(x=x, y=y, x_test=x_test, y_test=y_test, num_classes=10, source=os.fspath(folder))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays, and nothing else: a pickle
    that names any other callable (``os.system``, say) is refused before anything runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # How protocol-2 pickles written by Python 3 spell a bytes object: str -> bytes.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_cifar_batch(path: str | os.PathLike) -> dict[str, Any]:
    """
    One batch file of CIFAR-10's Python version (``data_batch_1`` ... ``test_batch``), read
    without running code: the files are Python pickles, and only NumPy arrays, lists, strings
    and numbers are unpickled (torchvision's reader calls :func:`pickle.load`, which runs
    whatever a doctored file names).

    :return: ``{"data": (N, 3072) uint8 array, "labels": list of int, ...}``.
    :raises ValueError: for a file that holds anything else, or no ``data`` / ``labels``; the
        message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 batch ({e})") from None
    if isinstance(batch, dict):
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or not isinstance(labels, list)
        or len(labels) != len(data)
    ):
        raise ValueError(
            f"{path}: not a CIFAR-10 batch (expected 'data', an (N, 3072) uint8 array, and "
            "'labels', a list of N integers)"
        )
    return batch


# ----------------------------------------------------------------------------------------------
# Synthetic


def make_synthetic(
    *,
    n: int = 1000,
    d: int = 20,
    informative: int = 4,
    num_classes: int = 3,
    class_sep: float = 2.0,
    data_seed: int = 0,
) -> RawData:
    r"""
    A seeded classification problem in which only the first ``informative`` features carry signal.

    Labels are balanced (``n // num_classes`` or one more per class) and shuffled. Each class
    :math:`k` has a centroid :math:`c_k \sim \mathcal N(0, \mathrm{class\_sep}^2 I)` in the
    informative dimensions; an example is :math:`z = (c_y + \epsilon, \eta)` with
    :math:`\epsilon \sim \mathcal N(0, I_{\mathrm{informative}})` and pure noise
    :math:`\eta \sim \mathcal N(0, I_{d - \mathrm{informative}})` independent of the label, and
    its features are :math:`x = \sigma(z)` (the logistic function, which keeps inputs in
    ``(0, 1)`` like the image data sets without changing which features are informative).

    :param int n: Number of examples.
    :param int d: Number of features.
    :param int informative: Number of leading features that depend on the label (1 to ``d``).
    :param int num_classes: Number of classes (at least 2).
    :param float class_sep: Scale of the class centroids; larger is easier.
    :param int data_seed: Seed of the generator (the result is a function of all arguments).
    :rtype: RawData
    """
    for key, value, low in (("n", n, 1), ("d", d, 1), ("num_classes", num_classes, 2)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
            raise ValueError(f"synthetic: {key} must be an integer >= {low}, got {value!r}")
    if not isinstance(informative, int | np.integer) or not 1 <= informative <= d:
        raise ValueError(
            f"synthetic: informative must be an integer in [1, d={d}], got {informative!r}"
        )
    if n < num_classes:
        raise ValueError(f"synthetic: n={n} must be at least num_classes={num_classes}")
    if not class_sep >= 0:
        raise ValueError(f"synthetic: class_sep must be >= 0, got {class_sep!r}")
    if not isinstance(data_seed, int | np.integer) or data_seed < 0:
        raise ValueError(f"synthetic: data_seed must be a non-negative integer, got {data_seed!r}")
    rng = np.random.default_rng(int(data_seed))
    centroids = class_sep * rng.standard_normal((num_classes, informative))
    y = rng.permutation(np.arange(n) % num_classes)
    z = rng.standard_normal((n, d))
    z[:, :informative] += centroids[y]
    x = 1.0 / (1.0 + np.exp(-z))
    params = {
        "n": int(n),
        "d": int(d),
        "informative": int(informative),
        "num_classes": int(num_classes),
        "class_sep": float(class_sep),
        "data_seed": int(data_seed),
    }
    return RawData(
        x=torch.from_numpy(x.astype(np.float32)),
        y=torch.from_numpy(y.astype(np.int64)),
        x_test=None,
        y_test=None,
        num_classes=int(num_classes),
        source="synthetic",
        params=params,
    )


def load_raw(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    seed: int,
    download: bool,
    synthetic_kwargs: Mapping[str, Any],
) -> RawData:
    """Dispatch on the data set name (already validated)."""
    if synthetic_kwargs and name != "synthetic":
        raise ValueError(
            f"unexpected keyword argument(s) {sorted(synthetic_kwargs)} for {name!r}: only "
            f"'synthetic' takes extra keyword arguments ({', '.join(SYNTHETIC_DEFAULTS)})"
        )
    if data_dir is not None and name in ("digits", "synthetic"):
        where = "embedded in scikit-learn" if name == "digits" else "generated"
        raise ValueError(f"data set {name!r} is {where} and reads no files: drop data_dir")
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download=download)
    if name == "mnist":
        return load_mnist(data_dir, download=download)
    if name == "cifar10":
        return load_cifar10(data_dir, download=download)
    if name == "synthetic":
        unknown = set(synthetic_kwargs) - set(SYNTHETIC_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unexpected keyword argument(s) {sorted(unknown)} for 'synthetic'; valid: "
                f"{', '.join(SYNTHETIC_DEFAULTS)}"
            )
        kwargs = {**SYNTHETIC_DEFAULTS, **synthetic_kwargs}
        if kwargs["data_seed"] is None:
            kwargs["data_seed"] = seed
        return make_synthetic(**kwargs)
    raise AssertionError(name)  # pragma: no cover
