"""The seeded synthetic classification problem."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pyro_sbp.data import DataSplits, load_dataset, make_synthetic


@pytest.fixture(scope="module")
def synthetic() -> DataSplits:
    return load_dataset(
        "synthetic", seed=0, n=3000, d=20, informative=4, num_classes=3, val_fraction=0
    )


def test_shapes_and_metadata(synthetic: DataSplits) -> None:
    assert synthetic.input_shape == (20,)
    assert synthetic.num_classes == 3
    assert (len(synthetic.train), len(synthetic.test)) == (2400, 600)
    x, y = synthetic.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) > 0.0 and float(x.max()) < 1.0
    assert len(synthetic.mean) == len(synthetic.std) == 20
    assert synthetic.split["params"] == {
        "n": 3000,
        "d": 20,
        "informative": 4,
        "num_classes": 3,
        "class_sep": 2.0,
        "data_seed": 0,
    }
    all_labels = torch.cat([y, synthetic.test.tensors[1]])
    assert torch.bincount(all_labels).tolist() == [1000, 1000, 1000]


def test_deterministic_given_seed() -> None:
    a = make_synthetic(n=200, d=6, informative=2, num_classes=2, data_seed=7)
    b = make_synthetic(n=200, d=6, informative=2, num_classes=2, data_seed=7)
    c = make_synthetic(n=200, d=6, informative=2, num_classes=2, data_seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    s1 = load_dataset("synthetic", seed=5, n=200)
    s2 = load_dataset("synthetic", seed=5, n=200)
    assert s1.split == s2.split
    assert torch.equal(s1.train.tensors[0], s2.train.tensors[0])


def test_data_seed_is_separate_from_split_seed() -> None:
    a = load_dataset("synthetic", seed=1, data_seed=0, n=200)
    b = load_dataset("synthetic", seed=2, data_seed=0, n=200)
    assert a.split["params"] == b.split["params"]
    assert a.split["indices"] != b.split["indices"]
    # Same underlying examples: each split's rows are the data set's rows at its indices.
    full = make_synthetic(n=200, data_seed=0).x
    for s in (a, b):
        assert torch.equal(s.train.tensors[0], full[s.split["indices"]["train"]])


def _test_accuracy(splits: DataSplits, features: slice) -> float:
    x, y = splits.train.tensors
    xt, yt = splits.test.tensors
    model = LogisticRegression(max_iter=2000)
    model.fit(x[:, features].numpy(), y.numpy())
    return float(model.score(xt[:, features].numpy(), yt.numpy()))


def test_only_informative_features_separate_classes(synthetic: DataSplits) -> None:
    chance = 1 / 3
    informative = _test_accuracy(synthetic, slice(0, 4))
    noise = _test_accuracy(synthetic, slice(4, 20))
    assert informative > chance + 0.4, informative
    # 600 test examples: the standard error of a chance-level accuracy is about 0.02.
    assert abs(noise - chance) < 0.08, noise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"informative": 0}, "informative must be an integer in"),
        ({"informative": 21}, "informative must be an integer in"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"n": 2, "num_classes": 3}, "n=2 must be at least num_classes=3"),
        ({"class_sep": -1.0}, "class_sep must be >= 0"),
        ({"noise": 1.0}, r"unexpected keyword argument\(s\) \['noise'\] for 'synthetic'"),
    ],
)
def test_bad_synthetic_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("synthetic", **kwargs)


def test_resize_rejected_for_flat_inputs() -> None:
    with pytest.raises(ValueError, match="resize applies to image data sets"):
        load_dataset("synthetic", n=50, resize=8)
