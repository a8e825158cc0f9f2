"""Bit precision, quantised export and compression rates of Bayesian Compression networks."""

import math

import pytest
import torch
from torch import nn

from pyro_sbp.export.bit_precision import (
    code_bits,
    compression_report,
    export_bc,
    kept_units,
    masked_network,
    quantize,
    quantize_bc,
    significand_bits,
)
from pyro_sbp.models import build_network
from pyro_sbp.models.bayesian_compression import (
    apply_group_masks,
    make_bayesian_compression,
    named_bc_layers,
)


def test_significand_bits_hand_cases():
    # 2 Var = 2^-10: the round-offs 2^-1 .. 2^-9 exceed it (strictly): 9 bits.
    assert significand_bits(torch.tensor([2.0**-11])) == 9
    assert significand_bits(torch.tensor([0.0])) == 23  # all 23 of float32
    assert significand_bits(torch.tensor([1.0])) == 0  # 2 Var = 2 exceeds every round-off
    # The layer's mean, rounded up: (9 + 23) / 2 = 16; (9 + 10) / 2 = 9.5 -> 10.
    assert significand_bits(torch.tensor([2.0**-11, 0.0])) == 16
    assert significand_bits(torch.tensor([2.0**-11, 2.0**-12])) == 10
    assert significand_bits(torch.tensor([])) == 0
    with pytest.raises(ValueError, match="non-negative"):
        significand_bits(torch.tensor([-1.0]))


def test_quantize_and_code_bits_hand_cases():
    w = torch.tensor([0.3, -0.3, 0.124, 0.76])
    # floor(w 4 + 1/2) / 4: 1.7 -> 1, -0.7 -> -1, 0.996 -> 0, 3.54 -> 3.
    assert torch.equal(quantize(w, 2), torch.tensor([0.25, -0.25, 0.0, 0.75]))
    # codes k = 1, -1, 0, 3: sign + ceil(log2(4)) = 3 bits.
    assert code_bits(quantize(w, 2), 2) == 3
    assert code_bits(torch.tensor([0.5]), 9) == 1 + 9  # k = 256: 9 magnitude bits
    assert code_bits(torch.tensor([2.0**-9]), 9) == 2  # k = 1
    with pytest.raises(ValueError, match="significand bits"):
        quantize(w, -1)


def _hand_built():
    net = make_bayesian_compression(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    first, last = net[0], net[2]
    with torch.no_grad():
        for layer in (first, last):
            layer.z_loc.fill_(1.0)
            layer.z_log_sigma2.fill_(-80.0)  # Var[z] ~ 0: Var[w] = sigma_w^2
            layer.weight_log_sigma2.fill_(math.log(2.0**-11))  # 9 significand bits
        first.weight.copy_(
            torch.tensor([[0.75, 0.5, 0.1, 0.2], [0.3, 0.2, 0.1, 0.1], [-0.25, 0.125, 0.3, 0.4]])
        )
        last.weight.copy_(torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.3, 0.0]]))
    apply_group_masks(net, {"0": torch.tensor([1, 1, 0, 0]), "2": torch.tensor([1, 0, 1])})
    return net.eval()


def test_compression_rates_hand_built():
    net = _hand_built()
    kept = kept_units(net, (4,))
    # Layer 2 drops input 1: layer 0's unit 1 goes (a Linear -> ReLU -> Linear chain).
    assert kept["0"][0].tolist() == [True, False, True]
    assert kept["0"][1].tolist() == [True, True, False, False]
    assert kept["2"][1].tolist() == [True, False, True]
    bits = quantize_bc(net, (4,))
    assert bits == {"0": 9, "2": 9}
    rep = compression_report(net, (4,), bits=bits)
    # Kept: 2 x 2 and 2 x 2 of 12 + 6 weights at 32 bits.
    assert rep["weights_full"] == 18 and rep["weights_kept"] == 8
    assert rep["compression_pruning"] == pytest.approx(18 / 8)
    # Codes: layer 0 max |k| = 0.75 * 512 = 384 -> 1 + 9 bits; layer 2: 256 -> 1 + 9 bits.
    assert rep["layers"]["0"]["code_bits"] == 10 and rep["layers"]["2"]["code_bits"] == 10
    assert rep["compression_fast_prediction"] == pytest.approx(576 / 80)
    # Layer 2's kept codes [[256, 0], [0, 0]]: CSR = 1 value (10 + 1 column bit) + 3 row
    # pointers of 1 bit = 14 bits < 40 dense; layer 0 stays dense (40).
    assert rep["layers"]["2"]["bits_csr"] == 14
    assert rep["compression_maximum"] == pytest.approx(576 / (40 + 14))
    assert rep["architecture"] == [2, 2]
    # The export has exactly those weights, and computes the masked (quantised) network.
    small = export_bc(net, (4,), bits=bits)
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2, 2), (2, 2)]
    x = torch.randn(7, 4)
    assert torch.allclose(small(x), masked_network(net, bits=bits)(x), atol=1e-6)


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_export_equals_masked_network(prior):
    gen = torch.Generator().manual_seed(0)
    net = make_bayesian_compression(build_network("lenet5-caffe"), prior)
    masks = {}
    for name, layer in named_bc_layers(net):
        masks[name] = torch.rand(layer.num_groups, generator=gen) < 0.4
        if name == "classifier.1":  # whole channels of features.3 unused downstream
            masks[name].view(50, 16)[:10] = False
    apply_group_masks(net, masks)
    net.eval()
    x = torch.rand(6, 1, 28, 28, generator=gen)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(masked_network(net)(x), ref, atol=1e-6)
        small = export_bc(net, (1, 28, 28))
        assert torch.allclose(small(x), ref, rtol=1e-4, atol=1e-5)
        kept = kept_units(net, (1, 28, 28))
        convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [
            int(kept["features.0"][0].sum()),
            int(kept["features.3"][0].sum()),
        ]
        assert int(kept["features.3"][0].sum()) <= int(masks["features.3"].sum())
        linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
        rep = compression_report(net, (1, 28, 28))
        assert sum(m.weight.numel() for m in [*convs, *linears]) == rep["weights_kept"]
        bits = quantize_bc(net)
        q_small = export_bc(net, (1, 28, 28), bits=bits)
        q_ref = masked_network(net, bits=bits)
        assert torch.allclose(q_small(x), q_ref(x), rtol=1e-4, atol=1e-5)
        # Rounding moves each kept weight by at most half a step 2^-s.
        for name, _layer in named_bc_layers(net):
            w = masked_network(net).get_submodule(name).weight
            wq = q_ref.get_submodule(name).weight
            assert (w - wq).abs().max() <= 2.0 ** -(bits[name] + 1) + 1e-7


def test_export_bad_input():
    net = make_bayesian_compression(build_network("digits-mlp"))
    with pytest.raises(ValueError, match="shape"):
        export_bc(net, (1, 8, 8), masks={"classifier.1": torch.ones(3)})


def test_the_report_of_a_short_run_writes_its_files(tmp_path):
    from pyro_sbp.export.bit_precision import format_bc_summary, make_bc_report
    from pyro_sbp.infer import TrainConfig, Trainer

    config = TrainConfig(
        model="digits-mlp",
        dataset="digits",
        method="bc-gnj",
        epochs=1,
        pretrain_epochs=1,
        batch_size=128,
    )
    Trainer(config, tmp_path, progress=False).fit()
    report = make_bc_report(tmp_path, bench=False, num_draws=10)
    for name in ("report.json", "masks.pt", "full.pt", "pruned.pt", "compression.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "posterior.nc").is_file()
    assert report["criterion"] == "log-alpha:-3" and report["latency_cpu"] == []
    assert 0.0 <= report["accuracy_quantized"] <= 1.0
    assert "fast prediction" in format_bc_summary(report)
