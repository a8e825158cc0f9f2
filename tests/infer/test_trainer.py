"""Trainer odds and ends: history records, pretrained weights, evaluation, units kept."""

import itertools

import pyro
import pytest
import torch

from pyro_sbp.infer import TrainConfig, Trainer, evaluate, units_kept_snr
from pyro_sbp.infer.checkpoint import optim_state_from_pyro
from pyro_sbp.models import build_network

SMALL = {"hidden": [16, 8]}


def _config(**kwargs) -> TrainConfig:
    base = dict(model="digits-mlp", dataset="digits", epochs=1, pretrain_epochs=1)
    base["network_kwargs"] = dict(SMALL)
    base.update(kwargs)
    return TrainConfig(**base)


def test_history_records():
    trainer = Trainer(_config(), None, progress=False)
    history = trainer.fit()
    assert [r["phase"] for r in history] == ["pretrain", "svi"]
    svi = history[1]
    assert svi["units_total"] == {"classifier.1.gate": 16, "classifier.3.gate": 8}
    assert set(svi["units_kept"]) == set(svi["units_total"])
    assert all(0 <= svi["units_kept"][k] <= svi["units_total"][k] for k in svi["units_kept"])
    assert svi["units_kept"] == units_kept_snr(trainer.guide)
    assert 0.0 <= svi["val_accuracy"] <= 1.0
    assert svi["val_accuracy"] == evaluate(trainer.net, trainer.loaders["val"], trainer.device)
    assert trainer.net.training  # evaluate puts the mode back


def test_units_kept_counts_the_mask():
    trainer = Trainer(_config(), None, progress=False)
    trainer.fit()
    gate = trainer.net.classifier[1].gate
    before = units_kept_snr(trainer.guide, threshold=0.0)["classifier.1.gate"]
    assert before == 16
    gate.mask[:5] = 0.0
    assert units_kept_snr(trainer.guide, threshold=0.0)["classifier.1.gate"] == 11


def test_pretrained_weights_are_loaded_and_pretraining_skipped(tmp_path):
    torch.manual_seed(3)
    plain = build_network("digits-mlp", **SMALL)
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    trainer = Trainer(_config(pretrained=str(path), pretrain_epochs=2), None, progress=False)
    assert trainer.config.pretrain_epochs == 0
    state = trainer.net.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    history = trainer.fit()
    assert [r["phase"] for r in history] == ["svi"]


def test_pretrained_weights_of_another_shape_are_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(build_network("digits-mlp", hidden=[32, 8]).state_dict(), path)
    with pytest.raises(ValueError) as info:
        Trainer(_config(pretrained=str(path)), None, progress=False)
    message = str(info.value)
    assert "classifier.1.weight: network (16, 64), checkpoint (32, 64)" in message, message


def test_pretrained_weights_from_a_pyro_sbp_checkpoint(tmp_path):
    # A run's own checkpoint.pt (with optimiser and RNG states) is accepted as --pretrained.
    first = tmp_path / "first"
    config = TrainConfig(
        epochs=0, pretrain_epochs=1, batch_size=64, network_kwargs={"hidden": [16, 8]}
    )
    Trainer(config, first, progress=False).fit()
    pyro.clear_param_store()
    second = TrainConfig(
        epochs=1,
        pretrain_epochs=3,
        batch_size=64,
        network_kwargs={"hidden": [16, 8]},
        pretrained=str(first / "checkpoint.pt"),
    )
    trainer = Trainer(second, None, progress=False)
    saved = torch.load(first / "checkpoint.pt", weights_only=False)["net_state"]
    for name, value in trainer.net.state_dict().items():
        if ".gate." not in name:
            assert torch.equal(value, saved[name]), name
    assert trainer.config.pretrain_epochs == 0 and second.pretrain_epochs == 3


def test_input_gates_train_with_the_gate_learning_rate(tmp_path):
    torch.manual_seed(3)
    plain = build_network("digits-mlp", **SMALL)
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    config = _config(input_gates=["classifier.1"], gate_lr=0.2, pretrained=str(path))
    # Pretrained weights of the plain network load although it has no gate buffers.
    trainer = Trainer(config, None, progress=False)
    assert torch.equal(trainer.net.classifier[1].weight.detach(), plain.classifier[1].weight)
    gate = trainer.net.classifier[1].input_gate
    assert gate.num_units == 64
    history = trainer.fit()
    assert history[-1]["units_total"]["classifier.1.input_gate"] == 64
    assert trainer._optim_args("classifier.1.input_gate.loc")["lr"] == 0.2
    assert trainer._optim_args("classifier.1.weight")["lr"] == config.lr
    loc = pyro.get_param_store()["classifier.1.input_gate.loc"]
    assert loc.shape == (64,) and not torch.equal(loc, torch.zeros(64))


def test_pretraining_leaves_no_gradient_for_the_first_svi_step():
    # A gradient left in .grad by the last pretraining batch would be added to the first SVI
    # step's (and a run resumed after pretraining would then differ from an uninterrupted one).
    trainer = Trainer(_config(epochs=0), None, progress=False)
    trainer.fit()
    assert all(p.grad is None for p in trainer.net.parameters())


@pytest.mark.parametrize("weight", [20.0, {"classifier.1.gate": 5.0}], ids=repr)
def test_the_warm_up_ramps_to_the_kl_weight(weight):
    history = Trainer(
        _config(epochs=3, pretrain_epochs=0, kl_weight=weight, kl_warmup_epochs=2),
        None,
        progress=False,
    ).fit()
    got = [r["kl_weight"] for r in history]
    if isinstance(weight, dict):
        full = {"classifier.1.gate": 5.0, "classifier.3.gate": 1.0}
        assert got == [{k: f * v for k, v in full.items()} for f in (0.5, 1.0, 1.0)]
    else:
        assert got == [10.0, 20.0, 20.0]


@pytest.mark.parametrize("weight", [0, -2.0, float("nan"), {"a": 0.0}])
def test_bad_kl_weight_in_the_config(weight):
    with pytest.raises(ValueError, match="kl_weight must be a positive number"):
        _config(kl_weight=weight)


def test_a_larger_kl_weight_keeps_fewer_units():
    kept = {}
    for weight in (1.0, 1000.0):
        pyro.set_rng_seed(0)
        config = _config(epochs=10, pretrain_epochs=2, kl_weight=weight, gate_lr=0.1, batch_size=64)
        kept[weight] = sum(Trainer(config, None, progress=False).fit()[-1]["units_kept"].values())
    assert kept[1000.0] < kept[1.0], kept


@pytest.mark.parametrize(("masks", "back"), [("cumulative", False), ("fresh", True)])
def test_fresh_masks_let_a_removed_unit_come_back(monkeypatch, masks, back):
    import pyro_sbp.reduction as reduction
    from pyro_sbp.models import named_gates
    from pyro_sbp.reduction import LayerPruning, PruningResult

    calls = {"n": 0}

    def compute_masks(net, guide, criterion, data=None, *, progress=False):
        # Epoch 1 removes unit 0 of the first layer; epoch 2 would keep every unit. As the
        # library's criteria do, the masks already on the gates are respected.
        calls["n"] += 1
        result = PruningResult(criterion, "snr", threshold=0.0)
        for site, gate in named_gates(net):
            keep = gate.mask > 0
            if calls["n"] == 1 and site == "classifier.1.gate":
                keep = keep.clone()
                keep[0] = False
            result.layers[site] = LayerPruning(site, torch.zeros(gate.num_units), keep)
        return result

    monkeypatch.setattr(reduction, "compute_masks", compute_masks)
    config = _config(epochs=2, pretrain_epochs=0, prune_criterion="snr:1", prune_masks=masks)
    trainer = Trainer(config, None, progress=False)
    history = trainer.fit()
    assert history[0]["units_kept"]["classifier.1.gate"] == 15
    assert history[1]["units_kept"]["classifier.1.gate"] == (16 if back else 15)


@pytest.mark.parametrize(
    ("key", "value"), [("noise", "unit"), ("lr_schedule", "step"), ("prune_masks", "none")]
)
def test_unknown_recipe_options(key, value):
    with pytest.raises(ValueError, match=f"{key} must be one of"):
        _config(**{key: value})


def test_keep_best_ends_with_the_best_finetuning_epoch(tmp_path, monkeypatch):
    import pyro_sbp.infer.trainer as trainer_module

    # Validation accuracies of the epochs, made up: the second fine-tuning epoch (SVI epoch 3)
    # is the best.
    made_up = iter([0.5, 0.6, 0.7, 0.9, 0.8, 0.3])
    monkeypatch.setattr(trainer_module, "evaluate", lambda *args: next(made_up))
    captured = {}
    real_end = Trainer._end_epoch

    def end_epoch(self, record, bar):
        real_end(self, record, bar)
        if record["phase"] == "finetune":
            captured[record["epoch"]] = {
                "net": {k: v.clone() for k, v in self.net.state_dict().items()},
                "loc": pyro.param("classifier.1.gate.loc").detach().clone(),
            }

    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch)
    config = _config(pretrain_epochs=1, epochs=1, finetune_epochs=4, keep_best=True)
    trainer = Trainer(config, tmp_path, progress=False)
    history = trainer.fit()
    assert [r["val_accuracy"] for r in history] == [0.5, 0.6, 0.7, 0.9, 0.8, 0.3]
    assert (trainer.best["epoch"], trainer.best["val_accuracy"], trainer.best["kept"]) == (
        3,
        0.9,
        True,
    )
    best = captured[3]
    assert all(torch.equal(v, best["net"][k]) for k, v in trainer.net.state_dict().items())
    assert torch.equal(pyro.param("classifier.1.gate.loc").detach(), best["loc"])
    assert not torch.equal(best["loc"], captured[5]["loc"])  # the last epoch's differ
    # The checkpoint holds the best epoch's network; a resumed run does nothing more.
    from pyro_sbp.infer import load_checkpoint

    ckpt = load_checkpoint(tmp_path)
    assert all(torch.equal(v, best["net"][k]) for k, v in ckpt["net_state"].items())
    assert ckpt["best"]["kept"] and ckpt["svi_done"] == 5


def _pyro_optim_steps(trainer: Trainer, batches) -> tuple[list[float], pyro.optim.PyroOptim]:
    """The SVI steps as the trainer took them before it had one torch optimiser:
    ``pyro.optim.Adam`` with the trainer's rates, one torch optimiser per parameter (created at
    its first step), stepping the parameters of each step's trace."""
    optim = pyro.optim.Adam(trainer._optim_args)
    losses = []
    for x, y, idx in batches:
        with pyro.poutine.trace(param_only=True) as capture:
            loss = trainer.elbo.loss_and_grads(trainer.model, trainer.guide, x, y, idx, 1.0)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        optim(params)
        pyro.infer.util.zero_grads(params)
        losses.append(loss)
    return losses, optim


@pytest.mark.parametrize("method", ["sbp", "sparse-vd", "bc-gnj", "bc-ghs"])
def test_one_torch_adam_steps_as_pyros_optimiser_per_parameter(method):
    # Adam is per element: one optimiser with two groups (weights at lr, the variational
    # parameters at gate_lr, both times the schedule's factor) takes pyro.optim.Adam's steps.
    config = _config(method=method, pretrain_epochs=0, lr=3e-3, gate_lr=0.05)
    runs = {}
    for path in ("torch", "pyro"):
        trainer = Trainer(config, None, progress=False)
        trainer.method.set_stochastic(trainer.net, True)
        trainer.net.train()
        batches = list(itertools.islice(iter(trainer.loaders["train"]), 4))
        init = {k: v.detach().clone() for k, v in trainer.net.named_parameters()}
        pyro.set_rng_seed(7)  # the same noise on both paths
        if path == "torch":
            trainer._set_lr_factor(0.5)
            assert [g["name"] for g in trainer.optim.param_groups] == ["network", "variational"]
            assert [g["lr"] for g in trainer.optim.param_groups] == [1.5e-3, 0.025]
            losses = [trainer._step(0, x, y, idx, 1.0) for x, y, idx in batches]
            assert all(p.grad is None for g in trainer.optim.param_groups for p in g["params"])
            optim = trainer.optim_state()
        else:
            trainer._lr_factor = 0.5
            losses, pyro_optim = _pyro_optim_steps(trainer, batches)
            optim = optim_state_from_pyro(pyro_optim.get_state())
        store = pyro.get_param_store()
        params = {k: v.detach().clone() for k, v in store.items()}
        states = dict(zip(optim["param_names"], optim["state_dict"]["state"].values(), strict=True))
        runs[path] = losses, params, states
        assert not all(torch.equal(init[k], params[k]) for k in init)
    (losses, params, states), (old_losses, old_params, old_states) = runs["torch"], runs["pyro"]
    assert losses == pytest.approx(old_losses, rel=1e-6)
    assert params.keys() == old_params.keys() == states.keys() == old_states.keys()
    for name in params:
        torch.testing.assert_close(params[name], old_params[name])
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(states[name][key], old_states[name][key])
