"""Cost of the SBP gate distributions against torch's log-normal, side by side.

For ``n`` gates in float32 on the CPU, times one pass of

* ours: ``TruncatedLogNormal.rsample`` + ``kl_divergence(TruncatedLogNormal, TruncatedLogUniform)``
  + ``mean`` + ``variance`` (fresh distribution objects each repetition, so no cached value is
  reused), and
* torch's: ``LogNormal.rsample`` + ``kl_divergence(Normal, Normal)`` of the same size,

alternating the two in one run, and writes the medians and their ratio (ours / torch's) to
``benchmarks/results/distributions.json``. Target: ratio <= 8.

A third pass, timed in the same loop, computes the same four quantities by the textbook formulas
(:func:`textbook`: erf differences, ``erfinv`` for the quantile, no tail handling; the erf
arguments clamped so that no special function takes a slow path). They are wrong where the
truncated mass is small (the tails of the parameter range, about a quarter of these gates:
``textbook_wrong_fraction``), so they are no implementation; they are a lower bound on what any
eager-PyTorch implementation of the four quantities costs, written as ``textbook_ratio``. Where
that floor is above the target, no choice of formulas meets the target in eager PyTorch: it needs
a fused native kernel.

The gate parameters are those of a network in training: ``loc`` spread over [-25, 2] (most gates
inside [-20, 0], some past either bound) and ``log scale`` over [-6, 0].

``ours_parts_median_s`` times ours's three parts one by one. ``float_lanes`` says which build of
the native kernels ran (8: the AVX2 vector kernels, 1: the scalar ones; ``PYRO_SBP_SIMD=0``
builds the scalar ones), ``native`` whether they ran at all (``PYRO_SBP_NATIVE=0`` times the
PyTorch path; ``--out`` writes the figures elsewhere).

    python benchmarks/distributions.py [--n 1000000] [--repeats 30] [--out FILE]
"""

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import textbook_formulas as tb
import torch
from torch.distributions import LogNormal, Normal, kl_divergence

from pyro_sbp import _native
from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform

RESULTS = Path(__file__).parent / "results" / "distributions.json"


def textbook(loc, scale, log_low: float, log_high: float, u):
    """rsample (at uniforms ``u``), KL to the log-uniform, mean and variance of the truncated
    log-normal by the textbook formulas (:mod:`textbook_formulas`), in as few eager passes as we
    could write them.

    Not an implementation: where the truncated mass ``Z`` (or that of the tilted normals of the
    mean and variance) is below float precision it returns garbage. Only a cost floor.
    """
    alpha, beta, e_alpha, z, t = tb.terms(loc, scale, log_low, log_high)
    kl = tb.kl(scale, z, t, log_low, log_high)
    z1, _ = tb.mass(alpha - scale, beta - scale)
    z2, _ = tb.mass(alpha - 2.0 * scale, beta - 2.0 * scale)
    mean = torch.exp(loc + 0.5 * scale.square()) * z1 / z
    variance = mean.square() * torch.expm1(scale.square() + (z2 * z / z1.square()).log())
    theta = tb.sample(loc, scale, e_alpha, z, u, log_low, log_high)
    return theta, kl, mean, variance


def ours(loc, scale, low, high, prior):
    d = TruncatedLogNormal(loc, scale, low, high, validate_args=False)
    theta = d.rsample()
    kl = kl_divergence(d, prior)
    return theta, kl, d.mean, d.variance


def ours_training(loc, scale, low, high, prior):
    # What one SVI step needs of the guide: a sample and the KL (TraceMeanField_ELBO).
    d = TruncatedLogNormal(loc, scale, low, high, validate_args=False)
    return d.rsample(), kl_divergence(d, prior)


def ours_parts(loc, scale, low, high, prior) -> dict[str, float]:
    """Seconds of each of ``ours``'s three parts, timed one after the other on one fresh
    distribution: the sample, the KL, and the mean and variance (one call on the CPU)."""
    d = TruncatedLogNormal(loc, scale, low, high, validate_args=False)
    t0 = time.perf_counter()
    d.rsample()
    t1 = time.perf_counter()
    kl_divergence(d, prior)
    t2 = time.perf_counter()
    _ = d.mean, d.variance
    t3 = time.perf_counter()
    return {"rsample": t1 - t0, "kl": t2 - t1, "mean_variance": t3 - t2}


def torchs(loc, scale, q):
    d = LogNormal(loc, scale, validate_args=False)
    theta = d.rsample()
    kl = kl_divergence(Normal(loc, scale, validate_args=False), q)
    return theta, kl


def textbook_wrong_fraction(loc, scale, low, high, rtol: float = 1e-3) -> float:
    """Fraction of gates whose textbook KL, mean or variance is off by more than ``rtol``
    (relative, against ours computed in float64)."""
    d = TruncatedLogNormal(loc.double(), scale.double(), low.double(), high.double())
    p64 = TruncatedLogUniform(low.double(), high.double()).expand(d.batch_shape)
    ref = (kl_divergence(d, p64), d.mean, d.variance)
    u = torch.rand(loc.shape)
    _, *got = textbook(loc, scale, math.log(low.item()), math.log(high.item()), u)
    bad = torch.zeros(loc.shape, dtype=torch.bool)
    for g, r in zip(got, ref, strict=True):
        g = g.double()
        bad |= ~torch.isfinite(g) | ((g - r).abs() > rtol * r.abs() + 1e-30)
    return bad.double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.manual_seed(0)
    n = args.n
    loc = torch.empty(n).uniform_(-25.0, 2.0)
    scale = torch.empty(n).uniform_(-6.0, 0.0).exp()
    low, high = torch.tensor(math.exp(-20.0)), torch.tensor(1.0)
    prior = TruncatedLogUniform(low, high, validate_args=False).expand([n])
    q = Normal(torch.zeros(n), torch.ones(n), validate_args=False)

    log_low, log_high = math.log(low.item()), math.log(high.item())

    def floor():
        return textbook(loc, scale, log_low, log_high, torch.rand(n))

    for _ in range(3):  # warm-up
        ours(loc, scale, low, high, prior)
        torchs(loc, scale, q)
        floor()
    t_ours, t_train, t_torch, t_floor, t_parts = [], [], [], [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours(loc, scale, low, high, prior)
            t1 = time.perf_counter()
            torchs(loc, scale, q)
            t2 = time.perf_counter()
            ours_training(loc, scale, low, high, prior)
            t3 = time.perf_counter()
            floor()
            t4 = time.perf_counter()
            t_parts.append(ours_parts(loc, scale, low, high, prior))
            t_ours.append(t1 - t0)
            t_torch.append(t2 - t1)
            t_train.append(t3 - t2)
            t_floor.append(t4 - t3)
        wrong = textbook_wrong_fraction(loc, scale, low, high)
    med_ours, med_torch = statistics.median(t_ours), statistics.median(t_torch)
    med_train, med_floor = statistics.median(t_train), statistics.median(t_floor)
    result = {
        "n": n,
        "dtype": "float32",
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "ours_median_s": med_ours,
        "torch_median_s": med_torch,
        "ratio": med_ours / med_torch,
        "ours_training_median_s": med_train,
        "training_ratio": med_train / med_torch,
        "ours_parts_median_s": {k: statistics.median(p[k] for p in t_parts) for k in t_parts[0]},
        "textbook_median_s": med_floor,
        "textbook_ratio": med_floor / med_torch,
        "textbook_wrong_fraction": wrong,
        "target": 8.0,
        "native": _native.enabled(),
        "float_lanes": _native.ops().float_lanes() if _native.enabled() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
