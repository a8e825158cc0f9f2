"""Errors that stop or refuse a run, with messages that say what is wrong."""

import pyro
import pytest
import torch
from torch import nn

from pyro_sbp.infer import NonFiniteLossError, TrainConfig, Trainer, load_checkpoint, save_atomic
from pyro_sbp.models import SBPModel, build_network, make_prunable

SMALL = {"hidden": [16, 8]}


def _config(**kwargs) -> TrainConfig:
    base = dict(
        model="digits-mlp",
        dataset="digits",
        epochs=1,
        pretrain_epochs=1,
        network_kwargs=dict(SMALL),
    )
    base.update(kwargs)
    return TrainConfig(**base)


def _poison_before_step(trainer: Trainer, step: int, param: str) -> None:
    """Set one entry of a parameter to nan right before SVI step number ``step`` (0-based)."""
    real = trainer._step
    calls = {"n": 0}

    def svi_step(*args, **kwargs):
        if calls["n"] == step:
            with torch.no_grad():
                pyro.get_param_store()[param][0] = float("nan")
        calls["n"] += 1
        return real(*args, **kwargs)

    trainer._step = svi_step


# --- non-finite loss ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_nonfinite_loss_names_the_step_and_the_site(tmp_path):
    pyro.enable_validation(False)  # let the nan reach the loss
    trainer = Trainer(_config(pretrain_epochs=0, epochs=2), tmp_path, progress=False)
    _poison_before_step(trainer, 11, "classifier.1.gate.loc")  # in the second epoch
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "step 11" in message and "epoch 2" in message, message
    assert "classifier.1.gate" in message, message
    # The last checkpoint (end of epoch 1) is intact and finite.
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["svi_done"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["guide_params"]["params"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["net_state"].values())


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_nonfinite_diagnosis_points_at_the_poisoned_site(tmp_path):
    # Only classifier.1.gate.loc is bad when the loss turns nan; the network's last layer and the
    # other gate's parameters are innocent and should not be blamed.
    pyro.enable_validation(False)
    trainer = Trainer(_config(pretrain_epochs=0, epochs=1), None, progress=False)
    _poison_before_step(trainer, 2, "classifier.1.gate.loc")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "classifier.1.gate.loc" in message, message
    assert "classifier.5.weight" not in message, message
    assert "classifier.3.gate.log_scale" not in message, message


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_nonfinite_parameter_with_validation_on_names_the_step_and_the_site():
    # Pyro's (and torch's) default: distribution arguments are validated. A nan gate parameter
    # must still stop the run with a NonFiniteLossError that says where, not with a bare
    # "Expected parameter loc ..." from the distribution's constructor.
    pyro.enable_validation(True)
    trainer = Trainer(_config(pretrain_epochs=0, epochs=1), None, progress=False)
    _poison_before_step(trainer, 2, "classifier.1.gate.loc")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "step 2" in message and "classifier.1.gate" in message, message


def test_nonfinite_pretraining_loss_names_the_step(monkeypatch):
    trainer = Trainer(_config(pretrain_epochs=1, epochs=0), None, progress=False)
    with torch.no_grad():
        trainer.net.classifier[1].weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"pretraining epoch 1, step 0"):
        trainer.fit()


# --- checkpoints of another architecture -------------------------------------------------


@pytest.fixture
def trained_dir(tmp_path):
    Trainer(_config(pretrain_epochs=0, epochs=1), tmp_path, progress=False).fit()
    return tmp_path


def test_resume_with_other_network_kwargs_is_refused(trained_dir):
    other = _config(network_kwargs={"hidden": [64, 32]})
    with pytest.raises(ValueError) as info:
        Trainer(other, trained_dir, resume=True, progress=False)
    message = str(info.value)
    assert "[16, 8]" in message and "[64, 32]" in message, message


def test_resume_with_another_model_is_refused(trained_dir):
    with pytest.raises(ValueError, match=r"'digits-mlp'.*'lenet-300-100'"):
        Trainer(_config(model="lenet-300-100"), trained_dir, resume=True, progress=False)


def test_checkpoint_with_other_shapes_is_refused(trained_dir):
    # A checkpoint whose config matches but whose weights have other shapes (e.g. edited).
    ckpt = load_checkpoint(trained_dir)
    ckpt["config"]["network_kwargs"] = {"hidden": [12, 8]}
    save_atomic(ckpt, trained_dir / "checkpoint.pt")
    with pytest.raises(ValueError) as info:
        Trainer(_config(network_kwargs={"hidden": [12, 8]}), trained_dir, resume=True)
    message = str(info.value)
    assert "another architecture" in message, message
    assert "classifier.1.weight: network (12, 64), checkpoint (16, 64)" in message, message


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_config(), tmp_path / "nothing", resume=True, progress=False)
    with pytest.raises(ValueError, match="resume=True needs the run directory"):
        Trainer(_config(), None, resume=True, progress=False)


# --- data shapes -------------------------------------------------------------------------


def test_wrong_input_shape_names_the_expected_shape():
    net = make_prunable(build_network("digits-mlp"))
    model = SBPModel(net, 4, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"\(batch, 1, 8, 8\), got \(4, 64\)"):
        model(torch.rand(4, 64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, 1, 8, 8\), got \(1, 8, 8\)"):
        model(torch.rand(1, 8, 8))


def test_model_and_data_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"expects inputs of shape \(1, 28, 28\).*\(1, 8, 8\)"):
        Trainer(_config(model="lenet-300-100", network_kwargs={}), None, progress=False)


def test_num_data_must_be_positive():
    net = make_prunable(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="num_data"):
        SBPModel(net, 0)


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", -1),
        ("pretrain_epochs", -2),
        ("kl_warmup_epochs", -1),
        ("batch_size", 0),
        ("lr", 0.0),
        ("gate_lr", -1e-3),
        ("beta1", 1.0),
        ("device", "tpu"),
    ],
)
def test_bad_config_is_refused(key, value):
    with pytest.raises(ValueError, match=key if key != "device" else "device"):
        TrainConfig(**{key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_when_not_available():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Trainer(_config(device="cuda"), None, progress=False)
