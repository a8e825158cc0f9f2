"""The compression-accuracy sweep: fits per KL weight, the frontier, the choice, resumption."""

import dataclasses
import json

import pytest

from pyro_sbp.cli import main
from pyro_sbp.infer import TrainConfig, load_checkpoint
from pyro_sbp.infer.sweep import SweepPoint, _choose, _frontier, run_sweep
from tests.test_cli import TINY


def _config() -> TrainConfig:
    return TrainConfig(
        network_kwargs={"hidden": [16, 8]},
        pretrain_epochs=2,
        pretrain_lr=0.01,
        epochs=3,
        finetune_epochs=1,
        batch_size=64,
        gate_lr=0.2,
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    record = run_sweep(
        _config(), [1000.0, 1.0], out, criterion="snr:1", max_accuracy_drop=100.0, progress=False
    )
    return out, record


def test_one_run_per_weight_from_one_pretrained_network(swept):
    out, record = swept
    assert [p["kl_weight"] for p in record["points"]] == [1.0, 1000.0]
    pretrained = load_checkpoint(out / "pretrained")
    assert (pretrained["pretrain_done"], pretrained["svi_done"]) == (2, 0)
    for w in (1.0, 1000.0):
        ckpt = load_checkpoint(out / f"kl-{w:g}")
        config = ckpt["config"]
        assert config["kl_weight"] == w and config["prune_criterion"] == "snr:1"
        assert config["pretrained"] == str(out / "pretrained" / "checkpoint.pt")
        assert (ckpt["pretrain_done"], ckpt["svi_done"]) == (0, 4)
    assert json.loads((out / "sweep.json").read_text()) == record


def test_a_larger_weight_gives_a_smaller_network_and_is_chosen(swept):
    _, record = swept
    small, large = record["points"]
    assert large["fraction_removed"] > small["fraction_removed"]
    assert large["params"] < small["params"] and large["flops"] < small["flops"]
    # Within 100 points everything qualifies: the one with the fewest parameters is chosen.
    assert record["chosen"] == 1000.0
    assert record["reference"]["params"] >= small["params"]
    assert 0.0 < record["reference"]["val_accuracy"] <= 1.0


def test_an_interrupted_or_finished_sweep_is_only_read_back(swept):
    out, record = swept
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    again = run_sweep(
        _config(), [1.0, 1000.0], out, criterion="snr:1", max_accuracy_drop=100.0, progress=False
    )
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")} == stamps
    assert again["points"] == record["points"]


def _point(w, removed, acc, params):
    total = {"a": 100}
    return SweepPoint(w, "", acc, acc, {"a": round(100 * (1 - removed))}, total, params, params)


def test_the_choice_and_the_frontier():
    points = [
        _point(1.0, 0.1, 0.95, 900),
        _point(10.0, 0.5, 0.945, 500),
        _point(30.0, 0.4, 0.90, 600),  # beaten by the weight-10 point on both axes
        _point(100.0, 0.9, 0.80, 100),
    ]
    assert _frontier(points) == [1.0, 10.0, 100.0]
    assert _choose(points, 0.95, 1.0) == 10.0  # 0.5 points below
    assert _choose(points, 0.95, 0.4) == 1.0
    assert _choose(points, 0.95, 20.0) == 100.0
    assert _choose(points, 0.99, 0.1) is None
    assert _choose(points, 0.95, None) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kl_weights": []}, "at least one KL weight"),
        ({"kl_weights": [0.0]}, "positive numbers"),
        ({"kl_weights": [1.0], "max_accuracy_drop": -1.0}, "max_accuracy_drop must be >= 0"),
        ({"kl_weights": [1.0], "criterion": "bmrs-x"}, "unknown pruning criterion"),
    ],
)
def test_bad_sweeps_are_refused(tmp_path, kwargs, match):
    weights = kwargs.pop("kl_weights")
    with pytest.raises(ValueError, match=match):
        run_sweep(_config(), weights, tmp_path, progress=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_the_sweep_command_exports_and_reports_the_chosen_network(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--epochs", "3", "--finetune-epochs", "1", "--gate-lr", "0.2"]
    args += ["--pretrain-epochs", "2", "--pretrain-lr", "0.01", "--batch-size", "64"]
    args += ["--criterion", "snr:1", "--kl-weights", "1,10", "--max-accuracy-drop", "100"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chosen: KL weight 10," in printed
    assert (out / "frontier.png").stat().st_size > 10_000
    for name in ("full.pt", "pruned.pt", "report.json"):
        assert (out / "kl-10" / name).is_file(), name
    report = json.loads((out / "kl-10" / "report.json").read_text())
    assert (report["criterion"], report["training_criterion"]) == ("trained", "snr:1")
    sweep = json.loads((out / "sweep.json").read_text())
    measured = next(p for p in sweep["points"] if p["kl_weight"] == 10.0)
    assert measured["fraction_removed"] > 0
    assert report["params_pruned"] == measured["params"]  # the network the sweep measured


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--kl-weights", "1,x", "expected comma-separated numbers"),
        ("--kl-weights", "1,-3", "expected positive numbers"),
    ],
)
def test_bad_sweep_arguments(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as info:
        main(["sweep", option, value, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_sweep_run_again_with_other_settings_is_refused_or_continued(tmp_path):
    config = dataclasses.replace(_config(), epochs=1, finetune_epochs=0)
    run_sweep(config, [10.0], tmp_path, criterion="snr:1", progress=False)
    with pytest.raises(ValueError, match=r"holds a fit of other settings \(gate_lr: 0.2 there"):
        run_sweep(dataclasses.replace(config, gate_lr=0.1), [10.0], tmp_path, criterion="snr:1")
    # More epochs: the fits continue where they stopped.
    record = run_sweep(
        dataclasses.replace(config, epochs=2), [10.0], tmp_path, criterion="snr:1", progress=False
    )
    assert load_checkpoint(tmp_path / "kl-10")["svi_done"] == 2
    assert len(record["points"]) == 1


def test_given_splits_and_the_default_criterion(tmp_path):
    from torch.utils.data import TensorDataset

    from pyro_sbp.data import load_dataset
    from pyro_sbp.reduction import DEFAULT_CRITERION

    splits = load_dataset("digits", seed=0)
    x, y = splits.train.tensors
    split = dict(splits.split, sizes=dict(splits.split["sizes"], train=300))
    split["indices"] = dict(split["indices"], train=split["indices"]["train"][:300])
    small = dataclasses.replace(splits, train=TensorDataset(x[:300], y[:300]), split=split)
    config = dataclasses.replace(_config(), epochs=1, finetune_epochs=0)
    record = run_sweep(config, [10.0], tmp_path, progress=False, splits=small)
    assert record["criterion"] == DEFAULT_CRITERION == "bmrs-u:4"
    ckpt = load_checkpoint(tmp_path / "kl-10")
    assert ckpt["split"]["sizes"]["train"] == 300
    # Read back with the same data: nothing is fitted again.
    again = run_sweep(config, [10.0], tmp_path, progress=False, splits=small)
    assert again["points"] == record["points"]
