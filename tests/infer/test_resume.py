"""A resumed run ends in exactly the state of an uninterrupted one."""

import copy
import json

import pyro
import pytest
import torch

from pyro_sbp.infer import TrainConfig, Trainer, load_checkpoint
from pyro_sbp.infer import checkpoint as checkpoint_module

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
        "optim": copy.deepcopy(trainer.optim_state()),
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


class _FormatTwoTrainer(Trainer):
    """The trainer as it was up to checkpoint format 2: ``pyro.optim.Adam`` (one torch
    optimiser per parameter, created at its first step) stepping the parameters of each step's
    trace, and that optimiser's ``get_state()`` as the checkpoint's ``optim_state``."""

    def _build_optimizer(self, state=None):
        self.pyro_optim = pyro.optim.Adam(self._optim_args)
        return super()._build_optimizer(state)

    def _set_lr_factor(self, factor):
        super()._set_lr_factor(factor)
        store = pyro.get_param_store()
        for param, optim in self.pyro_optim.optim_objs.items():
            for group in optim.param_groups:
                group["lr"] = self._base_lr(store.param_name(param)) * factor

    def _step(self, epoch, x, y, idx, beta):
        with pyro.poutine.trace(param_only=True) as capture:
            loss = self.elbo.loss_and_grads(self.model, self.guide, x, y, idx, beta)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        self.pyro_optim(params)
        pyro.infer.util.zero_grads(params)
        return float(loss)

    def state(self):
        return super().state() | {"optim_state": self.pyro_optim.get_state()}


def test_a_checkpoint_of_format_2_resumes_as_the_run_would_have_gone_on(tmp_path, monkeypatch):
    # Written by the per-parameter Pyro optimisers inside an SVI epoch; resumed by the one
    # torch optimiser, whose Adam update per element is theirs: the run ends as an
    # uninterrupted one (to rounding), which it cannot if a state went to the wrong parameter.
    config = _config(checkpoint_every=5)
    full = _run(config, tmp_path / "a")
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "FORMAT_VERSION", 2)
        _crash_after_saves(m, 6)  # at step 20, the second of SVI epoch 2 (9 batches each)
        with pytest.raises(Crash):
            _FormatTwoTrainer(config, tmp_path / "b", progress=False).fit()
    raw = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert raw["format_version"] == 2 and raw["epoch_progress"]["phase"] == "svi"
    assert set(raw["optim_state"]) == set(full["params"])  # Pyro's {param_name: state_dict}
    ckpt = load_checkpoint(tmp_path / "b")
    converted = ckpt["optim_state"]
    assert converted["param_names"] == list(raw["optim_state"])
    for i, name in enumerate(converted["param_names"]):
        own = raw["optim_state"][name]["state"][0]
        assert set(own) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in own.items():
            assert torch.equal(converted["state_dict"]["state"][i][key], value), (name, key)

    resumed = Trainer(config, tmp_path / "b", resume=True, progress=False)
    assert resumed.global_step == raw["global_step"] > 0
    params = [p for group in resumed.optim.param_groups for p in group["params"]]
    for name, param in zip(resumed.optim_param_names, params, strict=True):
        own = raw["optim_state"][name]["state"][0]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(resumed.optim.state[param][key], own[key]), (name, key)
    resumed.fit()
    state = _snapshot(resumed)
    assert state["steps"] == full["steps"]
    assert [r["phase"] for r in state["history"]] == [r["phase"] for r in full["history"]]
    for a, b in zip(state["history"], full["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert state["params"].keys() == full["params"].keys()
    for name, value in full["params"].items():
        torch.testing.assert_close(state["params"][name], value, rtol=1e-4, atol=1e-5)
