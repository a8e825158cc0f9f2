"""SBPLightningModule: a few steps of Lightning training on the digits (CPU)."""

import pickle

import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from pyro_sbp.data import load_dataset  # noqa: E402
from pyro_sbp.infer import CompactMeanField_ELBO  # noqa: E402
from pyro_sbp.infer.lightning import KLWarmup, PruneEveryEpoch, SBPLightningModule  # noqa: E402
from pyro_sbp.models import build_network, make_prunable, named_gates  # noqa: E402
from pyro_sbp.reduction import compute_masks  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", seed=0, val_fraction=0.2)


def _module(splits, **kwargs) -> SBPLightningModule:
    net = build_network(
        "digits-mlp",
        hidden=[16, 8],
        mean=splits.mean,
        std=splits.std,
        num_classes=splits.num_classes,
    )
    return SBPLightningModule(make_prunable(net), splits.num_train, **kwargs)


def _train_loader(splits, batch_size: int = 50) -> DataLoader:
    x, y = splits.train.tensors
    indexed = TensorDataset(x, y, torch.arange(len(x)))
    generator = torch.Generator().manual_seed(0)
    return DataLoader(indexed, batch_size=batch_size, shuffle=True, generator=generator)


def test_loss_is_the_trainers_elbo(splits):
    module = _module(splits)
    x, y = splits.train.tensors
    batch = (x[:40], y[:40], torch.arange(40))
    module.kl_factor = 0.25
    torch.manual_seed(1)
    loss = module.loss(*batch)
    assert torch.isfinite(loss) and loss.requires_grad
    # Its gradient reaches the weights and the gate posteriors, module parameters both.
    loss.backward()
    torch.manual_seed(1)
    with torch.no_grad():
        expected = CompactMeanField_ELBO().differentiable_loss(
            module.sbp_model, module.guide, *batch, 0.25
        )
    torch.testing.assert_close(loss.detach(), expected)
    params = dict(module.named_parameters())
    gates = module.gate_parameters()
    assert gates and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    assert all(p.grad is not None for n, p in params.items() if n.startswith("net."))


def test_a_copy_of_the_module_trains_its_own_parameters(splits):
    # Lightning's ddp_spawn pickles the module to each process, whose param store is empty.
    module = _module(splits)
    copy = pickle.loads(pickle.dumps(module))
    pyro.clear_param_store()
    x, y = splits.train.tensors
    copy.loss(x[:40], y[:40], torch.arange(40)).backward()
    store = pyro.get_param_store()
    for param in copy.gate_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0
        assert any(store[name].unconstrained() is param for name in store.keys())
    assert all(p.grad is None for p in module.gate_parameters())


def test_optimizer_has_a_group_for_weights_and_one_for_gates(splits):
    module = _module(splits, lr=2e-3, gate_lr=5e-2, beta1=0.9)
    optimizer = module.configure_optimizers()
    weights, gates = optimizer.param_groups
    assert (weights["lr"], gates["lr"]) == (2e-3, 5e-2)
    assert weights["betas"] == (0.9, 0.999)
    assert {id(p) for p in gates["params"]} == {id(p) for p in module.gate_parameters()}
    assert {id(p) for p in weights["params"]} == {id(p) for p in module.net.parameters()}
    assert len(gates["params"]) == 2 * len(list(named_gates(module.net)))


def test_lightning_fit_with_warmup_and_pruning(splits, tmp_path):
    torch.manual_seed(0)
    module = _module(splits, lr=1e-2, gate_lr=0.1, init_log_scale=-1.0)
    factors = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                factors.append(pl_module.kl_factor)

    x, y = splits.train.tensors
    prune = PruneEveryEpoch("snr:1", (x, y))
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=8,
        callbacks=[KLWarmup(2), prune, Record()],
        default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in module.gate_parameters()]
    val = DataLoader(splits.val, batch_size=100)
    trainer.fit(module, _train_loader(splits), val)
    assert factors == [0.5, 1.0, 1.0]
    after = module.gate_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert 0.0 <= float(trainer.callback_metrics["val_accuracy"]) <= 1.0
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    # The masks on the gates are the criterion's at the end of the last epoch.
    masks = compute_masks(module.net, module.guide, "snr:1").masks()
    kept = {site: int(g.mask.sum()) for site, g in named_gates(module.net)}
    assert kept == {site: int(m.sum()) for site, m in masks.items()}
    assert sum(kept.values()) < 16 + 8  # log sigma = -1: some units have SNR < 1


def test_bad_settings_are_refused(splits):
    with pytest.raises(ValueError, match="gate_lr must be positive"):
        _module(splits, gate_lr=0.0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        KLWarmup(0)
    with pytest.raises(ValueError, match="masks must be"):
        PruneEveryEpoch("snr:1", masks="sometimes")
