"""Cost of the SBP gate distributions against torch's log-normal, side by side.

For ``n`` gates in float32 on the CPU, times one pass of

* ours: ``TruncatedLogNormal.rsample`` + ``kl_divergence(TruncatedLogNormal, TruncatedLogUniform)``
  + ``mean`` + ``variance`` (fresh distribution objects each repetition, so no cached value is
  reused), and
* torch's: ``LogNormal.rsample`` + ``kl_divergence(Normal, Normal)`` of the same size,

alternating the two in one run, and writes the medians and their ratio (ours / torch's) to
``benchmarks/results/distributions.json``. Target: ratio <= 4.

The gate parameters are those of a network in training: ``loc`` spread over [-25, 2] (most gates
inside [-20, 0], some past either bound) and ``log scale`` over [-6, 0].

    python benchmarks/distributions.py [--n 1000000] [--repeats 30]
"""

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.distributions import LogNormal, Normal, kl_divergence

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform

RESULTS = Path(__file__).parent / "results" / "distributions.json"


def ours(loc, scale, low, high, prior):
    d = TruncatedLogNormal(loc, scale, low, high, validate_args=False)
    theta = d.rsample()
    kl = kl_divergence(d, prior)
    return theta, kl, d.mean, d.variance


def ours_training(loc, scale, low, high, prior):
    # What one SVI step needs of the guide: a sample and the KL (TraceMeanField_ELBO).
    d = TruncatedLogNormal(loc, scale, low, high, validate_args=False)
    return d.rsample(), kl_divergence(d, prior)


def torchs(loc, scale, q):
    d = LogNormal(loc, scale, validate_args=False)
    theta = d.rsample()
    kl = kl_divergence(Normal(loc, scale, validate_args=False), q)
    return theta, kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    n = args.n
    loc = torch.empty(n).uniform_(-25.0, 2.0)
    scale = torch.empty(n).uniform_(-6.0, 0.0).exp()
    low, high = torch.tensor(math.exp(-20.0)), torch.tensor(1.0)
    prior = TruncatedLogUniform(low, high, validate_args=False).expand([n])
    q = Normal(torch.zeros(n), torch.ones(n), validate_args=False)

    for _ in range(3):  # warm-up
        ours(loc, scale, low, high, prior)
        torchs(loc, scale, q)
    t_ours, t_train, t_torch = [], [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours(loc, scale, low, high, prior)
            t1 = time.perf_counter()
            torchs(loc, scale, q)
            t2 = time.perf_counter()
            ours_training(loc, scale, low, high, prior)
            t3 = time.perf_counter()
            t_ours.append(t1 - t0)
            t_torch.append(t2 - t1)
            t_train.append(t3 - t2)
    med_ours, med_torch = statistics.median(t_ours), statistics.median(t_torch)
    med_train = statistics.median(t_train)
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
        "target": 4.0,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
