"""Closed-form KL divergences of the truncated families (imported for its side effect).

Each result has the batch shape of the broadcast pair, as ``TraceMeanField_ELBO`` requires, is
``inf`` where the support of ``p`` is not contained in that of ``q``, and is clamped at zero
(rounding can leave an exact zero slightly negative). They are computed on the distributions'
compact parameters (a plate's ``expand`` is not materialised) and expanded at the end.
"""

import math

import torch
from torch.distributions import Uniform, register_kl

from pyro_sbp.distributions import _kl_grad, _standard
from pyro_sbp.distributions.truncated_log_normal import TruncatedLogNormal
from pyro_sbp.distributions.truncated_log_uniform import TruncatedLogUniform
from pyro_sbp.distributions.truncated_normal import TruncatedNormal

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _nested(p_low, p_high, q_low, q_high):
    return (q_low <= p_low) & (p_high <= q_high)


def _finish(kl, nested, shape):
    return torch.where(nested, kl.clamp(min=0.0), math.inf).expand(shape)


def _kl_to_uniform(p: TruncatedNormal, q_low, q_high, shape):
    # KL(N_[a,b](mu, sigma^2) || U[a', b']) = log(b' - a') - H (SBP, Eq. 9), with
    # H = log(sqrt(2 pi e) sigma Z) + (alpha phi(alpha) - beta phi(beta)) / (2 Z), split as
    # log((b' - a') / (b - a)) + KL(N_[a,b] || U[a, b]); the second term is computed on
    # standardised bounds, by quadrature where p is so flat that log(b - a) - H would cancel.
    loc, scale, low, high = p._cloc, p._cscale, p._clow, p._chigh
    if _kl_grad.native_applies(loc, scale, low, high, q_low, q_high):
        # All of it in one operator call (and its derivatives, when a gradient is needed).
        return _kl_grad.kl_to_interval(loc, scale, low, high, q_low, q_high).expand(shape)
    if torch.is_grad_enabled() and (loc.requires_grad or scale.requires_grad):
        # The same value, differentiated analytically (an SVI step's KL): no graph of its
        # every branch to record and replay.
        kl = _kl_grad.kl_to_uniform(loc, scale, low, high)
    else:
        kl = _standard.kl_to_uniform(p._alpha, p._beta, p._moments.entropy, p._width)
    kl = kl + (torch.log(q_high - q_low) - torch.log(high - low))
    return _finish(kl, _nested(low, high, q_low, q_high), shape)


def _shape(p, q):
    return torch.broadcast_shapes(p.batch_shape, q.batch_shape)


@register_kl(TruncatedNormal, Uniform)
def _kl_truncatednormal_uniform(p, q):
    low, high = _standard.compact(q.batch_shape, q.low, q.high)
    return _kl_to_uniform(p, low, high, _shape(p, q))


@register_kl(TruncatedLogNormal, TruncatedLogUniform)
def _kl_truncatedlognormal_truncatedloguniform(p, q):
    # KL is invariant under the shared bijection exp: KL(LogN_[a,b] || LogU_[a',b'])
    # = KL(N_[a,b] || U[a', b']).
    return _kl_to_uniform(p.base_dist, q._a, q._b, _shape(p, q))


@register_kl(TruncatedNormal, TruncatedNormal)
def _kl_truncatednormal_truncatednormal(p, q):
    # KL(p || q) = -H(p) - E_p[log q(x)], with
    # -E_p[log q] = log sigma_q + log sqrt(2 pi) + log Z_q + E_p[(x - mu_q)^2] / (2 sigma_q^2).
    # The quadratic is taken relative to c_q = clamp(mu_q, a_q, b_q), whose square is the one
    # hidden in log Z_q = log Zhat_q - (c_q - mu_q)^2 / (2 sigma_q^2), so the two cancel exactly:
    # (m - mu_q)^2 - (c_q - mu_q)^2 = (m - c_q)(m + c_q - 2 mu_q).
    # p's mean is c_p + sigma_p M_p; keeping the offset apart keeps it when it is below the
    # resolution of c_p (float32, loc far outside the bounds).
    offset = p._cscale * p._moments.mean_offset
    quad = p._variance_compact + ((p._center - q._center) + offset) * (
        (p._center - q._cloc) + (q._center - q._cloc) + offset
    )
    kl = (
        -(p._cscale.log() + p._moments.entropy)
        + q._cscale.log()
        + _LOG_SQRT_2PI
        + q._log_zhat
        + quad / (2.0 * q._cscale.square())
    )
    return _finish(kl, _nested(p._clow, p._chigh, q._clow, q._chigh), _shape(p, q))


@register_kl(TruncatedLogNormal, TruncatedLogNormal)
def _kl_truncatedlognormal_truncatedlognormal(p, q):
    return _kl_truncatednormal_truncatednormal(p.base_dist, q.base_dist)
