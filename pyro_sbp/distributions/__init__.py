"""Truncated log-space distributions for multiplicative noise gates, with closed-form KLs.

Importing this package registers the KL divergences in :mod:`pyro_sbp.distributions.kl`, so that
``kl_divergence`` (and with it ``pyro.infer.TraceMeanField_ELBO``) uses them.
"""

from pyro_sbp.distributions import kl  # noqa: F401  (registers the KL divergences)
from pyro_sbp.distributions.horseshoe import Jeffreys, half_cauchy_factors
from pyro_sbp.distributions.sparse_vd import ImproperLogUniform, SparseVDNormal
from pyro_sbp.distributions.truncated_log_normal import TruncatedLogNormal
from pyro_sbp.distributions.truncated_log_uniform import TruncatedLogUniform
from pyro_sbp.distributions.truncated_normal import TruncatedNormal

__all__ = [
    "ImproperLogUniform",
    "Jeffreys",
    "SparseVDNormal",
    "TruncatedLogNormal",
    "TruncatedLogUniform",
    "TruncatedNormal",
    "half_cauchy_factors",
]
