"""Pruning criteria on a trained toy model: masks, matching, errors, pruning during training."""

import itertools
import json
import math

import pyro
import pytest
import torch

from pyro_sbp.cli import main
from pyro_sbp.infer import TrainConfig, Trainer
from pyro_sbp.models import named_gates
from pyro_sbp.reduction import apply_masks, compute_masks, parse_criterion


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(epochs=12, pretrain_epochs=4, batch_size=64, gate_lr=0.05)
    trainer = Trainer(config, out, progress=False)
    trainer.fit()
    return trainer, out


def _reload(out):
    pyro.clear_param_store()
    return Trainer.from_run(out)


CRITERIA = [
    "bmrs-n",
    "bmrs-n-published",
    "bmrs-u:8",
    "bmrs-u:4",
    "bmrs-u-low:4",
    "snr:1",
    "mean:0.1",
    "l2:1",
    "match:snr:bmrs-u:4",
    "match:mean:bmrs-u:4",
    "match:l2:bmrs-u:4",
]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_masks_have_the_gates_shapes_and_say_why(trained, criterion):
    _, out = trained
    trainer = _reload(out)
    result = compute_masks(trainer.net, trainer.guide, criterion)
    gates = dict(named_gates(trainer.net))
    assert list(result.layers) == list(gates)
    for site, lp in result.layers.items():
        assert lp.keep.shape == lp.scores.shape == (gates[site].num_units,)
        assert lp.keep.dtype == torch.bool
        if result.score_name == "delta_f":
            assert torch.equal(lp.keep, lp.scores < 0)
        elif not criterion.startswith("match"):
            assert torch.equal(lp.keep, lp.scores > float(criterion.split(":")[1]))
    d = result.to_dict()
    assert d["units_before"] == sum(g.num_units for g in gates.values())
    json.dumps(d)


def test_snr_criterion_agrees_with_the_guide(trained):
    _, out = trained
    trainer = _reload(out)
    result = compute_masks(trainer.net, trainer.guide, "snr:1")
    for site, snr in trainer.guide.snr().items():
        assert torch.equal(result.layers[site].keep, (snr > 1).cpu())


@pytest.mark.parametrize("base", ["snr", "mean", "l2"])
def test_match_hits_the_target_fraction(trained, base):
    _, out = trained
    trainer = _reload(out)
    target = compute_masks(trainer.net, trainer.guide, "bmrs-u:4")
    assert 0 < target.fraction_removed < 1, "the toy run should prune some units"
    matched = compute_masks(trainer.net, trainer.guide, f"match:{base}:bmrs-u:4")
    assert matched.units_after == target.units_after
    # Every removed unit scores at most the threshold, every kept one at least.
    for lp in matched.layers.values():
        assert (lp.scores[~lp.keep] <= matched.threshold).all()
        assert (lp.scores[lp.keep] >= matched.threshold).all()


def test_masks_are_cumulative_and_zero_the_units(trained):
    _, out = trained
    trainer = _reload(out)
    site, gate = next(iter(named_gates(trainer.net)))
    forced = {s: torch.ones(g.num_units, dtype=torch.bool) for s, g in named_gates(trainer.net)}
    forced[site][:3] = False
    apply_masks(trainer.net, forced)
    result = compute_masks(trainer.net, trainer.guide, "snr:0")
    assert not result.layers[site].keep[:3].any()
    assert gate.mask[:3].eq(0).all()


def test_masks_do_not_depend_on_precision_or_device_of_the_parameters(trained):
    _, out = trained
    trainer = _reload(out)
    first = compute_masks(trainer.net, trainer.guide, "bmrs-n").masks()
    store = pyro.get_param_store()
    for name in list(store.keys()):
        if name.endswith((".gate.loc", ".gate.log_scale")):
            store[name] = store[name].detach().double()
    second = compute_masks(trainer.net, trainer.guide, "bmrs-n").masks()
    assert all(torch.equal(first[s], second[s]) for s in first)


@pytest.mark.parametrize("bad", ["bogus", "snr", "bmrs-u", "match:snr", "match:foo:bmrs-n", "l2:x"])
def test_unknown_criterion_lists_the_valid_ones(bad):
    with pytest.raises(ValueError, match="valid: elbo, bmrs-n, bmrs-n-published, bmrs-u:P"):
        parse_criterion(bad)


def _published_bmrs_n(mu, sigma, a, b, s=1e-6):
    """Delta F_N as the published BMRS code writes it (expanded quadratic terms, no
    -log(2 pi)/2), transcribed term by term in float64."""
    phi = torch.distributions.Normal(0.0, 1.0).cdf
    var = sigma**2
    var_t = 1 / (1 / var + 1 / s**2)
    mu_t = var_t * (mu / var + a / s**2)
    z_q = phi((b - mu) / sigma) - phi((a - mu) / sigma)
    z_p = phi(torch.tensor((b - a) / s, dtype=torch.float64)) - 0.5
    z_qt = phi((b - mu_t) / var_t.sqrt()) - phi((a - mu_t) / var_t.sqrt())
    term1 = torch.log(z_qt * (b - a) / (z_q * z_p))
    term2 = 0.5 * torch.log(var_t / (var * s**2))
    term3 = -0.5 * (mu**2 / var + a**2 / s**2 - mu_t**2 / var_t)
    return term1 + term2 + term3


def test_bmrs_n_published_is_the_published_formula(trained):
    """The published code's Delta F_N is ours plus log(2 pi)/2, up to the ~0.05 nats its
    expanded quadratic terms lose in float64 (a^2 / s^2 = 4e14)."""
    _, out = trained
    trainer = _reload(out)
    ours = compute_masks(trainer.net, trainer.guide, "bmrs-n")
    published = compute_masks(trainer.net, trainer.guide, "bmrs-n-published")
    for site, gate in named_gates(trainer.net):
        loc, log_scale = trainer.guide.params(site)
        mu, sigma = loc.detach().double(), log_scale.detach().double().exp()
        a, b = torch.tensor(gate.low).log().item(), torch.tensor(gate.high).log().item()
        # Where the published expression is finite (its Z_q underflows far from [a, b]).
        reference = _published_bmrs_n(mu, sigma, a, b)
        ok = torch.isfinite(reference) & (reference.abs() < 1e3)
        assert ok.any()
        got = published.layers[site].scores
        assert torch.allclose(got[ok], reference[ok], atol=0.1, rtol=1e-6)
        diff = got - ours.layers[site].scores
        assert torch.allclose(diff, torch.full_like(diff, 0.5 * math.log(2 * math.pi)))


def test_bad_masks_are_refused(trained):
    _, out = trained
    trainer = _reload(out)
    site, gate = next(iter(named_gates(trainer.net)))
    with pytest.raises(ValueError, match="expected"):
        apply_masks(trainer.net, {site: torch.ones(gate.num_units + 1)})
    with pytest.raises(ValueError, match="unknown gate"):
        apply_masks(trainer.net, {"nope.gate": torch.ones(3)})


def test_prune_command_writes_masks_and_summary(trained, capsys):
    _, out = trained
    pyro.clear_param_store()
    assert main(["prune", str(out), "--criterion", "bmrs-u:4"]) == 0
    summary = json.loads((out / "pruning.json").read_text())
    masks = torch.load(out / "masks.pt")
    assert summary["criterion"] == "bmrs-u:4"
    for site, layer in summary["layers"].items():
        assert layer["units_after"] == int(masks[site].sum())
        assert len(layer["scores"]) == layer["units_before"]
    assert "removed" in capsys.readouterr().out
    assert main(["prune", str(out), "--criterion", "nope"]) == 2
    assert "valid:" in capsys.readouterr().err


def test_pruning_during_training_then_finetuning():
    pyro.set_rng_seed(0)
    config = TrainConfig(
        epochs=8,
        pretrain_epochs=3,
        finetune_epochs=2,
        batch_size=64,
        gate_lr=0.1,
        prune_criterion="bmrs-u:4",
    )
    trainer = Trainer(config, None, progress=False)
    history = trainer.fit()
    svi = [r for r in history if r["phase"] == "svi"]
    finetune = [r for r in history if r["phase"] == "finetune"]
    assert len(svi) == 8 and len(finetune) == 2
    kept = [sum(r["units_kept"].values()) for r in svi]
    assert all(b <= a for a, b in itertools.pairwise(kept)), kept
    assert kept[-1] < 150, "some units should have been pruned"
    # Frozen masks in fine-tuning; masked units are off.
    assert finetune[0]["units_kept"] == finetune[-1]["units_kept"] == svi[-1]["units_kept"]
    masks = {s: g.mask.sum().item() for s, g in named_gates(trainer.net)}
    assert masks == svi[-1]["units_kept"]


def test_trained_keeps_the_masks_on_the_gates_as_they_are(trained):
    _, out = trained
    trainer = _reload(out)
    site, gate = next(iter(named_gates(trainer.net)))
    keep = torch.ones(gate.num_units)
    keep[::3] = 0.0
    apply_masks(trainer.net, {site: keep})
    result = compute_masks(trainer.net, trainer.guide, "trained")
    assert result.masks()[site].tolist() == (keep > 0).tolist()
    assert all(bool(m.all()) for s, m in result.masks().items() if s != site)
    assert result.score_name == "mask" and result.threshold is None
    with pytest.raises(ValueError, match="cannot target"):
        parse_criterion("match:snr:trained")
