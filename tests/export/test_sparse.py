"""Sparse VD export: equal to the masked network in evaluation, dead units removed, CSR sizes."""

import itertools
import math

import pytest
import torch
from torch import nn

from pyro_sbp.export import FeatureSelect, load_torchscript, save_torchscript
from pyro_sbp.export.sparse import (
    SparseConv2d,
    SparseLinear,
    export_sparse_vd,
    format_storage,
    load_sparse,
    save_sparse,
    sparse_storage,
)
from pyro_sbp.infer.checkpoint import CheckpointError
from pyro_sbp.models import build_network
from pyro_sbp.models.sparse_vd import (
    compute_weight_masks,
    make_sparse_vd,
    named_sparse_vd_layers,
    set_threshold,
)


def _sparsify(net, dead_rows=0.3, seed=0):
    """Random log alphas around 0 (about a third above 3), random biases, and a fraction of
    each layer's units with every incoming weight removed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in named_sparse_vd_layers(net):
            noise = torch.randn(layer.weight.shape, generator=gen)
            layer.log_sigma2.copy_(layer.weight.square().log() + 3 * noise)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
            rows = torch.rand(layer.weight.shape[0], generator=gen) < dead_rows
            layer.log_sigma2[rows] = 50.0
    return net.eval()


@pytest.fixture(scope="module")
def lenet5():
    torch.manual_seed(0)
    return _sparsify(make_sparse_vd(build_network("lenet5-caffe", mean=0.3, std=0.5)))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_export_equals_the_masked_network(lenet5, sparse):
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        expected = lenet5(x)
        got = export_sparse_vd(lenet5, (1, 28, 28), sparse=sparse)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_full_export_is_the_unmasked_network(lenet5):
    x = torch.rand(4, 1, 28, 28)
    full = export_sparse_vd(lenet5, (1, 28, 28), masks="all")
    set_threshold(lenet5, math.inf)
    try:
        with torch.no_grad():
            torch.testing.assert_close(full(x), lenet5(x), rtol=1e-4, atol=1e-5)
    finally:
        set_threshold(lenet5, 3.0)
    widths = [
        m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for m in full.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    assert widths == [20, 50, 500, 10]


def test_dead_units_are_removed(lenet5):
    keep = {name: layer.keep() for name, layer in named_sparse_vd_layers(lenet5)}
    pruned = export_sparse_vd(lenet5, (1, 28, 28))
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    # Every unit with an incoming weight left, and only those (the rows removed above have
    # none; at about a third of the weights removed at random, every other unit keeps some
    # input and is read by a kept unit).
    alive = {n: int(k.reshape(k.shape[0], -1).any(1).sum()) for n, k in keep.items()}
    assert [m.out_channels for m in convs] == [alive["features.0"], alive["features.3"]]
    assert linears[0].out_features == alive["classifier.1"]
    assert linears[1].out_features == 10  # the classifier's outputs always stay
    assert convs[1].in_channels == alive["features.0"]
    assert linears[0].in_features == alive["features.3"] * 16
    assert alive["features.3"] < 50 and alive["classifier.1"] < 500


def test_csr_sizes_and_storage_report(lenet5):
    sparse = export_sparse_vd(lenet5, (1, 28, 28), sparse=True)
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear | SparseConv2d)]
    assert [type(m) for m in layers] == [SparseConv2d, SparseConv2d, SparseLinear, SparseLinear]
    result = compute_weight_masks(lenet5, "log-alpha:3")
    report = sparse_storage(sparse, lenet5)
    total = report["total"]
    # The CSR holds the kept weights of the kept units that read kept units (a weight reading
    # a dead unit is folded into the bias with the unit's constant).
    keep = result.masks()
    alive = {n: k.reshape(k.shape[0], -1).any(1) for n, k in keep.items()}
    names = list(keep)
    expected = [int(keep[names[0]][alive[names[0]]].sum())]
    for prev, name in itertools.pairwise(names):
        k = keep[name][alive[name]] if name != names[-1] else keep[name]
        cols = alive[prev].repeat_interleave(k.shape[1] // alive[prev].numel())
        expected.append(int(k[:, cols].sum()))
    assert [row["nnz"] for row in report["layers"].values()] == expected
    assert total["nnz"] == sum(expected) < result.weights_after
    assert total["weights"] == result.weights_before == 20 * 25 + 50 * 20 * 25 + 800 * 500 + 5000
    assert total["compression"] == pytest.approx(total["weights"] / sum(expected))
    for m, row in zip(layers, report["layers"].values(), strict=True):
        w = m.weight
        assert w.crow_indices().dtype == w.col_indices().dtype == torch.int32
        nnz = row["nnz"]
        assert row["csr_bytes"] == 4 * nnz + 4 * nnz + 4 * (w.shape[0] + 1)
    assert total["storage_ratio"] == pytest.approx(
        total["dense_bytes"] / (total["csr_bytes"] + total["bias_bytes"])
    )
    assert "total" in format_storage(report)


def test_unread_inputs_are_selected_away():
    torch.manual_seed(1)
    net = _sparsify(make_sparse_vd(build_network("lenet-300-100")), dead_rows=0.0)
    first = net.classifier[1]
    with torch.no_grad():
        first.log_sigma2[:, :100] = 50.0  # the first 100 pixels are read by no unit
    x = torch.rand(5, 1, 28, 28)
    pruned = export_sparse_vd(net, (1, 28, 28))
    selects = [m for m in pruned.modules() if isinstance(m, FeatureSelect)]
    assert len(selects) == 1 and selects[0].index.min() >= 100
    assert selects[0].index.numel() == int(first.keep().any(0).sum()) <= 684
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-4, atol=1e-5)


def test_constant_units_fold_into_the_next_bias():
    # A hidden unit with no incoming weight outputs relu(bias): removed, its constant carried
    # by the next layer's bias.
    torch.manual_seed(2)
    net = make_sparse_vd(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).eval()
    with torch.no_grad():
        net[0].log_sigma2.copy_(net[0].weight.square().log() - 2)
        net[2].log_sigma2.copy_(net[2].weight.square().log() - 2)
        net[0].log_sigma2[1] = 50.0
        net[0].bias[1] = 0.7
    pruned = export_sparse_vd(net, (4,), select_inputs=False)
    assert pruned[0].out_features == 2 and pruned[2].in_features == 2
    x = torch.randn(8, 4)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x))


def test_torchscript_and_save_load(lenet5, tmp_path):
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = lenet5(x)
    save_torchscript(export_sparse_vd(lenet5, (1, 28, 28)), tmp_path / "pruned.pt")
    scripted = load_torchscript(tmp_path / "pruned.pt")
    sparse = export_sparse_vd(lenet5, (1, 28, 28), sparse=True)
    save_sparse(sparse, tmp_path / "sparse.pt")
    loaded = load_sparse(tmp_path / "sparse.pt")
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a sparse network file"):
        load_sparse(tmp_path / "other.pt")


def test_bad_masks(lenet5):
    with pytest.raises(ValueError, match="masks must be a dict, None or 'all'"):
        export_sparse_vd(lenet5, (1, 28, 28), masks="some")
    with pytest.raises(ValueError, match="unknown Sparse VD layers"):
        export_sparse_vd(lenet5, (1, 28, 28), masks={"x": torch.ones(1, dtype=torch.bool)})
