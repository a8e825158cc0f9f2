"""The fixture registry that drives the generic distribution checks.

Each :class:`Fixture` names a distribution class, a list of parameter sets (batched) and a scipy
reference for its ``log_prob`` and ``cdf``. Parameters are float64; every generic test loops over
the registry, so a new family gets every check by adding one entry here.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.stats
import torch

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, TruncatedNormal


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _truncnorm(loc, scale, low, high):
    loc, scale, low, high = (np.asarray(v, dtype=np.float64) for v in (loc, scale, low, high))
    return scipy.stats.truncnorm((low - loc) / scale, (high - loc) / scale, loc=loc, scale=scale)


def _scipy_truncated_normal(p):
    return _truncnorm(p["loc"], p["scale"], p["low"], p["high"])


class _LogTruncnorm:
    """scipy has no truncated log-normal: change variables in truncnorm."""

    def __init__(self, p):
        self.tn = _truncnorm(p["loc"], p["scale"], np.log(p["low"]), np.log(p["high"]))

    def logpdf(self, x):
        return self.tn.logpdf(np.log(x)) - np.log(x)

    def cdf(self, x):
        return self.tn.cdf(np.log(x))


def _scipy_truncated_log_uniform(p):
    return scipy.stats.loguniform(np.asarray(p["low"]), np.asarray(p["high"]))


E20 = math.exp(-20.0)


@dataclass
class Fixture:
    dist: type
    params: list[dict] = field(default_factory=list)
    scipy: object = None

    def __str__(self):
        return self.dist.__name__

    def make(self, i: int, dtype=torch.float64):
        return self.dist(**{k: torch.tensor(v, dtype=dtype) for k, v in self.params[i].items()})

    def reference(self, i: int):
        return self.scipy(self.params[i])


FIXTURES = [
    Fixture(
        TruncatedNormal,
        [
            {"loc": 0.3, "scale": 1.0, "low": -1.0, "high": 2.0},
            {"loc": [-2.0, 5.0, 0.0], "scale": [0.5, 2.0, 10.0], "low": -1.0, "high": 2.0},
            # loc far outside on both sides: the tail branches.
            {"loc": [-8.0, 9.0], "scale": [1.0, 0.7], "low": [0.0, -3.0], "high": [1.0, 2.0]},
        ],
        _scipy_truncated_normal,
    ),
    Fixture(
        TruncatedLogNormal,
        [
            {"loc": -1.0, "scale": 1.0, "low": E20, "high": 1.0},
            {"loc": [-10.0, 0.0, 0.5], "scale": [3.0, 0.5, 1.0], "low": E20, "high": 1.0},
            {"loc": [-25.0, 3.0], "scale": [1.5, 1.0], "low": [E20, 0.1], "high": [1.0, 2.0]},
        ],
        _LogTruncnorm,
    ),
    Fixture(
        TruncatedLogUniform,
        [
            {"low": E20, "high": 1.0},
            {"low": [E20, 0.5, 1e-3], "high": [1.0, 2.0, 1e-3 * 1.01]},
        ],
        _scipy_truncated_log_uniform,
    ),
]


def fixture_cases():
    return [(f, i) for f in FIXTURES for i in range(len(f.params))]


def case_id(case):
    f, i = case
    return f"{f}-{i}"
