"""High-precision mpmath references for the truncated (log-)normal and log-uniform distributions.

Every public function takes Python floats and returns an ``mpmath.mpf`` (or ``mpf('inf')``) that is
correct to at least ``TARGET_DIGITS`` significant digits, also where the normalizer

    Z = Φ(beta) - Φ(alpha),   alpha = (a - mu)/sigma,   beta = (b - mu)/sigma,

is astronomically small (e.g. mu = -40, sigma = 1e-6 on [-20, 0]: alpha = 2e7, Z ≈ exp(-2e14)).

How:

* ``mpf`` has an unbounded exponent, so exp(-2e14) is an ordinary number; nothing underflows.
* Φ-differences are evaluated on the side of the tail (``erfc`` of the upper tail for ``lo >= 0``,
  of the mirrored lower tail for ``hi <= 0``) so a tiny Z is not the difference of two numbers
  close to 1.
* The closed forms still cancel (log Z ≈ -alpha²/2 against alpha φ(alpha)/2Z ≈ alpha²/2 in the
  entropy; 1 + alpha φ(alpha)/Z - (φ(alpha)/Z)² ≈ 1/alpha² in the variance; E[θ²] - E[θ]² in
  Var[θ]). The working precision starts at ``30 + 2 log10(1 + alpha² + beta²)`` (+ the digits lost
  to an interval narrow in sigma units) decimal digits and each
  quantity is then *certified by convergence*: it is recomputed with 20 more digits until two
  successive evaluations agree to ``TARGET_DIGITS + 5`` digits (the cancellation errors shrink by
  10^-20 per step, so the last evaluation is then good to far more than ``TARGET_DIGITS``).

Independent checks (used by ``test_accuracy.py``): the ``quad_*`` functions below integrate the
densities with ``mp.quad`` (tanh-sinh on breakpoints graded around the mass), sharing no formula
with the closed forms except the density itself; and scipy.stats.truncnorm / loguniform in the
moderate range.

Conventions: ``TruncatedNormal`` quantities (``tn_*``) take bounds ``low, high`` of x;
``TruncatedLogNormal`` quantities (``tln_*``) take bounds ``low, high`` of θ = exp(x) (0 < low <
high) and use log(low), log(high) evaluated in mpmath; ``tlu_*`` take the θ bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import mpmath as mp

__all__ = [
    "TARGET_DIGITS",
    "kl_tln_tln",
    "kl_tln_tlu",
    "kl_tn_tn",
    "kl_tn_uniform",
    "quad_kl_tn_tn",
    "quad_kl_tn_uniform",
    "quad_tln_moments",
    "quad_tn_stats",
    "tln_entropy",
    "tln_log_prob",
    "tln_mean",
    "tln_variance",
    "tlu_entropy",
    "tlu_mean",
    "tlu_variance",
    "tn_entropy",
    "tn_log_prob",
    "tn_log_z",
    "tn_mean",
    "tn_variance",
]

TARGET_DIGITS = 25
_STEP_DPS = 20
_MAX_DPS = 5000


# --------------------------------------------------------------------------------------------
# precision management
# --------------------------------------------------------------------------------------------
def _base_dps(loc: float, scale: float, low: float, high: float, extra: int = 0) -> int:
    """Starting working precision (decimal digits) for a truncated normal in x-space."""
    alpha = (low - loc) / scale
    beta = (high - loc) / scale
    dps = 30 + 2 * math.log10(1.0 + alpha * alpha + beta * beta)
    width = (
        beta - alpha
    )  # digits lost in Φ(beta) - Φ(alpha) when the interval is narrow in sigma units
    if width < 1.0:
        dps += -math.log10(width)
    return int(dps) + 1 + extra


def _agree(u: mp.mpf, v: mp.mpf, digits: int) -> bool:
    if mp.isinf(u) or mp.isinf(v) or mp.isnan(u) or mp.isnan(v):
        return u == v
    if v == 0:
        return u == 0
    return abs(u - v) <= mp.mpf(10) ** (-digits) * abs(v)


def _converged(fn: Callable[[], tuple], dps: int) -> tuple:
    """Evaluate ``fn`` (returning a tuple of mpf) at increasing precision until it converges."""
    with mp.workdps(dps):
        prev = fn()
    while dps < _MAX_DPS:
        dps += _STEP_DPS
        with mp.workdps(dps):
            cur = fn()
        if all(_agree(u, v, TARGET_DIGITS + 5) for u, v in zip(prev, cur, strict=True)):
            return cur
        prev = cur
    raise RuntimeError(f"mpmath reference did not converge below {_MAX_DPS} digits")


# --------------------------------------------------------------------------------------------
# raw formulas (evaluated at the current mp precision)
# --------------------------------------------------------------------------------------------
def _ndtr_diff(lo: mp.mpf, hi: mp.mpf) -> mp.mpf:
    """Φ(hi) - Φ(lo), lo <= hi, evaluated on the side of the tail."""
    s = mp.sqrt(2)
    if lo >= 0:  # both in the upper tail: Q(lo) - Q(hi)
        return (mp.erfc(lo / s) - mp.erfc(hi / s)) / 2
    if hi <= 0:  # both in the lower tail: Q(-hi) - Q(-lo)
        return (mp.erfc(-hi / s) - mp.erfc(-lo / s)) / 2
    return (mp.erf(hi / s) - mp.erf(lo / s)) / 2


def _log_ndtr_diff(lo: mp.mpf, hi: mp.mpf) -> mp.mpf:
    """log(Φ(hi) - Φ(lo)); exact also when Z = 1 - (tiny), where log(Z) would round to 0."""
    if lo >= 0 or hi <= 0:
        return mp.log(_ndtr_diff(lo, hi))
    s = mp.sqrt(2)
    return mp.log1p(-(mp.erfc(-lo / s) + mp.erfc(hi / s)) / 2)


def _tn_raw(mu, sigma, a, b):
    """(log Z, mean, variance, entropy, alpha, beta, Z) of TN(mu, sigma; [a, b]) in x-space."""
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    z = _ndtr_diff(alpha, beta)
    pa = mp.npdf(alpha)
    pb = mp.npdf(beta)
    r1 = (pa - pb) / z
    r2 = (alpha * pa - beta * pb) / z
    log_z = _log_ndtr_diff(alpha, beta)
    mean = mu + sigma * r1
    var = sigma**2 * (1 + r2 - r1**2)
    entropy = mp.log(mp.sqrt(2 * mp.pi * mp.e) * sigma) + log_z + r2 / 2
    return log_z, mean, var, entropy


def _tln_raw(mu, sigma, low, high):
    """(E[θ], Var[θ], H[θ]) for log θ ~ TN(mu, sigma; [log low, log high])."""
    a = mp.log(low)
    b = mp.log(high)
    alpha = (a - mu) / sigma
    beta = (b - mu) / sigma
    z = _ndtr_diff(alpha, beta)
    e1 = mp.exp(mu + sigma**2 / 2) * _ndtr_diff(alpha - sigma, beta - sigma) / z
    e2 = mp.exp(2 * mu + 2 * sigma**2) * _ndtr_diff(alpha - 2 * sigma, beta - 2 * sigma) / z
    var = e2 - e1**2
    _, mean_x, _, h_x = _tn_raw(mu, sigma, a, b)
    return e1, var, h_x + mean_x


def _tlu_raw(low, high):
    la = mp.log(low)
    lb = mp.log(high)
    width = lb - la
    mean = (high - low) / width
    e2 = (high**2 - low**2) / (2 * width)
    var = e2 - mean**2
    entropy = (la + lb) / 2 + mp.log(width)
    return mean, var, entropy


def _f(*xs: float) -> tuple:
    return tuple(mp.mpf(float(x)) for x in xs)


# --------------------------------------------------------------------------------------------
# TruncatedNormal (x-space)
# --------------------------------------------------------------------------------------------
@cache
def _tn_stats(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> tuple:
    if not (scale > 0 and low < high):
        raise ValueError("need scale > 0 and low < high")
    dps = _base_dps(loc, scale, low, high, extra_dps)
    return _converged(lambda: _tn_raw(*_f(loc, scale, low, high)), dps)


def tn_log_z(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> mp.mpf:
    """log(Φ(beta) - Φ(alpha))."""
    return _tn_stats(loc, scale, low, high, extra_dps)[0]


def tn_mean(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> mp.mpf:
    return _tn_stats(loc, scale, low, high, extra_dps)[1]


def tn_variance(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> mp.mpf:
    return _tn_stats(loc, scale, low, high, extra_dps)[2]


def tn_entropy(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> mp.mpf:
    """Differential entropy log(√(2πe) sigma Z) + (alphaφ(alpha) - betaφ(beta)) / 2Z."""
    return _tn_stats(loc, scale, low, high, extra_dps)[3]


@cache
def tn_log_prob(x: float, loc: float, scale: float, low: float, high: float) -> mp.mpf:
    if not (low <= x <= high):
        return mp.mpf("-inf")
    log_z = tn_log_z(loc, scale, low, high)
    dps = _base_dps(loc, scale, low, high) + int(2 * math.log10(1 + ((x - loc) / scale) ** 2))

    def fn():
        xx, mu, sigma = _f(x, loc, scale)
        return (-mp.log(mp.sqrt(2 * mp.pi) * sigma) - log_z - (xx - mu) ** 2 / (2 * sigma**2),)

    return _converged(fn, dps)[0]


@cache
def kl_tn_uniform(
    loc: float, scale: float, low: float, high: float, u_low: float, u_high: float
) -> mp.mpf:
    """KL(TN(loc, scale; [low, high]) || Uniform(u_low, u_high)); +inf unless the support nests."""
    if not (u_low <= low and high <= u_high):
        return mp.inf
    h = tn_entropy(loc, scale, low, high)
    dps = _base_dps(loc, scale, low, high)
    return _converged(lambda: (mp.log(mp.mpf(u_high) - mp.mpf(u_low)) - h,), dps)[0]


@cache
def kl_tn_tn(
    p_loc: float,
    p_scale: float,
    p_low: float,
    p_high: float,
    q_loc: float,
    q_scale: float,
    q_low: float,
    q_high: float,
    extra_dps: int = 0,
) -> mp.mpf:
    """KL(TN_p || TN_q) = -H_p + log(√(2π) sigma_q Z_q) + (Var_p + (E_p - mu_q)²) / 2sigma_q²."""
    if not (q_low <= p_low and p_high <= q_high):
        return mp.inf
    dps = max(
        _base_dps(p_loc, p_scale, p_low, p_high, extra_dps),
        _base_dps(q_loc, q_scale, q_low, q_high, extra_dps),
    )
    # the quadratic term ~ ((E_p - mu_q)/sigma_q)² can cancel against log Z_q ~ -alpha_q²/2
    dps += int(
        2 * math.log10(1 + ((p_low - q_loc) / q_scale) ** 2 + ((p_high - q_loc) / q_scale) ** 2)
    )

    def fn():
        _, m_p, v_p, h_p = _tn_raw(*_f(p_loc, p_scale, p_low, p_high))
        mu_q, s_q, a_q, b_q = _f(q_loc, q_scale, q_low, q_high)
        log_z_q = _tn_raw(mu_q, s_q, a_q, b_q)[0]
        cross = (
            mp.log(mp.sqrt(2 * mp.pi) * s_q) + log_z_q + (v_p + (m_p - mu_q) ** 2) / (2 * s_q**2)
        )
        return (cross - h_p,)

    return _converged(fn, dps)[0]


# --------------------------------------------------------------------------------------------
# TruncatedLogNormal (θ-space; low, high bound θ)
# --------------------------------------------------------------------------------------------
def _log_bounds(low: float, high: float) -> tuple[float, float]:
    return math.log(low), math.log(high)


@cache
def _tln_stats(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> tuple:
    if not (scale > 0 and 0 < low < high):
        raise ValueError("need scale > 0 and 0 < low < high")
    a, b = _log_bounds(low, high)
    dps = _base_dps(loc, scale, a, b, extra_dps)
    # E[θ²] and E[θ]² agree to ~ -log10(Var/E²) digits; _converged raises precision until the
    # difference is certified, the start only has to be sensible.
    dps += int(2 * max(0.0, -math.log10(scale)))
    return _converged(lambda: _tln_raw(*_f(loc, scale, low, high)), dps)


def tln_mean(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> mp.mpf:
    """E[θ] = exp(mu + sigma²/2) (Φ(beta - sigma) - Φ(alpha - sigma)) / Z."""
    return _tln_stats(loc, scale, low, high, extra_dps)[0]


def tln_variance(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> mp.mpf:
    """Var[θ] = E[θ²] - E[θ]²,  E[θ²] = exp(2mu + 2sigma²) (Φ(beta-2sigma) - Φ(alpha-2sigma)) / Z.

    Evaluated as that difference in mpmath, at a precision raised until it has converged.
    """
    return _tln_stats(loc, scale, low, high, extra_dps)[1]


def tln_entropy(loc: float, scale: float, low: float, high: float, extra_dps: int = 0) -> mp.mpf:
    """Differential entropy of θ: H[x] + E[x]."""
    return _tln_stats(loc, scale, low, high, extra_dps)[2]


@cache
def tln_log_prob(theta: float, loc: float, scale: float, low: float, high: float) -> mp.mpf:
    if not (low <= theta <= high):
        return mp.mpf("-inf")
    a, b = _log_bounds(low, high)
    dps = _base_dps(loc, scale, a, b)
    dps += int(2 * math.log10(1 + ((math.log(theta) - loc) / scale) ** 2))

    def fn():
        th, mu, sigma, lo, hi = _f(theta, loc, scale, low, high)
        x = mp.log(th)
        log_z = _tn_raw(mu, sigma, mp.log(lo), mp.log(hi))[0]
        return (-mp.log(mp.sqrt(2 * mp.pi) * sigma) - log_z - (x - mu) ** 2 / (2 * sigma**2) - x,)

    return _converged(fn, dps)[0]


@cache
def kl_tln_tlu(
    loc: float,
    scale: float,
    low: float,
    high: float,
    u_low: float | None = None,
    u_high: float | None = None,
) -> mp.mpf:
    """KL(TLN(loc, scale; [low, high]) || TLU(u_low, u_high)) = log(log u_high - log u_low) - H[x].

    (KL is invariant under x = log θ, so this is KL(TN || Uniform) on the log bounds.) The
    log-uniform defaults to the same bounds.
    """
    u_low = low if u_low is None else u_low
    u_high = high if u_high is None else u_high
    if not (u_low <= low and high <= u_high):
        return mp.inf
    a, b = _log_bounds(low, high)
    dps = _base_dps(loc, scale, a, b)

    def fn():
        mu, sigma, lo, hi, ulo, uhi = _f(loc, scale, low, high, u_low, u_high)
        _, _, _, h_x = _tn_raw(mu, sigma, mp.log(lo), mp.log(hi))
        return (mp.log(mp.log(uhi) - mp.log(ulo)) - h_x,)

    return _converged(fn, dps)[0]


@cache
def kl_tln_tln(
    p_loc: float,
    p_scale: float,
    p_low: float,
    p_high: float,
    q_loc: float,
    q_scale: float,
    q_low: float,
    q_high: float,
) -> mp.mpf:
    """KL(TLN_p || TLN_q) = KL of the underlying truncated normals on the log bounds."""
    if not (q_low <= p_low and p_high <= q_high):
        return mp.inf
    pa, pb = _log_bounds(p_low, p_high)
    qa, qb = _log_bounds(q_low, q_high)
    dps = max(_base_dps(p_loc, p_scale, pa, pb), _base_dps(q_loc, q_scale, qa, qb))
    dps += int(2 * math.log10(1 + ((pa - q_loc) / q_scale) ** 2 + ((pb - q_loc) / q_scale) ** 2))

    def fn():
        mu_p, s_p, lo_p, hi_p, mu_q, s_q, lo_q, hi_q = _f(
            p_loc, p_scale, p_low, p_high, q_loc, q_scale, q_low, q_high
        )
        _, m_p, v_p, h_p = _tn_raw(mu_p, s_p, mp.log(lo_p), mp.log(hi_p))
        log_z_q = _tn_raw(mu_q, s_q, mp.log(lo_q), mp.log(hi_q))[0]
        cross = (
            mp.log(mp.sqrt(2 * mp.pi) * s_q) + log_z_q + (v_p + (m_p - mu_q) ** 2) / (2 * s_q**2)
        )
        return (cross - h_p,)

    return _converged(fn, dps)[0]


# --------------------------------------------------------------------------------------------
# TruncatedLogUniform
# --------------------------------------------------------------------------------------------
@cache
def _tlu_stats(low: float, high: float) -> tuple:
    if not 0 < low < high:
        raise ValueError("need 0 < low < high")
    dps = 40 + int(max(0.0, -math.log10(math.log(high) - math.log(low))))
    return _converged(lambda: _tlu_raw(*_f(low, high)), dps)


def tlu_mean(low: float, high: float) -> mp.mpf:
    """(high - low) / log(high / low)."""
    return _tlu_stats(low, high)[0]


def tlu_variance(low: float, high: float) -> mp.mpf:
    """(high² - low²) / (2 log(high / low)) - mean²."""
    return _tlu_stats(low, high)[1]


def tlu_entropy(low: float, high: float) -> mp.mpf:
    """(log low + log high) / 2 + log log(high / low)."""
    return _tlu_stats(low, high)[2]


# --------------------------------------------------------------------------------------------
# independent quadrature checks (slow; for validating the closed forms above)
# --------------------------------------------------------------------------------------------
def _breakpoints(alpha: mp.mpf, beta: mp.mpf, centre: mp.mpf) -> list:
    """Breakpoints on [alpha, beta] graded geometrically around where exp(-(z - centre)²/2) has
    its mass on the interval (the projection of ``centre``; width 1/distance when outside)."""
    p = min(max(centre, alpha), beta)
    d = abs(p - centre)
    w = 1 / d if d > 1 else mp.mpf(1)
    pts = {alpha, beta, p}
    k = 0
    while True:
        step = w * mp.mpf(4) ** k
        lo, hi = p - step, p + step
        added = False
        if lo > alpha:
            pts.add(lo)
            added = True
        if hi < beta:
            pts.add(hi)
            added = True
        if not added:
            break
        k += 1
    return sorted(pts)


def _quad(f, pts) -> mp.mpf:
    return mp.quad(f, pts)


@cache
def quad_tn_stats(loc: float, scale: float, low: float, high: float) -> tuple:
    """(log Z, mean, variance, entropy) of TN by mp.quad of the density (independent check)."""
    dps = _base_dps(loc, scale, low, high) + 10
    with mp.workdps(dps):
        mu, sigma, a, b = _f(loc, scale, low, high)
        alpha, beta = (a - mu) / sigma, (b - mu) / sigma
        pts = _breakpoints(alpha, beta, mp.mpf(0))
        # scale out exp(-c²/2) at the mass point so the integrand is O(1) where it matters
        c = min(max(mp.mpf(0), alpha), beta)

        def w(z):
            return mp.exp(-(z - c) * (z + c) / 2)

        zt = _quad(w, pts)  # Z = zt * exp(-c²/2) / √(2π)
        log_z = mp.log(zt) - c**2 / 2 - mp.log(mp.sqrt(2 * mp.pi))
        m_z = _quad(lambda z: z * w(z), pts) / zt
        v_z = _quad(lambda z: (z - m_z) ** 2 * w(z), pts) / zt
        log_norm = mp.log(mp.sqrt(2 * mp.pi) * sigma) + log_z
        # H = -E[log p(x)] = E[z²/2] + log(√(2π) sigma Z), evaluated as ∫ p (-log p)
        h = _quad(lambda z: w(z) * (z**2 / 2 + log_norm), pts) / zt
        return log_z, mu + sigma * m_z, sigma**2 * v_z, h


@cache
def quad_tln_moments(loc: float, scale: float, low: float, high: float) -> tuple:
    """(E[θ], Var[θ]) of the truncated log-normal by mp.quad (independent check)."""
    a, b = _log_bounds(low, high)
    dps = _base_dps(loc, scale, a, b) + 20
    with mp.workdps(dps):
        mu, sigma, lo, hi = _f(loc, scale, low, high)
        alpha, beta = (mp.log(lo) - mu) / sigma, (mp.log(hi) - mu) / sigma
        c0 = min(max(mp.mpf(0), alpha), beta)
        pts0 = _breakpoints(alpha, beta, mp.mpf(0))

        def w(z):
            return mp.exp(-(z - c0) * (z + c0) / 2)

        zt = _quad(w, pts0)
        # breakpoints for the exp(sigma z)- and exp(2sigma z)-tilted integrands
        pts = sorted(
            set(pts0)
            | set(_breakpoints(alpha, beta, sigma))
            | set(_breakpoints(alpha, beta, 2 * sigma))
        )
        e1 = _quad(lambda z: mp.exp(mu + sigma * z) * w(z), pts) / zt
        var = _quad(lambda z: (mp.exp(mu + sigma * z) - e1) ** 2 * w(z), pts) / zt
        return e1, var


def quad_kl_tn_tn(
    p_loc: float,
    p_scale: float,
    p_low: float,
    p_high: float,
    q_loc: float,
    q_scale: float,
    q_low: float,
    q_high: float,
) -> mp.mpf:
    """∫ p (log p - log q) dx by mp.quad, log Z_p and log Z_q from quad_tn_stats."""
    if not (q_low <= p_low and p_high <= q_high):
        return mp.inf
    log_zp = quad_tn_stats(p_loc, p_scale, p_low, p_high)[0]
    log_zq = quad_tn_stats(q_loc, q_scale, q_low, q_high)[0]
    dps = max(_base_dps(p_loc, p_scale, p_low, p_high), _base_dps(q_loc, q_scale, q_low, q_high))
    dps += 10 + int(
        2 * math.log10(1 + ((p_low - q_loc) / q_scale) ** 2 + ((p_high - q_loc) / q_scale) ** 2)
    )
    with mp.workdps(dps):
        mu, sigma, a, b, mu_q, s_q = _f(p_loc, p_scale, p_low, p_high, q_loc, q_scale)
        alpha, beta = (a - mu) / sigma, (b - mu) / sigma
        pts = _breakpoints(alpha, beta, mp.mpf(0))

        def log_p(z):
            return -(z**2) / 2 - mp.log(mp.sqrt(2 * mp.pi) * sigma) - log_zp

        def log_q(z):
            x = mu + sigma * z
            return -((x - mu_q) ** 2) / (2 * s_q**2) - mp.log(mp.sqrt(2 * mp.pi) * s_q) - log_zq

        # p(x) dx = exp(log_p(z)) sigma dz
        return _quad(lambda z: mp.exp(log_p(z)) * sigma * (log_p(z) - log_q(z)), pts)


def quad_kl_tn_uniform(
    loc: float, scale: float, low: float, high: float, u_low: float, u_high: float
) -> mp.mpf:
    """∫ p log(p (u_high - u_low)) dx by mp.quad (no cancellation for a near-uniform p)."""
    if not (u_low <= low and high <= u_high):
        return mp.inf
    log_zp = quad_tn_stats(loc, scale, low, high)[0]
    with mp.workdps(_base_dps(loc, scale, low, high) + 10):
        mu, sigma, a, b, ulo, uhi = _f(loc, scale, low, high, u_low, u_high)
        alpha, beta = (a - mu) / sigma, (b - mu) / sigma
        pts = _breakpoints(alpha, beta, mp.mpf(0))
        log_w = mp.log(uhi - ulo)

        def log_p(z):
            return -(z**2) / 2 - mp.log(mp.sqrt(2 * mp.pi) * sigma) - log_zp

        return _quad(lambda z: mp.exp(log_p(z)) * sigma * (log_p(z) + log_w), pts)
