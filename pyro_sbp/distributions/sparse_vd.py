r"""Sparse Variational Dropout's prior and posterior of a weight, with the KL approximation of
Molchanov, Ashukha and Vetrov (2017) registered for them.

.. math::

    p(w) \propto \frac{1}{|w|}, \qquad
    q(w) = \mathcal N(\theta, \alpha\theta^2), \quad
    \log\alpha = \log\sigma^2 - \log\theta^2 .

**References**

[1] Molchanov, Ashukha, Vetrov, *Variational Dropout Sparsifies Deep Neural Networks*, ICML
    2017 (Sections 3-4, Eq. 14).
[2] Kingma, Salimans, Welling, *Variational Dropout and the Local Reparameterization Trick*,
    NeurIPS 2015.
"""

import math

import torch
from pyro.distributions import Normal, TorchDistribution
from torch.distributions import constraints, register_kl
from torch.distributions.utils import broadcast_all

#: The constants of the fitted approximation of -KL (Molchanov et al. 2017, Eq. 14).
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: The range log alpha is clipped to, as the authors' PyTorch code does (their Theano code
#: clips to [-8, 8]); beyond it the KL changes by less than 6e-4 nats (measured, see
#: :func:`sparse_vd_neg_kl`).
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -10.0, 10.0
#: Added to theta^2 in log alpha = log sigma^2 - log(theta^2 + eps) (the authors' 1e-8), so that
#: a weight at exactly zero has a finite log alpha.
THETA2_EPS = 1e-8


class ImproperLogUniform(TorchDistribution):
    r"""The scale-invariant log-uniform prior of Sparse VD, improper:

    .. math::

        p(w) \propto \frac{1}{|w|}, \qquad w \in \mathbb R \setminus \{0\}.

    ``log_prob`` is :math:`-\log|w|`, the log-density up to its (infinite) normaliser, and
    the distribution cannot be sampled. It exists for its KL from
    :class:`SparseVDNormal`, which is finite and depends on :math:`\alpha` only (registered
    here, so :class:`~pyro.infer.TraceMeanField_ELBO` uses it instead of a Monte Carlo
    estimate).

    :param batch_shape: the batch shape (one weight tensor's shape, say).
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, batch_shape=torch.Size(), *, validate_args=None):
        super().__init__(torch.Size(batch_shape), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ImproperLogUniform, _instance)
        super(ImproperLogUniform, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "the log-uniform prior p(w) ~ 1/|w| is improper and cannot be sampled"
        )

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return -value.abs().log()


class SparseVDNormal(Normal):
    r"""Sparse VD's posterior of a weight, in the additive reparameterisation:

    .. math::

        q(w) = \mathcal N(\theta, \sigma^2) = \mathcal N(\theta, \alpha\theta^2), \qquad
        \log\alpha = \mathrm{clip}\big(\log\sigma^2 - \log(\theta^2 + 10^{-8}),\,
        -10,\, 10\big),

    with variance :math:`\alpha(\theta^2 + 10^{-8})` (that is :math:`\sigma^2` exactly inside
    the clipping range). The parameters are :math:`\theta` (``loc``) and :math:`\log\sigma^2`
    (``log_sigma2``), not :math:`\alpha`: the gradient of the weight's noise with respect to
    :math:`\theta` is then free of the noise (Molchanov et al., Section 4.1).

    :param loc: :math:`\theta`.
    :param log_sigma2: :math:`\log\sigma^2`.
    """

    arg_constraints = {"loc": constraints.real, "log_sigma2": constraints.real}

    def __init__(self, loc, log_sigma2, *, validate_args=None):
        loc, log_sigma2 = broadcast_all(loc, log_sigma2)
        self.log_sigma2 = log_sigma2
        theta2 = loc.square() + THETA2_EPS
        self.log_alpha = (log_sigma2 - theta2.log()).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        scale = (self.log_alpha.exp() * theta2).sqrt()
        super().__init__(loc, scale, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SparseVDNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.log_sigma2 = self.log_sigma2.expand(batch_shape)
        new.log_alpha = self.log_alpha.expand(batch_shape)
        return super().expand(batch_shape, _instance=new)


def sparse_vd_neg_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    r"""The fitted approximation of :math:`-\mathrm{KL}(q \,\|\, p)` of one weight
    (Molchanov et al. 2017, Eq. 14):

    .. math::

        -\mathrm{KL} \approx k_1\,\sigma(k_2 + k_3\log\alpha) - \tfrac12\log(1 + \alpha^{-1})
        - k_1, \qquad k_1 = 0.63576,\ k_2 = 1.87320,\ k_3 = 1.48695.

    It is *not* the exact value. Since the prior is improper, the exact KL is defined up to a
    constant, fixed (as the approximation fixes it) so that the KL vanishes as
    :math:`\alpha \to \infty`:

    .. math::

        \mathrm{KL}(\alpha) = \mathbb E_{\varepsilon \sim \mathcal N(0,1)}
        \log\big|1 + \sqrt\alpha\,\varepsilon\big| - \tfrac12\log\alpha
        + \tfrac12(\gamma + \log 2).

    Integrated numerically (scipy ``quad``, split at the singularity
    :math:`\varepsilon = -\alpha^{-1/2}`) on 201 points of :math:`\log\alpha \in [-10, 10]`
    (``tests/distributions/test_sparse_vd.py``), the approximation is off by at most
    **0.0094 nats per weight** (0.00937, at :math:`\log\alpha = -3.5`; :math:`6.0\cdot10^{-4}`
    at :math:`-10` and :math:`3\cdot10^{-8}` at :math:`10`); the test holds it below 0.0095.
    ``log1p(exp(-log_alpha))`` is written as ``softplus(-log_alpha)``, exact and stable at both
    ends.
    """
    return (
        K1 * torch.sigmoid(K2 + K3 * log_alpha)
        - 0.5 * torch.nn.functional.softplus(-log_alpha)
        - K1
    )


#: :math:`\tfrac12(\gamma + \log 2)`, the limit of :math:`-\mathbb E\log|\varepsilon|`.
EXACT_KL_CONSTANT = 0.5 * (0.5772156649015329 + math.log(2.0))


@register_kl(SparseVDNormal, ImproperLogUniform)
def _kl_sparsevdnormal_improperloguniform(p, q):
    # Molchanov et al. 2017, Eq. 14: the fitted approximation (see sparse_vd_neg_kl), a
    # function of alpha alone, element-wise with the batch shape of the pair.
    shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    return (-sparse_vd_neg_kl(p.log_alpha)).expand(shape)
