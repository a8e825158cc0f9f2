"""Seeded train / validation / test splits of the registered data sets."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from ._sources import RawData, load_raw

__all__ = ["DATASETS", "DataSplits", "load_dataset"]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")

#: Version of the splitting procedure recorded in :attr:`DataSplits.split`; bump it whenever a
#: change would give different indices for the same arguments.
SPLIT_VERSION = 1

# Independent random streams derived from the seed.
_TEST_STREAM = 0
_VAL_STREAM = 1


@dataclass(frozen=True, eq=False)
class DataSplits:
    """
    A data set split into train, validation and test parts, held in memory.

    Inputs are float32 tensors in ``[0, 1]`` and labels int64 tensors; each part is a
    :class:`~torch.utils.data.TensorDataset` of ``(inputs, labels)``. The inputs are *not*
    normalised: :attr:`mean` and :attr:`std` (per channel, computed on the train part) are
    there for the model to normalise inside the network (e.g. with
    :class:`pyro_sbp.models.nets.Normalize`).

    :param str name: The data set's name (one of :data:`DATASETS`).
    :param train: Training examples.
    :type train: ~torch.utils.data.TensorDataset
    :param val: Validation examples carved from the training examples, or ``None`` when
        ``val_fraction=0``.
    :type val: ~torch.utils.data.TensorDataset or None
    :param test: Test examples.
    :type test: ~torch.utils.data.TensorDataset
    :param tuple input_shape: Shape of one input, e.g. ``(1, 8, 8)``, or ``(d,)`` for flat
        vectors.
    :param int num_classes: Number of classes.
    :param tuple mean: Per-channel mean of the training inputs (one entry per element of
        ``input_shape[0]``: per colour channel for images, per feature for flat vectors).
    :param tuple std: Per-channel standard deviation of the training inputs (same layout; a
        channel that is constant gets 1.0 so that the entries are always positive).
    :param dict split: JSON-serialisable record of how the split was made: ``dataset``,
        ``seed``, ``val_fraction``, ``test_fraction`` (``None`` when the data set's own test
        split is used), ``test_split`` (``"official"`` or ``"stratified"``), ``resize``,
        ``source`` (where the data were read from), ``params`` (the generator's arguments for
        ``synthetic``), ``sizes`` and ``indices``. The index lists (sorted) are positions in the
        data set's own training set (``train``, ``val``) and test set (``test``) when
        ``test_split == "official"``, and positions in the whole data set otherwise.
    """

    name: str
    train: TensorDataset
    val: TensorDataset | None
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: dict[str, Any] = field(repr=False)

    def __post_init__(self):
        check_finite_inputs(self)

    @property
    def num_train(self) -> int:
        """Number of training examples (the data set size for scaling the ELBO)."""
        return len(self.train)


def check_finite_inputs(splits: DataSplits) -> None:
    """Refuse inputs that are ``nan`` or infinite, naming the split and the first example.

    :raises ValueError: at the first non-finite input: its split, its position in the split
        and, where the split records it, its index in the data set.
    """
    for part in ("train", "val", "test"):
        dataset = getattr(splits, part)
        if dataset is None:
            continue
        x = dataset.tensors[0]
        if not x.is_floating_point():
            continue
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            value = x[i].reshape(-1)[~torch.isfinite(x[i].reshape(-1))][0].item()
            indices = (splits.split or {}).get("indices", {}).get(part)
            known = indices is not None and i < len(indices)
            origin = f" (example {indices[i]} of the data set)" if known else ""
            count = int(bad.sum())
            raise ValueError(
                f"{splits.name}: non-finite input ({value}) in the {part} split at index {i}"
                f"{origin}; {count} of its {len(x)} examples are not finite"
            )


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _check_fraction(key: str, value: object, *, allow_zero: bool) -> float:
    lower = "0 <=" if allow_zero else "0 <"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} must be a number with {lower} {key} < 1, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0) and v < 1):
        raise ValueError(f"{key} must satisfy {lower} {key} < 1, got {value!r}")
    return v


def _count(fraction: float, n: int) -> int:
    """``round(fraction * n)``, but at least 1 when ``fraction > 0``."""
    if fraction == 0:
        return 0
    return max(1, round(fraction * n))


def stratified_split(
    labels: np.ndarray, n_test: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """
    Split ``range(len(labels))`` into (rest, test) with ``n_test`` test examples, stratified.

    Each class gets ``floor(n_test * n_c / n)`` test examples, and the ones left over go to the
    classes with the largest fractional parts (ties to the smaller class label).

    :return: Sorted ``(rest, test)`` index arrays.
    """
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_test / n)
    per_class = np.floor(exact).astype(np.int64)
    leftover = n_test - int(per_class.sum())
    order = np.argsort(-(exact - per_class), kind="stable")
    per_class[order[:leftover]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, per_class, strict=True)
    ]
    test = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def _resize(x: Tensor, size: int, name: str) -> Tensor:
    if x.dim() != 4:
        raise ValueError(
            f"resize applies to image data sets; {name!r} has inputs of shape {tuple(x.shape[1:])}"
        )
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return out.clamp_(0.0, 1.0)


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (dim 1) mean and population standard deviation."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _validate_args(
    name: str, seed: object, val_fraction: object, test_fraction: object, resize: object
) -> tuple[int, float, float]:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names are: {', '.join(DATASETS)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    val = _check_fraction("val_fraction", val_fraction, allow_zero=True)
    test = _check_fraction("test_fraction", test_fraction, allow_zero=False)
    if resize is not None and (
        isinstance(resize, bool) or not isinstance(resize, numbers.Integral) or int(resize) < 1
    ):
        raise ValueError(f"resize must be a positive integer or None, got {resize!r}")
    return int(seed), val, test


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    resize: int | None = None,
    download: bool = False,
    **synthetic_kwargs: Any,
) -> DataSplits:
    """
    Load a data set into memory and split it into train, validation and test parts.

    The test part is the data set's own test split where it has one (Fashion-MNIST, MNIST,
    CIFAR-10; ``test_fraction`` is then ignored) and otherwise a seeded, stratified
    ``test_fraction`` of the examples (digits, synthetic). The validation part is a seeded
    random ``val_fraction`` of the remaining training examples (the BMRS paper's 80/20 split by
    default). The same arguments always give the same split; the indices are recorded in
    :attr:`DataSplits.split`.

    Data sources (see :mod:`pyro_sbp.data`): ``digits`` is embedded in scikit-learn;
    ``fashion-mnist`` is looked for in ``data_dir`` (directly or in the torchvision layout
    ``data_dir/FashionMNIST/raw``) and then in ``/usr/share/datasets/fashion-mnist`` (Debian's
    ``dataset-fashion-mnist``); ``mnist`` and ``cifar10`` are read by torchvision from the root
    ``data_dir``; ``synthetic`` is generated (see :func:`~pyro_sbp.data.make_synthetic`).
    Nothing is downloaded unless ``download=True``.

    :param str name: One of :data:`DATASETS`.
    :param data_dir: Directory holding the files (a torchvision root for ``mnist`` and
        ``cifar10``), and where ``download=True`` puts them.
    :type data_dir: str or os.PathLike or None
    :param int seed: Seed of the splits (and, unless ``data_seed`` is given, of the
        ``synthetic`` generator).
    :param float val_fraction: Fraction of the training examples held out for validation,
        ``0 <= val_fraction < 1``; 0 gives no validation part.
    :param float test_fraction: Fraction of the examples held out for testing when the data set
        has no test split of its own, ``0 < test_fraction < 1``.
    :param resize: Side length to resize images to, once, up front (bilinear, no antialiasing),
        e.g. 32 for the BMRS LeNet-5 on (Fashion-)MNIST.
    :type resize: int or None
    :param bool download: Allow torchvision to download a missing data set into ``data_dir``.
    :param synthetic_kwargs: Only for ``synthetic``: ``n``, ``d``, ``informative``,
        ``num_classes``, ``class_sep``, ``data_seed`` (see
        :func:`~pyro_sbp.data.make_synthetic`).
    :rtype: DataSplits
    :raises ValueError: for an unknown name, a bad fraction, seed or resize, or keyword
        arguments that the data set does not take.
    :raises FileNotFoundError: if the data set's files are not found (the message says where it
        looked and how to get them).
    """
    seed, val_fraction, test_fraction = _validate_args(
        name, seed, val_fraction, test_fraction, resize
    )
    raw: RawData = load_raw(
        name, data_dir, seed=seed, download=download, synthetic_kwargs=synthetic_kwargs
    )
    labels = raw.y.numpy()
    official = raw.x_test is not None
    if official:
        pool = np.arange(len(labels))
        test_idx = np.arange(len(raw.x_test))
    else:
        n_test = _count(test_fraction, len(labels))
        if n_test >= len(labels):
            raise ValueError(
                f"test_fraction={test_fraction} leaves no training examples out of {len(labels)}"
            )
        pool, test_idx = stratified_split(labels, n_test, _rng(seed, _TEST_STREAM))
    n_val = _count(val_fraction, len(pool))
    if n_val >= len(pool):
        raise ValueError(
            f"val_fraction={val_fraction} leaves no training examples out of {len(pool)}"
        )
    perm = _rng(seed, _VAL_STREAM).permutation(len(pool))
    val_idx = np.sort(pool[perm[:n_val]])
    train_idx = np.sort(pool[perm[n_val:]])

    x = raw.x if resize is None else _resize(raw.x, int(resize), name)
    if official:
        x_test = raw.x_test if resize is None else _resize(raw.x_test, int(resize), name)
        y_test = raw.y_test
    else:
        x_test, y_test = x, raw.y

    def part(xs: Tensor, ys: Tensor, idx: np.ndarray) -> TensorDataset:
        index = torch.from_numpy(idx.astype(np.int64))
        return TensorDataset(xs.index_select(0, index), ys.index_select(0, index))

    train = part(x, raw.y, train_idx)
    val = part(x, raw.y, val_idx) if n_val > 0 else None
    test = part(x_test, y_test, test_idx)
    mean, std = _channel_stats(train.tensors[0])
    split = {
        "version": SPLIT_VERSION,
        "dataset": name,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": None if official else test_fraction,
        "test_split": "official" if official else "stratified",
        "resize": None if resize is None else int(resize),
        "source": raw.source,
        "params": dict(raw.params),
        "sizes": {
            "train": len(train_idx),
            "val": len(val_idx),
            "test": len(test_idx),
            "total": len(labels) + (len(test_idx) if official else 0),
        },
        "indices": {
            "train": train_idx.tolist(),
            "val": val_idx.tolist(),
            "test": test_idx.tolist(),
        },
    }
    return DataSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        input_shape=tuple(int(s) for s in train.tensors[0].shape[1:]),
        num_classes=raw.num_classes,
        mean=mean,
        std=std,
        split=split,
    )
