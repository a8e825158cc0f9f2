r"""What Bayesian Compression (Louizos, Ullrich, Welling 2017) needs as Pyro distributions.

* :class:`Jeffreys`: the group normal-Jeffreys prior's scale prior :math:`p(z) \propto
  1/|z|`, with the KL of the posterior :math:`\mathcal N(\mu_z, \sigma_z^2)`
  (:class:`~pyro_sbp.distributions.sparse_vd.SparseVDNormal`) registered as the Sparse VD
  approximation (:func:`~pyro_sbp.distributions.sparse_vd.sparse_vd_neg_kl`) at
  :math:`\log\alpha_z = \log\sigma_z^2 - \log\mu_z^2` (the tutorial code's
  ``get_log_dropout_rates``). It is
  :class:`~pyro_sbp.distributions.sparse_vd.ImproperLogUniform` with a parameter: a group
  site is sampled in the data plate, and :class:`~pyro_sbp.infer.CompactMeanField_ELBO`
  rebuilds the prior of such a site from its parameters.
* The half-Cauchy scales of the group horseshoe written through the (inverse-)gamma
  decomposition (:func:`half_cauchy_factors`), with closed-form KLs of ``LogNormal`` variational
  factors to ``Gamma`` and ``InverseGamma`` priors registered here.

The Gaussian KL of the weights, :math:`\mathrm{KL}(\mathcal N(\mu, \sigma^2) \| \mathcal N(0,
1))`, is torch's own ``(Normal, Normal)`` registration.

Importing this module (``pyro_sbp.distributions`` does) registers the KLs with
``torch.distributions.kl.register_kl``, so that ``kl_divergence`` and Pyro's
``TraceMeanField_ELBO`` use them.
"""

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions import Gamma, InverseGamma, LogNormal, register_kl
from torch.distributions.utils import broadcast_all

from pyro_sbp.distributions.sparse_vd import (
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    THETA2_EPS,
    SparseVDNormal,
    sparse_vd_neg_kl,
)


class Jeffreys(TorchDistribution):
    r"""The improper Jeffreys scale prior :math:`p(z) \propto 1/|z - \mathrm{loc}|` on the
    real line (the group normal-Jeffreys prior of a scale :math:`z`: ``loc = 0``).

    Marginalising :math:`z` out of :math:`w \mid z \sim \mathcal N(0, z^2)` gives the
    log-uniform prior :math:`p(w) \propto 1/|w|` of the weights (BC Section 3.1). It cannot be
    sampled from or normalised: ``log_prob`` is the unnormalised :math:`-\log|z -
    \mathrm{loc}|`. Its KL from a :class:`~pyro_sbp.distributions.SparseVDNormal` posterior is
    registered (the Sparse VD approximation). ``loc`` also carries the batch shape.

    **References**

    [1] Louizos, Ullrich, Welling, *Bayesian Compression for Deep Learning*, NeurIPS 2017
        (Section 3.1).

    :param loc: the centre (0 for a scale prior).
    """

    arg_constraints = {"loc": constraints.real}
    support = constraints.real
    has_rsample = False

    def __init__(self, loc: Tensor | float = 0.0, *, validate_args: bool | None = None):
        (self.loc,) = broadcast_all(loc)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Jeffreys, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        super(Jeffreys, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "the Jeffreys prior p(z) ~ 1/|z| is improper and cannot be sampled"
        )

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return -torch.log(torch.abs(value - self.loc))


@register_kl(SparseVDNormal, Jeffreys)
def _kl_sparsevdnormal_jeffreys(p: SparseVDNormal, q: Jeffreys) -> Tensor:
    # The KL of z: the Sparse VD approximation (Molchanov et al. 2017, Eq. 14) at
    # log alpha = log sigma^2 - log((mu - loc)^2 + 1e-8), clipped as SparseVDNormal clips it.
    theta2 = (p.loc - q.loc).square() + THETA2_EPS
    log_alpha = (p.log_sigma2 - theta2.log()).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
    return -sparse_vd_neg_kl(log_alpha)


def _neg_entropy_log_normal(p: LogNormal) -> Tensor:
    # -H(LogNormal(m, s^2)) = -(m + 1/2 + log(s sqrt(2 pi))).
    m, s = p.loc, p.scale
    return -(m + 0.5 + torch.log(s) + 0.5 * math.log(2.0 * math.pi))


@register_kl(LogNormal, Gamma)
def _kl_lognormal_gamma(p: LogNormal, q: Gamma) -> Tensor:
    # KL = -H(p) - E_p[log q], log q(x) = k log r - lgamma(k) + (k - 1) log x - r x, with
    # E_p[log x] = m and E_p[x] = exp(m + s^2/2).
    m, s = p.loc, p.scale
    k, r = q.concentration, q.rate
    cross = k * torch.log(r) - torch.lgamma(k) + (k - 1.0) * m - r * torch.exp(m + 0.5 * s**2)
    return _neg_entropy_log_normal(p) - cross


@register_kl(LogNormal, InverseGamma)
def _kl_lognormal_inversegamma(p: LogNormal, q: InverseGamma) -> Tensor:
    # log q(x) = k log b - lgamma(k) - (k + 1) log x - b / x, with E_p[1/x] = exp(-m + s^2/2).
    m, s = p.loc, p.scale
    k, b = q.concentration, q.rate
    cross = k * torch.log(b) - torch.lgamma(k) - (k + 1.0) * m - b * torch.exp(0.5 * s**2 - m)
    return _neg_entropy_log_normal(p) - cross


def half_cauchy_factors(scale: Tensor | float) -> tuple[Gamma, InverseGamma]:
    r"""The two factors of a half-Cauchy scale: if :math:`a \sim \mathrm{Gamma}(\frac12,
    \mathrm{rate} = 1/\tau^2)` and :math:`b \sim \mathrm{InvGamma}(\frac12, 1)`, then

    .. math::

        \sqrt{a b} \sim \mathcal C^+(0, \tau),

    since :math:`a = \tau^2 g^2 / 2` and :math:`b = 2 / h^2` for standard normals :math:`g, h`,
    and :math:`|g / h|` is a standard half-Cauchy variable. Both factors are exponential-family
    priors whose KLs from log-normal variational factors are closed-form (registered here).

    **References**

    [1] Louizos, Ullrich, Welling, *Bayesian Compression for Deep Learning*, NeurIPS 2017
        (Section 3.2).

    :param scale: :math:`\tau` (positive).
    :return: ``(Gamma(1/2, 1/tau^2), InverseGamma(1/2, 1))`` (Pyro distributions).
    """
    import pyro.distributions as dist

    (tau,) = broadcast_all(scale)
    if not bool((tau > 0).all()):
        raise ValueError(f"a half-Cauchy scale must be positive, got {scale}")
    half = torch.full_like(tau, 0.5)
    return dist.Gamma(half, tau.square().reciprocal()), dist.InverseGamma(
        half, torch.ones_like(tau)
    )
