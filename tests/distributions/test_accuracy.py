"""float64 accuracy of the truncated (log-)normal / log-uniform distributions against mpmath.

The references live in ``mpmath_reference.py``; the ``test_reference_*`` tests below validate them
(against scipy.stats in the moderate range and against mp.quad of the densities in the far tails),
so ``pytest -k reference`` runs without the implementation.

Acceptance criteria (Z = Φ(beta) - Φ(alpha) of the underlying normal in x = log θ space):

* KL(TLN || TLU), E[θ] (and TN mean / entropy, TLN entropy, KL(TN || ·), log_prob):
  1e-8 relative where Z > 1e-300, 1e-5 relative where Z <= 1e-300.
* Var[θ] (and TN variance): 1e-6 relative for scale >= 1e-3 and Z > 1e-300, 1e-2 relative for
  scale < 1e-3; in the far tails (Z <= 1e-300) finite, >= 0 and within 1e-2 relative.
* TruncatedLogUniform mean / variance / entropy: 1e-12 relative.

A reference below float64's smallest normal number (e.g. a TN mean of -1e-868588963813) cannot be
represented; there |computed - reference| <= 2.2e-308 is accepted instead.
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from torch.distributions import kl_divergence

try:
    from . import mpmath_reference as ref
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    import mpmath_reference as ref

FAR_TAIL_LOG_Z = math.log(1e-300)
TINY = np.finfo(np.float64).tiny

RTOL_KL = 1e-8  # KL, E[θ], means, entropies, log_prob (Z > 1e-300)
RTOL_KL_FAR = 1e-5  # same quantities, Z <= 1e-300
RTOL_VAR = 1e-6  # variances, scale >= 1e-3 and Z > 1e-300
RTOL_VAR_LOOSE = 1e-2  # variances, scale < 1e-3 or Z <= 1e-300
RTOL_TLU = 1e-12

# x = log θ bounds; the θ bounds are exp() of these (SBP's default is [e^-20, 1]).
X_BOUNDS = {
    "[e^-20,1]": (-20.0, 0.0),
    "[e^-5,e^2]": (-5.0, 2.0),
    "[e^-1,e^-0.9]": (-1.0, -0.9),
}
LOCS = (-40.0, -30.0, -20.5, -20.0, -19.0, -10.0, -1.0, 0.0, 0.5, 5.0, 30.0)
SCALES = (1e-6, 1e-4, 1e-3, 0.1, 1.0, 10.0, 1e3)

GRID = [
    pytest.param(b, loc, scale, id=f"{b}-loc={loc:g}-scale={scale:g}")
    for b in X_BOUNDS
    for loc in LOCS
    for scale in SCALES
]


def _theta_bounds(bounds: str) -> tuple[float, float]:
    a, b = X_BOUNDS[bounds]
    return math.exp(a), math.exp(b)


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _dists():
    # imported lazily so the reference tests run while the implementation does not exist
    from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, TruncatedNormal

    return TruncatedNormal, TruncatedLogNormal, TruncatedLogUniform


def _tn(loc, scale, low, high):
    return _dists()[0](_t(loc), _t(scale), _t(low), _t(high))


def _tln(loc, scale, low, high):
    return _dists()[1](_t(loc), _t(scale), _t(low), _t(high))


def _tlu(low, high):
    return _dists()[2](_t(low), _t(high))


def _item(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _rel_err(computed: float, reference) -> mp.mpf:
    with mp.workdps(30):
        c = mp.mpf(computed)
        if reference == 0:
            return abs(c)
        return abs(c - reference) / abs(reference)


def assert_close(what: str, computed, reference, rtol: float) -> None:
    """|computed - reference| <= rtol |reference| (reference an mpf; exact difference)."""
    c = _item(computed)
    if mp.isinf(reference):
        assert c == float(reference), f"{what}: computed={c!r}, reference={reference}"
        return
    r_str = mp.nstr(reference, 20)
    assert math.isfinite(c), f"{what}: computed={c!r} is not finite, reference={r_str}"
    with mp.workdps(30):
        diff = abs(mp.mpf(c) - reference)
        rel = _rel_err(c, reference)
        ok = diff <= rtol * abs(reference) or diff <= TINY
    assert ok, (
        f"{what}: computed={c!r}, reference={r_str}, rel err={mp.nstr(rel, 3)} > rtol={rtol:g}"
    )


def _is_far(log_z) -> bool:
    return log_z <= FAR_TAIL_LOG_Z


def _rtol_kl(*log_zs) -> float:
    return RTOL_KL_FAR if any(_is_far(lz) for lz in log_zs) else RTOL_KL


def _rtol_var(log_z, scale: float) -> float:
    if _is_far(log_z) or scale < 1e-3:
        return RTOL_VAR_LOOSE
    return RTOL_VAR


def _x_log_z(bounds: str, loc: float, scale: float):
    a, b = X_BOUNDS[bounds]
    return ref.tn_log_z(loc, scale, a, b)


def _tln_log_z(loc: float, scale: float, low: float, high: float):
    return ref.tn_log_z(loc, scale, math.log(low), math.log(high))


# ============================================================================================
# validation of the references themselves
# ============================================================================================
# (loc, scale, low, high) in x-space where scipy is accurate (|alpha|, |beta| moderate, Z not tiny)
MODERATE = [
    (0.0, 1.0, -5.0, 2.0),
    (-1.0, 0.5, -1.0, -0.9),
    (0.5, 10.0, -5.0, 2.0),
    (-19.0, 1.0, -20.0, 0.0),
    (-10.0, 3.0, -20.0, 0.0),
    (5.0, 2.0, -5.0, 2.0),
    (-20.0, 1.0, -20.0, 0.0),
    (1.0, 0.3, -5.0, 2.0),
    (-3.0, 0.7, -5.0, 2.0),
    (30.0, 10.0, -20.0, 0.0),
]
MODERATE_IDS = [f"loc={p[0]:g}-scale={p[1]:g}-[{p[2]:g},{p[3]:g}]" for p in MODERATE]

# far tails / extreme scales (Z down to exp(-2e14)), checked against mp.quad
QUAD_POINTS = [
    (-40.0, 1e-6, -20.0, 0.0),
    (-20.5, 1e-4, -20.0, 0.0),
    (30.0, 1e-3, -5.0, 2.0),
    (5.0, 0.1, -1.0, -0.9),
    (0.5, 1e-6, -1.0, -0.9),
    (0.5, 1e3, -1.0, -0.9),
    (-19.0, 1e-3, -20.0, 0.0),
]
QUAD_IDS = [f"loc={p[0]:g}-scale={p[1]:g}-[{p[2]:g},{p[3]:g}]" for p in QUAD_POINTS]
RTOL_REF_SCIPY = 1e-9
RTOL_REF_QUAD = 1e-20


def _ref_close(what: str, value, expected, rtol: float, atol: float = 0.0) -> None:
    with mp.workdps(40):
        diff = abs(mp.mpf(value) - mp.mpf(expected))
        ok = diff <= rtol * abs(mp.mpf(expected)) + atol
    assert ok, f"{what}: reference={mp.nstr(value, 20)}, check={mp.nstr(expected, 20)}"


@pytest.mark.parametrize(("loc", "scale", "low", "high"), MODERATE, ids=MODERATE_IDS)
def test_reference_tn_vs_scipy(loc, scale, low, high):
    alpha, beta = (low - loc) / scale, (high - loc) / scale
    d = scipy.stats.truncnorm(alpha, beta, loc=loc, scale=scale)
    z = scipy.special.ndtr(beta) - scipy.special.ndtr(alpha)
    _ref_close("log Z", ref.tn_log_z(loc, scale, low, high), math.log(z), RTOL_REF_SCIPY)
    _ref_close("mean", ref.tn_mean(loc, scale, low, high), d.mean(), RTOL_REF_SCIPY)
    _ref_close("variance", ref.tn_variance(loc, scale, low, high), d.var(), RTOL_REF_SCIPY)
    _ref_close("entropy", ref.tn_entropy(loc, scale, low, high), d.entropy(), RTOL_REF_SCIPY)
    for f in (0.1, 0.5, 0.9):
        x = low + f * (high - low)
        _ref_close(
            f"log_prob({x})", ref.tn_log_prob(x, loc, scale, low, high), d.logpdf(x), RTOL_REF_SCIPY
        )
    # KL(TN || Uniform) = log(width) - H; KL(TLN || TLU) is the same on the log bounds
    kl = math.log(high - low) - d.entropy()
    _ref_close("KL(TN||U)", ref.kl_tn_uniform(loc, scale, low, high, low, high), kl, 1e-8)
    _ref_close(
        "KL(TLN||TLU)",
        ref.kl_tln_tlu(loc, scale, math.exp(low), math.exp(high)),
        kl,
        1e-8,
        atol=1e-14,  # exp/log round trip of the bounds
    )


@pytest.mark.parametrize(("loc", "scale", "low", "high"), MODERATE, ids=MODERATE_IDS)
def test_reference_tln_vs_scipy_quad(loc, scale, low, high):
    alpha, beta = (low - loc) / scale, (high - loc) / scale
    d = scipy.stats.truncnorm(alpha, beta, loc=loc, scale=scale)
    opts = {"epsabs": 0.0, "epsrel": 1e-13, "limit": 200}
    e1 = scipy.integrate.quad(lambda x: math.exp(x) * d.pdf(x), low, high, **opts)[0]
    var = scipy.integrate.quad(lambda x: (math.exp(x) - e1) ** 2 * d.pdf(x), low, high, **opts)[0]
    h = scipy.integrate.quad(lambda x: -d.pdf(x) * (d.logpdf(x) - x), low, high, **opts)[0]
    th_lo, th_hi = math.exp(low), math.exp(high)
    _ref_close("E[theta]", ref.tln_mean(loc, scale, th_lo, th_hi), e1, RTOL_REF_SCIPY)
    _ref_close("Var[theta]", ref.tln_variance(loc, scale, th_lo, th_hi), var, RTOL_REF_SCIPY)
    _ref_close("H[theta]", ref.tln_entropy(loc, scale, th_lo, th_hi), h, RTOL_REF_SCIPY)
    theta = math.exp(0.5 * (low + high))
    _ref_close(
        "TLN log_prob",
        ref.tln_log_prob(theta, loc, scale, th_lo, th_hi),
        d.logpdf(math.log(theta)) - math.log(theta),
        RTOL_REF_SCIPY,
    )


@pytest.mark.parametrize(
    ("low", "high"), [(math.exp(a), math.exp(b)) for a, b in X_BOUNDS.values()] + [(1e-3, 1e3)]
)
def test_reference_tlu_vs_scipy(low, high):
    d = scipy.stats.loguniform(low, high)
    _ref_close("mean", ref.tlu_mean(low, high), d.mean(), 1e-12)
    _ref_close("variance", ref.tlu_variance(low, high), d.var(), 1e-9)
    _ref_close("entropy", ref.tlu_entropy(low, high), d.entropy(), 1e-12)


@pytest.mark.parametrize(("loc", "scale", "low", "high"), QUAD_POINTS, ids=QUAD_IDS)
def test_reference_tn_vs_mp_quad(loc, scale, low, high):
    q_log_z, q_mean, q_var, q_h = ref.quad_tn_stats(loc, scale, low, high)
    log_z = ref.tn_log_z(loc, scale, low, high)
    # log Z can be -1e-217151 (Z = 1 - tiny): compare it absolutely at O(1)
    _ref_close("log Z", log_z, q_log_z, RTOL_REF_QUAD, atol=RTOL_REF_QUAD)
    _ref_close("mean", ref.tn_mean(loc, scale, low, high), q_mean, RTOL_REF_QUAD)
    _ref_close("variance", ref.tn_variance(loc, scale, low, high), q_var, RTOL_REF_QUAD)
    _ref_close("entropy", ref.tn_entropy(loc, scale, low, high), q_h, RTOL_REF_QUAD)
    _ref_close(
        "KL(TN||U)",
        ref.kl_tn_uniform(loc, scale, low, high, low, high),
        ref.quad_kl_tn_uniform(loc, scale, low, high, low, high),
        RTOL_REF_QUAD,
    )


@pytest.mark.parametrize(("loc", "scale", "low", "high"), QUAD_POINTS, ids=QUAD_IDS)
def test_reference_tln_vs_mp_quad(loc, scale, low, high):
    th_lo, th_hi = math.exp(low), math.exp(high)
    q_e1, q_var = ref.quad_tln_moments(loc, scale, th_lo, th_hi)
    _ref_close("E[theta]", ref.tln_mean(loc, scale, th_lo, th_hi), q_e1, RTOL_REF_QUAD)
    _ref_close("Var[theta]", ref.tln_variance(loc, scale, th_lo, th_hi), q_var, RTOL_REF_QUAD)


@pytest.mark.parametrize(("loc", "scale", "low", "high"), QUAD_POINTS, ids=QUAD_IDS)
def test_reference_converged(loc, scale, low, high):
    """40 more working digits do not change the references beyond 1e-25."""
    th_lo, th_hi = math.exp(low), math.exp(high)
    for fn, args in [
        (ref.tn_log_z, (loc, scale, low, high)),
        (ref.tn_mean, (loc, scale, low, high)),
        (ref.tn_variance, (loc, scale, low, high)),
        (ref.tn_entropy, (loc, scale, low, high)),
        (ref.tln_mean, (loc, scale, th_lo, th_hi)),
        (ref.tln_variance, (loc, scale, th_lo, th_hi)),
        (ref.tln_entropy, (loc, scale, th_lo, th_hi)),
    ]:
        _ref_close(fn.__name__, fn(*args), fn(*args, extra_dps=40), 1e-25, atol=1e-300)


# KL(TN_p || TN_q) pairs (x-space): (p loc, scale, low, high), (q loc, scale, low, high)
KL_PAIRS = {
    "same-bounds": ((0.0, 1.0, -5.0, 2.0), (0.5, 2.0, -5.0, 2.0)),
    "narrow-in-wide": ((-1.0, 0.5, -1.0, -0.9), (0.0, 1.0, -5.0, 2.0)),
    "far-tail-p": ((-40.0, 1e-6, -20.0, 0.0), (-10.0, 1.0, -20.0, 0.0)),
    "far-tail-q": ((-10.0, 1.0, -20.0, 0.0), (-40.0, 1e-6, -20.0, 0.0)),
    "tail-p-boundary": ((-20.5, 1e-4, -20.0, 0.0), (-19.0, 0.1, -20.0, 0.0)),
    "wide-scales": ((0.5, 10.0, -5.0, 2.0), (5.0, 1e3, -20.0, 2.0)),
    "far-tail-p-narrow": ((30.0, 1e-3, -1.0, -0.9), (0.0, 1.0, -5.0, 2.0)),
}
KL_INF_PAIRS = {
    "p-wider-below": ((0.0, 1.0, -20.0, 0.0), (0.0, 1.0, -5.0, 2.0)),
    "p-wider-above": ((0.0, 1.0, -5.0, 2.0), (0.0, 1.0, -20.0, 0.0)),
}
KL_QUAD_PAIRS = ["same-bounds", "narrow-in-wide", "far-tail-p", "far-tail-q"]


@pytest.mark.parametrize("pair", KL_QUAD_PAIRS)
def test_reference_kl_tn_tn_vs_mp_quad(pair):
    p, q = KL_PAIRS[pair]
    _ref_close("KL(TN||TN)", ref.kl_tn_tn(*p, *q), ref.quad_kl_tn_tn(*p, *q), RTOL_REF_QUAD)


@pytest.mark.parametrize("pair", ["same-bounds", "narrow-in-wide", "wide-scales"])
def test_reference_kl_tn_tn_vs_scipy(pair):
    p, q = KL_PAIRS[pair]
    dp = scipy.stats.truncnorm((p[2] - p[0]) / p[1], (p[3] - p[0]) / p[1], loc=p[0], scale=p[1])
    dq = scipy.stats.truncnorm((q[2] - q[0]) / q[1], (q[3] - q[0]) / q[1], loc=q[0], scale=q[1])
    kl = scipy.integrate.quad(
        lambda x: dp.pdf(x) * (dp.logpdf(x) - dq.logpdf(x)), p[2], p[3], epsabs=0, epsrel=1e-13
    )[0]
    _ref_close("KL(TN||TN)", ref.kl_tn_tn(*p, *q), kl, RTOL_REF_SCIPY)
    # the log-normal KL is the same KL on the log bounds
    th = [math.exp(v) for v in (p[2], p[3], q[2], q[3])]
    kl_ln = ref.kl_tln_tln(p[0], p[1], th[0], th[1], q[0], q[1], th[2], th[3])
    _ref_close("KL(TLN||TLN)", kl_ln, kl, RTOL_REF_SCIPY)


def test_reference_kl_inf():
    for p, q in KL_INF_PAIRS.values():
        assert ref.kl_tn_tn(*p, *q) == mp.inf
    assert ref.kl_tn_uniform(0.0, 1.0, -5.0, 2.0, -4.0, 2.0) == mp.inf
    assert ref.kl_tln_tlu(0.0, 1.0, math.exp(-20), 1.0, math.exp(-5), 1.0) == mp.inf


# ============================================================================================
# the implementation against the references (float64)
# ============================================================================================
@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tln_kl_to_tlu(bounds, loc, scale):
    low, high = _theta_bounds(bounds)
    kl = kl_divergence(_tln(loc, scale, low, high), _tlu(low, high))
    r = ref.kl_tln_tlu(loc, scale, low, high)
    assert_close("KL(TLN||TLU)", kl, r, _rtol_kl(_tln_log_z(loc, scale, low, high)))


@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tln_mean(bounds, loc, scale):
    low, high = _theta_bounds(bounds)
    r = ref.tln_mean(loc, scale, low, high)
    m = _tln(loc, scale, low, high).mean
    assert_close("E[theta]", m, r, _rtol_kl(_tln_log_z(loc, scale, low, high)))


@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tln_variance(bounds, loc, scale):
    low, high = _theta_bounds(bounds)
    r = ref.tln_variance(loc, scale, low, high)
    v = _item(_tln(loc, scale, low, high).variance)
    log_z = _tln_log_z(loc, scale, low, high)
    assert math.isfinite(v) and v >= 0, f"Var[theta]={v!r} (reference {mp.nstr(r, 20)})"
    assert_close("Var[theta]", v, r, _rtol_var(log_z, scale))


@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tln_entropy(bounds, loc, scale):
    low, high = _theta_bounds(bounds)
    r = ref.tln_entropy(loc, scale, low, high)
    h = _tln(loc, scale, low, high).entropy()
    assert_close("H[theta]", h, r, _rtol_kl(_tln_log_z(loc, scale, low, high)))


@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tn_mean(bounds, loc, scale):
    a, b = X_BOUNDS[bounds]
    r = ref.tn_mean(loc, scale, a, b)
    assert_close("TN mean", _tn(loc, scale, a, b).mean, r, _rtol_kl(_x_log_z(bounds, loc, scale)))


@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tn_variance(bounds, loc, scale):
    a, b = X_BOUNDS[bounds]
    r = ref.tn_variance(loc, scale, a, b)
    v = _item(_tn(loc, scale, a, b).variance)
    assert math.isfinite(v) and v >= 0, f"TN variance={v!r} (reference {mp.nstr(r, 20)})"
    assert_close("TN variance", v, r, _rtol_var(_x_log_z(bounds, loc, scale), scale))


@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tn_entropy(bounds, loc, scale):
    a, b = X_BOUNDS[bounds]
    r = ref.tn_entropy(loc, scale, a, b)
    h = _tn(loc, scale, a, b).entropy()
    assert_close("TN entropy", h, r, _rtol_kl(_x_log_z(bounds, loc, scale)))


@pytest.mark.parametrize(("bounds", "loc", "scale"), GRID)
def test_tn_kl_to_uniform(bounds, loc, scale):
    a, b = X_BOUNDS[bounds]
    kl = kl_divergence(_tn(loc, scale, a, b), torch.distributions.Uniform(_t(a), _t(b)))
    r = ref.kl_tn_uniform(loc, scale, a, b, a, b)
    assert_close("KL(TN||Uniform)", kl, r, _rtol_kl(_x_log_z(bounds, loc, scale)))


UNIFORM_POINTS = [
    pytest.param("[e^-20,1]", -40.0, 1e-6, (-25.0, 5.0), id="far-tail-wider-uniform"),
    pytest.param("[e^-5,e^2]", 0.0, 1.0, (-5.0, 3.0), id="moderate-wider-uniform"),
    pytest.param("[e^-1,e^-0.9]", 5.0, 0.1, (-1.0, -0.9), id="narrow-same-bounds"),
]


@pytest.mark.parametrize(("bounds", "loc", "scale", "u"), UNIFORM_POINTS)
def test_tn_kl_to_pyro_uniform(bounds, loc, scale, u):
    import pyro.distributions as pdist

    a, b = X_BOUNDS[bounds]
    kl = kl_divergence(_tn(loc, scale, a, b), pdist.Uniform(_t(u[0]), _t(u[1])))
    r = ref.kl_tn_uniform(loc, scale, a, b, *u)
    assert_close("KL(TN||pyro Uniform)", kl, r, _rtol_kl(_x_log_z(bounds, loc, scale)))


def test_kl_to_uniform_not_nested_is_inf():
    kl = kl_divergence(_tn(0.0, 1.0, -5.0, 2.0), torch.distributions.Uniform(_t(-4.0), _t(2.0)))
    assert _item(kl) == math.inf, f"KL(TN[-5,2] || U(-4,2)) = {_item(kl)!r}, expected inf"
    low, high = math.exp(-20.0), 1.0
    kl = kl_divergence(_tln(0.0, 1.0, low, high), _tlu(math.exp(-5.0), high))
    assert _item(kl) == math.inf, f"KL(TLN[e^-20,1] || TLU[e^-5,1]) = {_item(kl)!r}, expected inf"


@pytest.mark.parametrize("pair", list(KL_PAIRS))
def test_kl_tn_tn(pair):
    p, q = KL_PAIRS[pair]
    kl = kl_divergence(_tn(*p), _tn(*q))
    r = ref.kl_tn_tn(*p, *q)
    assert_close("KL(TN||TN)", kl, r, _rtol_kl(ref.tn_log_z(*p), ref.tn_log_z(*q)))


def _ln_params(params):
    loc, scale, low, high = params
    return loc, scale, math.exp(low), math.exp(high)


@pytest.mark.parametrize("pair", list(KL_PAIRS))
def test_kl_tln_tln(pair):
    p, q = (_ln_params(v) for v in KL_PAIRS[pair])
    kl = kl_divergence(_tln(*p), _tln(*q))
    r = ref.kl_tln_tln(*p, *q)
    assert_close("KL(TLN||TLN)", kl, r, _rtol_kl(_tln_log_z(*p), _tln_log_z(*q)))


@pytest.mark.parametrize("pair", list(KL_INF_PAIRS))
def test_kl_not_nested_is_inf(pair):
    p, q = KL_INF_PAIRS[pair]
    kl = _item(kl_divergence(_tn(*p), _tn(*q)))
    assert kl == math.inf, f"KL(TN||TN) {p} || {q} = {kl!r}, expected inf"
    p, q = _ln_params(p), _ln_params(q)
    kl = _item(kl_divergence(_tln(*p), _tln(*q)))
    assert kl == math.inf, f"KL(TLN||TLN) {p} || {q} = {kl!r}, expected inf"


LOG_PROB_PARAMS = [
    ("[e^-20,1]", -40.0, 1e-6),
    ("[e^-20,1]", -20.5, 1e-4),
    ("[e^-20,1]", 0.0, 1.0),
    ("[e^-5,e^2]", 0.5, 10.0),
    ("[e^-5,e^2]", 30.0, 1e-3),
    ("[e^-1,e^-0.9]", 5.0, 0.1),
    ("[e^-1,e^-0.9]", -1.0, 1e3),
]
LOG_PROB_POINTS = [
    pytest.param(b, loc, scale, f, id=f"{b}-loc={loc:g}-scale={scale:g}-at={f:g}")
    for b, loc, scale in LOG_PROB_PARAMS
    for f in (0.1, 0.5, 0.9)
]


@pytest.mark.parametrize(("bounds", "loc", "scale", "frac"), LOG_PROB_POINTS)
def test_tn_log_prob(bounds, loc, scale, frac):
    a, b = X_BOUNDS[bounds]
    x = a + frac * (b - a)
    lp = _tn(loc, scale, a, b).log_prob(_t(x))
    r = ref.tn_log_prob(x, loc, scale, a, b)
    assert_close(f"TN log_prob({x!r})", lp, r, _rtol_kl(_x_log_z(bounds, loc, scale)))


@pytest.mark.parametrize(("bounds", "loc", "scale", "frac"), LOG_PROB_POINTS)
def test_tln_log_prob(bounds, loc, scale, frac):
    a, b = X_BOUNDS[bounds]
    low, high = _theta_bounds(bounds)
    theta = math.exp(a + frac * (b - a))
    lp = _tln(loc, scale, low, high).log_prob(_t(theta))
    r = ref.tln_log_prob(theta, loc, scale, low, high)
    rtol = _rtol_kl(_tln_log_z(loc, scale, low, high))
    assert_close(f"TLN log_prob({theta!r})", lp, r, rtol)


TLU_BOUNDS = [pytest.param(*_theta_bounds(b), id=b) for b in X_BOUNDS] + [
    pytest.param(1e-3, 1e3, id="[1e-3,1e3]")
]


@pytest.mark.parametrize(("low", "high"), TLU_BOUNDS)
def test_tlu_moments(low, high):
    d = _tlu(low, high)
    assert_close("TLU mean", d.mean, ref.tlu_mean(low, high), RTOL_TLU)
    assert_close("TLU variance", d.variance, ref.tlu_variance(low, high), RTOL_TLU)
    assert_close("TLU entropy", d.entropy(), ref.tlu_entropy(low, high), RTOL_TLU)
