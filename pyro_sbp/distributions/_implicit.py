r"""Reparameterised samples of the truncated normal with an implicit (analytic) backward.

A sample :math:`x = \mu + \sigma\xi` of :math:`\mathcal N_{[a, b]}(\mu, \sigma^2)` is the
quantile at a uniform :math:`u`: :math:`F(\xi; \alpha, \beta) = u` with
:math:`\alpha = (a - \mu)/\sigma` and :math:`\beta = (b - \mu)/\sigma`. Holding :math:`u` fixed,
the implicit function theorem gives its derivatives without differentiating the sampler's steps
(the ``ndtri`` of the straddling case, the Newton iterations of the tail):

.. math::

    G_\alpha = \frac{\partial \xi}{\partial \alpha}
        = (1 - u)\frac{\phi(\alpha)}{\phi(\xi)}, \qquad
    G_\beta = \frac{\partial \xi}{\partial \beta} = u\,\frac{\phi(\beta)}{\phi(\xi)},

    \frac{\partial x}{\partial \mu} = 1 - G_\alpha - G_\beta, \qquad
    \frac{\partial x}{\partial \sigma} = \xi - \alpha G_\alpha - \beta G_\beta,

in the canonical frame of :mod:`pyro_sbp.distributions._standard` (the interval mirrored so that
its midpoint is :math:`\ge 0`, where :math:`\partial x / \partial\sigma` changes sign with the
mirror and :math:`\partial x / \partial\mu` does not). The ratios of densities are taken as one
``exp`` of a factored exponent, :math:`\phi(\alpha)/\phi(\xi) = e^{(\xi - \alpha)(\xi +
\alpha)/2}`, times :math:`\log u` inside it, so that nothing overflows. In the tail
(:math:`0 < \alpha`) the terms :math:`1 - G_\alpha - G_\beta` cancel as the sample closes on the
bound; there the derivatives of the excess :math:`z = \xi - \alpha` are used instead. With
:math:`r(y) = \phi(y)/\Phi(-y) = y + d(y)` (:func:`~pyro_sbp.distributions._standard.mills_gap`
:math:`d`), :math:`\rho = \Phi(-\beta)/\Phi(-\alpha)` and :math:`p = 1 - u + u\rho` (the sample
solves :math:`\Phi(-\alpha - z) = p\,\Phi(-\alpha)`):

.. math::

    \frac{\partial z}{\partial \alpha} = \frac{-z + d(\alpha) - d(\alpha + z)
        - u\rho\, r(\alpha)/p}{r(\alpha + z)}, \qquad
    \frac{\partial z}{\partial \beta} = \frac{u\rho\, r(\beta)}{p\, r(\alpha + z)},

    \frac{\partial x}{\partial \mu} = -\Big(\frac{\partial z}{\partial \alpha}
        + \frac{\partial z}{\partial \beta}\Big), \qquad
    \frac{\partial x}{\partial \sigma} = z - \alpha \frac{\partial z}{\partial \alpha}
        - \beta \frac{\partial z}{\partial \beta},

where the difference of the Mills ratios is that of their small gaps and
:math:`r(\alpha) - r(\beta) = -(\beta - \alpha) + d(\alpha) - d(\beta)` uses the exact width.

The forward pass runs the accurate sampler of :mod:`~pyro_sbp.distributions._standard` with no
autograd graph, and the backward pass is a dozen element-wise operations: an SVI step no longer
records, stores and replays the sampler's every operation. Everything that depends on the
parameters alone (the mirror, the branch, the normalisers) is computed on the compact
parameters, once per unit.
"""

import math

import torch
from torch import Tensor

from pyro_sbp import _native
from pyro_sbp.distributions import _standard

_SQRT1_2 = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gap_from_erfcx(y: Tensor, ey: Tensor) -> tuple[Tensor, Tensor]:
    """``(r(y), d(y))`` for ``y >= 0`` given ``ey = erfcx(y / sqrt 2)``: the inverse Mills ratio
    and its gap, the gap by its series where ``r - y`` would cancel."""
    r = _SQRT_2_OVER_PI / ey
    threshold = _standard._series_threshold(y.dtype)
    inv = torch.where(y < threshold, threshold, y).reciprocal()
    series = inv * _standard._gap_series(inv * inv, 0, 4)
    return r, torch.where(y < threshold, r - y, series)


def _standardised(loc, scale, low, high):
    alpha = (low - loc) / scale
    beta = (high - loc) / scale
    width = (high - low) / scale
    center = torch.minimum(torch.maximum(loc, low), high)
    return alpha, beta, width, center


class _RSample(torch.autograd.Function):
    """``x`` at uniforms ``u`` (or ``exp(x)`` clamped to ``exp_bounds = (exp(low), exp(high))``);
    see the module docstring."""

    @staticmethod
    def forward(ctx, loc, scale, low, high, u, exp_bounds):
        alpha, beta, width, center = _standardised(loc, scale, low, high)
        ubar = 1.0 - u
        # exact_quantile=False: the mirrored elements take the quantile at 1 - u, so that in the
        # canonical frame every sample has CDF value u. The canonical offset from
        # s_c = max(alpha_c, 0) is the standardised sample xi_c where the unit straddles
        # (s_c = 0), the excess z = xi_c - alpha_c in the tail (kept apart: alpha_c + z would
        # round z away).
        off, c = _standard.sample_offset(
            alpha, beta, u, ubar, width, exact_quantile=False, canonical_frame=True
        )
        x = torch.minimum(torch.maximum(center + scale * (c.sign * off), low), high)
        if exp_bounds is None:
            out = x
        else:
            # exp(log low) can round one ulp below low: clamped (the gradient is exp's).
            out = torch.minimum(torch.maximum(x.exp(), exp_bounds[0]), exp_bounds[1])
        # The canonical bounds (compact: one per unit) and the samples' offsets and CDF values.
        ctx.save_for_backward(c.alpha, c.beta, c.width, c.sign, c.tail, u, ubar, off, out)
        ctx.log_space = exp_bounds is not None
        ctx.shapes = loc.shape, scale.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        al, be, wd, sign, tail, u, ubar, off, out = ctx.saved_tensors
        c = _standard.Canonical(al, be, wd, sign, tail)
        dx_dloc, dx_dscale = _sample_derivatives(c, u, ubar, off)
        if ctx.log_space:
            grad = grad * out
        grad_loc = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_loc = (grad * dx_dloc).sum_to_size(ctx.shapes[0])
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * dx_dscale).sum_to_size(ctx.shapes[1])
        return grad_loc, grad_scale, None, None, None, None


def _sample_derivatives(c: _standard.Canonical, u, ubar, off) -> tuple[Tensor, Tensor]:
    """``(dx/dloc, dx/dscale)`` of the samples at canonical CDF values ``u`` (``ubar = 1 - u``)
    whose canonical offsets (from ``max(alpha_c, 0)``) are ``off``, for the canonical bounds
    ``c``."""
    al, be = c.alpha, c.beta
    xi = off
    # The general form: G_alpha = (1 - u) phi(alpha) / phi(xi), G_beta = u phi(beta) / phi(xi),
    # each as one exp of a factored exponent (log 0 = -inf gives 0, never nan: u in (0, 1)).
    g_alpha = torch.exp(torch.log(ubar) + 0.5 * (xi - al) * (xi + al))
    g_beta = torch.exp(torch.log(u) - 0.5 * (be - xi) * (be + xi))
    d_loc = 1.0 - g_alpha - g_beta
    d_scale = xi - al * g_alpha - be * g_beta
    tail = c.tail
    # As the sampler takes its branches (_standard.DENSE_BRANCHES): on the CPU the tail form
    # runs only when a unit needs it.
    if not _standard._dense(tail) and not bool(tail.any()):
        return d_loc, c.sign * d_scale
    # The tail (0 < alpha_c), in terms of the excess z = xi - alpha on stand-in tail bounds
    # where the unit straddles (its values are discarded there).
    ta = torch.where(tail, al, _standard._SAFE_TAIL[0])
    tb = torch.where(tail, be, _standard._SAFE_TAIL[1])
    tw = torch.where(tail, c.width, _standard._SAFE_TAIL[2])
    _, _, ea, q_eb, _ = _standard._tail_log_zhat(ta, tb, tw)
    rho = q_eb / ea
    r_a, d_a = _gap_from_erfcx(ta, ea)
    r_b, d_b = _gap_from_erfcx(tb, _standard.erfcx(tb * _SQRT1_2))
    z = torch.where(tail, off, 0.5).clamp(min=0.0)
    y = ta + z
    r_y, d_y = _gap_from_erfcx(y, _standard.erfcx(y * _SQRT1_2))
    w = u * rho / (ubar + u * rho)
    dz_da = (-z + d_a - d_y - w * r_a) / r_y
    dz_db = w * r_b / r_y
    # -(dz/da + dz/db), with r(alpha) - r(beta) = -(beta - alpha) + d(alpha) - d(beta).
    tail_loc = (z - d_a + d_y + w * (d_a - d_b - tw)) / r_y
    tail_scale = z - ta * dz_da - tb * dz_db
    d_loc = torch.where(tail, tail_loc, d_loc)
    d_scale = c.sign * torch.where(tail, tail_scale, d_scale)
    return d_loc, d_scale


def _unit_shape(u_shape: torch.Size, *params: Tensor) -> torch.Size:
    # The trailing block of the samples' shape that the compact parameters span (their units;
    # pyro_sbp/_native/layout.h maps them the same way).
    k = 0
    for p in params:
        lead = 0
        while lead < p.dim() and p.shape[lead] == 1:
            lead += 1
        k = max(k, p.dim() - lead)
    return u_shape[len(u_shape) - k :]


def _reduce_to(g: Tensor, unit_shape: torch.Size, shape: torch.Size) -> Tensor:
    """The per-unit gradient ``g`` (flat, one value per unit) summed to a parameter's shape."""
    if g.shape == shape:
        return g
    g = g.view(unit_shape)
    if g.shape == shape:
        return g
    if g.numel() == shape.numel():
        return g.reshape(shape)
    return g.sum_to_size(shape) if len(shape) >= g.dim() else g.sum_to_size(shape[-g.dim() :])


class _NativeRSample(torch.autograd.Function):
    """The same samples and derivatives as :class:`_RSample`, by the native kernel
    (:mod:`pyro_sbp._native`): the forward pass returns the samples and, when a gradient is
    needed, their derivatives in ``loc`` and ``scale``, in one call; the backward pass sums
    ``grad`` times them per unit, in another."""

    @staticmethod
    def forward(ctx, loc, scale, low, high, exp_low, exp_high, u, log_space, need_grad):
        out, d_loc, d_scale = _native.ops().tn_rsample(
            loc, scale, low, high, exp_low, exp_high, u, log_space, need_grad
        )
        if need_grad:
            ctx.save_for_backward(d_loc, d_scale)
            ctx.unit_shape = _unit_shape(u.shape, loc, scale, low, high, exp_low, exp_high)
            ctx.shapes = loc.shape, scale.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        d_loc, d_scale = ctx.saved_tensors
        units = ctx.unit_shape.numel()
        g_loc, g_scale = _native.ops().tn_unit_grads(grad, d_loc, d_scale, units)
        grad_loc = _reduce_to(g_loc, ctx.unit_shape, ctx.shapes[0])
        grad_scale = _reduce_to(g_scale, ctx.unit_shape, ctx.shapes[1])
        return grad_loc, grad_scale, None, None, None, None, None, None, None


def rsample(loc, scale, low, high, u, exp_bounds: tuple[Tensor, Tensor] | None = None) -> Tensor:
    r"""Samples of :math:`\mathcal N_{[low, high]}(loc, scale^2)` at the uniforms ``u``, or, with
    ``exp_bounds = (exp(low), exp(high))``, their ``exp`` (the truncated log-normal's samples),
    differentiable in ``loc`` and ``scale`` by the implicit reparameterisation (module
    docstring). ``loc``, ``scale``, ``low`` and ``high`` may be compact (broadcastable to
    ``u``); the bounds get no gradient. ``u`` is clamped into ``[tiny, 1 - eps/2]`` here.

    On the CPU the native kernel (:mod:`pyro_sbp._native`) computes the samples and their
    derivatives; elsewhere the PyTorch operators of :class:`_RSample` do, with the same
    formulas."""
    e_low, e_high = (low, high) if exp_bounds is None else exp_bounds
    if u.is_contiguous() and _native.usable(u, loc, scale, low, high, e_low, e_high):
        need_grad = torch.is_grad_enabled() and (loc.requires_grad or scale.requires_grad)
        return _NativeRSample.apply(
            loc, scale, low, high, e_low, e_high, u, exp_bounds is not None, need_grad
        )
    finfo = torch.finfo(u.dtype)
    u = u.clamp(finfo.tiny, 1.0 - finfo.eps / 2)
    return _RSample.apply(loc, scale, low, high, u, exp_bounds)
