r"""Bayesian Model Reduction for the group horseshoe: the :math:`\Delta F` of removing a group.

**The reduced model.** Under the group horseshoe a group's scale is :math:`z_g = s\,\tilde z_g`
with the local scale :math:`\tilde z_g = \sqrt{a_g b_g} \sim \mathcal C^+(0, 1)`,
:math:`a_g \sim \mathrm{Gamma}(\frac12, 1)`, :math:`b_g \sim \mathrm{InvGamma}(\frac12, 1)`, and
the posterior factors :math:`q(\log a_g) = \mathcal N(m_a, s_a^2)`,
:math:`q(\log b_g) = \mathcal N(m_b, s_b^2)`. The prior is proper, so Bayesian Model Reduction
(Friston et al.; the BMRS paper's criterion) applies: for a reduced prior :math:`\tilde p`,

.. math::

    \Delta F = \log \mathbb E_q\!\left[\frac{\tilde p(\theta)}{p(\theta)}\right],

and the group goes iff :math:`\Delta F \ge 0` (the reduced model has at least the evidence of
the full one).

*Exactly* :math:`z_g = 0` is the reduced prior :math:`\tilde p = \delta_0(\tilde z_g)`, for
which :math:`\Delta F = \log q(\tilde z_g = 0) - \log p(\tilde z_g = 0)` (the Savage-Dickey
ratio). The half-Cauchy density at 0 is :math:`2/\pi`, but a log-normal posterior has density 0
there: :math:`\Delta F = -\infty` for every posterior, whatever the data say. So "off" needs a
tolerance, as BMRS_U's precision :math:`2^{-p}` gives one for SBP's gates: the reduced prior is
the horseshoe *truncated* to local scales below :math:`c = 2^{-p}`,

.. math::

    \tilde p(a, b) = \frac{p(a, b)\, \mathbb 1[a b \le c^2]}{P_p(a b \le c^2)},

whose limit as :math:`c \to 0` is :math:`\delta_0`. For any truncation of the prior to a set
:math:`A`, :math:`\tilde p / p = \mathbb 1_A / P_p(A)`, so

.. math::

    \Delta F = \log q(A) - \log p(A).

Both terms are closed-form. Under :math:`q`, :math:`\log(a b) \sim \mathcal N(m_a + m_b,
s_a^2 + s_b^2)` (mean-field), so :math:`\log q(A) = \log\Phi\big((2\log c - m_a - m_b) /
\sqrt{s_a^2 + s_b^2}\big)` (``log_ndtr``: accurate far into the tail). Under :math:`p`,
:math:`\sqrt{ab}` is half-Cauchy, so :math:`p(A) = P(\tilde z \le c) = \frac{2}{\pi}\arctan c`.
Hence

.. math::

    \Delta F_g(c) = \log\Phi\!\left(\frac{2\log c - m_a - m_b}{\sqrt{s_a^2 + s_b^2}}\right)
        - \log\!\left(\frac{2}{\pi}\arctan c\right).

It lies in :math:`(-\infty, -\log(\frac2\pi\arctan c)]`; a group whose local scale has
collapsed well below :math:`c` gets :math:`\approx -\log(\frac2\pi \arctan c) > 0` (removed),
one that is clearly above :math:`c` a large negative value (kept), and a posterior equal to
the prior (if it could be) :math:`0`. The local scale :math:`\tilde z_g` is dimensionless: it
is the group's scale relative to the layer's global scale :math:`s`, which all groups of the
layer share (and which the reduction of one group leaves untouched). As :math:`c \to 0`,
:math:`\Delta F_g(c) \to -\infty` for every posterior (the :math:`\delta_0` limit above).

``tests/reduction/test_bc_delta_f.py`` checks :math:`\Delta F` against the expectation
:math:`\log\mathbb E_q[\tilde p / p]` integrated numerically (scipy), with
:math:`P_p(A)` integrated over the gamma and inverse-gamma densities.
"""

import math

import torch
from torch import Tensor

#: The default precision p: the local scale is "off" below 2^-4 (BMRS_U-4's choice for gates).
DEFAULT_PRECISION = 4.0


def check_precision(precision: object) -> float:
    """ValueError unless ``precision`` is a positive finite number (bits)."""
    number = isinstance(precision, int | float) and not isinstance(precision, bool)
    if not (number and math.isfinite(precision) and precision > 0):
        raise ValueError(f"the precision p (c = 2^-p) must be a positive number, got {precision!r}")
    return float(precision)


def delta_f_horseshoe(
    loc_a: Tensor,
    scale_a: Tensor,
    loc_b: Tensor,
    scale_b: Tensor,
    precision: float = DEFAULT_PRECISION,
) -> Tensor:
    r""":math:`\Delta F` of truncating a group's local horseshoe scale below
    :math:`c = 2^{-p}` (the module's derivation):

    .. math::

        \Delta F = \log\Phi\!\left(\frac{2\log c - m_a - m_b}{\sqrt{s_a^2 + s_b^2}}\right)
            - \log\!\left(\frac{2}{\pi}\arctan c\right).

    **References**

    [1] Louizos, Ullrich, Welling, *Bayesian Compression for Deep Learning*, NeurIPS 2017
        (Section 3.2).
    [2] Wright, Igel, Selvan, *BMRS: Bayesian Model Reduction for Structured Pruning*,
        NeurIPS 2024 (BMRS_U).

    :param loc_a: :math:`m_a`, the mean of :math:`\log a` under :math:`q`.
    :param scale_a: :math:`s_a`.
    :param loc_b: :math:`m_b`, the mean of :math:`\log b`.
    :param scale_b: :math:`s_b`.
    :param float precision: :math:`p` (bits; :math:`c = 2^{-p}`).
    :return: :math:`\Delta F` per group (a group goes iff it is :math:`\ge 0`).
    """
    p = check_precision(precision)
    log_c = -p * math.log(2.0)
    loc = loc_a + loc_b
    scale = torch.sqrt(scale_a.square() + scale_b.square())
    log_q = torch.special.log_ndtr((2.0 * log_c - loc) / scale)
    log_p = math.log(2.0 / math.pi * math.atan(math.exp(log_c)))
    return log_q - log_p


def delta_f_layer(layer, precision: float = DEFAULT_PRECISION) -> Tensor:
    """:func:`delta_f_horseshoe` of every group of a horseshoe layer
    (:class:`~pyro_sbp.models.bayesian_compression.BCLinear` / ``BCConv2d`` with
    ``prior="ghs"``).

    :raises ValueError: for a normal-Jeffreys layer (an improper prior: no Delta F).
    """
    if layer.prior_name != "ghs":
        raise ValueError(
            "Delta F needs a proper prior: the group normal-Jeffreys prior is improper"
        )
    return delta_f_horseshoe(
        layer.z_a_loc,
        layer.z_a_log_scale.exp(),
        layer.z_b_loc,
        layer.z_b_log_scale.exp(),
        precision,
    )
