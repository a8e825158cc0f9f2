"""load_dataset on the embedded digits: shapes, ranges, seeded splits, metadata, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pyro_sbp.data import DATASETS, DataSplits, load_dataset


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.as_tensor(bunch.target, dtype=torch.int64)


def test_registry() -> None:
    assert DATASETS == ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")


def test_digits_shapes_and_ranges(digits: DataSplits) -> None:
    assert digits.name == "digits"
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    for part in (digits.train, digits.val, digits.test):
        assert part is not None
        x, y = part.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(y.tolist()) <= set(range(10))
    assert float(digits.train.tensors[0].max()) == 1.0


def test_digits_split_sizes(digits: DataSplits) -> None:
    # 1797 examples: round(0.2 * 1797) = 359 test; round(0.2 * 1438) = 288 validation.
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1150, 288, 359)
    assert digits.num_train == 1150
    assert digits.split["sizes"] == {"train": 1150, "val": 288, "test": 359, "total": 1797}


def test_digits_split_indices_partition_and_match(
    digits: DataSplits, all_digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    indices = digits.split["indices"]
    train, val, test = (indices[k] for k in ("train", "val", "test"))
    assert sorted(train + val + test) == list(range(1797))
    assert train == sorted(train) and val == sorted(val) and test == sorted(test)
    x, y = all_digits
    for key, part in (("train", digits.train), ("val", digits.val), ("test", digits.test)):
        idx = torch.tensor(indices[key])
        assert torch.equal(part.tensors[0], x[idx])
        assert torch.equal(part.tensors[1], y[idx])


def test_split_record_is_json_and_complete(digits: DataSplits) -> None:
    record = json.loads(json.dumps(digits.split))
    assert record["seed"] == 0
    assert record["val_fraction"] == 0.2 and record["test_fraction"] == 0.2
    assert record["test_split"] == "stratified"
    assert record["dataset"] == "digits" and record["resize"] is None


def test_same_seed_same_split() -> None:
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    assert a.split == b.split
    for pa, pb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert pa is not None and pb is not None
        assert all(torch.equal(ta, tb) for ta, tb in zip(pa.tensors, pb.tensors, strict=True))
    assert a.mean == b.mean and a.std == b.std


def test_different_seeds_different_splits(digits: DataSplits) -> None:
    other = load_dataset("digits", seed=1)
    for key in ("train", "val", "test"):
        assert digits.split["indices"][key] != other.split["indices"][key]
    assert other.split["sizes"] == digits.split["sizes"]


def test_test_split_is_stratified(digits: DataSplits, all_digits) -> None:
    counts = np.bincount(all_digits[1].numpy(), minlength=10)
    test_counts = np.bincount(digits.test.tensors[1].numpy(), minlength=10)
    # Largest-remainder allocation: within one example of the exact proportion.
    assert np.all(np.abs(test_counts - counts * 359 / 1797) < 1.0)
    # The validation part is a plain random carve: proportions hold only roughly.
    val_counts = np.bincount(digits.val.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(val_counts / 288 - counts / 1797) < 0.05)


def test_mean_std_are_train_statistics(digits: DataSplits) -> None:
    x = digits.train.tensors[0].double()
    assert digits.mean == pytest.approx((float(x.mean()),), rel=1e-5)
    assert digits.std == pytest.approx((float(x.std(correction=0)),), rel=1e-5)
    assert len(digits.mean) == len(digits.std) == digits.input_shape[0]


def test_no_validation_split() -> None:
    splits = load_dataset("digits", val_fraction=0)
    assert splits.val is None
    assert len(splits.train) == 1438 and len(splits.test) == 359
    assert splits.split["indices"]["val"] == [] and splits.split["sizes"]["val"] == 0


def test_custom_fractions() -> None:
    splits = load_dataset("digits", val_fraction=0.5, test_fraction=0.1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (
        809,
        808,
        180,
    )  # round(808.5) = 808


def test_resize_digits() -> None:
    splits = load_dataset("digits", resize=16)
    assert splits.input_shape == (1, 16, 16)
    x = splits.train.tensors[0]
    assert x.shape[1:] == (1, 16, 16)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    base = load_dataset("digits")
    assert base.split["indices"] == splits.split["indices"]
    assert splits.split["resize"] == 16
    # Up front, with torch.nn.functional.interpolate (bilinear, no antialiasing).
    expected = torch.nn.functional.interpolate(
        base.train.tensors[0], size=(16, 16), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(x, expected)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown data set 'svhn'") as info:
        load_dataset("svhn")
    for name in DATASETS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.0}, "val_fraction must satisfy 0 <= val_fraction < 1"),
        ({"val_fraction": -0.1}, "val_fraction must satisfy"),
        ({"val_fraction": float("nan")}, "val_fraction must satisfy"),
        ({"val_fraction": "0.2"}, "val_fraction must be a number"),
        ({"test_fraction": 0.0}, "test_fraction must satisfy 0 < test_fraction < 1"),
        ({"test_fraction": 1.5}, "test_fraction must satisfy"),
        ({"val_fraction": 0.9999}, "leaves no training examples"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"resize": 0}, "resize must be a positive integer"),
        ({"n": 10}, r"unexpected keyword argument\(s\) \['n'\] for 'digits'"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **kwargs)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_rebuild_from_record(name: str) -> None:
    extra = {"n": 300, "informative": 3, "data_seed": 11} if name == "synthetic" else {}
    original = load_dataset(name, seed=9, val_fraction=0.3, test_fraction=0.25, **extra)
    record = json.loads(json.dumps(original.split))
    rebuilt = load_dataset(
        record["dataset"],
        seed=record["seed"],
        val_fraction=record["val_fraction"],
        test_fraction=record["test_fraction"],
        resize=record["resize"],
        **record["params"],
    )
    assert rebuilt.split == original.split
    assert torch.equal(rebuilt.train.tensors[0], original.train.tensors[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_non_finite_inputs_are_refused_with_split_and_index(
    digits: DataSplits, part: str, bad: float
) -> None:
    import dataclasses

    from torch.utils.data import TensorDataset

    x, y = getattr(digits, part).tensors
    x = x.clone()
    x[7, 0, 3, 2] = bad
    x[11, 0, 0, 0] = bad
    example = digits.split["indices"][part][7]
    with pytest.raises(ValueError) as info:
        dataclasses.replace(digits, **{part: TensorDataset(x, y)})
    message = str(info.value)
    assert f"non-finite input ({bad}) in the {part} split at index 7" in message, message
    assert f"(example {example} of the data set)" in message
    assert f"2 of its {len(x)} examples" in message


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_a_data_dir_for_a_data_set_that_reads_no_files_is_refused(name: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=f"'{name}' is .* and reads no files: drop data_dir"):
        load_dataset(name, tmp_path)
