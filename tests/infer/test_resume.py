"""A resumed run ends in exactly the state of an uninterrupted one."""

import copy
import json

import pyro
import pytest
import torch

from pyro_sbp.infer import TrainConfig, Trainer

SMALL = {"hidden": [16, 8]}


def _config(**kwargs) -> TrainConfig:
    base = dict(
        model="digits-mlp",
        dataset="digits",
        epochs=3,
        pretrain_epochs=1,
        network_kwargs=dict(SMALL),
        gate_lr=0.05,
        kl_warmup_epochs=2,  # the KL weight depends on the epoch: resumption must keep count
    )
    base.update(kwargs)
    return TrainConfig(**base)


class Crash(Exception):
    """Stands for the run being killed right after a checkpoint was written."""


def _snapshot(trainer: Trainer) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in pyro.get_param_store().items()},
        "net": copy.deepcopy(trainer.net.state_dict()),
        "optim": copy.deepcopy(trainer.optim.get_state()),
        "pretrain_optim": copy.deepcopy(trainer.pretrain_optim.state_dict()),
        "history": [_record(r) for r in trainer.history],
        "steps": trainer.global_step,
    }


def _record(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "seconds"}


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def _run(config: TrainConfig, out_dir, **kwargs) -> dict:
    trainer = Trainer(config, out_dir, progress=False, **kwargs)
    trainer.fit()
    return _snapshot(trainer)


def _crash_after_saves(monkeypatch, n: int) -> None:
    real = Trainer.save
    count = {"saves": 0}

    def save(self):
        real(self)
        count["saves"] += 1
        if count["saves"] == n:
            raise Crash

    monkeypatch.setattr(Trainer, "save", save)


def test_resume_with_more_epochs_equals_an_uninterrupted_run(tmp_path):
    full = _run(_config(), tmp_path / "a")
    assert [r["phase"] for r in full["history"]] == ["pretrain", "svi", "svi", "svi"]
    assert [r.get("kl_weight") for r in full["history"]] == [None, 0.5, 1.0, 1.0]

    _run(_config(epochs=1), tmp_path / "b")
    resumed = Trainer(_config(), tmp_path / "b", resume=True, progress=False)
    assert (resumed.pretrain_done, resumed.svi_done) == (1, 1)
    resumed.fit()
    _assert_same(full, _snapshot(resumed))
    # Every parameter of the store: the network's and the gates'.
    names = set(full["params"])
    assert {"classifier.1.weight", "classifier.1.gate.loc", "classifier.3.gate.log_scale"} <= names
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [r["loss"] for r in history] == [r["loss"] for r in full["history"]]


def test_resume_after_a_crash_in_svi(tmp_path, monkeypatch):
    full = _run(_config(), tmp_path / "a")
    with monkeypatch.context() as m:
        _crash_after_saves(m, 3)  # pretrain, svi 1, svi 2
        with pytest.raises(Crash):
            _run(_config(), tmp_path / "b")
    resumed = Trainer(_config(), tmp_path / "b", resume=True, progress=False)
    assert (resumed.pretrain_done, resumed.svi_done) == (1, 2)
    resumed.fit()
    _assert_same(full, _snapshot(resumed))


def test_resume_in_the_middle_of_pretraining(tmp_path, monkeypatch):
    config = _config(pretrain_epochs=2, epochs=1)
    full = _run(config, tmp_path / "a")
    assert [r["phase"] for r in full["history"]] == ["pretrain", "pretrain", "svi"]
    with monkeypatch.context() as m:
        _crash_after_saves(m, 1)
        with pytest.raises(Crash):
            _run(config, tmp_path / "b")
    resumed = Trainer(config, tmp_path / "b", resume=True, progress=False)
    assert (resumed.pretrain_done, resumed.svi_done) == (1, 0)
    resumed.fit()
    _assert_same(full, _snapshot(resumed))


def test_a_finished_run_resumed_does_nothing_more(tmp_path):
    full = _run(_config(epochs=1), tmp_path / "a")
    resumed = Trainer(_config(epochs=1), tmp_path / "a", resume=True, progress=False)
    resumed.fit()
    assert resumed.global_step == full["steps"]
    state = _snapshot(resumed)
    # No step has run since the restore, so the network's weights are only in the network (the
    # param store gets them at the first forward pass); the gates' parameters are restored.
    _assert_same(full["net"], state["net"])
    _assert_same(full["history"], state["history"])
    gate_params = {k: v for k, v in full["params"].items() if ".gate." in k}
    _assert_same(gate_params, {k: v for k, v in state["params"].items() if ".gate." in k})
