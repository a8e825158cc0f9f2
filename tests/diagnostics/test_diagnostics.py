"""ArviZ data, netCDF round trip, ArviZ's own summary and plots, and the run report."""

import json

import arviz as az
import matplotlib
import numpy as np
import pyro
import pytest
import torch

from pyro_sbp.diagnostics import format_summary, make_report, save_netcdf, to_arviz, var_name
from pyro_sbp.infer import TrainConfig, Trainer
from pyro_sbp.models import named_gates

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        epochs=3, pretrain_epochs=2, batch_size=64, gate_lr=0.1, network_kwargs={"hidden": [16, 8]}
    )
    Trainer(config, out, progress=False).fit()
    return out


def _posterior(data):
    return data.posterior if hasattr(data, "posterior") else data["posterior"]


def test_arviz_data_has_a_unit_dim_per_layer_and_the_unit_stats(run):
    pyro.clear_param_store()
    trainer = Trainer.from_run(run)
    data = to_arviz(trainer.net, trainer.guide, num_chains=2, num_draws=50)
    post = _posterior(data)
    for site, gate in named_gates(trainer.net):
        name = var_name(site)
        theta = post[f"theta_{name}"]
        assert theta.dims == ("chain", "draw", f"{name}_unit")
        assert theta.shape == (2, 50, gate.num_units)
        assert np.all(theta.values > 0) and np.all(theta.values <= 1)
        np.testing.assert_allclose(post[f"log_theta_{name}"].values, np.log(theta.values))
        # The draws are from the guide's posterior: their mean is near E[theta].
        q = trainer.guide.posterior(site)
        np.testing.assert_allclose(
            theta.values.mean(axis=(0, 1)), q.mean.detach().numpy(), atol=0.2, rtol=0.2
        )
    const = data.constant_data if hasattr(data, "constant_data") else data["constant_data"]
    for prefix in ("mean_theta", "mask", "snr", "delta_f_bmrs_n", "delta_f_bmrs_u4", "loc"):
        assert f"{prefix}_classifier_1" in const


def test_netcdf_round_trip_summary_and_plots(run, tmp_path):
    pyro.clear_param_store()
    trainer = Trainer.from_run(run)
    data = to_arviz(trainer.net, trainer.guide, num_chains=2, num_draws=50)
    path = save_netcdf(data, tmp_path / "posterior.nc")
    back = az.from_netcdf(str(path))
    summary = az.summary(back, var_names=["theta_classifier_3"], kind="stats")
    assert len(summary) == 8 and "mean" in summary.columns
    axes = az.plot_forest(back, var_names=["log_theta_classifier_3"], combined=True)
    assert axes is not None
    az.plot_posterior(back, var_names=["theta_classifier_3"], coords={"classifier_3_unit": [0]})
    matplotlib.pyplot.close("all")


def test_report_writes_everything(run):
    pyro.clear_param_store()
    report = make_report(run, "bmrs-u:4", bench=False, num_draws=50)
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in (
        "dataset",
        "network",
        "criterion",
        "accuracy_full",
        "accuracy_pruned",
        "units",
        "params_full",
        "params_pruned",
        "flops_full",
        "flops_pruned",
        "input_shape",
    ):
        assert key in report, key
    assert report["input_shape"] == [1, 8, 8]
    for site, u in report["units"].items():
        assert 0 <= u["after"] <= u["before"], site
    for name in ("full.pt", "pruned.pt", "posterior.nc", "masks.pt"):
        assert (run / name).exists(), name
    for plot in (
        "log_theta.png",
        "delta_f_vs_snr.png",
        "training.png",
        "units_kept.png",
        "accuracy_vs_compression.png",
    ):
        assert (run / "plots" / plot).stat().st_size > 10_000, plot
    # The exported files compute what the report says: the pruned one's parameters.
    from pyro_sbp.export import count_parameters, load_torchscript

    assert count_parameters(load_torchscript(run / "pruned.pt")) == report["params_pruned"]
    x = torch.rand(4, 1, 8, 8)
    assert load_torchscript(run / "full.pt")(x).shape == (4, 10)
    # The printed summary: the layers, and every BMRS criterion's point on the same posterior.
    summary = format_summary(report)
    assert summary.splitlines()[0].endswith("pruned with bmrs-u:4")
    for site, u in report["units"].items():
        assert f"{site:<22} {u['before']:>7} {u['after']:>7}" in summary
    bmrs_line = next(line for line in summary.splitlines() if line.startswith("BMRS criteria"))
    for name in ("bmrs-n", "bmrs-u:8", "bmrs-u:4", "bmrs-u-low:4"):
        fraction, accuracy = report["accuracy_vs_compression_val"][name][0]
        assert f"{name} {100 * fraction:.0f}%, {100 * accuracy:.2f}%" in bmrs_line


@pytest.fixture(scope="module")
def pruned_in_training(tmp_path_factory):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    out = tmp_path_factory.mktemp("pruned")
    config = TrainConfig(
        epochs=3,
        pretrain_epochs=2,
        pretrain_lr=0.01,
        finetune_epochs=1,
        batch_size=64,
        gate_lr=0.2,
        kl_weight=10.0,
        network_kwargs={"hidden": [16, 8]},
        prune_criterion="snr:0.5",
    )
    Trainer(config, out, progress=False).fit()
    return out


def test_a_report_names_the_criterion_that_made_its_masks(pruned_in_training, capsys):
    from pyro_sbp.cli import main

    run = pruned_in_training
    pyro.clear_param_store()
    # By default the masks the run pruned with during training (and fine-tuned), as they are.
    from pyro_sbp.infer import Trainer as _Trainer
    from pyro_sbp.models import named_gates as _named_gates

    pyro.clear_param_store()
    trained = {s: g.mask.clone() for s, g in _named_gates(_Trainer.from_run(run).net)}
    assert sum(int(m.sum()) for m in trained.values()) < 24  # it did prune
    pyro.clear_param_store()
    report = make_report(run, bench=False, num_draws=20)
    assert (report["criterion"], report["training_criterion"]) == ("trained", "snr:0.5")
    assert {s: u["after"] for s, u in report["units"].items()} == {
        s: int(m.sum()) for s, m in trained.items()
    }
    first = format_summary(report).splitlines()[0]
    assert first.endswith("pruned with trained (the masks of pruning during training with snr:0.5)")
    # Another criterion is applied on top of the training's masks, and the summary says so.
    pyro.clear_param_store()
    report = make_report(run, "bmrs-n", bench=False, num_draws=20)
    assert (report["criterion"], report["training_criterion"]) == ("bmrs-n", "snr:0.5")
    assert "pruned with bmrs-n (on the masks of pruning during training with snr:0.5)" in (
        format_summary(report)
    )
    pyro.clear_param_store()
    assert main(["prune", str(run)]) == 0
    pruning = json.loads((run / "pruning.json").read_text())
    assert (pruning["criterion"], pruning["training_criterion"]) == ("trained", "snr:0.5")
    assert "trained" in capsys.readouterr().out
