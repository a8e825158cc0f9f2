import math

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from pyro_sbp.distributions import _implicit, _standard
from pyro_sbp.distributions._lazy import LazyExpand, broadcast

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


class TruncatedNormal(LazyExpand, TorchDistribution):
    r"""A normal distribution truncated to the interval ``[low, high]``.

    .. math::

        p(x) = \frac{\phi\big((x - \mu)/\sigma\big)}{\sigma Z}, \qquad
        Z = \Phi(\beta) - \Phi(\alpha), \qquad
        \alpha = \frac{a - \mu}{\sigma}, \quad \beta = \frac{b - \mu}{\sigma}.

    Every quantity is computed in log space with the tail kept in its scaled form
    (:math:`\log Z = \log \hat Z - s^2/2`, see :mod:`pyro_sbp.distributions._standard`), so that
    ``log_prob``, ``entropy``, ``mean``, ``variance``, samples and their gradients stay finite and
    accurate even when ``loc`` lies many thousands of scales outside ``[low, high]``, where
    :math:`Z` underflows. Samples are drawn by inverting the CDF on the tail that keeps
    precision, without clipping the uniforms; ``rsample`` differentiates them implicitly (the
    analytic :math:`\partial x/\partial\mu` and :math:`\partial x/\partial\sigma` at fixed
    CDF value, :mod:`pyro_sbp.distributions._implicit`), not through the sampler's steps.

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov, *Structured Bayesian Pruning via Log-Normal
        Multiplicative Noise*, NeurIPS 2017 (Section 4).

    :param loc: mean of the normal before truncation.
    :param scale: standard deviation of the normal before truncation (positive).
    :param low: lower bound of the support (finite).
    :param high: upper bound of the support (finite, greater than ``low``).
    """

    arg_constraints = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "low": constraints.real,
        "high": constraints.real,
    }
    has_rsample = True
    _param_names = ("loc", "scale", "low", "high")
    # The cached statistics, all compact (broadcastable to any expansion of the batch shape).
    _shared_cache = (
        "_compact",
        "_alpha",
        "_beta",
        "_width",
        "_center",
        "_mean_compact",
        "_variance_compact",
        "_moments",
        "_full_moments",
        "_log_zhat",
        "_log_z",
    )

    def __init__(self, loc, scale, low, high, *, validate_args=None):
        self.loc, self.scale, self.low, self.high = broadcast(loc, scale, low, high)
        super().__init__(self.loc.shape, validate_args=validate_args)
        if self._validate_args:
            _check_bounds(self.low, self.high, type(self).__name__)

    def expand(self, batch_shape, _instance=None):
        # The expanded parameters are formed when first read (_lazy.LazyExpand): a plate's
        # expand then costs no tensor operation, since samples, KL and moments use the
        # compact parameters.
        new = self._get_checked_instance(TruncatedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        super(TruncatedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return self._lazy_expand(new, batch_shape)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.low, self.high)

    def rsample(self, sample_shape=torch.Size()):
        return self._rsample(sample_shape)

    def _rsample(self, sample_shape=torch.Size(), exp_bounds=None) -> Tensor:
        # Differentiated implicitly (pyro_sbp.distributions._implicit): the backward pass is a
        # dozen element-wise operations instead of the sampler's every step.
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        return _implicit.rsample(
            self._cloc, self._cscale, self._clow, self._chigh, u, exp_bounds=exp_bounds
        )

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        inside = (value >= self._clow) & (value <= self._chigh)
        lp = self._log_prob_inside(value)
        return torch.where(inside, lp, -math.inf)

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        below = value <= self._clow
        above = value >= self._chigh
        x = torch.where(below | above, 0.5 * (self._clow + self._chigh), value)
        # The smaller of the two masses either side of x is accurate; the cdf follows from it.
        lower = self._log_mass(self._clow, x)
        upper = self._log_mass(x, self._chigh)
        cdf = torch.where(lower < -math.log(2.0), lower.exp(), -torch.expm1(upper))
        return torch.where(below, 0.0, torch.where(above, 1.0, cdf))

    def icdf(self, value):
        if self._validate_args:
            if not ((value >= 0) & (value <= 1)).all():
                raise ValueError("icdf expects probabilities in [0, 1]")
        return self._quantile(value)

    def entropy(self):
        return (self._cscale.log() + self._moments.entropy).expand(self.batch_shape)

    @property
    def mean(self):
        return self._mean_compact.expand(self.batch_shape)

    @property
    def mode(self):
        return self._center.expand(self.batch_shape)

    @property
    def variance(self):
        return self._variance_compact.expand(self.batch_shape)

    @property
    def log_normalizer(self) -> Tensor:
        r""":math:`\log Z`, the log of the mass the normal puts on ``[low, high]``."""
        return self._log_z.expand(self.batch_shape)

    # --- cached standardised quantities ---------------------------------------------------
    # All of them are "compact": computed once per distinct parameter, without the dims that
    # an expand (a plate) only broadcasts, and broadcastable to the batch shape.

    @lazy_property
    def _compact(self):
        source = self.expanded_from
        if source is not None:
            return source._compact
        return _standard.compact(self.batch_shape, self.loc, self.scale, self.low, self.high)

    @property
    def _cloc(self):
        return self._compact[0]

    @property
    def _cscale(self):
        return self._compact[1]

    @property
    def _clow(self):
        return self._compact[2]

    @property
    def _chigh(self):
        return self._compact[3]

    @lazy_property
    def _alpha(self):
        return (self._clow - self._cloc) / self._cscale

    @lazy_property
    def _beta(self):
        return (self._chigh - self._cloc) / self._cscale

    @lazy_property
    def _width(self):
        # beta - alpha, exact even where alpha and beta are huge and close.
        return (self._chigh - self._clow) / self._cscale

    @lazy_property
    def _center(self):
        # The point of [low, high] closest to loc: every offset is measured from it, which
        # keeps full precision next to a bound when loc lies far outside.
        return torch.minimum(torch.maximum(self._cloc, self._clow), self._chigh)

    @lazy_property
    def _mean_compact(self):
        return self._center + self._cscale * self._moments.mean_offset

    @lazy_property
    def _variance_compact(self):
        return self._cscale.square() * self._full_moments.variance

    @lazy_property
    def _moments(self):
        if "_full_moments" in self.__dict__:
            return self._full_moments
        return _standard.moments(self._alpha, self._beta, self._width, need_var=False)

    @lazy_property
    def _full_moments(self):
        return _standard.moments(self._alpha, self._beta, self._width)

    @lazy_property
    def _log_zhat(self):
        if "_moments" in self.__dict__:
            return self._moments.log_zhat
        return _standard.log_zhat(self._alpha, self._beta, self._width)[1]

    @lazy_property
    def _log_z(self):
        s = _standard.nearest_to_zero(self._alpha, self._beta)
        return self._log_zhat - 0.5 * s * s

    def _log_mass(self, lo: Tensor, hi: Tensor) -> Tensor:
        """log P(lo <= X <= hi) for low <= lo < hi <= high, in scaled form throughout."""
        loc, scale = self._cloc, self._cscale
        a = (lo - loc) / scale
        b = (hi - loc) / scale
        _, lz = _standard.log_zhat(a, b, (hi - lo) / scale)
        center = torch.minimum(torch.maximum(loc, lo), hi)
        # log Z' - log Z = lz' - lz - (s'^2 - s^2) / 2, the squares differenced as a product.
        ds = (center - self._center) / scale
        ss = (center + self._center - 2.0 * loc) / scale
        return lz - self._log_zhat - 0.5 * ds * ss

    def _log_prob_inside(self, value):
        # -(xi^2 - s^2)/2 factored as -(xi - s)(xi + s)/2: the two quadratics cancel exactly.
        lo = (value - self._center) / self._cscale
        hi = (value + self._center - 2.0 * self._cloc) / self._cscale
        return -0.5 * lo * hi - (_LOG_SQRT_2PI + self._cscale.log() + self._log_zhat)

    def _quantile(self, u):
        finfo = torch.finfo(u.dtype)
        shape = torch.broadcast_shapes(u.shape, self.batch_shape)
        u = u.clamp(finfo.tiny, 1.0 - finfo.eps / 2).expand(shape)
        offset = _standard.sample_offset(
            self._alpha, self._beta, u, 1.0 - u, self._width, exact_quantile=True
        )
        x = self._center + self._cscale * offset
        return torch.minimum(torch.maximum(x, self._clow), self._chigh)


def _check_bounds(low: Tensor, high: Tensor, name: str) -> None:
    if not torch.isfinite(low).all() or not torch.isfinite(high).all():
        raise ValueError(f"{name}: low and high must be finite, got low={low}, high={high}")
    if not (low < high).all():
        raise ValueError(f"{name}: low must be less than high, got low={low}, high={high}")
