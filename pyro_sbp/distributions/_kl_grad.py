r"""The KL of a truncated normal to the uniform on its interval, with an analytic backward.

:math:`\mathrm{KL}(\mathcal N_{[a,b]}(\mu, \sigma^2) \,\|\, U[a, b]) = K(\alpha, \beta) =
\log(\beta - \alpha) - H(\alpha, \beta)`, the KL of the standardised truncated normal (its
value: :func:`~pyro_sbp.distributions._standard.kl_to_uniform`). With
:math:`A = \phi(\alpha)/Z`, :math:`B = \phi(\beta)/Z` and :math:`T = \alpha A - \beta B`,

.. math::

    \frac{\partial H}{\partial\alpha} = \tfrac12 A\,(T - \alpha^2 - 1), \qquad
    \frac{\partial H}{\partial\beta} = \tfrac12 B\,(\beta^2 + 1 - T),

and through :math:`\alpha = (a - \mu)/\sigma`, :math:`\beta = (b - \mu)/\sigma` (the
:math:`1/(\beta - \alpha)` of the logarithm cancels between the two)

.. math::

    \frac{\partial K}{\partial\mu} = \frac{1}{2\sigma}\big(A Y_1 + B Y_2\big), \qquad
    \frac{\partial K}{\partial\sigma} = -\frac{1}{\sigma}\Big(1 - \tfrac12\big(\alpha A Y_1
        + \beta B Y_2\big)\Big), \qquad Y_1 = T - \alpha^2 - 1,\ Y_2 = \beta^2 + 1 - T.

These equal :math:`-\mathrm{Cov}(\xi, \xi^2)/(2\sigma)` and :math:`-\mathrm{Var}(\xi^2)/(2\sigma)`
(the exponential family's identities), which is how the nearly flat case computes them: by the
same 8-point Gauss-Legendre rule as its KL, the squares differenced in factored form. In the
tail (canonical :math:`0 < \alpha`), :math:`Y_1` is a difference of terms of order
:math:`\alpha^2` that leaves :math:`-u(\alpha) \approx -2/\alpha^2`; it is taken in the scaled
form of :mod:`~pyro_sbp.distributions._standard`,

.. math::

    -Y_1 = X = \frac{E_\alpha u(\alpha) - q E_\beta\,\big(u(\beta) - (\beta - \alpha)(\beta +
        \alpha)\big)}{D}, \qquad Y_2 = (\beta - \alpha)(\beta + \alpha) + X,

with :math:`u(x) = 1 - x\,d(x)` (:func:`~pyro_sbp.distributions._standard.mills_gap_complement`),
:math:`A = \sqrt{2/\pi}/D` and :math:`B = \sqrt{2/\pi}\,q/D`. Everything is computed in the
canonical frame (the interval mirrored so that its midpoint is :math:`\ge 0`), where
:math:`\partial K/\partial\mu` changes sign with the mirror.

The forward pass is the accurate value with no autograd graph; the backward pass a few dozen
element-wise operations on the units, instead of the replay of every branch's formulas. On the
CPU the native kernel (:mod:`pyro_sbp._native`, ``tn_kl_uniform``) computes the value and both
derivatives with the same formulas in one operator call, each element taking its own form; the
backward pass is then ``grad`` times them, summed to the parameters' shapes.
"""

import math

import torch
from torch import Tensor

from pyro_sbp import _native
from pyro_sbp.distributions import _standard

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _standardised(loc, scale, low, high):
    return (low - loc) / scale, (high - loc) / scale, (high - low) / scale


class _KLToUniform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loc, scale, low, high):
        alpha, beta, width = _standardised(loc, scale, low, high)
        entropy = _standard.moments(alpha, beta, width, need_var=False).entropy
        ctx.save_for_backward(loc, scale, low, high)
        return _standard.kl_to_uniform(alpha, beta, entropy, width)

    @staticmethod
    def backward(ctx, grad):
        loc, scale, low, high = ctx.saved_tensors
        d_loc, d_scale = kl_derivatives(loc, scale, low, high)
        grad_loc = (grad * d_loc).sum_to_size(loc.shape) if ctx.needs_input_grad[0] else None
        grad_scale = (grad * d_scale).sum_to_size(scale.shape) if ctx.needs_input_grad[1] else None
        return grad_loc, grad_scale, None, None


def _straddle_terms(al, be, width):
    # Canonical alpha <= 0 <= beta: A, B and the Y's as written (no cancellation).
    al = _standard._nonpositive(al)
    z = _standard._straddle_z(al, be)
    a = _standard._normal_pdf(al) / z
    b = _standard._normal_pdf(be) / z
    t = al * a - be * b
    return a, b, t - al * al - 1.0, be * be + 1.0 - t


def _tail_terms(al, be, width):
    _, d, ea, q_eb, w = _standard._tail_log_zhat(al, be, width)
    ua = _standard.mills_gap_complement(al, _standard.mills_gap(al))
    ub = _standard.mills_gap_complement(be, _standard.mills_gap(be))
    w2 = 2.0 * w  # (beta - alpha)(beta + alpha)
    x = (ea * ua - q_eb * (ub - w2)) / d
    a = _SQRT_2_OVER_PI / d
    b = _SQRT_2_OVER_PI * torch.exp(-w) / d
    return a, b, -x, w2 + x


def _flat_halves(al, width):
    """``(Cov(xi, xi^2) / 2, Var(xi^2) / 2)`` of the nearly flat canonical interval, by the KL's
    quadrature, with xi^2 - E[xi^2] = 2 m h (v - E v) + h^2 (v^2 - E v^2)."""
    m, h, v, wts, g, big_l = _standard._flat_quadrature(al, width)
    p = torch.exp(g - big_l) * wts
    ev = (p * v).sum(-1, keepdim=True)
    ev2 = (p * v * v).sum(-1, keepdim=True)
    m, h = m.unsqueeze(-1), h.unsqueeze(-1)
    dv = v - ev
    dsq = 2.0 * m * h * dv + h * h * (v * v - ev2)
    cov = (p * h * dv * dsq).sum(-1)
    var = (p * dsq * dsq).sum(-1)
    return 0.5 * cov, 0.5 * var


def kl_derivatives(loc, scale, low, high) -> tuple[Tensor, Tensor]:
    """``(dK/dloc, dK/dscale)`` of ``K = KL(N_[low, high](loc, scale^2) || U[low, high])``."""
    alpha, beta, width = _standardised(loc, scale, low, high)
    c = _standard.canonical(alpha, beta, width)
    al, be, wd = c.alpha, c.beta, c.width
    tail = c.tail
    flat = _standard._is_flat(al, be, wd)
    dense = _standard._dense(tail)
    # Each form on its own elements, stand-in bounds elsewhere (as _standard._overlay).
    a, b, y1, y2 = _straddle_terms(
        torch.where(tail | flat, _standard._SAFE_STRADDLE[0], al),
        torch.where(tail | flat, _standard._SAFE_STRADDLE[1], be),
        torch.where(tail | flat, _standard._SAFE_STRADDLE[2], wd),
    )
    if dense or bool(tail.any()):
        ta, tb, ty1, ty2 = _tail_terms(
            torch.where(tail, al, _standard._SAFE_TAIL[0]),
            torch.where(tail, be, _standard._SAFE_TAIL[1]),
            torch.where(tail, wd, _standard._SAFE_TAIL[2]),
        )
        a, b = torch.where(tail, ta, a), torch.where(tail, tb, b)
        y1, y2 = torch.where(tail, ty1, y1), torch.where(tail, ty2, y2)
    # Cov(xi_c, xi_c^2) / 2 and Var(xi_c^2) / 2, in the canonical frame.
    half_cov = -0.5 * (a * y1 + b * y2)
    half_var = 1.0 - 0.5 * (al * a * y1 + be * b * y2)
    if dense or bool(flat.any()):
        fc, fv = _flat_halves(
            torch.where(flat, al, _standard._SAFE_FLAT[0]),
            torch.where(flat, wd, _standard._SAFE_FLAT[2]),
        )
        half_cov, half_var = torch.where(flat, fc, half_cov), torch.where(flat, fv, half_var)
    return -c.sign * half_cov / scale, -half_var / scale


class _NativeKLToInterval(torch.autograd.Function):
    """The value and derivatives of :func:`kl_to_interval` by the native kernel, in one call;
    the backward pass is ``grad`` times the derivatives, summed to the parameters' shapes."""

    @staticmethod
    def forward(ctx, loc, scale, low, high, q_low, q_high):
        kl, d_loc, d_scale = _native.ops().tn_kl_uniform(loc, scale, low, high, q_low, q_high, True)
        ctx.save_for_backward(d_loc, d_scale)
        ctx.shapes = loc.shape, scale.shape
        return kl

    @staticmethod
    def backward(ctx, grad):
        d_loc, d_scale = ctx.saved_tensors
        grad_loc = (grad * d_loc).sum_to_size(ctx.shapes[0]) if ctx.needs_input_grad[0] else None
        grad_scale = (
            (grad * d_scale).sum_to_size(ctx.shapes[1]) if ctx.needs_input_grad[1] else None
        )
        return grad_loc, grad_scale, None, None, None, None


def native_applies(loc, scale, low, high, q_low, q_high) -> bool:
    """Whether :func:`kl_to_interval` takes the native kernel: CPU tensors of one floating dtype
    (:func:`pyro_sbp._native.usable`) and no gradient asked of a bound (the kernel gives the
    bounds none)."""
    bounds_grad = torch.is_grad_enabled() and (
        low.requires_grad or high.requires_grad or q_low.requires_grad or q_high.requires_grad
    )
    return not bounds_grad and _native.usable(loc, scale, low, high, q_low, q_high)


def kl_to_interval(loc, scale, low, high, q_low, q_high) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N_{[low, high]}(loc, scale^2) \,\|\, U[q_low, q_high])` by
    the native kernel (:func:`native_applies` must hold): :math:`K(\alpha, \beta) +
    \log\frac{q_{high} - q_{low}}{high - low}` clamped at zero, ``inf`` where ``[low, high]`` is
    not inside ``[q_low, q_high]``, of the parameters' broadcast shape; differentiable in ``loc``
    and ``scale`` (module docstring), the derivatives computed only when a gradient is needed."""
    if torch.is_grad_enabled() and (loc.requires_grad or scale.requires_grad):
        return _NativeKLToInterval.apply(loc, scale, low, high, q_low, q_high)
    return _native.ops().tn_kl_uniform(loc, scale, low, high, q_low, q_high, False)[0]


def kl_to_uniform(loc, scale, low, high) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N_{[low, high]}(loc, scale^2) \,\|\, U[low, high])`, its
    gradient in ``loc`` and ``scale`` analytic (module docstring); the bounds get none. By the
    native kernel where it applies (the uniform on the same interval: the log ratio is 0), else
    by the PyTorch operators."""
    if native_applies(loc, scale, low, high, low, high):
        return kl_to_interval(loc, scale, low, high, low, high)
    return _KLToUniform.apply(loc, scale, low, high)
