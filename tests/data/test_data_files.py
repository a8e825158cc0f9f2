"""File-backed data sets: Fashion-MNIST, MNIST and CIFAR-10 (never over the network)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_sbp.data import (
    FASHION_MNIST_SYSTEM_DIRS,
    DataSplits,
    IDXFormatError,
    _sources,
    load_dataset,
)

SYSTEM_DIR = Path(FASHION_MNIST_SYSTEM_DIRS[0])
HAVE_SYSTEM_FASHION = (SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_system_fashion = pytest.mark.skipif(
    not HAVE_SYSTEM_FASHION,
    reason=f"Fashion-MNIST not installed in {SYSTEM_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def no_system_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the Fashion-MNIST system search path at an empty directory."""
    empty = tmp_path / "system-empty"
    monkeypatch.setattr(_sources, "FASHION_MNIST_SYSTEM_DIRS", (str(empty),))
    return empty


def _check_images(splits: DataSplits, arrays: tuple[np.ndarray, ...]) -> None:
    x, y, x_test, y_test = arrays
    idx = splits.split["indices"]
    expected = torch.from_numpy(x).unsqueeze(1).float() / 255
    torch.testing.assert_close(splits.train.tensors[0], expected[idx["train"]], rtol=0, atol=0)
    assert splits.train.tensors[1].tolist() == y[idx["train"]].tolist()
    expected_test = torch.from_numpy(x_test).unsqueeze(1).float() / 255
    torch.testing.assert_close(splits.test.tensors[0], expected_test, rtol=0, atol=0)
    assert splits.test.tensors[1].tolist() == y_test.tolist()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's dataset-fashion-mnist


@pytest.fixture(scope="module")
def system_fashion() -> DataSplits:
    if not HAVE_SYSTEM_FASHION:
        pytest.skip(f"Fashion-MNIST not installed in {SYSTEM_DIR}")
    return load_dataset("fashion-mnist")


@needs_system_fashion
def test_fashion_mnist_system_package(system_fashion: DataSplits) -> None:
    s = system_fashion
    assert s.split["source"] == str(SYSTEM_DIR)
    assert s.split["test_split"] == "official" and s.split["test_fraction"] is None
    assert (len(s.train), len(s.val), len(s.test)) == (48000, 12000, 10000)
    assert s.split["sizes"]["total"] == 70000
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.train.tensors[0].dtype == torch.float32
    labels = torch.cat([s.train.tensors[1], s.val.tensors[1]])
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert torch.bincount(s.test.tensors[1]).tolist() == [1000] * 10
    assert float(s.test.tensors[0].min()) == 0.0 and float(s.test.tensors[0].max()) == 1.0
    assert s.mean[0] == pytest.approx(0.286, abs=0.002)
    assert s.std[0] == pytest.approx(0.353, abs=0.002)
    train, val = s.split["indices"]["train"], s.split["indices"]["val"]
    assert sorted(train + val) == list(range(60000))


@needs_system_fashion
def test_fashion_mnist_resize_32(system_fashion: DataSplits) -> None:
    s = load_dataset("fashion-mnist", resize=32, val_fraction=0)
    assert s.input_shape == (1, 32, 32) and s.val is None
    assert s.train.tensors[0].shape == (60000, 1, 32, 32)
    assert s.test.tensors[0].shape == (10000, 1, 32, 32)
    x = s.test.tensors[0]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    expected = torch.nn.functional.interpolate(
        system_fashion.test.tensors[0][:50], size=(32, 32), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(x[:50], expected)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from the user's data_dir


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_files_directly_in_data_dir(
    tmp_path: Path, write_fake_idx_set, no_system_dirs: Path, gz: bool
) -> None:
    arrays = write_fake_idx_set(tmp_path, gz=gz)
    s = load_dataset("fashion-mnist", tmp_path, val_fraction=0.25)
    assert s.split["source"] == str(tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (45, 15, 20)
    _check_images(s, arrays)


def test_fashion_mnist_torchvision_layout(
    tmp_path: Path, write_fake_idx_set, no_system_dirs: Path
) -> None:
    # Uncompressed files in root/FashionMNIST/raw: torchvision's own layout.
    arrays = write_fake_idx_set(tmp_path / "FashionMNIST" / "raw")
    s = load_dataset("fashion-mnist", tmp_path)
    assert s.split["source"] == str(tmp_path / "FashionMNIST" / "raw")
    _check_images(s, arrays)


def test_fashion_mnist_gzipped_torchvision_root(
    tmp_path: Path, write_fake_idx_set, no_system_dirs: Path
) -> None:
    # Only the .gz files (as downloaded, not yet extracted): read with our IDX reader.
    arrays = write_fake_idx_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    s = load_dataset("fashion-mnist", tmp_path)
    _check_images(s, arrays)


def test_fashion_mnist_data_dir_before_system_dir(
    tmp_path: Path, write_fake_idx_set, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "system"
    write_fake_idx_set(system, gz=True, seed=1)
    mine = tmp_path / "mine"
    arrays = write_fake_idx_set(mine, seed=2)
    monkeypatch.setattr(_sources, "FASHION_MNIST_SYSTEM_DIRS", (str(system),))
    _check_images(load_dataset("fashion-mnist", mine), arrays)
    # An explicit data_dir that holds no data set is an error naming what was looked for; the
    # system copy is not used instead.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", tmp_path / "empty")
    message = str(info.value)
    assert f"data_dir {tmp_path / 'empty'} holds no fashion-mnist data set" in message
    assert "train-images-idx3-ubyte" in message
    assert str(system) not in message
    # Without a data_dir the system copy is found.
    assert load_dataset("fashion-mnist").split["source"] == str(system)


def test_fashion_mnist_corrupt_file_is_an_error(
    tmp_path: Path, write_fake_idx_set, no_system_dirs: Path
) -> None:
    write_fake_idx_set(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(IDXFormatError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_inconsistent_files(
    tmp_path: Path, write_fake_idx_set, no_system_dirs: Path
) -> None:
    write_fake_idx_set(tmp_path)
    from pyro_sbp.data import write_idx

    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    with pytest.raises(IDXFormatError, match="60 train images but 7 train labels"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_missing(tmp_path: Path, no_system_dirs: Path) -> None:
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", tmp_path / "partial")
    message = str(info.value)
    for place in (tmp_path / "partial", tmp_path / "partial" / "FashionMNIST" / "raw"):
        assert f"- {place} (missing" in message
    assert str(no_system_dirs) not in message  # a data_dir given is the only place looked in
    assert "missing train-labels-idx1-ubyte[.gz]" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "download=True" in message


def test_fashion_mnist_missing_without_data_dir(no_system_dirs: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no data_dir was given") as info:
        load_dataset("fashion-mnist")
    assert str(no_system_dirs) in str(info.value)


def test_fashion_mnist_download_needs_data_dir(no_system_dirs: Path) -> None:
    with pytest.raises(ValueError, match="download=True needs a data_dir"):
        load_dataset("fashion-mnist", download=True)


def test_fashion_mnist_download_goes_through_torchvision(
    tmp_path: Path, write_fake_idx_set, no_system_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    calls: list[str] = []

    def fake_download(self: torchvision.datasets.FashionMNIST) -> None:
        calls.append(self.raw_folder)
        if not calls[1:]:
            write_fake_idx_set(Path(self.raw_folder))

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    s = load_dataset("fashion-mnist", tmp_path, download=True)
    assert calls and calls[0] == str(tmp_path / "FashionMNIST" / "raw")
    assert len(s.test) == 20
    # Files present: no download even with download=True.
    calls.clear()
    load_dataset("fashion-mnist", tmp_path, download=True)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# MNIST through torchvision


def test_mnist_torchvision_layout(tmp_path: Path, write_fake_idx_set) -> None:
    arrays = write_fake_idx_set(tmp_path / "MNIST" / "raw", n_train=50, n_test=30)
    s = load_dataset("mnist", tmp_path, seed=4)
    assert s.name == "mnist" and s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 30)
    assert s.split["source"] == str(tmp_path / "MNIST" / "raw")
    _check_images(s, arrays)
    resized = load_dataset("mnist", tmp_path, seed=4, resize=32)
    assert resized.input_shape == (1, 32, 32)
    assert resized.split["indices"] == s.split["indices"]


def test_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "download=True" in message
    with pytest.raises(FileNotFoundError, match="no data_dir was given"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "download=True" in message
    with pytest.raises(FileNotFoundError, match="no data_dir was given"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="download=True needs a data_dir"):
        load_dataset("cifar10", download=True)


def test_cifar10_fake_batches(
    tmp_path: Path, write_fake_cifar10, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision checks the real files' md5 sums; fake files need that check switched off.
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    x, y, x_test, y_test = write_fake_cifar10(tmp_path)
    s = load_dataset("cifar10", tmp_path, val_fraction=0.2)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 6)
    idx = s.split["indices"]["train"]
    expected = torch.from_numpy(x[idx]).float() / 255
    torch.testing.assert_close(s.train.tensors[0], expected, rtol=0, atol=0)
    assert s.train.tensors[1].tolist() == y[idx].tolist()
    torch.testing.assert_close(s.test.tensors[0], torch.from_numpy(x_test).float() / 255)
    assert s.test.tensors[1].tolist() == y_test.tolist()
    assert len(s.mean) == len(s.std) == 3


def test_cifar10_real_files() -> None:
    root = os.environ.get("PYRO_SBP_DATA_DIR")
    if root is None or not (Path(root) / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip("CIFAR-10 not present (set PYRO_SBP_DATA_DIR to a torchvision root with it)")
    s = load_dataset("cifar10", root)
    assert (len(s.train), len(s.val), len(s.test)) == (40000, 10000, 10000)
    assert s.input_shape == (3, 32, 32)


def test_cifar10_batches_are_read_without_running_code(
    tmp_path: Path, write_fake_cifar10, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import pickle

    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(path, "wb") as f:
        pickle.dump({"data": Payload(), "labels": [1]}, f)
    with pytest.raises(ValueError, match=r"refusing to unpickle posix\.system") as info:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 10), dtype=np.uint8), "labels": [1, 2]}, f)
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 batch \(expected"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_batches_of_another_md5_are_refused(tmp_path: Path, write_fake_cifar10) -> None:
    write_fake_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"data_batch_1 is corrupt \(its md5 is not"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_read_cifar_batch_takes_bytes_keys(tmp_path: Path, protocol: int) -> None:
    import pickle

    from pyro_sbp.data._sources import read_cifar_batch

    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({b"data": data, b"labels": [3, 4], b"batch_label": b"x"}, f, protocol)
    batch = read_cifar_batch(tmp_path / "b")
    assert np.array_equal(batch["data"], data) and batch["labels"] == [3, 4]
