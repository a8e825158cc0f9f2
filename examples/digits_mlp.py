"""Structured Bayesian pruning of a small MLP on scikit-learn's 8x8 digits, written out in Pyro.

The library's pipeline step by step, with Pyro's own SVI loop instead of the ``Trainer`` / CLI:

1. data: ``load_dataset("digits")`` (embedded in scikit-learn, nothing to download) and
   ``make_loaders``, whose training batches are ``(x, y, idx)`` with ``idx`` the positions of the
   examples in the training set, the subsample indices of the data plate;
2. network: ``build_network("digits-mlp")`` (64-100-50-10, ReLU) made prunable in one line with
   ``make_prunable``: a truncated log-normal noise gate on each of the 150 hidden units;
3. pretraining: gates off (``set_gates_enabled(net, False)``), plain torch cross-entropy;
4. the Pyro model, written here by hand: the gated network inside
   ``pyro.plate("data", N, subsample=idx)``, every gate's KL scaled by ``1 / N`` so that the
   per-example noise still counts each unit's KL once; the guide is ``SBPGuide``;
5. SVI with ``CompactMeanField_ELBO`` (``TraceMeanField_ELBO``'s loss and gradients, with each
   KL computed once per unit; the KL between the truncated log-normal posterior and the
   truncated log-uniform prior is analytic);
6. ``guide.update_gates()`` (``E[theta]`` into the gates for evaluation), then Bayesian Model
   Reduction by hand: for each unit the change in log evidence ``delta_f(q, prior, reduced)``
   for the reduced priors of BMRS_N (theta pinned at its lower bound) and BMRS_U-4 (theta
   below 2^-4), a unit going iff Delta F >= 0; checked against ``compute_masks``;
7. ``apply_masks``, a few epochs of SVI with the masks frozen (fine-tuning), then
   ``export_pruned`` / ``export_full`` (plain ``nn.Module`` s, also saved as TorchScript),
   ``count_flops``, and a check that the exported network computes what the gated one does;
8. ``to_arviz`` and ``arviz.summary`` of one layer's gates.

Run ``python examples/digits_mlp.py`` (20 pretraining, 150 SVI and 10 fine-tuning epochs of 18
minibatches: about 85 s on one thread of a 2-core machine shared with another training job) or
with ``--epochs 2 --pretrain-epochs 1 --finetune-epochs 1`` for a smoke test. Files go to
``--out`` (default ``runs/examples/digits``): ``pruned.pt`` and ``full.pt`` (TorchScript),
``masks.pt``, ``posterior.nc`` (ArviZ) and ``result.json``.
"""

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_sbp.data import load_dataset, make_loaders
from pyro_sbp.diagnostics import save_netcdf, to_arviz, var_name
from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform
from pyro_sbp.export import (
    count_flops,
    count_parameters,
    export_full,
    export_pruned,
    load_torchscript,
    save_torchscript,
)
from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.models import build_network, make_prunable, named_gates, set_gates_enabled
from pyro_sbp.reduction import apply_masks, compute_masks, delta_f

#: BMRS_N's reduced prior on log theta: Normal(a, s^2) truncated to [a, b], s = 1e-6.
BMRS_N_SCALE = 1e-6
#: BMRS_U-4's reduced prior: log-uniform on [2^-23, 2^-4] (2^-23: the float32 mantissa).
BMRS_U_LOW, BMRS_U_HIGH = 2.0**-23, 2.0**-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-epochs", type=int, default=20, help="epochs with gates off")
    p.add_argument("--epochs", type=int, default=150, help="SVI epochs")
    p.add_argument(
        "--finetune-epochs", type=int, default=10, help="SVI epochs after pruning, masks frozen"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the weights")
    p.add_argument("--gate-lr", type=float, default=0.05, help="learning rate of the gates")
    p.add_argument(
        "--criterion",
        choices=["bmrs-n", "bmrs-u:4"],
        default="bmrs-u:4",
        help="which Delta F decides the masks that are exported",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: tiny tensors, and OpenMP threads stall on shared cores)",
    )
    p.add_argument("--out", default="runs/examples/digits", help="where to write the files")
    return p.parse_args(argv)


def pretrain(net, loader, epochs: int, lr: float) -> None:
    """Deterministic training of the weights with the gates off (SBP starts from a trained net)."""
    set_gates_enabled(net, False)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y, _idx in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    set_gates_enabled(net, True)


def make_model(net, num_data: int):
    """The Pyro model: a categorical likelihood on the gated network's logits.

    The gates sample their ``theta`` inside the data plate, once per example, with the
    log-density (and hence the guide's KL) scaled by ``1 / num_data``: the plate's
    ``num_data / batch`` times ``batch`` per-example KLs times ``1 / num_data`` is one KL per
    unit, as in the ELBO of a model with one global theta per unit.
    """
    gates = [gate for _, gate in named_gates(net)]

    def model(x, y=None, idx=None):
        for gate in gates:
            gate.kl_scale = 1.0 / num_data
        with pyro.plate("data", num_data, subsample=idx):
            logits = net(x)
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits

    return model


@torch.no_grad()
def predict(net, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split (``net`` in evaluation mode)."""
    logits, labels = [], []
    for x, y, *_ in loader:
        logits.append(net(x))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).double().mean().item()


@torch.no_grad()
def bmrs_delta_f(net, guide) -> dict[str, dict[str, torch.Tensor]]:
    """Delta F of every unit for BMRS_N and BMRS_U-4, from the guide's parameters.

    The posterior q = LogN_[a,b](loc, exp(log_scale)^2) and the prior LogU_[a,b] are the
    distributions the ELBO used; the reduced priors say "this unit is off". In float64, as
    ``compute_masks`` does.
    """
    f64 = torch.float64
    out = {}
    for site, gate in named_gates(net):
        loc, log_scale = guide.params(site)
        n = gate.num_units
        low, high = gate.low, gate.high
        q = TruncatedLogNormal(loc.detach().to(f64), log_scale.detach().to(f64).exp(), low, high)
        prior = TruncatedLogUniform(torch.tensor(low, dtype=f64), high).expand([n])
        reduced_n = TruncatedLogNormal(
            torch.tensor(math.log(low), dtype=f64), BMRS_N_SCALE, low, high
        ).expand([n])
        reduced_u = TruncatedLogUniform(torch.tensor(BMRS_U_LOW, dtype=f64), BMRS_U_HIGH).expand(
            [n]
        )
        out[site] = {
            "bmrs-n": delta_f(q, prior, reduced_n),
            "bmrs-u:4": delta_f(q, prior, reduced_u),
            "snr": q.mean / q.stddev,
        }
    return out


def arviz_summary(net, guide, site: str, out: Path):
    """ArviZ data of every gate (saved as netCDF) and the summary of one layer's theta."""
    with warnings.catch_warnings():
        # ArviZ 0.2x announces its 1.0 refactor on import.
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        import arviz as az

    data = to_arviz(net, guide, num_chains=2, num_draws=200, seed=0)
    save_netcdf(data, out / "posterior.nc")
    summary = az.summary(data, var_names=[f"theta_{var_name(site)}"], kind="stats", round_to=4)
    summary.insert(0, "kept", dict(named_gates(net))[site].mask.int().tolist())
    return summary


def svi_epochs(svi, loader, epochs: int) -> float:
    """``epochs`` passes of SVI over ``loader``; the last epoch's mean loss (the negative ELBO of
    the whole training set: each minibatch's loss is an unbiased estimate of it)."""
    loss = math.nan
    for _ in range(epochs):
        total = 0.0
        for x, y, idx in loader:
            total += svi.step(x, y, idx)
        loss = total / len(loader)
    return loss


@torch.no_grad()
def predict_all_units(net, loader):
    """Logits of the gated network with every unit kept (what ``export_full`` computes)."""
    saved = {site: gate.mask.clone() for site, gate in named_gates(net)}
    apply_masks(net, {site: torch.ones_like(m) for site, m in saved.items()})
    try:
        return predict(net, loader)[0]
    finally:
        apply_masks(net, saved)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()

    # 1. Data: inputs in [0, 1] (the network standardises them with the training statistics).
    splits = load_dataset("digits", seed=args.seed)
    loaders = make_loaders(splits, args.batch_size, seed=args.seed)
    train, test = loaders["train"], loaders["test"]
    num_data = splits.num_train
    shape = tuple(splits.input_shape)

    # 2. A plain network, made prunable: gates after both hidden Linear layers.
    net = build_network("digits-mlp", mean=splits.mean, std=splits.std)
    make_prunable(net)

    # 3. Pretraining with the gates off.
    pretrain(net, train, args.pretrain_epochs, lr=1e-3)
    net.eval()
    pretrained_acc = accuracy(*predict(net, test))

    # 4. Model and guide; 5. SVI. The weights are the network's Pyro parameters (point
    # estimates); the gates' variational parameters get their own learning rate.
    model = make_model(net, num_data)
    guide = SBPGuide(net, num_data)

    def optim_args(name: str) -> dict:
        gate_param = name.endswith((".gate.loc", ".gate.log_scale"))
        return {"lr": args.gate_lr if gate_param else args.lr, "betas": (0.95, 0.999)}

    svi = SVI(model, guide, Adam(optim_args), CompactMeanField_ELBO())
    net.train()
    loss = svi_epochs(svi, train, args.epochs)

    # 6. Posterior means into the gates, then Delta F per unit.
    guide.update_gates()
    net.eval()
    full_logits, labels = predict(net, test)
    scores = bmrs_delta_f(net, guide)
    masks = {site: s[args.criterion] < 0 for site, s in scores.items()}
    # The same decision through the library's criterion (it builds the same distributions).
    reference = compute_masks(net, guide, args.criterion)
    for site, keep in masks.items():
        assert torch.equal(keep, reference.layers[site].keep), site

    # 7. Apply the masks (removed units are exactly zero from now on), fine-tune the rest with
    # the masks frozen, then export and compare with the gated network.
    apply_masks(net, masks)
    pruned_acc = accuracy(predict(net, test)[0], labels)
    net.train()
    finetune_loss = svi_epochs(svi, train, args.finetune_epochs)
    guide.update_gates()
    net.eval()
    pruned_logits, _ = predict(net, test)
    full = export_full(net, shape)
    pruned = export_pruned(net, shape)
    save_torchscript(full, out / "full.pt")
    save_torchscript(pruned, out / "pruned.pt")
    torch.save(masks, out / "masks.pt")
    exported_logits, _ = predict(load_torchscript(out / "pruned.pt"), test)
    export_error = (exported_logits - pruned_logits).abs().max().item()
    full_error = (predict(full, test)[0] - predict_all_units(net, test)).abs().max().item()
    if max(export_error, full_error) > 1e-4:
        raise RuntimeError(
            f"the export differs from the gated network: {export_error:.3g} (pruned), "
            f"{full_error:.3g} (full)"
        )

    # 8. ArviZ: every gate's posterior; the summary of the smallest gated layer.
    gates = dict(named_gates(net))
    site = min(masks, key=lambda s: gates[s].num_units)
    summary = arviz_summary(net, guide, site, out)

    result = {
        "dataset": "digits",
        "network": "digits-mlp",
        "num_train": num_data,
        "epochs": {
            "pretrain": args.pretrain_epochs,
            "svi": args.epochs,
            "finetune": args.finetune_epochs,
        },
        "loss": {"svi": loss, "finetune": finetune_loss},
        "criterion": args.criterion,
        "units": {
            s: {
                "before": int(masks[s].numel()),
                "bmrs-n": int((scores[s]["bmrs-n"] < 0).sum()),
                "bmrs-u:4": int((scores[s]["bmrs-u:4"] < 0).sum()),
                "snr>1": int((scores[s]["snr"] > 1).sum()),
                "after": int(masks[s].sum()),
            }
            for s in masks
        },
        "test_accuracy": {
            "pretrained": pretrained_acc,
            "gated": accuracy(full_logits, labels),
            "pruned": pruned_acc,
            "pruned_finetuned": accuracy(pruned_logits, labels),
            "exported": accuracy(exported_logits, labels),
        },
        "max_abs_logit_difference": {"pruned": export_error, "full": full_error},
        "params": {"full": count_parameters(full), "pruned": count_parameters(pruned)},
        "flops": {"full": count_flops(full, shape), "pruned": count_flops(pruned, shape)},
        "files": ["full.pt", "pruned.pt", "masks.pt", "posterior.nc", "result.json"],
        "out": str(out),
        "seconds": time.perf_counter() - start,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print_result(result, summary, site)
    return result


def print_result(result: dict, summary, site: str) -> None:
    e = result["epochs"]
    print(
        f"digits-mlp on digits ({result['num_train']} training examples): {e['pretrain']} "
        f"pretraining, {e['svi']} SVI and {e['finetune']} fine-tuning epochs; "
        f"-ELBO {result['loss']['svi']:.1f}"
    )
    print(f"{'units kept':<20} {'before':>6} {'BMRS_N':>7} {'BMRS_U-4':>9} {'SNR>1':>6}")
    for s, u in result["units"].items():
        print(f"{s:<20} {u['before']:>6} {u['bmrs-n']:>7} {u['bmrs-u:4']:>9} {u['snr>1']:>6}")
    acc = {k: f"{100 * v:.2f}%" for k, v in result["test_accuracy"].items()}
    print(
        f"test accuracy: pretrained {acc['pretrained']}, gated {acc['gated']}, "
        f"pruned with {result['criterion']} {acc['pruned']}, fine-tuned "
        f"{acc['pruned_finetuned']}, exported {acc['exported']}"
    )
    p, f = result["params"], result["flops"]
    diff = result["max_abs_logit_difference"]
    print(
        f"parameters {p['full']:,} -> {p['pruned']:,}; FLOPs/example {f['full']:,} -> "
        f"{f['pruned']:,} ({f['full'] / max(f['pruned'], 1):.2f}x fewer)"
    )
    print(
        f"exported vs gated network, max |logit difference|: pruned {diff['pruned']:.1e}, "
        f"full {diff['full']:.1e}"
    )
    print(f"\narviz.summary of theta in {site} (independent draws from q):")
    print(summary.to_string(max_rows=12))
    print(f"\n{result['seconds']:.0f} s; files in {result['out']}")


if __name__ == "__main__":
    main()
