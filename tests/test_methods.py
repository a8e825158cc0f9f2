"""The method registry, and the trainer and CLI on a Sparse VD run."""

import json

import pytest
import torch

from pyro_sbp.cli import main
from pyro_sbp.infer import TrainConfig, Trainer, evaluate, load_checkpoint
from pyro_sbp.methods import METHOD_NAMES, METHODS, Method, SBPMethod, get_method, register_method
from pyro_sbp.models import named_gates
from pyro_sbp.models.sparse_vd import SparseVDGuide, SparseVDModel, named_sparse_vd_layers

D = 12
SYNTHETIC = {"n": 600, "d": D, "informative": 3, "num_classes": 3, "class_sep": 3.0}


def _config(**kwargs) -> TrainConfig:
    base = dict(
        model="digits-mlp",
        dataset="synthetic",
        dataset_kwargs=dict(SYNTHETIC),
        network_kwargs={"hidden": [16], "in_features": D, "num_classes": 3},
        method="sparse-vd",
        epochs=6,
        pretrain_epochs=2,
        kl_warmup_epochs=2,
        lr=1e-2,
        pretrain_lr=1e-2,
        gate_lr=0.1,
        batch_size=64,
    )
    base.update(kwargs)
    return TrainConfig(**base)


def test_the_registry():
    assert list(METHODS)[:4] == list(METHOD_NAMES) == ["sbp", "sparse-vd", "bc-gnj", "bc-ghs"]
    assert isinstance(METHODS["sbp"], SBPMethod) and METHODS["sbp"] is get_method("sbp")
    svd = METHODS["sparse-vd"]
    assert isinstance(svd, Method) and svd.name == "sparse-vd"
    assert svd.default_criterion == "log-alpha:3"
    assert "sparse-vd" in METHODS and "nope" not in METHODS


def test_an_unknown_method_is_one_line_listing_the_known_ones():
    message = "unknown method 'nope'; known methods: sbp, sparse-vd, bc-gnj, bc-ghs"
    with pytest.raises(ValueError, match=message):
        get_method("nope")
    with pytest.raises(ValueError, match=message):
        TrainConfig(method="nope")
    with pytest.raises(KeyError, match="unknown method"):
        METHODS["nope"]
    with pytest.raises(ValueError, match="expected a Method with a name"):
        register_method(object())


def test_a_criterion_of_another_method_is_refused():
    with pytest.raises(ValueError, match="unknown Sparse VD criterion 'bmrs-n'"):
        _config(prune_criterion="bmrs-n")
    with pytest.raises(ValueError, match="input_gates are SBP's"):
        _config(input_gates=["classifier.1"])


@pytest.fixture
def one_thread():
    # Restored after the test: later tests keep the machine's threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_short_sparse_vd_run(tmp_path, one_thread):
    trainer = Trainer(_config(), tmp_path / "run", progress=False)
    assert isinstance(trainer.model, SparseVDModel) and isinstance(trainer.guide, SparseVDGuide)
    assert not list(named_gates(trainer.net))
    history = trainer.fit()
    assert [r["phase"] for r in history] == ["pretrain"] * 2 + ["svi"] * 6
    last = history[-1]
    layers = ["classifier.1", "classifier.3"]
    assert list(last["units_total"]) == layers and last["units_total"] == {
        "classifier.1": 16,
        "classifier.3": 3,
    }
    assert last["weights_total"] == {"classifier.1": 16 * D, "classifier.3": 48}
    # Only 3 of the 12 inputs carry signal: Sparse VD removes weights, more every epoch.
    compression = [r["compression"] for r in history[2:]]
    assert compression == sorted(compression) and compression[-1] > 1.2
    assert [r["kl_weight"] for r in history[2:]] == [0.5] + [1.0] * 5
    # log sigma^2 at the gate learning rate, theta at the weights'.
    assert trainer._optim_args("classifier.1.log_sigma2")["lr"] == 0.1
    assert trainer._optim_args("classifier.1.weight")["lr"] == 1e-2
    assert last["val_accuracy"] == evaluate(trainer.net, trainer.loaders["val"], trainer.device)
    assert last["val_accuracy"] > 0.7
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["config"]["method"] == "sparse-vd"
    # Masks of another threshold applied and saved; restored: the same method, parameters,
    # masks, and the masks alone deciding (the threshold is off).
    trainer.method.apply_masks(trainer.net, trainer.compute_masks("log-alpha:5"))
    trainer.save()
    again = Trainer.from_run(tmp_path / "run")
    assert again.config.method == "sparse-vd"
    for (_, a), (_, b) in zip(
        named_sparse_vd_layers(trainer.net), named_sparse_vd_layers(again.net), strict=True
    ):
        assert torch.equal(a.log_sigma2.detach(), b.log_sigma2.detach())
        assert torch.equal(a.mask, b.mask) and b.threshold == float("inf")
    assert evaluate(again.net, again.loaders["val"], again.device) == evaluate(
        trainer.net, trainer.loaders["val"], trainer.device
    )


def test_an_old_checkpoint_without_a_method_loads_as_sbp():
    config = TrainConfig.from_dict({"model": "digits-mlp", "epochs": 1})
    assert config.method == "sbp"


def test_the_cli_on_a_sparse_vd_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--dataset", "digits", "--model", "digits-mlp", "--method", "sparse-vd"]
    options = [
        *args,
        "--network-kwargs",
        json.dumps({"hidden": [16, 8]}),
        "--pretrain-epochs",
        "1",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--no-progress",
        "--out",
        str(run),
    ]
    assert main(["train", *options]) == 0
    assert "sparse-vd, with a kept incoming weight" in capsys.readouterr().out
    assert main(["prune", str(run), "--criterion", "log-alpha:2"]) == 0
    pruning = json.loads((run / "pruning.json").read_text())
    assert pruning["threshold"] == 2.0 and pruning["weights_after"] < pruning["weights_before"]
    assert main(["export", str(run)]) == 0
    assert {"full.pt", "pruned.pt", "sparse.pt", "sparse.json"} <= {p.name for p in run.iterdir()}
    assert main(["bench", str(run), "--batch-sizes", "4", "--min-run-time", "0.01"]) == 0
    assert main(["prune", str(run), "--criterion", "snr:1"]) == 2
    assert "unknown Sparse VD criterion 'snr:1'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *options[:-1], str(tmp_path / "x"), "--method", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
