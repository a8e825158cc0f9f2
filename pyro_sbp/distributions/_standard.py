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

The cheap straddle formulas run on every element (on inputs clamped into their domain, so that
they stay finite); the tail and nearly-flat formulas run only on the elements that take them and
overwrite those (:func:`_overlay`). No ``nan`` or ``inf`` of an unused branch can reach the
values or the gradients, and the work stays proportional to the input. Every elementwise
operation is kept out of the slow paths of the math library (``exp`` and ``erfc`` of arguments
whose results would be subnormal), which cost twenty to fifty times a normal call.
"""

import math
from functools import partial
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


_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)
#: erfcx'(x) ~ -1/(sqrt(pi) x^2) sum_k c_k x^(-2k), c_k = (-1)^k (2k + 1)!! / 2^k.
_ERFCX_DERIVATIVE_SERIES = tuple(
    (-1) ** k * math.prod(range(1, 2 * k + 2, 2)) / 2**k for k in range(7)
)


def _erfcx_derivative(x: Tensor, y: Tensor) -> Tensor:
    r""":math:`\operatorname{erfcx}'(x) = 2x\operatorname{erfcx}(x) - 2/\sqrt\pi`, given
    :math:`y = \operatorname{erfcx}(x)`. For large :math:`x` the two terms cancel (the result is
    :math:`\approx -1/(\sqrt\pi x^2)`): the asymptotic series takes over there."""
    # The direct form loses about 2 x^2 eps relative; seven terms of the series are accurate to
    # 4e-17 relative from x = 30 and to 4e-9 from x = 8.
    threshold = 30.0 if x.dtype == torch.float64 else 8.0
    direct = 2.0 * x * y - 2.0 * _INV_SQRT_PI
    z = torch.where(x < threshold, threshold, x).reciprocal() ** 2
    acc = torch.full_like(z, _ERFCX_DERIVATIVE_SERIES[-1])
    for c in reversed(_ERFCX_DERIVATIVE_SERIES[:-1]):
        acc = acc * z + c
    return torch.where(x < threshold, direct, -_INV_SQRT_PI * z * acc)


class _Erfcx(torch.autograd.Function):
    # torch.special.erfcx with a derivative that does not cancel for large arguments (torch's
    # computes 2x erfcx(x) - 2/sqrt(pi) as written: in float32 its gradients of the tail
    # normalisers were wrong at |alpha| ~ 1e3 and non-finite beyond 1e12).
    @staticmethod
    def forward(ctx, x):
        y = torch.special.erfcx(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        return grad * _erfcx_derivative(x, y)


def erfcx(x: Tensor) -> Tensor:
    r"""The scaled complementary error function :math:`e^{x^2}\operatorname{erfc}(x)`, with an
    accurate gradient for large arguments."""
    return _Erfcx.apply(x)


def _series_threshold(dtype: torch.dtype) -> float:
    # Below this point the direct formula phi/Phi(-x) - x loses about log10(x^2) digits (at most
    # 6 of 16 in float64, 3 of 7 in float32); above it the first four terms of the asymptotic
    # series are accurate to machine precision.
    return 1e3 if dtype == torch.float64 else 30.0


def _newton_steps(dtype: torch.dtype) -> int:
    return 3 if dtype == torch.float64 else 2


def _ndtr_tail_threshold(dtype: torch.dtype) -> float:
    # Below this alpha, Phi(-alpha) and the tail samples it gives are well inside the normal range.
    return 10.0


def _gap_series(y2: Tensor, start: int, terms: int) -> Tensor:
    coeffs = _GAP_COEFFS[start : start + terms]
    acc = torch.full_like(y2, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * y2 + c
    return acc


def mills_gap(x: Tensor) -> Tensor:
    r"""The gap :math:`d(x) = \phi(x)/\Phi(-x) - x > 0` for :math:`x \ge 0`."""
    threshold = _series_threshold(x.dtype)
    direct = _SQRT_2_OVER_PI / erfcx(x * _SQRT1_2) - x
    # torch.where, not clamp, so that x == threshold keeps its gradient.
    y = torch.where(x < threshold, threshold, x).reciprocal()
    series = y * _gap_series(y * y, 0, 4)
    return torch.where(x < threshold, direct, series)


def mills_gap_complement(x: Tensor, d: Tensor) -> Tensor:
    r""":math:`u(x) = 1 - x\,d(x) \in (0, 1]` for :math:`x \ge 0`, given :math:`d = d(x)`."""
    # 1 - x d(x) ~ 2 / x^2 cancels x^2-fold on top of the error of d: the series takes over
    # early, with all its terms.
    threshold = 20.0 if x.dtype == torch.float64 else 8.0
    direct = 1.0 - x * d
    y = torch.where(x < threshold, threshold, x).reciprocal()
    y2 = y * y
    series = -y2 * _gap_series(y2, 1, len(_GAP_COEFFS) - 1)
    return torch.where(x < threshold, direct, series)


#: Whether every branch runs on every element (``torch.where`` picks the result): no host
#: synchronisation, the same work whatever the data, so that a CUDA stream never waits (what
#: tracing a step or capturing it in a CUDA graph needs). ``None``: on every device but the
#: CPU, where waiting is free and the rare branches are cheaper on their own elements only
#: (``index_select``, after asking the mask whether there are any). ``True`` or ``False``
#: forces either.
DENSE_BRANCHES: bool | None = None


def _dense(t: Tensor) -> bool:
    return DENSE_BRANCHES if DENSE_BRANCHES is not None else t.device.type != "cpu"


def _overlay(
    mask: Tensor,
    fn_rare,
    fn_common,
    *args: Tensor,
    safe_rare: tuple[float, ...],
    safe_common: tuple[float, ...],
) -> tuple[Tensor, ...]:
    """``fn_rare`` where ``mask`` holds, ``fn_common`` elsewhere.

    Both functions are element-wise (each takes and returns tensors of the arguments' common
    shape, possibly with trailing working dims of its own). With dense branches
    (:data:`DENSE_BRANCHES`) both run on every element, each on its own elements and on
    ``safe_rare`` / ``safe_common`` (one value per argument, inside the function's domain) in the
    others' places, so that both stay finite everywhere, values and gradients, and
    ``torch.where`` picks the result: no branch depends on the data. Otherwise ``fn_common``
    runs on every element (it must stay finite on all of them; its values and gradients are
    discarded where ``mask`` holds) and ``fn_rare`` only on its own, which overwrite those.
    """
    if _dense(mask):
        rare_args = [torch.where(mask, a, v) for a, v in zip(args, safe_rare, strict=True)]
        common_args = [torch.where(mask, v, a) for a, v in zip(args, safe_common, strict=True)]
        rare = fn_rare(*rare_args)
        common = fn_common(*common_args)
        return tuple(torch.where(mask, r, c) for r, c in zip(rare, common, strict=True))
    shape = mask.shape
    flat_mask = mask.reshape(-1)
    flat_args = [a.reshape(-1) for a in args]
    if bool(flat_mask.all()):
        return tuple(r.reshape(shape) for r in fn_rare(*flat_args))
    common = fn_common(*flat_args)
    if not bool(flat_mask.any()):
        return tuple(r.reshape(shape) for r in common)
    idx = flat_mask.nonzero().squeeze(-1)
    rare = fn_rare(*(a.index_select(0, idx) for a in flat_args))
    return tuple(c.index_put((idx,), r).reshape(shape) for c, r in zip(common, rare, strict=True))


#: In-domain stand-ins (alpha, beta, width) for the elements a branch does not own: a tail
#: interval (0 < alpha < beta), a straddling one (alpha < 0 < beta) and a nearly flat one.
_SAFE_TAIL = (1.0, 2.0, 1.0)
_SAFE_STRADDLE = (-1.0, 1.0, 2.0)
_SAFE_FLAT = (-0.05, 0.05, 0.1)


def compact(shape: torch.Size, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Views of ``tensors`` (all of ``shape``) without the dims that every one of them only
    broadcasts (stride 0), e.g. the batch dim of a plate's ``expand``: statistics computed on
    them are then computed once per distinct parameter, and expanded back for free."""
    dims = [d for d, n in enumerate(shape) if n > 1 and all(t.stride(d) == 0 for t in tensors)]
    if not dims:
        return tensors
    out = []
    for t in tensors:
        for d in dims:
            t = t.narrow(d, 0, 1)
        out.append(t)
    return tuple(out)


def _nonpositive(x: Tensor) -> Tensor:
    # min(x, 0) that keeps the gradient at x == 0 (clamp and minimum would drop or halve it,
    # and x == 0 is hit exactly whenever a bound sits at tau * scale from loc).
    return torch.where(x > 0, 0.0, x)


def _exp_floor(dtype: torch.dtype) -> float:
    # exp of anything below this is subnormal or zero (and slow); the floor's own exp is
    # negligible wherever it is used (added to or divided by quantities of order one).
    return -80.0 if dtype == torch.float32 else -700.0


def _erfc_cap(dtype: torch.dtype) -> float:
    # erfc beyond this underflows (slowly) to subnormals; erfc(cap) is ~1e-37 (float32),
    # ~1e-296 (float64).
    return 9.0 if dtype == torch.float32 else 26.0


def _normal_pdf(x: Tensor) -> Tensor:
    return torch.exp((-0.5 * x * x).clamp(min=_exp_floor(x.dtype))) * _INV_SQRT_2PI


def _normal_cdf_neg(x: Tensor) -> Tensor:
    """Phi(-x) for x >= -cap, by erfc (fast and accurate in the upper tail)."""
    return 0.5 * torch.erfc((x * _SQRT1_2).clamp(max=_erfc_cap(x.dtype)))


class Canonical(NamedTuple):
    """Bounds mirrored so that the midpoint is >= 0; ``sign`` is -1 on the mirrored elements."""

    alpha: Tensor
    beta: Tensor
    width: Tensor
    sign: Tensor
    tail: Tensor


def canonical(alpha: Tensor, beta: Tensor, width: Tensor | None = None) -> Canonical:
    # Mirroring when alpha + beta < 0 leaves the canonical interval a tail iff alpha > 0.
    # One mask for all three: at a symmetric interval (alpha = -beta) a branch-free form such as
    # max(alpha, -beta) would split the gradient between the two mirror images inconsistently.
    flip = (alpha + beta) < 0
    al = torch.where(flip, -beta, alpha)
    be = torch.where(flip, -alpha, beta)
    width = (beta - alpha) if width is None else width.expand_as(al)
    sign = 1.0 - 2.0 * flip.to(al.dtype)
    return Canonical(al, be, width, sign, al > 0)


def nearest_to_zero(alpha: Tensor, beta: Tensor) -> Tensor:
    """The point ``s`` of ``[alpha, beta]`` closest to zero (signed, unmirrored)."""
    return alpha.clamp(min=0.0) + beta.clamp(max=0.0)


# --- the two branches, on canonical bounds -------------------------------------------------------


def _tail_log_zhat(
    al: Tensor, be: Tensor, width: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ea = erfcx(al * _SQRT1_2)
    eb = erfcx(be * _SQRT1_2)
    w = 0.5 * width * (be + al)
    # D = E_a - q E_b, written as two non-negative terms (erfcx decreases on x > 0).
    d = (ea - eb) - eb * torch.expm1(-w)
    q_eb = torch.exp(-w) * eb
    return torch.log(0.5 * d), d, ea, q_eb, w


def _straddle_z(al: Tensor, be: Tensor) -> Tensor:
    # On canonical bounds al <= 0 <= be the two erf terms have opposite signs: no cancellation.
    # (On tail elements, where this branch's values are discarded, al is clamped to 0 so that
    # z stays positive.)
    return 0.5 * (torch.erf(be * _SQRT1_2) - torch.erf(_nonpositive(al) * _SQRT1_2))


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
    (lz,) = _overlay(
        c.tail,
        _tail_lz,
        _straddle_lz,
        c.alpha,
        c.beta,
        c.width,
        safe_rare=_SAFE_TAIL,
        safe_common=_SAFE_STRADDLE,
    )
    return nearest_to_zero(alpha, beta), lz


def log_z(alpha: Tensor, beta: Tensor, width: Tensor | None = None) -> Tensor:
    r""":math:`\log(\Phi(\beta) - \Phi(\alpha))`, finite for every ``alpha < beta``."""
    s, lz = log_zhat(alpha, beta, width)
    return lz - 0.5 * s * s


def _tail_all(
    al: Tensor, be: Tensor, width: Tensor, *, need_var: bool = True
) -> tuple[Tensor, ...]:
    log_zhat, d, ea, q_eb, _ = _tail_log_zhat(al, be, width)
    da = mills_gap(al)
    db = mills_gap(be)
    # T - alpha^2 with T = (alpha phi(alpha) - beta phi(beta)) / Z: the alpha^2 / 2 hidden in
    # log Z cancels against T / 2 in the entropy.
    ent = (al * ea * da - q_eb * (be * db + width * (be + al))) / d
    entropy = _HALF_LOG_2PI_E + log_zhat + 0.5 * ent
    # Standardised mean minus alpha.
    mean = (ea * da - q_eb * (db + width)) / d
    if not need_var:
        return log_zhat, entropy, mean
    ua = mills_gap_complement(al, da)
    var = (ea * ua - q_eb * (1.0 + (be - 2.0 * al) * db + width * width)) / d - mean * mean
    return log_zhat, entropy, mean, var.clamp(min=0.0)


def _straddle_all(
    al: Tensor, be: Tensor, width: Tensor, *, need_var: bool = True
) -> tuple[Tensor, ...]:
    al = _nonpositive(al)
    z = _straddle_z(al, be)
    pa = _normal_pdf(al)
    pb = _normal_pdf(be)
    ent = (al * pa - be * pb) / z
    log_zhat = torch.log(z)
    entropy = _HALF_LOG_2PI_E + log_zhat + 0.5 * ent
    mean = (pa - pb) / z
    if not need_var:
        return log_zhat, entropy, mean
    var = 1.0 + ent - mean * mean
    return log_zhat, entropy, mean, var.clamp(min=0.0)


# --- the nearly flat case -----------------------------------------------------------------------

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
# Below this spread of -y^2/2 over the interval (g's largest |value| in _flat_quadrature) the
# closed forms above subtract nearly equal terms (the variance, and log(beta - alpha) - H in the
# KL), while 8-point Gauss-Legendre is exact to rounding: it integrates e^g times a polynomial of
# degree 2 with relative error below 2e-10 for a spread s <= 1 (1.1e-10 at most, measured against
# mpmath), far below float32's rounding. In float64 the switch is at 5% from uniform
# (s < 0.05): above it the KL is at least ~1e-4 and the closed forms lose at
# most a few digits of sixteen. In float32 they lose all seven in the variance of a narrow tail
# interval far from zero well above that (the truncated log-normal's variance at loc 0, scale 40
# on [e^-0.7, e^-0.6] came out 0 against 2.27e-4), so float32 takes the quadrature up to s = 1.
_NEAR_UNIFORM = {torch.float64: 0.05}
_NEAR_UNIFORM_DEFAULT = 1.0


def _is_flat(alpha: Tensor, beta: Tensor, width: Tensor) -> Tensor:
    h = 0.5 * width
    spread = 0.5 * (alpha + beta).abs() * h + 0.5 * h * h
    return spread < _NEAR_UNIFORM.get(alpha.dtype, _NEAR_UNIFORM_DEFAULT)


def _psi(x: Tensor) -> Tensor:
    # x e^x - e^x + 1 = sum_{n>=2} (n - 1) x^n / n!  (>= 0), by its series where it would cancel.
    direct = x * torch.exp(x) - torch.expm1(x)
    series = x * x * (0.5 + x * (1 / 3 + x * (1 / 8 + x * (1 / 30 + x * (1 / 144 + x / 840)))))
    return torch.where(x.abs() < 0.1, series, direct)


def _flat_quadrature(al: Tensor, width: Tensor):
    # y = m + h v on v in [-1, 1]; the log density is -m^2/2 + g(v), g = -(m h v + h^2 v^2 / 2).
    h = 0.5 * width
    m = al + h
    v = torch.as_tensor(_GL_NODES, dtype=al.dtype, device=al.device)
    wts = torch.as_tensor(_GL_WEIGHTS / 2.0, dtype=al.dtype, device=al.device)
    g = -(m * h).unsqueeze(-1) * v - (0.5 * h * h).unsqueeze(-1) * v * v
    big_l = torch.log1p((torch.expm1(g) * wts).sum(-1, keepdim=True))
    return m, h, v, wts, g, big_l


def _flat_kl(al: Tensor, be: Tensor, width: Tensor) -> tuple[Tensor]:
    # KL(p || U) = E_U[g e^g] / E_U[e^g] - log E_U[e^g] = E_U[psi(g - L)], L = log E_U[e^g]:
    # a sum of non-negative terms, with no cancellation however close p is to uniform.
    _, _, _, wts, g, big_l = _flat_quadrature(al, width)
    return ((_psi(g - big_l) * wts).sum(-1),)


def _flat_all(
    al: Tensor, be: Tensor, width: Tensor, *, need_var: bool = True
) -> tuple[Tensor, ...]:
    m, h, v, wts, g, big_l = _flat_quadrature(al, width)
    p = torch.exp(g - big_l) * wts
    ev = (p * v).sum(-1)
    kl = (_psi(g - big_l) * wts).sum(-1)
    # Canonical s is alpha in the tail (alpha > 0), else 0: m - s is then h or m.
    tail = al > 0
    m_minus_s = torch.where(tail, h, m)
    m_plus_s = torch.where(tail, m + al, m)
    log_zhat = torch.log(width) - _LOG_SQRT_2PI + big_l.squeeze(-1) - 0.5 * m_minus_s * m_plus_s
    entropy = torch.log(width) - kl
    mean = m_minus_s + h * ev
    if not need_var:
        return log_zhat, entropy, mean
    var = h * h * ((p * (v - ev.unsqueeze(-1)).square()).sum(-1))
    return log_zhat, entropy, mean, var


def _closed_form(al, be, width, *, need_var):
    return _overlay(
        al > 0,
        partial(_tail_all, need_var=need_var),
        partial(_straddle_all, need_var=need_var),
        al,
        be,
        width,
        safe_rare=_SAFE_TAIL,
        safe_common=_SAFE_STRADDLE,
    )


class Moments(NamedTuple):
    r"""Standardised statistics of the truncated standard normal.

    ``s`` and ``log_zhat`` as in :func:`log_zhat`; ``entropy`` is the differential entropy of the
    standardised variable; ``mean_offset`` is its mean minus ``s`` (the mean of the unstandardised
    variable is ``clamp(loc, low, high) + scale * mean_offset``); ``variance`` its variance
    (``None`` unless asked for).
    """

    s: Tensor
    log_zhat: Tensor
    entropy: Tensor
    mean_offset: Tensor
    variance: Tensor | None


def moments(
    alpha: Tensor, beta: Tensor, width: Tensor | None = None, *, need_var: bool = True
) -> Moments:
    c = canonical(alpha, beta, width)
    flat = _is_flat(c.alpha, c.beta, c.width)
    out = _overlay(
        flat,
        partial(_flat_all, need_var=need_var),
        partial(_closed_form, need_var=need_var),
        c.alpha,
        c.beta,
        c.width,
        safe_rare=_SAFE_FLAT,
        safe_common=_SAFE_STRADDLE,
    )
    lz, entropy, mean = out[:3]
    mean = c.sign * mean
    var = out[3] if need_var else None
    return Moments(nearest_to_zero(alpha, beta), lz, entropy, mean, var)


# --- KL to the uniform on the same interval -----------------------------------------------------


def kl_to_uniform(
    alpha: Tensor, beta: Tensor, entropy: Tensor, width: Tensor | None = None
) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N_{[\alpha,\beta]}(0, 1) \,\|\, U[\alpha, \beta])`.

    ``entropy`` is that of the standardised truncated normal (:attr:`Moments.entropy`). The KL is
    :math:`\log(\beta - \alpha) - H`, except where the normal is nearly flat over the interval:
    there the KL is tiny, the difference would lose its digits, and it is integrated directly.
    """
    c = canonical(alpha, beta, width)
    flat = _is_flat(c.alpha, c.beta, c.width)

    def direct(al, be, wd, ent):
        return (torch.log(wd) - ent,)

    def close(al, be, wd, ent):
        return _flat_kl(al, be, wd)

    (kl,) = _overlay(
        flat,
        close,
        direct,
        c.alpha,
        c.beta,
        c.width,
        entropy,
        safe_rare=(*_SAFE_FLAT, 0.0),
        safe_common=(*_SAFE_STRADDLE, 0.0),
    )
    return kl.clamp(min=0.0)


# --- sampling ------------------------------------------------------------------------------------


#: erfcx(alpha / sqrt 2) at the stand-in alphas of the tail sampler's two branches (computed
#: once, so that sampling asks nothing of a tensor's value).
_ERFCX_STAND_INS = {
    _ndtr_tail_threshold(dt) + 1.0: tuple(
        float(torch.special.erfcx(torch.tensor(a * _SQRT1_2, dtype=torch.float64)))
        for a in (_ndtr_tail_threshold(dt) + 1.0, 1.0)
    )
    for dt in (torch.float32, torch.float64)
}


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

    def by_ndtri(al, log_p, ea):
        # Phi(-alpha) p with alpha < 10 (clamped: this runs on every element, and its values
        # are replaced by Newton's beyond); kept >= tiny so that ndtri stays finite.
        al = al.clamp(max=_ndtr_tail_threshold(dtype))
        p = (_normal_cdf_neg(al).log() + log_p).exp().clamp(min=tiny)
        return ((-torch.special.ndtri(p) - al).clamp(min=0.0),)

    def by_newton(al, log_p, ea):
        # g(z) = log(Phi(-alpha - z) / Phi(-alpha)) - log p, decreasing and concave, with
        # slope -r(alpha + z), r(y) = sqrt(2/pi) / erfcx(y / sqrt 2) the inverse Mills ratio.
        # Newton from the root of its quadratic part (an upper bound) converges monotonically.
        def g_and_slope(a, ea, z, lp):
            ey = erfcx((a + z) * _SQRT1_2)
            g = torch.log(ey / ea) - 0.5 * z * (2.0 * a + z) - lp
            return g, _SQRT_2_OVER_PI / ey

        with torch.no_grad():
            a, e, lp = al.detach(), ea.detach(), log_p.detach()
            z = -2.0 * lp / (a + torch.sqrt(a * a - 2.0 * lp))
            for _ in range(_newton_steps(dtype)):
                g, slope = g_and_slope(a, e, z, lp)
                z = (z + g / slope).clamp(min=0.0)
        # One more step with gradients: at the root it gives the implicit-function gradient.
        g, slope = g_and_slope(al, ea, z, log_p)
        return ((z + g / slope.detach()).clamp(min=0.0),)

    far = _ndtr_tail_threshold(dtype) + 1.0
    erfcx_far, erfcx_one = _ERFCX_STAND_INS[far]
    return _overlay(
        ~moderate,
        by_newton,
        by_ndtri,
        al,
        log_p,
        ea,
        safe_rare=(far, -1.0, erfcx_far),
        safe_common=(1.0, -1.0, erfcx_one),
    )


def sample_offset(
    alpha: Tensor,
    beta: Tensor,
    u: Tensor,
    ubar: Tensor,
    width: Tensor | None = None,
    *,
    exact_quantile: bool = True,
    canonical_frame: bool = False,
) -> Tensor:
    r"""Standardised quantile at CDF value ``u`` (with ``ubar = 1 - u`` given exactly), as an
    offset from ``s``: the quantile of the unstandardised variable is
    ``clamp(loc, low, high) + scale * offset``, which keeps full precision next to a bound.

    ``alpha``, ``beta`` and ``width`` may be compact (broadcastable to ``u``'s shape): everything
    that depends on them alone (the mirror, the branch, the normalisers) is computed once per
    distinct parameter, and only the steps that involve ``u`` run per sample.

    With ``exact_quantile=False`` (for sampling) the mirror is applied to the result only: the
    mirrored element then gets the quantile at ``1 - u``, which has the same distribution when
    ``u`` is uniform, and two passes over the data are saved. With ``canonical_frame`` as well,
    the offset is returned in the canonical frame (from ``max(alpha_c, 0)``, unmirrored), with
    the :class:`Canonical` bounds: ``(offset, canonical)``.
    """
    c = canonical(alpha, beta, width)
    shape = u.shape
    if exact_quantile:
        # The mirror maps CDF value u to 1 - u.
        mirrored = c.sign < 0
        u, ubar = torch.where(mirrored, ubar, u), torch.where(mirrored, u, ubar)
    # Straddle: the constants per parameter, then one pass per sample.
    al = _nonpositive(c.alpha)
    z = _straddle_z(al, c.beta)
    p_low = _normal_cdf_neg(-al) + u * z
    p_high = _normal_cdf_neg(c.beta) + ubar * z
    # ndtri on the smaller of the two tail probabilities (<= 1/2, where it is accurate), with
    # the sign put back: negative when the quantile lies in the lower half.
    p = torch.minimum(p_low, p_high).clamp(min=torch.finfo(u.dtype).tiny)
    off = torch.copysign(torch.special.ndtri(p), p_low - p_high)
    if _dense(u):
        # Tail: every sample, on a stand-in tail interval where its parameter straddles; the
        # tail parameters' samples overwrite the straddle values.
        (excess,) = _tail_excess(
            torch.where(c.tail, c.alpha, _SAFE_TAIL[0]).expand(shape),
            torch.where(c.tail, c.beta, _SAFE_TAIL[1]).expand(shape),
            torch.where(c.tail, c.width, _SAFE_TAIL[2]).expand(shape),
            u,
            ubar,
        )
        off = torch.where(c.tail.expand(shape), excess, off)
    elif bool(c.tail.any()):
        # Tail: only on the samples of tail parameters, which overwrite the straddle values.
        tail = c.tail.expand(shape).reshape(-1)
        idx = tail.nonzero().squeeze(-1)

        def pick(t):
            return t.expand(shape).reshape(-1).index_select(0, idx)

        (excess,) = _tail_excess(pick(c.alpha), pick(c.beta), pick(c.width), pick(u), pick(ubar))
        off = off.reshape(-1).index_put((idx,), excess).reshape(shape)
    if canonical_frame and not exact_quantile:
        return off, c
    return c.sign * off
