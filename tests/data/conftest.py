"""Fixtures of the data tests: small fake data sets in the files' real layouts."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pyro_sbp.data import write_idx

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def fake_mnist_arrays(
    n_train: int = 60, n_test: int = 20, side: int = 28, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random uint8 images and balanced labels 0..9, as an MNIST-style data set."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n_train, side, side), dtype=np.uint8)
    y = (np.arange(n_train) % 10).astype(np.uint8)
    x_test = rng.integers(0, 256, size=(n_test, side, side), dtype=np.uint8)
    y_test = (np.arange(n_test) % 10).astype(np.uint8)
    return x, y, x_test, y_test


@pytest.fixture
def write_fake_idx_set() -> Callable[..., tuple[np.ndarray, ...]]:
    """``write(directory, gz=False, **kw)`` writes the four IDX files and returns the arrays."""

    def write(directory: Path, *, gz: bool = False, **kwargs: int) -> tuple[np.ndarray, ...]:
        directory.mkdir(parents=True, exist_ok=True)
        arrays = fake_mnist_arrays(**kwargs)
        for stem, array in zip(IDX_STEMS, arrays, strict=True):
            write_idx(directory / (stem + (".gz" if gz else "")), array)
        return arrays

    return write


@pytest.fixture
def write_fake_cifar10() -> Callable[..., tuple[np.ndarray, ...]]:
    """``write(root, n_per_batch=4, n_test=6)`` writes ``root/cifar-10-batches-py`` pickles."""

    def write(root: Path, n_per_batch: int = 4, n_test: int = 6) -> tuple[np.ndarray, ...]:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        xs, ys = [], []
        for i in range(1, 6):
            data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
            with open(folder / f"data_batch_{i}", "wb") as f:
                pickle.dump({"data": data, "labels": labels}, f)
            xs.append(data)
            ys.extend(labels)
        test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
        test_labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({"data": test, "labels": test_labels}, f)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
        x = np.concatenate(xs).reshape(-1, 3, 32, 32)
        return x, np.asarray(ys), test.reshape(-1, 3, 32, 32), np.asarray(test_labels)

    return write
