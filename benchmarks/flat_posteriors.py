"""Why no evidence-based rule at fixed weights removes the units whose posterior is the prior's.

One BMRS MLP is fitted on Fashion-MNIST with the KL weight 100 and no pruning (5 pretraining and
6 SVI epochs, gate learning rate 0.05, one thread, seed 0). On that fit, for the units whose
posterior is (nearly) the prior (KL < 0.01 nats):

- exact BMR: Delta F_N (BMRS_N) and Delta F_U-4 (BMRS_U-4), which differ only by where the
  truncated normal's shape puts a little more or less mass than the flat prior;
- the ELBO of the network without the unit (criterion ``elbo``): N E[log p(y | theta_j = 0) -
  log p(y | theta)] + beta KL_j;
- the ELBO of the network with the unit's posterior replaced by its prior (the truncated-normal
  family extended by the prior itself), with common random numbers: N E[log p(y | theta_j ~ p) -
  log p(y | theta_j ~ q)] + beta KL_j.

Then, for the set each criterion removes: N times the joint change of the expected
log-likelihood at fixed weights, the KL the removal saves (beta times the removed units' KL),
and the validation accuracy of the pruned network before any fine-tuning.

    python benchmarks/flat_posteriors.py     # about 6 minutes on one core

Writes ``benchmarks/results/flat_posteriors.json``; docs/math.md (section 4) quotes it.
"""

import json
import platform
import time
from pathlib import Path

import torch

from pyro_sbp.infer import TrainConfig, Trainer
from pyro_sbp.infer.trainer import evaluate
from pyro_sbp.models import named_gates
from pyro_sbp.reduction import apply_masks
from pyro_sbp.reduction.delta_f import posterior64
from pyro_sbp.reduction.elbo_ablation import ELBO_EXAMPLES, _Evaluator, _log_lik, unit_kls

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "flat_posteriors.json"
WORK = ROOT / "runs" / "flat-posteriors"
KL_WEIGHT = 100.0
FLAT_KL = 0.01
CRITERIA = ("bmrs-n", "bmrs-u:4", "snr:1", "elbo")


def _quantiles(t: torch.Tensor) -> list[float]:
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    return [round(v, 4) for v in t.double().quantile(q).tolist()] if t.numel() else []


def _prior_swap(trainer, ev) -> dict[str, torch.Tensor]:
    """N E[log p(y | theta_j ~ prior) - log p(y | theta_j ~ q)] + beta KL_j for every unit, the
    two draws of theta_j from one uniform (common random numbers)."""
    kl = unit_kls(trainer.guide)
    out = {}
    for site, gate in ev.gates:
        q, _, _ = posterior64(trainer.guide, site)
        u = q.cdf(ev.thetas[site].double()).clamp(1e-12, 1 - 1e-12)
        a = torch.tensor(gate.low, dtype=torch.float64).log()
        b = torch.tensor(gate.high, dtype=torch.float64).log()
        theta_prior = (a + u * (b - a)).exp().to(ev.thetas[site])
        d = torch.zeros(gate.num_units, dtype=torch.float64)
        for j in range(gate.num_units):
            total = 0.0
            for s, e in ev.chunks:
                ev.set_chunk(s, e)
                with torch.no_grad():
                    base = _log_lik(trainer.net(ev.x[s:e]), ev.y[s:e]).sum()
                    theta = ev.thetas[site][s:e].clone()
                    theta[:, j] = theta_prior[s:e, j]
                    gate._theta = theta
                    total += float(_log_lik(trainer.net(ev.x[s:e]), ev.y[s:e]).sum() - base)
            d[j] = ev.scale() * total + gate.kl_weight * float(kl[site][j])
        out[site] = d
    return out


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    config = TrainConfig(
        model="bmrs-mlp",
        dataset="fashion-mnist",
        resize=32,
        pretrain_epochs=5,
        epochs=6,
        gate_lr=0.05,
        kl_weight=KL_WEIGHT,
        seed=0,
    )
    resume = (WORK / "checkpoint.pt").exists()
    trainer = Trainer(config, WORK, resume=resume, progress=False)
    trainer.fit()
    trainer.guide.update_gates()
    data = trainer.splits.train.tensors
    kl = unit_kls(trainer.guide)
    flat = {site: kl[site] < FLAT_KL for site in kl}
    results = {c: trainer.compute_masks(c) for c in CRITERIA}
    gates = dict(named_gates(trainer.net))
    with _Evaluator(trainer.net, trainer.guide, data, ELBO_EXAMPLES, 0) as ev:
        swap = _prior_swap(trainer, ev)
        base = ev.log_lik()
        joint = {}
        for c, r in results.items():
            removed = {s: ~lp.keep for s, lp in r.layers.items()}
            for s, gate in gates.items():
                gate.mask.copy_((~removed[s]).to(gate.mask))
            change = float(ev.scale() * (ev.log_lik() - base))
            for gate in gates.values():
                gate.mask.fill_(1.0)
            saved = sum(KL_WEIGHT * float(kl[s][removed[s]].sum()) for s in gates)
            joint[c] = {
                "units_removed": r.units_before - r.units_after,
                "flat_units_removed": sum(int((removed[s] & flat[s]).sum()) for s in gates),
                "n_times_log_lik_change": change,
                "kl_saved": saved,
                "delta_f_joint": change + saved,
            }
    loader = trainer._eval_loader()
    for c, r in results.items():
        apply_masks(trainer.net, r)
        joint[c]["val_accuracy_no_finetune"] = evaluate(trainer.net, loader, trainer.device)
        apply_masks(trainer.net, {s: torch.ones(g.num_units) for s, g in gates.items()})
    joint["none"] = {"val_accuracy_no_finetune": evaluate(trainer.net, loader, trainer.device)}

    def flat_scores(name):
        if name == "prior-swap":
            return torch.cat([swap[s][flat[s]] for s in gates])
        r = results[name]
        return torch.cat([r.layers[s].scores[flat[s]] for s in gates])

    data_out = {
        "network": "bmrs-mlp",
        "kl_weight": KL_WEIGHT,
        "epochs": {"pretrain": 5, "svi": 6},
        "units": sum(g.num_units for g in gates.values()),
        "flat_units": sum(int(f.sum()) for f in flat.values()),
        "flat_kl_below": FLAT_KL,
        "flat_unit_scores": {
            "delta_f_bmrs_n": _quantiles(flat_scores("bmrs-n")),
            "delta_f_bmrs_u4": _quantiles(flat_scores("bmrs-u:4")),
            "delta_f_elbo_unit_off": _quantiles(flat_scores("elbo")),
            "delta_f_elbo_prior_swap": _quantiles(flat_scores("prior-swap")),
        },
        "quantiles": [0.0, 0.1, 0.5, 0.9, 1.0],
        "joint": joint,
        "examples": ELBO_EXAMPLES,
        "seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data_out, indent=1) + "\n")
    print(json.dumps(data_out, indent=1))


if __name__ == "__main__":
    main()
