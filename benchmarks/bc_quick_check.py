"""Quick Bayesian Compression check on Fashion-MNIST / LeNet5-Caffe, at one thread.

Usage: ``python benchmarks/bc_quick_check.py PRIOR PRETRAIN_EPOCHS MAX_EPOCHS BUDGET_S GROUP_LR``
(e.g. ``gnj 2 60 2400 1e-2``): pretrain the plain network, then SVI with the ELBO (KL weight
1, Adam 1e-3, the group scales at GROUP_LR) until MAX_EPOCHS or BUDGET_S seconds; after every
epoch prune at log alpha_z >= -3, quantise, export and write
``benchmarks/results/bc_<prior>_fashion_mnist_quick.json`` (test errors, architecture, bits,
the three compression rates, FLOPs reduction). ``benchmarks/bayesian_compression.py`` is the
full benchmark; this is the quick check behind the figures its report quotes."""

import json
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_sbp.data import load_dataset, make_loaders
from pyro_sbp.export import count_flops
from pyro_sbp.export.bit_precision import compression_report, export_bc, quantize_bc
from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.models import build_network
from pyro_sbp.models.bayesian_compression import (
    BCGuide,
    BCModel,
    compute_group_masks,
    make_bayesian_compression,
    set_stochastic,
)

torch.set_num_threads(1)
prior = sys.argv[1] if len(sys.argv) > 1 else "gnj"
pre_epochs, max_epochs, budget = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
out = Path(__file__).resolve().parent / "results" / f"bc_{prior}_fashion_mnist_quick.json"
pyro.set_rng_seed(0)
splits = load_dataset("fashion-mnist", seed=0)
loaders = make_loaders(splits, batch_size=128, seed=0, eval_batch_size=1000)
shape = splits.input_shape


@torch.no_grad()
def error(m, split="test"):
    m.eval()
    wrong = n = 0
    for x, y, *_ in loaders[split]:
        wrong += int((m(x).argmax(1) != y).sum())
        n += len(y)
    return 100.0 * wrong / n


net = build_network("lenet5-caffe")
opt = torch.optim.Adam(net.parameters(), 1e-3)
t0 = time.time()
for _ in range(pre_epochs):
    net.train()
    for x, y, _ in loaders["train"]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
plain_err = error(net)
flops_full = count_flops(net, shape)
print(
    f"pretrained {pre_epochs} epochs: test error {plain_err:.2f}% ({time.time() - t0:.0f}s)",
    flush=True,
)
net = make_bayesian_compression(net, prior)
model, guide = BCModel(net, splits.num_train, shape), BCGuide(net, splits.num_train)
pyro.clear_param_store()
var_lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
GROUP_KEYS = (
    "z_loc",
    "z_log_sigma2",
    "s_a_loc",
    "s_a_log_scale",
    "s_b_loc",
    "s_b_log_scale",
    "z_a_loc",
    "z_a_log_scale",
    "z_b_loc",
    "z_b_log_scale",
)


def lr_of(name, _p):  # the group scales (BC's gates) at var_lr, everything else at 1e-3
    return {"lr": var_lr if name.rpartition(".")[2] in GROUP_KEYS else 1e-3}


svi = SVI(model, guide, Adam(lr_of), CompactMeanField_ELBO())
history = []
start = time.time()
for ep in range(max_epochs):
    net.train()
    set_stochastic(net, True)
    tot = 0.0
    for x, y, idx in loaders["train"]:
        tot += svi.step(x, y, idx)
    net.eval()
    full_err = error(net)
    res = compute_group_masks(net, "log-alpha:-3")
    masks = res.masks()
    bits = quantize_bc(net, shape, masks)
    pruned = export_bc(net, shape, masks=masks)
    quant = export_bc(net, shape, masks=masks, bits=bits)
    rep = compression_report(net, shape, masks=masks, bits=bits)
    row = {
        "epoch": ep + 1,
        "loss": tot / splits.num_train,
        "test_error_bc_full": full_err,
        "test_error_pruned": error(pruned),
        "test_error_quantized": error(quant),
        "val_error_quantized": error(quant, "val"),
        "architecture": rep["architecture"],
        "bits": bits,
        "code_bits": {k: v["code_bits"] for k, v in rep["layers"].items()},
        "compression_pruning": rep["compression_pruning"],
        "compression_fast_prediction": rep["compression_fast_prediction"],
        "compression_maximum": rep["compression_maximum"],
        "flops_reduction": flops_full / count_flops(pruned, shape),
        "seconds": time.time() - start,
    }
    if prior == "ghs":
        dres = compute_group_masks(net, "delta-f:4")
        row["architecture_delta_f4"] = [int(k.sum()) for k in dres.keep.values()]
    history.append(row)
    print(json.dumps(row), flush=True)
    json.dump(
        {
            "prior": prior,
            "network": "lenet5-caffe",
            "dataset": "fashion-mnist",
            "pretrain_epochs": pre_epochs,
            "plain_test_error": plain_err,
            "kl_weight": 1.0,
            "lr": 1e-3,
            "group_scale_lr": var_lr,
            "batch_size": 128,
            "history": history,
        },
        open(out, "w"),
        indent=1,
    )
    if time.time() - start > budget:
        break
