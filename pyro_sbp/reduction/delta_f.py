r"""Bayesian Model Reduction: the change in evidence when a unit's prior is reduced.

For a posterior :math:`q(\theta)` fitted under the prior :math:`p(\theta)`, the log evidence of
the model with the reduced prior :math:`\tilde p(\theta)` differs from the full model's by

.. math::

    \Delta F = \log \mathbb E_{q}\!\left[\frac{\tilde p(\theta)}{p(\theta)}\right],

with no refitting. A unit is removed when :math:`\Delta F \ge 0`: the reduced model ("this unit
is off") has at least the evidence of the full one. The ratio is invariant under the shared
change of variables :math:`x = \log\theta`, so everything is computed on :math:`x`.

Closed forms are registered by type triple, like torch's KL divergences
(:func:`register_delta_f`); any other triple gets a Monte Carlo estimate
(:func:`delta_f_monte_carlo`).

**References**

[1] Wright, Igel, Selvan, *BMRS: Bayesian Model Reduction for Structured Pruning*,
    NeurIPS 2024 (Eq. 6-9).
[2] Friston, Parr, Zeidman, *Bayesian model reduction*, arXiv:1805.07092 (2018).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, _standard

_DELTA_F_REGISTRY: dict[tuple[type, type, type], Callable] = {}
_LOG_2PI = math.log(2.0 * math.pi)


def register_delta_f(posterior: type, prior: type, reduced: type):
    """Decorator registering a closed form of :math:`\\Delta F` for a type triple."""

    def decorator(fn):
        _DELTA_F_REGISTRY[(posterior, prior, reduced)] = fn
        return fn

    return decorator


def _lookup(q, p, r) -> Callable | None:
    key = (type(q), type(p), type(r))
    if key in _DELTA_F_REGISTRY:
        return _DELTA_F_REGISTRY[key]
    for (tq, tp, tr), fn in _DELTA_F_REGISTRY.items():
        if isinstance(q, tq) and isinstance(p, tp) and isinstance(r, tr):
            return fn
    return None


def delta_f(posterior: Distribution, prior: Distribution, reduced_prior: Distribution) -> Tensor:
    r""":math:`\Delta F = \log \mathbb E_q[\tilde p(\theta) / p(\theta)]`, of the posterior's batch
    shape (the three distributions broadcast).

    Uses a registered closed form where there is one; raises ``NotImplementedError`` otherwise
    (use :func:`delta_f_monte_carlo` for other families).

    :param posterior: :math:`q(\theta)`.
    :param prior: the prior :math:`p(\theta)` the posterior was fitted under.
    :param reduced_prior: the reduced prior :math:`\tilde p(\theta)`.
    """
    fn = _lookup(posterior, prior, reduced_prior)
    if fn is None:
        raise NotImplementedError(
            f"no closed form of Delta F for ({type(posterior).__name__}, {type(prior).__name__}, "
            f"{type(reduced_prior).__name__}); use delta_f_monte_carlo"
        )
    return fn(posterior, prior, reduced_prior)


def delta_f_monte_carlo(
    posterior: Distribution,
    prior: Distribution,
    reduced_prior: Distribution,
    num_samples: int = 10_000,
) -> tuple[Tensor, Tensor]:
    r"""Monte Carlo :math:`\Delta F`: log-mean-exp of :math:`\log\tilde p - \log p` over posterior
    samples, and its standard error (delta method: the standard error of the mean ratio divided
    by the mean ratio).

    :return: ``(delta_f, standard_error)``, each of the posterior's batch shape.
    """
    theta = posterior.sample((num_samples,))
    log_w = _log_prob_or_minus_inf(reduced_prior, theta) - prior.log_prob(theta)
    lme = torch.logsumexp(log_w, 0) - math.log(num_samples)
    # Relative standard error of the mean of w = exp(log_w), computed stably around its max.
    w = torch.exp(log_w - lme)
    se = w.std(0) / math.sqrt(num_samples)
    return lme, se


def _log_prob_or_minus_inf(d: Distribution, value: Tensor) -> Tensor:
    # The reduced prior's support may be smaller than the posterior's: -inf outside it (without
    # tripping argument validation on the values outside).
    inside = d.support.check(value)
    safe = torch.where(inside, value, d.sample().expand_as(value))
    return torch.where(inside, d.log_prob(safe), -math.inf)


def _check_same_bounds(q, r, what: str) -> None:
    if not (
        torch.equal(q.low, r.low.expand_as(q.low)) and torch.equal(q.high, r.high.expand_as(q.high))
    ):
        raise ValueError(f"the {what} must have the posterior's bounds for the closed form")


@register_delta_f(TruncatedLogNormal, TruncatedLogUniform, TruncatedLogNormal)
def _delta_f_lognormal_loguniform_lognormal(q, p, r):
    r"""Reduced prior :math:`\tilde p = \mathrm{LogN}_{[a,b]}(\nu, \tau^2)` (BMRS_N:
    :math:`\nu = a`, :math:`\tau = 10^{-6}`), all three on :math:`[a, b]`:

    .. math::

        \Delta F = \log(b - a) - \log Z_q - \log Z_{\tilde p} + \log Z_{\tilde q}
            + \log \mathcal N(\mu;\, \nu,\, \sigma^2 + \tau^2),

    where :math:`\tilde q \propto \mathcal N(\mu, \sigma^2)\,\mathcal N(\nu, \tau^2)` on
    :math:`[a, b]` (product of Gaussians: mean :math:`\tilde m = (\mu\tau^2 + \nu\sigma^2)/S`,
    variance :math:`\sigma^2\tau^2/S`, :math:`S = \sigma^2 + \tau^2`). Each :math:`\log Z` is
    taken in scaled form :math:`\log\hat Z - d^2/2` and the quadratic terms are combined
    analytically: with :math:`c_\bullet` the point of :math:`[a, b]` nearest each mean,

    .. math::

        d_q^2 + d_{\tilde p}^2 - d_{\tilde q}^2 - \frac{(\mu - \nu)^2}{S}
          = \frac{(c_q - c_{\tilde q})(c_q + c_{\tilde q} - 2\mu)}{\sigma^2}
          + \frac{(c_{\tilde p} - c_{\tilde q})(c_{\tilde p} + c_{\tilde q} - 2\nu)}{\tau^2},

    (the identity :math:`(x-\mu)^2/\sigma^2 + (x-\nu)^2/\tau^2 = (x-\tilde m)^2/\tilde v
    + (\mu-\nu)^2/S` at :math:`x = c_{\tilde q}`), so no term of size :math:`(b-a)^2/\tau^2
    \approx 4\cdot 10^{14}` is ever subtracted from another (the published code expands them
    and loses about 0.05 nats; it also drops the :math:`\log(2\pi)/2`).
    """
    _check_same_bounds(q, r, "reduced prior")
    qb, rb = q.base_dist, r.base_dist
    a, b = qb.low, qb.high
    mu, sigma = qb.loc, qb.scale
    nu, tau = rb.loc, rb.scale
    s = sigma.square() + tau.square()
    # tau^2 / S and sigma^2 / S without forming 1 - tiny.
    w_mu = tau.square() / s
    w_nu = sigma.square() / s
    m_tilde = nu * w_nu + mu * w_mu
    sd_tilde = sigma * tau / s.sqrt()
    width = b - a
    c_q = qb._center
    c_p = rb._center
    c_t = torch.minimum(torch.maximum(m_tilde, a), b)
    _, lz_t = _standard.log_zhat(
        (a - m_tilde) / sd_tilde, (b - m_tilde) / sd_tilde, width / sd_tilde
    )
    quad = (c_q - c_t) * (c_q + c_t - 2.0 * mu) / sigma.square() + (c_p - c_t) * (
        c_p + c_t - 2.0 * nu
    ) / tau.square()
    out = (
        torch.log(width)
        - qb._log_zhat
        - rb._log_zhat
        + lz_t
        - 0.5 * (_LOG_2PI + s.log())
        + 0.5 * quad
    )
    prior_width = torch.log(p._width)
    # A prior wider than [a, b] only changes the constant log(b - a) into log(b' - a').
    return out + (prior_width - torch.log(width))


@register_delta_f(TruncatedLogNormal, TruncatedLogUniform, TruncatedLogUniform)
def _delta_f_lognormal_loguniform_loguniform(q, p, r):
    r"""Reduced prior :math:`\tilde p = \mathrm{LogU}_{[a', b']}` with :math:`[a', b'] \subseteq
    [a, b]` (BMRS_U-p: :math:`a' = \log 2^{-23}`, :math:`b' = \log 2^{-p}`):

    .. math::

        \Delta F = \log q(a' \le x \le b') - \log\frac{b' - a'}{b - a},

    the first term in scaled log form (finite however far :math:`\mu` lies from
    :math:`[a', b']`), :math:`-\infty` where the intervals do not meet.
    """
    qb = q.base_dist
    a_r, b_r = r._a, r._b
    if not ((a_r >= p._a) & (b_r <= p._b)).all():
        raise ValueError("the reduced prior's support must lie inside the prior's")
    lo = torch.maximum(a_r, qb.low)
    hi = torch.minimum(b_r, qb.high)
    meets = lo < hi
    # Keep _log_mass on a valid interval where the intervals do not meet (masked below).
    lo_s = torch.where(meets, lo, qb.low)
    hi_s = torch.where(meets, hi, qb.high)
    log_mass = torch.where(meets, qb._log_mass(lo_s, hi_s), -math.inf)
    return log_mass - (torch.log(r._width) - torch.log(p._width))


def posterior64(guide, site: str) -> tuple[TruncatedLogNormal, float, float]:
    """A gate site's posterior in float64 on the CPU (detached), with the gate's bounds."""
    gate = dict(guide._gates)[site]
    with torch.no_grad():
        loc, log_scale = guide.params(site)
        q = TruncatedLogNormal(
            loc.detach().cpu().double(),
            log_scale.detach().cpu().double().exp(),
            gate.low,
            gate.high,
            validate_args=False,
        )
    return q, gate.low, gate.high


def expected_theta(posterior: TruncatedLogNormal) -> Tensor:
    r""":math:`\mathbb E_q[\theta]`, the value a kept gate takes at test time."""
    return posterior.mean


def snr(posterior: TruncatedLogNormal) -> Tensor:
    r"""Signal-to-noise ratio :math:`\mathbb E[\theta]/\sqrt{\operatorname{Var}[\theta]}`
    (SBP keeps a unit iff it exceeds 1)."""
    return posterior.mean / posterior.stddev.clamp(min=torch.finfo(posterior.loc.dtype).tiny)
