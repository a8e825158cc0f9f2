"""make_loaders: seeded shuffling and (x, y, idx) training batches."""

from __future__ import annotations

import pytest
import torch

from pyro_sbp.data import DataSplits, load_dataset, make_loaders


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


def _epoch(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(batch) for batch in loader]


def test_keys(digits: DataSplits) -> None:
    loaders = make_loaders(digits, 64)
    assert set(loaders) == {"train", "val", "test"}
    no_val = load_dataset("digits", val_fraction=0)
    assert set(make_loaders(no_val, 64)) == {"train", "test"}


def test_train_yields_index_triples(digits: DataSplits) -> None:
    loader = make_loaders(digits, 100)["train"]
    assert len(loader) == 12  # ceil(1150 / 100)
    batches = _epoch(loader)
    assert len(batches) == 12
    seen = []
    x_all, y_all = digits.train.tensors
    for batch in batches:
        assert isinstance(batch, tuple) and len(batch) == 3
        x, y, idx = batch
        assert idx.dtype == torch.int64 and y.dtype == torch.int64 and x.dtype == torch.float32
        assert x.shape[1:] == (1, 8, 8)
        assert torch.equal(x, x_all[idx]) and torch.equal(y, y_all[idx])
        seen.append(idx)
    sizes = [len(i) for i in seen]
    assert sizes == [100] * 11 + [50]
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(digits.num_train))
    assert not torch.equal(order, torch.arange(digits.num_train))  # shuffled


def test_train_shuffle_is_seeded(digits: DataSplits) -> None:
    a = make_loaders(digits, 128, seed=3)["train"]
    b = make_loaders(digits, 128, seed=3)["train"]
    c = make_loaders(digits, 128, seed=4)["train"]
    first_a, first_b, first_c = (torch.cat([i for _, _, i in loader]) for loader in (a, b, c))
    assert torch.equal(first_a, first_b)
    assert not torch.equal(first_a, first_c)
    # Each epoch reshuffles, reproducibly.
    second_a = torch.cat([i for _, _, i in a])
    second_b = torch.cat([i for _, _, i in b])
    assert torch.equal(second_a, second_b)
    assert not torch.equal(first_a, second_a)


def test_loaders_do_not_touch_global_rng(digits: DataSplits) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for loader in make_loaders(digits, 128, seed=1).values():
        _epoch(loader)
    assert torch.equal(torch.rand(3), expected)


def test_eval_loaders_yield_pairs_in_order(digits: DataSplits) -> None:
    loaders = make_loaders(digits, 64, eval_batch_size=100)
    for key, part in (("val", digits.val), ("test", digits.test)):
        batches = _epoch(loaders[key])
        assert all(len(b) == 2 for b in batches)
        assert [len(b[0]) for b in batches[:-1]] == [100] * (len(batches) - 1)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert torch.equal(x, part.tensors[0]) and torch.equal(y, part.tensors[1])
    assert len(_epoch(make_loaders(digits, 64)["test"])[0][0]) == 64


def test_worker_processes(digits: DataSplits) -> None:
    loaders = make_loaders(digits, 256, seed=2, num_workers=1)
    in_process = make_loaders(digits, 256, seed=2)
    a = torch.cat([i for _, _, i in loaders["train"]])
    b = torch.cat([i for _, _, i in in_process["train"]])
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"batch_size": 8, "eval_batch_size": 0}, "eval_batch_size must be a positive integer"),
        ({"batch_size": 8, "seed": -1}, "seed must be a non-negative integer"),
        ({"batch_size": 8, "num_workers": -1}, "num_workers must be a non-negative integer"),
    ],
)
def test_bad_arguments(digits: DataSplits, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_loaders(digits, **kwargs)
