"""The textbook formulas of the truncated log-normal gate, shared by the benchmarks' cost floors
(``distributions.py``'s ``textbook``, ``svi_overhead.py``'s textbook gates).

Not an implementation: where a truncated mass is below float precision they return garbage (the
mass is clamped to the smallest normal number so that the logs stay finite and fast). Erf
arguments are clamped to [-4, 4] (erf is +-1 beyond in float32) and exp arguments kept above
-80, so that no special function takes a slow path. ``log(theta)`` is truncated to
``[log_low, log_high]``.
"""

import math

import torch

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


def mass(lo, hi):
    """``(Phi(hi) - Phi(lo), erf(lo / sqrt 2))``."""
    e_lo = torch.erf((lo * _SQRT1_2).clamp(-4.0, 4.0))
    e_hi = torch.erf((hi * _SQRT1_2).clamp(-4.0, 4.0))
    return ((e_hi - e_lo) * 0.5).clamp(min=torch.finfo(lo.dtype).tiny), e_lo


def terms(loc, scale, log_low: float, log_high: float):
    """``(alpha, beta, erf(alpha / sqrt 2), Z, alpha phi(alpha) - beta phi(beta))``."""
    alpha, beta = (log_low - loc) / scale, (log_high - loc) / scale
    z, e_alpha = mass(alpha, beta)
    pdf_alpha = torch.exp(alpha.square().clamp(max=160.0) * -0.5)
    pdf_beta = torch.exp(beta.square().clamp(max=160.0) * -0.5)
    return alpha, beta, e_alpha, z, (alpha * pdf_alpha - beta * pdf_beta) * _INV_SQRT_2PI


def kl(scale, z, t, log_low: float, log_high: float):
    """KL to the log-uniform prior: ``log(log_high - log_low)`` minus the entropy of
    ``log(theta)``."""
    entropy = _HALF_LOG_2PI_E + scale.log() + z.log() + t / (2.0 * z)
    return math.log(log_high - log_low) - entropy


def sample(loc, scale, e_alpha, z, u, log_low: float, log_high: float):
    """``theta`` at uniforms ``u``: the inverse CDF through ``erfinv``."""
    p = (e_alpha + 1.0) * 0.5 + u * z
    eps = torch.finfo(loc.dtype).eps
    q = torch.erfinv((2.0 * p - 1.0).clamp(eps - 1.0, 1.0 - eps)) * math.sqrt(2.0)
    return (loc + scale * q).clamp(log_low, log_high).exp()
