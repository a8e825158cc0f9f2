r"""Numerics of the standard normal truncated to ``[alpha, beta]``.

Everything the truncated families need is computed here on standardised bounds
``alpha = (low - loc) / scale`` and ``beta = (high - loc) / scale``, so that it stays finite and
accurate over the whole parameter range, including bounds far out in one tail where the truncated
mass :math:`Z = \Phi(\beta) - \Phi(\alpha)` underflows every floating point format.

Two cases cover every interval once the interval lying entirely below zero is mirrored onto the
positive half-line (every quantity used here is either symmetric under the mirror or changes sign
in a known way):

* *straddle* (:math:`\alpha \le 0 \le \beta`): :math:`Z = (\operatorname{erf}(\beta/\sqrt2) -
  \operatorname{erf}(\alpha/\sqrt2))/2` is a sum of two non-negative terms and is bounded away
  from zero unless the interval is narrow; the textbook formulas are accurate.
* *tail* (:math:`0 < \alpha < \beta`): with :math:`E_x = \operatorname{erfcx}(x/\sqrt2)` and
  :math:`q = e^{-(\beta^2-\alpha^2)/2}`,

  .. math::

      Z = \tfrac12 e^{-\alpha^2/2} D, \qquad D = E_\alpha - q E_\beta
        = (E_\alpha - E_\beta) + E_\beta(1 - q),

  so :math:`\log Z = \log(D/2) - \alpha^2/2` with no underflow. The quadratic terms that cancel in
  the entropy, mean and variance are cancelled analytically, leaving expressions in the Mills
  ratio gap :math:`d(x) = \phi(x)/\Phi(-x) - x` (and :math:`u(x) = 1 - x\,d(x)`), which are small
  positive numbers computed from their asymptotic series where the direct formula would cancel.

Throughout, :math:`s` is the point of :math:`[\alpha, \beta]` closest to zero and
:math:`\hat Z = Z e^{s^2/2}` the *scaled* mass, so that :math:`\log Z = \log \hat Z - s^2/2`.

Branches are evaluated only on the elements that take them (:func:`_piecewise`), which keeps the
work proportional to the input and keeps the values (and gradients) of a branch from ever being
computed outside its domain.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

_SQRT1_2 = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# d(x) = phi(x)/Phi(-x) - x ~ sum_k c_k x^-(2k+1) as x -> oo. The coefficients follow from the
# Riccati equation d' = x d + d^2 - 1 (itself from r' = r (r - x) for the inverse Mills ratio r).
_GAP_COEFFS = (
    1.0,
    -2.0,
    10.0,
    -74.0,
    706.0,
    -8162.0,
    110410.0,
    -1708394.0,
    29752066.0,
    -576037442.0,
    12277827850.0,
)


def _series_threshold(dtype: torch.dtype) -> float:
    # Above this point the asymptotic series of d is accurate to machine precision, while below
    # it the direct formula phi/Phi(-x) - x loses only about log10(x^2) digits.
    return 20.0 if dtype == torch.float64 else 8.0


def _newton_steps(dtype: torch.dtype) -> int:
    return 3 if dtype == torch.float64 else 2


def _ndtr_tail_threshold(dtype: torch.dtype) -> float:
    # Below this alpha, Phi(-alpha) and the tail samples it gives are well inside the normal range.
    return 10.0


def _gap_series(y2: Tensor, start: int) -> Tensor:
    acc = torch.zeros_like(y2)
    for c in reversed(_GAP_COEFFS[start:]):
        acc = acc * y2 + c
    return acc


def mills_gap(x: Tensor) -> Tensor:
    r"""The gap :math:`d(x) = \phi(x)/\Phi(-x) - x > 0` for :math:`x \ge 0`."""
    threshold = _series_threshold(x.dtype)
    direct = _SQRT_2_OVER_PI / torch.special.erfcx(x * _SQRT1_2) - x
    y = x.clamp(min=threshold).reciprocal()
    series = y * _gap_series(y * y, 0)
    return torch.where(x < threshold, direct, series)


def mills_gap_complement(x: Tensor, d: Tensor) -> Tensor:
    r""":math:`u(x) = 1 - x\,d(x) \in (0, 1]` for :math:`x \ge 0`, given :math:`d = d(x)`."""
    threshold = _series_threshold(x.dtype)
    direct = 1.0 - x * d
    y = x.clamp(min=threshold).reciprocal()
    y2 = y * y
    series = -y2 * _gap_series(y2, 1)
    return torch.where(x < threshold, direct, series)


def _piecewise(mask: Tensor, fn_true, fn_false, *args: Tensor) -> tuple[Tensor, ...]:
    """Evaluate ``fn_true`` on the elements where ``mask`` holds and ``fn_false`` elsewhere.

    All ``args`` share the shape of ``mask``. Each function sees only its own elements (as flat
    tensors) and returns a tuple of flat tensors; the results are scattered back. Neither
    function is evaluated outside its domain, so no ``nan`` or ``inf`` of an unused branch can
    reach the values or the gradients.
    """
    shape = mask.shape
    flat_mask = mask.reshape(-1)
    flat_args = [a.reshape(-1) for a in args]
    if bool(flat_mask.all()):
        return tuple(r.reshape(shape) for r in fn_true(*flat_args))
    if not bool(flat_mask.any()):
        return tuple(r.reshape(shape) for r in fn_false(*flat_args))
    idx_true = flat_mask.nonzero().squeeze(-1)
    idx_false = (~flat_mask).nonzero().squeeze(-1)
    res_true = fn_true(*(a.index_select(0, idx_true) for a in flat_args))
    res_false = fn_false(*(a.index_select(0, idx_false) for a in flat_args))
    out = []
    for rt, rf in zip(res_true, res_false, strict=True):
        full = rt.new_empty(flat_mask.shape)
        full = full.index_put((idx_true,), rt).index_put((idx_false,), rf)
        out.append(full.reshape(shape))
    return tuple(out)


class Canonical(NamedTuple):
    """Bounds mirrored so that ``beta >= 0``; ``flip`` marks the mirrored elements."""

    alpha: Tensor
    beta: Tensor
    width: Tensor
    flip: Tensor
    tail: Tensor


def canonical(alpha: Tensor, beta: Tensor, width: Tensor | None = None) -> Canonical:
    flip = beta < 0
    al = torch.where(flip, -beta, alpha)
    be = torch.where(flip, -alpha, beta)
    width = (beta - alpha) if width is None else width.expand_as(al)
    return Canonical(al, be, width, flip, al > 0)


def nearest_to_zero(alpha: Tensor, beta: Tensor) -> Tensor:
    """The point ``s`` of ``[alpha, beta]`` closest to zero (signed, unmirrored)."""
    return torch.maximum(torch.minimum(torch.zeros_like(alpha), beta), alpha)


# --- the two branches, on canonical bounds -------------------------------------------------------


def _tail_log_zhat(
    al: Tensor, be: Tensor, width: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ea = torch.special.erfcx(al * _SQRT1_2)
    eb = torch.special.erfcx(be * _SQRT1_2)
    w = 0.5 * width * (be + al)
    # D = E_a - q E_b, written as two non-negative terms (erfcx decreases on x > 0).
    d = (ea - eb) - eb * torch.expm1(-w)
    q_eb = torch.exp(-w) * eb
    return torch.log(0.5 * d), d, ea, q_eb, w


def _straddle_z(al: Tensor, be: Tensor) -> Tensor:
    return 0.5 * (torch.erf(be * _SQRT1_2) - torch.erf(al * _SQRT1_2))


def _tail_all(al: Tensor, be: Tensor, width: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    log_zhat, d, ea, q_eb, _ = _tail_log_zhat(al, be, width)
    da = mills_gap(al)
    db = mills_gap(be)
    # Entropy term T - alpha^2 with T = (alpha phi(alpha) - beta phi(beta)) / Z.
    ent = (al * ea * da - q_eb * (be * db + width * (be + al))) / d
    # Standardised mean minus alpha.
    mean = (ea * da - q_eb * (db + width)) / d
    ua = mills_gap_complement(al, da)
    var = (ea * ua - q_eb * (1.0 + (be - 2.0 * al) * db + width * width)) / d - mean * mean
    return log_zhat, ent, mean, var.clamp(min=0.0)


def _straddle_all(al: Tensor, be: Tensor, width: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z = _straddle_z(al, be)
    pa = torch.exp(-0.5 * al * al) * _INV_SQRT_2PI
    pb = torch.exp(-0.5 * be * be) * _INV_SQRT_2PI
    ent = (al * pa - be * pb) / z
    mean = (pa - pb) / z
    var = 1.0 + ent - mean * mean
    return torch.log(z), ent, mean, var.clamp(min=0.0)


def _tail_lz(al: Tensor, be: Tensor, width: Tensor) -> tuple[Tensor]:
    return (_tail_log_zhat(al, be, width)[0],)


def _straddle_lz(al: Tensor, be: Tensor, width: Tensor) -> tuple[Tensor]:
    return (torch.log(_straddle_z(al, be)),)


def log_zhat(alpha: Tensor, beta: Tensor, width: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""``(s, log Zhat)`` with :math:`\log(\Phi(\beta) - \Phi(\alpha)) = \log \hat Z - s^2/2`.

    ``width`` is ``beta - alpha``, to be passed when it is known more accurately than the
    difference (for shifted bounds far from zero).
    """
    c = canonical(alpha, beta, width)
    (lz,) = _piecewise(c.tail, _tail_lz, _straddle_lz, c.alpha, c.beta, c.width)
    return nearest_to_zero(alpha, beta), lz


def log_z(alpha: Tensor, beta: Tensor, width: Tensor | None = None) -> Tensor:
    r""":math:`\log(\Phi(\beta) - \Phi(\alpha))`, finite for every ``alpha < beta``."""
    s, lz = log_zhat(alpha, beta, width)
    return lz - 0.5 * s * s


class Moments(NamedTuple):
    r"""Standardised statistics of the truncated standard normal.

    ``s`` and ``log_zhat`` as in :func:`log_zhat`; ``entropy`` is the differential entropy of the
    standardised variable; ``mean_offset`` is its mean minus ``s`` (the mean of the unstandardised
    variable is ``clamp(loc, low, high) + scale * mean_offset``); ``variance`` its variance.
    """

    s: Tensor
    log_zhat: Tensor
    entropy: Tensor
    mean_offset: Tensor
    variance: Tensor


def moments(alpha: Tensor, beta: Tensor, width: Tensor | None = None) -> Moments:
    c = canonical(alpha, beta, width)
    lz, ent, mean, var = _piecewise(c.tail, _tail_all, _straddle_all, c.alpha, c.beta, c.width)
    # In the tail branch ``mean`` is measured from s = alpha; in the straddle branch s = 0.
    mean = torch.where(c.flip, -mean, mean)
    entropy = _HALF_LOG_2PI_E + lz + 0.5 * ent
    return Moments(nearest_to_zero(alpha, beta), lz, entropy, mean, var)


# --- KL to the uniform on the same interval -----------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
# Below this spread of -y^2/2 over the interval the density is so close to uniform that
# log(beta - alpha) - H cancels; above it the KL is at least ~1e-4 and the direct form is exact.
_NEAR_UNIFORM = 0.05


def _psi(x: Tensor) -> Tensor:
    # x e^x - e^x + 1 = sum_{n>=2} (n - 1) x^n / n!  (>= 0), by its series where it would cancel.
    direct = x * torch.exp(x) - torch.expm1(x)
    series = x * x * (0.5 + x * (1 / 3 + x * (1 / 8 + x * (1 / 30 + x * (1 / 144 + x / 840)))))
    return torch.where(x.abs() < 0.1, series, direct)


def _kl_uniform_near(al: Tensor, be: Tensor, width: Tensor) -> tuple[Tensor]:
    # With y = m + h v and g(v) = -(m h v + h^2 v^2 / 2) (the log density up to a constant),
    # KL(p || U) = E_U[g e^g] / E_U[e^g] - log E_U[e^g] = E_U[psi(g - L)], L = log E_U[e^g],
    # psi(x) = x e^x - e^x + 1 >= 0: a sum of non-negative terms, by 8-point Gauss-Legendre
    # (exact to rounding for the nearly constant integrand of this branch).
    m = (0.5 * (al + be)).unsqueeze(-1)
    h = (0.5 * width).unsqueeze(-1)
    v = torch.as_tensor(_GL_NODES, dtype=al.dtype, device=al.device)
    wts = torch.as_tensor(_GL_WEIGHTS / 2.0, dtype=al.dtype, device=al.device)
    g = -(m * h) * v - (0.5 * h * h) * v * v
    big_l = torch.log1p((torch.expm1(g) * wts).sum(-1, keepdim=True))
    return ((_psi(g - big_l) * wts).sum(-1),)


def kl_to_uniform(
    alpha: Tensor, beta: Tensor, entropy: Tensor, width: Tensor | None = None
) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N_{[\alpha,\beta]}(0, 1) \,\|\, U[\alpha, \beta])`.

    ``entropy`` is that of the standardised truncated normal (:attr:`Moments.entropy`). The KL is
    :math:`\log(\beta - \alpha) - H`, except where the normal is nearly flat over the interval:
    there the KL is tiny, the difference would lose its digits, and it is integrated directly.
    """
    width = (beta - alpha) if width is None else width.expand_as(alpha)
    m = 0.5 * (alpha + beta)
    h = 0.5 * width
    near = (m.abs() * h + 0.5 * h * h) < _NEAR_UNIFORM

    def direct(al, be, wd, ent):
        return (torch.log(wd) - ent,)

    def flat(al, be, wd, ent):
        return _kl_uniform_near(al, be, wd)

    (kl,) = _piecewise(near, flat, direct, alpha, beta, width, entropy)
    return kl.clamp(min=0.0)


# --- sampling ------------------------------------------------------------------------------------


def _tail_excess(al: Tensor, be: Tensor, width: Tensor, u: Tensor, ubar: Tensor) -> tuple[Tensor]:
    r"""Excess ``z = y - alpha >= 0`` of the tail sample with CDF value ``u`` (``ubar = 1 - u``).

    Solves :math:`\log(\Phi(-\alpha - z)/\Phi(-\alpha)) = \log p`, :math:`p = \bar u + u \rho`,
    :math:`\rho = \Phi(-\beta)/\Phi(-\alpha)`. For moderate ``alpha`` through ``ndtri``; beyond,
    by Newton's method on the erfcx-scaled equation, from the root of its quadratic part. The last
    Newton step is taken with gradients on, which gives the implicit (exact) reparameterisation
    gradient.
    """
    _, _, ea, q_eb, _ = _tail_log_zhat(al, be, width)
    rho = q_eb / ea
    log_p = torch.log(ubar + u * rho)
    dtype = al.dtype
    tiny = torch.finfo(dtype).tiny
    moderate = al < _ndtr_tail_threshold(dtype)

    def by_ndtri(al, log_p):
        # Phi(-alpha) p, never 0: Phi(-10) p >= 7e-24 * tiny-ish keeps ndtri finite.
        p = (torch.special.log_ndtr(-al) + log_p).exp().clamp(min=tiny)
        return ((-torch.special.ndtri(p) - al).clamp(min=0.0),)

    def by_newton(al, log_p):
        def g_and_slope(z):
            y = al + z
            g = (
                torch.log(torch.special.erfcx(y * _SQRT1_2) / torch.special.erfcx(al * _SQRT1_2))
                - 0.5 * z * (al + y)
                - log_p
            )
            return g, y + mills_gap(y)

        with torch.no_grad():
            lp = log_p.detach()
            a = al.detach()
            z = -2.0 * lp / (a + torch.sqrt(a * a - 2.0 * lp))
            for _ in range(_newton_steps(dtype)):
                y = a + z
                g = (
                    torch.log(torch.special.erfcx(y * _SQRT1_2) / torch.special.erfcx(a * _SQRT1_2))
                    - 0.5 * z * (a + y)
                    - lp
                )
                z = (z + g / (y + mills_gap(y))).clamp(min=0.0)
        g, slope = g_and_slope(z)
        return ((z + g / slope.detach()).clamp(min=0.0),)

    return _piecewise(moderate, by_ndtri, by_newton, al, log_p)


def _straddle_sample(
    al: Tensor, be: Tensor, width: Tensor, u: Tensor, ubar: Tensor
) -> tuple[Tensor]:
    z = _straddle_z(al, be)
    dtype = al.dtype
    tiny = torch.finfo(dtype).tiny
    eps = torch.finfo(dtype).eps
    p_low = torch.special.ndtr(al) + u * z
    p_high = torch.special.ndtr(-be) + ubar * z
    use_low = p_low <= p_high
    # Each branch sees probabilities in (0, 1/2], where ndtri is accurate and finite.
    y_low = torch.special.ndtri(torch.where(use_low, p_low, 0.25).clamp(tiny, 0.5 + eps))
    y_high = -torch.special.ndtri(torch.where(use_low, 0.25, p_high).clamp(tiny, 0.5 + eps))
    return (torch.where(use_low, y_low, y_high),)


def sample_offset(
    alpha: Tensor, beta: Tensor, u: Tensor, ubar: Tensor, width: Tensor | None = None
) -> Tensor:
    r"""Standardised quantile at CDF value ``u`` (with ``ubar = 1 - u`` given exactly), as an
    offset from ``s``: the quantile of the unstandardised variable is
    ``clamp(loc, low, high) + scale * offset``, which keeps full precision next to a bound.
    """
    c = canonical(alpha, beta, width)
    # The mirror maps CDF value u to 1 - u.
    uc = torch.where(c.flip, ubar, u)
    ubc = torch.where(c.flip, u, ubar)

    (off,) = _piecewise(c.tail, _tail_excess, _straddle_sample, c.alpha, c.beta, c.width, uc, ubc)
    return torch.where(c.flip, -off, off)
