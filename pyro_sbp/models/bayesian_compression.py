r"""Bayesian Compression (Louizos, Ullrich, Welling 2017) as a Pyro model and guide.

Every ``nn.Linear`` and ``nn.Conv2d`` layer (the classifier's included) gets a scale
:math:`z_g` per *group*: an input feature of a ``Linear``, an output channel of a ``Conv2d``
(as the paper has them). The weights are :math:`w = z\,\tilde w` with

.. math::

    p(\tilde w) = \mathcal N(0, 1), \qquad
    q(\tilde w) = \mathcal N(\mu_w, \sigma_w^2)
    \quad\Longleftrightarrow\quad
    p(w \mid z) = \mathcal N(0, z^2), \qquad q(w \mid z) = \mathcal N(z\mu_w, z^2\sigma_w^2),

so that :math:`\mathrm{KL}(q(w \mid z) \| p(w \mid z)) = \mathrm{KL}(\mathcal N(\mu_w,
\sigma_w^2) \| \mathcal N(0, 1))` whatever :math:`z` (BC Eq. 8, as the tutorial code cites it),
and two priors on :math:`z`:

* **group normal-Jeffreys** (``prior="gnj"``, BC Section 3.1): :math:`p(z) \propto 1/|z|`,
  :math:`q(z) = \mathcal N(\mu_z, \sigma_z^2)`; its KL is the Sparse VD approximation at
  :math:`\log\alpha_z = \log\sigma_z^2 - \log\mu_z^2`
  (:class:`~pyro_sbp.distributions.SparseVDNormal` against
  :class:`~pyro_sbp.distributions.Jeffreys`).
* **group horseshoe** (``prior="ghs"``, BC Section 3.2): :math:`z_g = s\,\tilde z_g` with a
  layer-wide :math:`s \sim \mathcal C^+(0, \tau_0)` and :math:`\tilde z_g \sim \mathcal C^+(0,
  1)`, each half-Cauchy written as :math:`\sqrt{a b}` with :math:`a \sim \mathrm{Gamma}(\frac12,
  1/\tau^2)`, :math:`b \sim \mathrm{InvGamma}(\frac12, 1)`
  (:func:`~pyro_sbp.distributions.half_cauchy_factors`): the sites ``s_a``, ``s_b`` (one each
  per layer) and ``z_a``, ``z_b`` (one per group), each with a log-normal posterior and a
  closed-form KL. Then :math:`\log z_g = \frac12(\log s_a + \log s_b + \log a_g + \log b_g)` is
  normal under :math:`q`, i.e. :math:`q(z)` is *log-normal* (not the normal of the GNJ
  layers), with :math:`\alpha_z = \mathrm{Var}[z] / \mathbb E[z]^2 = e^{v} - 1`, :math:`v` the
  variance of :math:`\log z`.

A group is removed when :math:`\log\alpha_z` passes a threshold (the papers' about -3: the
tutorial code, KarenUllrich/Tutorial_BayesianCompressionForDL ``example.py``, keeps a group
iff :math:`\log\alpha_z <` -2.8, -3 and -5 for LeNet-300-100's three layers), and, for the
horseshoe, by Bayesian Model Reduction (:func:`~pyro_sbp.reduction.bayesian_compression.
delta_f_horseshoe`). A kept weight's posterior mean and variance (the
tutorial's ``compute_posterior_params``):

.. math::

    \mathbb E[w] = \mathbb E[z]\mu_w, \qquad
    \mathrm{Var}[w] = \mathbb E[z^2]\sigma_w^2 + \mathrm{Var}[z]\mu_w^2
    \;\big(= \mu_z^2\sigma_w^2 + \sigma_z^2\mu_w^2 + \sigma_z^2\sigma_w^2 \text{ for GNJ}\big).

**Local reparameterisation.** In training each example draws its own :math:`z` (a site in the
data plate, whose KL is scaled by :math:`1/N` so that it counts once, as SBP's gates) and the
layer samples its pre-activations given :math:`z`: for a ``Linear`` with
:math:`x' = x \odot z`, mean :math:`x'\mu_w^\top + b` and variance :math:`x'^2
(\sigma_w^2)^\top`; for a ``Conv2d``, :math:`z_c (x * \mu_w)_c + b_c` with variance
:math:`z_c^2 (x^2 * \sigma_w^2)_c`. The weight sites ``"<layer>.w"`` are still sampled by the
guide (their KL is what the ELBO needs) but not used by the forward pass: the expected
likelihood is the same, with a lower-variance gradient (as
:mod:`pyro_sbp.models.sparse_vd` does). Biases are point estimates.

In evaluation a layer computes with :math:`\mathbb E[w]` of its kept groups (a removed
``Conv2d`` channel outputs exactly zero, its bias included, as an SBP gate's mask makes it).

**References**

[1] Louizos, Ullrich, Welling, *Bayesian Compression for Deep Learning*, NeurIPS 2017.
[2] Kingma, Salimans, Welling, *Variational Dropout and the Local Reparameterization Trick*,
    NeurIPS 2015.
[3] Molchanov, Ashukha, Vetrov, *Variational Dropout Sparsifies Deep Neural Networks*, ICML
    2017 (Eq. 14).
"""

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn

from pyro_sbp.distributions import Jeffreys, SparseVDNormal, half_cauchy_factors
from pyro_sbp.distributions.sparse_vd import LOG_ALPHA_MAX, LOG_ALPHA_MIN, THETA2_EPS
from pyro_sbp.methods import LayerMasksMethod, register_method
from pyro_sbp.models.sbp_model import check_input, check_kl_weight, data_indices

#: The two priors on the group scales.
PRIORS = ("gnj", "ghs")
#: The papers' threshold: a group is removed when its log alpha_z is at least this.
DEFAULT_THRESHOLD = -3.0
#: The tutorial's initial log sigma^2 of the weights and of z, and the mean of z.
DEFAULT_INIT_LOG_SIGMA2 = -9.0
#: The initial log scale of the horseshoe's log-normal factors (on log a, log b).
DEFAULT_INIT_LOG_SCALE = -5.0
#: The global half-Cauchy scale tau_0 of the horseshoe.
DEFAULT_TAU0 = 1.0
#: Added to the pre-activations' variance before the square root.
_VAR_EPS = 1e-8


def check_threshold(threshold: object) -> float:
    """ValueError unless ``threshold`` is a number in [-10, 10] (log alpha_z is clipped
    there, so a threshold outside would keep or remove every group whatever the posterior)."""
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if not (number and LOG_ALPHA_MIN <= threshold <= LOG_ALPHA_MAX):
        raise ValueError(
            f"the log alpha_z threshold must be a number in [{LOG_ALPHA_MIN:g}, "
            f"{LOG_ALPHA_MAX:g}], got {threshold!r}"
        )
    return float(threshold)


def check_prior(prior: object) -> str:
    if prior not in PRIORS:
        raise ValueError(f"unknown Bayesian Compression prior {prior!r}; priors: {PRIORS}")
    return prior


class _BCMixin:
    """What the two layers share: the group scales' variational parameters and sites, the
    group ``mask``, the posterior moments, and the noisy / deterministic forward pass."""

    #: The axis of the weight that a group indexes (set by the subclasses).
    group_axis: int

    def _init_bc(self, prior: str, init_log_sigma2: float, tau0: float, init_log_scale):
        self.prior_name = check_prior(prior)
        groups = self.weight.shape[self.group_axis]
        self.num_groups = int(groups)
        self.weight_log_sigma2 = nn.Parameter(torch.full_like(self.weight, init_log_sigma2))
        ref = self.weight.detach()
        if prior == "gnj":
            # The tutorial's initialisation: z ~ N(1, 1e-2^2), log sigma_z^2 = -9.
            self.z_loc = nn.Parameter(1.0 + 1e-2 * torch.randn(groups).to(ref))
            self.z_log_sigma2 = nn.Parameter(torch.full((groups,), init_log_sigma2).to(ref))
        else:
            if not (math.isfinite(tau0) and tau0 > 0):
                raise ValueError(f"tau0 must be a positive number, got {tau0!r}")
            self.tau0 = float(tau0)
            for site, n in (("s_a", 1), ("s_b", 1), ("z_a", groups), ("z_b", groups)):
                # log x ~ N(loc, scale^2); loc 0 everywhere starts at z = 1.
                setattr(self, f"{site}_loc", nn.Parameter(torch.zeros(n).to(ref)))
                setattr(
                    self,
                    f"{site}_log_scale",
                    nn.Parameter(torch.full((n,), float(init_log_scale)).to(ref)),
                )
        self.register_buffer("mask", torch.ones(groups).to(ref))
        #: Noise on (SVI) or off (deterministic pretraining: w = mu_w, z = 1).
        self.stochastic = True
        #: The KL weight beta of this layer's sites (set by BCModel).
        self.kl_weight = 1.0
        # Set by BCModel around its call: the z sites are sampled (and replayed from the guide)
        # only inside the model; elsewhere a training forward pass draws z from q itself.
        self._in_model = False
        self.kl_scale = 1.0

    def pyro_context(self):
        """The layer's Pyro context: inside it, reading a parameter registers it in Pyro's
        param store (as the layer's own forward pass does). The guide builds the posteriors in
        it, so that SVI optimises the group scales' parameters, which only the guide reads."""
        context = getattr(self, "_pyro_context", None)
        return contextlib.nullcontext() if context is None else context

    # --- names ---------------------------------------------------------------------------

    @property
    def layer_name(self) -> str:
        return getattr(self, "_pyro_name", "")

    def _site(self, suffix: str) -> str:
        return f"{self.layer_name}.{suffix}" if self.layer_name else suffix

    @property
    def weight_site(self) -> str:
        """``"<layer>.w"``: the standardised weights :math:`\\tilde w`."""
        return self._site("w")

    @property
    def group_sites(self) -> list[str]:
        """The sites of the group scales: ``"<layer>.z"`` (GNJ) or ``"<layer>.s_a"``,
        ``".s_b"``, ``".z_a"``, ``".z_b"`` (GHS)."""
        if self.prior_name == "gnj":
            return [self._site("z")]
        return [self._site(s) for s in ("s_a", "s_b", "z_a", "z_b")]

    # --- distributions -------------------------------------------------------------------

    def weight_posterior(self) -> dist.Normal:
        return dist.Normal(self.weight, (0.5 * self.weight_log_sigma2).exp())

    def weight_prior(self) -> dist.Normal:
        zero = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
        return dist.Normal(zero, zero + 1.0).expand(self.weight.shape)

    def group_posteriors(self) -> dict[str, dist.TorchDistribution]:
        """:math:`q` of every group site (batch shapes ``(groups,)``, or ``(1,)`` for the
        horseshoe's ``s_a``, ``s_b``)."""
        if self.prior_name == "gnj":
            return {self._site("z"): SparseVDNormal(self.z_loc, self.z_log_sigma2)}
        return {
            self._site(s): dist.LogNormal(
                getattr(self, f"{s}_loc"), getattr(self, f"{s}_log_scale").exp()
            )
            for s in ("s_a", "s_b", "z_a", "z_b")
        }

    def group_priors(self) -> dict[str, dist.TorchDistribution]:
        ref = self.weight
        if self.prior_name == "gnj":
            zero = torch.zeros(self.num_groups, dtype=ref.dtype, device=ref.device)
            return {self._site("z"): Jeffreys(zero)}
        one = torch.ones(1, dtype=ref.dtype, device=ref.device)
        global_a, global_b = half_cauchy_factors(one * self.tau0)
        local_a, local_b = half_cauchy_factors(one)
        g = self.num_groups
        return {
            self._site("s_a"): global_a,
            self._site("s_b"): global_b,
            self._site("z_a"): local_a.expand([g]),
            self._site("z_b"): local_b.expand([g]),
        }

    def _z_from(self, values: dict[str, Tensor]) -> Tensor:
        if self.prior_name == "gnj":
            return values[self._site("z")]
        logs = [values[self._site(s)].log() for s in ("s_a", "s_b", "z_a", "z_b")]
        return (0.5 * (logs[0] + logs[1] + logs[2] + logs[3])).exp()

    def sample_z(self) -> Tensor:
        """A draw of :math:`z` (per example inside the model's data plate), times the mask."""
        if self._in_model:
            values = {}
            with poutine.scale(scale=self.kl_scale):
                for site, prior in self.group_priors().items():
                    values[site] = pyro.sample(site, prior.to_event(1))
        else:
            values = {site: q.rsample() for site, q in self.group_posteriors().items()}
        return self._z_from(values) * self.mask

    # --- posterior moments ---------------------------------------------------------------

    def _log_z_moments(self) -> tuple[Tensor, Tensor]:
        # GHS: log z = (log s_a + log s_b + log z_a + log z_b) / 2, a sum of independent normals.
        loc = 0.5 * (self.s_a_loc + self.s_b_loc + self.z_a_loc + self.z_b_loc)
        var = 0.25 * sum(
            getattr(self, f"{s}_log_scale").mul(2.0).exp() for s in ("s_a", "s_b", "z_a", "z_b")
        )
        return loc, var

    def z_moments(self) -> tuple[Tensor, Tensor]:
        r""":math:`(\mathbb E_q[z], \mathrm{Var}_q[z])` per group (the mask not applied)."""
        if self.prior_name == "gnj":
            q = SparseVDNormal(self.z_loc, self.z_log_sigma2)
            return q.mean, q.variance
        loc, var = self._log_z_moments()
        mean = (loc + 0.5 * var).exp()
        return mean, torch.expm1(var) * mean.square()

    def log_alpha(self) -> Tensor:
        r""":math:`\log\alpha_z = \log(\mathrm{Var}[z] / \mathbb E[z]^2)` per group, clipped to
        [-10, 10]: :math:`\log\sigma_z^2 - \log(\mu_z^2 + 10^{-8})` (GNJ, the tutorial's),
        :math:`\log(e^{v} - 1)` (GHS)."""
        if self.prior_name == "gnj":
            theta2 = self.z_loc.square() + THETA2_EPS
            raw = self.z_log_sigma2 - theta2.log()
        else:
            _, var = self._log_z_moments()
            raw = torch.log(torch.expm1(var))
        return raw.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def _group_shape(self) -> tuple[int, ...]:
        shape = [1] * self.weight.dim()
        shape[self.group_axis] = self.num_groups
        return tuple(shape)

    def posterior_weight_moments(self) -> tuple[Tensor, Tensor]:
        r"""Mean :math:`\mathbb E[z]\mu_w` and variance :math:`\mathbb E[z^2]\sigma_w^2 +
        \mathrm{Var}[z]\mu_w^2` of every weight, removed groups at zero."""
        mean_z, var_z = self.z_moments()
        mask = self.mask.reshape(self._group_shape())
        mean_z = mean_z.reshape(self._group_shape()) * mask
        var_z = var_z.reshape(self._group_shape()) * mask
        sigma2 = self.weight_log_sigma2.exp()
        mean = mean_z * self.weight
        var = (mean_z.square() + var_z) * sigma2 + var_z * self.weight.square()
        return mean, var

    def eval_weight(self) -> Tensor:
        """The weights of the network in evaluation: :math:`\\mathbb E[w]` of kept groups."""
        return self.posterior_weight_moments()[0]

    def eval_bias(self) -> Tensor | None:
        return self.bias


class BCLinear(_BCMixin, nn.Linear):
    r"""An ``nn.Linear`` with Bayesian Compression's scale :math:`z` per *input feature*:
    :math:`q(W_{:,g} \mid z_g) = \mathcal N(z_g\mu_{w,:,g}, z_g^2\sigma^2_{w,:,g})`, local
    reparameterisation in training, :math:`\mathbb E[w]` of the kept features in evaluation.
    ``weight`` is :math:`\mu_w`. Built by :func:`make_bayesian_compression`.
    """

    group_axis = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        prior: str = "gnj",
        init_log_sigma2: float = DEFAULT_INIT_LOG_SIGMA2,
        tau0: float = DEFAULT_TAU0,
        init_log_scale: float = DEFAULT_INIT_LOG_SCALE,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self._init_bc(prior, init_log_sigma2, tau0, init_log_scale)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs (batch, {self.in_features}), got "
                f"{tuple(x.shape)}"
            )
        if not self.training:
            return F.linear(x, self.eval_weight(), self.bias)
        if not self.stochastic:
            return F.linear(x * self.mask, self.weight, self.bias)
        xz = x * self.sample_z()
        mean = F.linear(xz, self.weight, self.bias)
        var = F.linear(xz.square(), self.weight_log_sigma2.exp())
        return mean + (var + _VAR_EPS).sqrt() * torch.randn_like(mean)


class BCConv2d(_BCMixin, nn.Conv2d):
    r"""An ``nn.Conv2d`` with Bayesian Compression's scale :math:`z` per *output channel*,
    local reparameterisation in training (:math:`z_c(x * \mu_w)_c + b_c`, variance
    :math:`z_c^2(x^2 * \sigma_w^2)_c`), :math:`\mathbb E[w]` of the kept channels in evaluation
    (a removed channel outputs exactly 0, its bias masked). Built by
    :func:`make_bayesian_compression` (zero padding only).
    """

    group_axis = 0

    def __init__(
        self,
        *args,
        prior: str = "gnj",
        init_log_sigma2: float = DEFAULT_INIT_LOG_SIGMA2,
        tau0: float = DEFAULT_TAU0,
        init_log_scale: float = DEFAULT_INIT_LOG_SCALE,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(
                f"Bayesian Compression convolutions need zero padding (the variance's "
                f"convolution pads with zeros), got padding_mode={self.padding_mode!r}"
            )
        if self.groups != 1:
            raise ValueError(f"grouped convolutions are not supported, got groups={self.groups}")
        self._init_bc(prior, init_log_sigma2, tau0, init_log_scale)

    def eval_bias(self) -> Tensor | None:
        return None if self.bias is None else self.bias * self.mask

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects inputs (batch, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}"
            )
        if not self.training:
            return self._conv(x, self.eval_weight(), self.eval_bias())
        mask = self.mask.reshape(1, -1, 1, 1)
        bias = None if self.bias is None else (self.bias * self.mask).reshape(1, -1, 1, 1)
        if not self.stochastic:
            out = self._conv(x, self.weight) * mask
            return out if bias is None else out + bias
        z = self.sample_z()
        z = z.reshape(-1 if z.dim() == 2 else 1, self.num_groups, 1, 1)
        mean = self._conv(x, self.weight) * z
        # The std is |z| sqrt(x^2 * sigma^2): a removed channel (z = 0) is exactly 0.
        std = self._conv(x.square(), self.weight_log_sigma2.exp()).add(_VAR_EPS).sqrt() * z.abs()
        out = mean + std * torch.randn_like(mean)
        return out if bias is None else out + bias


BC_LAYERS = (BCLinear, BCConv2d)


def _convert(m: nn.Module, prior: str, init_log_sigma2: float, tau0: float, init_log_scale):
    opts = dict(prior=prior, init_log_sigma2=init_log_sigma2, tau0=tau0)
    opts["init_log_scale"] = init_log_scale
    if isinstance(m, nn.Linear):
        new = BCLinear(m.in_features, m.out_features, bias=m.bias is not None, **opts)
    else:
        if m.padding_mode != "zeros":
            raise ValueError(
                f"Bayesian Compression convolutions need zero padding, got "
                f"padding_mode={m.padding_mode!r}"
            )
        new = BCConv2d(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
            **opts,
        )
    new = new.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        # mu_w starts at the layer's weights (z starts at 1): a pretrained network is kept.
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    return new


def make_bayesian_compression(
    net: nn.Module,
    prior: str = "gnj",
    layers: list[str] | None = None,
    *,
    init_log_sigma2: float = DEFAULT_INIT_LOG_SIGMA2,
    tau0: float = DEFAULT_TAU0,
    init_log_scale: float = DEFAULT_INIT_LOG_SCALE,
) -> nn.Module:
    """Give ``net``'s ``nn.Linear`` and ``nn.Conv2d`` layers Bayesian Compression's group
    scales, in place, in one call::

        net = make_bayesian_compression(build_network("lenet5-caffe"), prior="ghs")

    Every such layer (by default all, the classifier included: its input features are groups
    too) becomes a :class:`BCLinear` (a :math:`z` per input feature) or :class:`BCConv2d` (per
    output channel) whose ``weight`` is :math:`\\mu_w` (the layer's weights: :math:`z` starts
    at 1), with :math:`\\log\\sigma_w^2` = ``init_log_sigma2``. The network is converted to a
    :class:`~pyro.nn.PyroModule` tree, so its parameters are Pyro parameters named by their
    paths (``"features.0.z_loc"``); the sites are ``"<layer>.w"`` and ``"<layer>.z"`` (GNJ) or
    ``"<layer>.s_a"``, ``".s_b"``, ``".z_a"``, ``".z_b"`` (GHS).

    :param prior: ``"gnj"`` (group normal-Jeffreys) or ``"ghs"`` (group horseshoe).
    :param layers: names of the layers to convert (default: every Linear and Conv2d).
    :param float init_log_sigma2: initial :math:`\\log\\sigma^2` of the weights and (GNJ) of
        :math:`z` (the tutorial's -9).
    :param float tau0: the horseshoe's global scale :math:`\\tau_0`.
    :param float init_log_scale: initial log scale of the horseshoe's log-normal factors.
    :raises ValueError: for an unknown prior, a layer name that is not a Linear or Conv2d of
        ``net``, a network without one, or one that is already converted.
    """
    check_prior(prior)
    for name, value in (("init_log_sigma2", init_log_sigma2), ("init_log_scale", init_log_scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if any(isinstance(m, BC_LAYERS) for m in net.modules()):
        raise ValueError("the network already has Bayesian Compression layers")
    convertible = {
        name: m for name, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
    }
    if layers is None:
        names = list(convertible)
        if not names:
            raise ValueError("the network has no nn.Linear or nn.Conv2d layer to convert")
    else:
        names = list(layers)
        unknown = [n for n in names if n not in convertible]
        if unknown:
            raise ValueError(
                f"not nn.Linear/nn.Conv2d layers of the network: {unknown}; "
                f"layers: {list(convertible)}"
            )
    for name in names:
        if not name:
            raise ValueError("the network itself is a layer: wrap it in an nn.Sequential")
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        new = _convert(convertible[name], prior, init_log_sigma2, tau0, init_log_scale)
        setattr(parent, child, new)
    to_pyro_module_(net)
    return net


def named_bc_layers(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(layer name, layer)`` for every Bayesian Compression layer of ``net``, in order."""
    for name, m in net.named_modules():
        if isinstance(m, BC_LAYERS):
            yield name, m


def _layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    found = list(named_bc_layers(net))
    if not found:
        raise ValueError(
            "the network has no Bayesian Compression layers: call make_bayesian_compression"
        )
    return found


def set_stochastic(net: nn.Module, enabled: bool) -> None:
    """Switch the group and weight noise on (SVI) or off (deterministic pretraining)."""
    for _, layer in named_bc_layers(net):
        layer.stochastic = bool(enabled)


def set_kl_weight(net: nn.Module, kl_weight: float | Mapping[str, float]) -> dict[str, float]:
    """Give every layer its KL weight :math:`\\beta` (its weight and group sites share it):
    one number, or ``{layer name or one of its sites: beta}`` (layers left out keep 1).
    Returns it by layer.

    :raises ValueError: for a weight that is not a positive finite number, or an unknown layer.
    """
    layers = dict(_layers(net))
    if isinstance(kl_weight, Mapping):
        # A site name ("<layer>.w", "<layer>.z", ...) stands for its layer.
        of_site = {
            s: n for n, layer in layers.items() for s in [layer.weight_site, *layer.group_sites]
        }
        by_layer = {}
        for key, w in kl_weight.items():
            name = key if key in layers else of_site.get(key)
            if name is None:
                raise ValueError(f"kl_weight for unknown layer {key!r}; layers: {list(layers)}")
            by_layer[name] = w
        weights = {name: by_layer.get(name, 1.0) for name in layers}
    else:
        weights = dict.fromkeys(layers, kl_weight)
    for name, w in weights.items():
        check_kl_weight(w, f"the KL weight of {name!r}")
        layers[name].kl_weight = float(w)
    return {name: float(w) for name, w in weights.items()}


class BCModel:
    r"""The Pyro model of a Bayesian Compression classifier: the group priors, the standard
    normal prior of the standardised weights, and a categorical likelihood on the logits.

    .. math::

        p(y, \tilde W, z \mid x) = \prod_l p(z_l)\, \mathcal N(\tilde W_l \mid 0, I)
            \prod_{i=1}^N \mathrm{Cat}\big(y_i \mid f_{z \tilde W}(x_i)\big).

    Called as ``model(x, y, idx, kl_weight)``: the likelihood sits in
    ``pyro.plate("data", num_data, subsample=idx)``; the group sites are sampled in it, once
    per example, with their KL scaled by :math:`\beta_l / N` (one KL per group, as SBP's
    gates); the weight sites ``"<layer>.w"`` outside it, scaled by :math:`\beta_l`; both times
    the call's ``kl_weight`` (the trainer's warm-up factor). So the loss is

    .. math::

        -\sum_{i=1}^N \mathbb E_q \log p(y_i \mid x_i, z, \tilde W)
            + \mathrm{kl\_weight} \sum_l \beta_l \big(\mathrm{KL}(q(z_l) \| p(z_l))
            + \mathrm{KL}(q(\tilde W_l) \| p(\tilde W_l))\big),

    the negative ELBO at :math:`\beta = 1` (the tutorial's ``CE + KL / N`` times
    :math:`N`).

    :param nn.Module net: a network prepared with :func:`make_bayesian_compression`.
    :param int num_data: the size of the training set.
    :param input_shape: the shape of one input, checked on every call (optional).
    :param kl_weight: :math:`\beta`, one for every layer or ``{layer: beta}``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_data: int,
        input_shape: tuple[int, ...] | None = None,
        kl_weight: float | Mapping[str, float] = 1.0,
    ):
        if num_data < 1:
            raise ValueError(f"num_data must be positive, got {num_data}")
        self.net = net
        self.num_data = int(num_data)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        set_kl_weight(net, kl_weight)

    @property
    def kl_weights(self) -> dict[str, float]:
        """:math:`\\beta` of every site."""
        out = {}
        for _, layer in _layers(self.net):
            for site in [layer.weight_site, *layer.group_sites]:
                out[site] = layer.kl_weight
        return out

    def __call__(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, kl_weight: float = 1.0
    ) -> Tensor:
        check_input(x, self.input_shape)
        idx = data_indices(x, idx, self.num_data)
        layers = [layer for _, layer in _layers(self.net)]
        for layer in layers:
            with poutine.scale(scale=kl_weight * layer.kl_weight):
                pyro.sample(layer.weight_site, layer.weight_prior().to_event(layer.weight.dim()))
            layer.kl_scale = kl_weight * layer.kl_weight / self.num_data
            layer._in_model = True
        try:
            with pyro.plate("data", self.num_data, subsample=idx):
                logits = self.net(x)
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        finally:
            for layer in layers:
                layer._in_model = False
        return logits


class BCGuide(PyroModule):
    r"""The mean-field guide of a Bayesian Compression network: :math:`q(\tilde w) =
    \mathcal N(\mu_w, \sigma_w^2)` per weight and the group posteriors (a
    :class:`~pyro_sbp.distributions.SparseVDNormal` per group for GNJ, log-normal factors for
    GHS), their parameters the layers' own.

    It samples the same sites as :class:`BCModel`, with the same scales (the group sites in the
    data plate, once per example, scaled by :math:`\beta / N`), from the families whose KLs to
    the priors are registered, so :class:`~pyro.infer.TraceMeanField_ELBO` computes every KL
    in closed form (the Sparse VD approximation for GNJ's :math:`z`). It holds no parameters.

    :param nn.Module net: the network prepared with :func:`make_bayesian_compression`.
    :param int num_data: the size of the training set (as given to the model).
    """

    def __init__(self, net: nn.Module, num_data: int):
        super().__init__(name="")
        # A plain list, so that the network is not a submodule of the guide.
        self._layers = _layers(net)
        self.num_data = int(num_data)

    @property
    def site_names(self) -> list[str]:
        out = []
        for _, layer in self._layers:
            out += [layer.weight_site, *layer.group_sites]
        return out

    def forward(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, kl_weight: float = 1.0
    ) -> dict[str, Tensor]:
        idx = data_indices(x, idx, self.num_data)
        out = {}
        groups = {}
        for name, layer in self._layers:
            with layer.pyro_context():
                q = layer.weight_posterior().to_event(layer.weight.dim())
                groups[name] = layer.group_posteriors()
            with poutine.scale(scale=kl_weight * layer.kl_weight):
                out[layer.weight_site] = pyro.sample(layer.weight_site, q)
        with pyro.plate("data", self.num_data, subsample=idx):
            for name, layer in self._layers:
                with poutine.scale(scale=kl_weight * layer.kl_weight / self.num_data):
                    for site, q in groups[name].items():
                        out[site] = pyro.sample(site, q.to_event(1))
        return out


# --- masks -----------------------------------------------------------------------------------


@torch.no_grad()
def log_alphas(net: nn.Module) -> dict[str, Tensor]:
    """:math:`\\log\\alpha_z` of every group (on the CPU), by layer name."""
    return {name: layer.log_alpha().detach().cpu() for name, layer in _layers(net)}


CRITERIA_HELP = (
    "log-alpha[:T] (a group goes when log alpha_z >= T, default -3, T in [-10, 10]); "
    "bc-ghs also delta-f[:P] (Bayesian Model Reduction of the local scale below 2^-P, "
    "default P = 4), e.g. log-alpha:-3, delta-f:8"
)


def parse_criterion(criterion: str, prior: str = "gnj") -> tuple[str, float]:
    """``("log-alpha", T)`` or ``("delta-f", P)`` from a criterion string.

    :raises ValueError: for an unknown criterion, a threshold out of [-10, 10], ``delta-f``
        with the normal-Jeffreys prior (improper: no Delta F), or a precision that is not a
        positive number.
    """
    if not isinstance(criterion, str):
        raise ValueError(f"a criterion must be a string, got {criterion!r}")
    name, _, arg = criterion.partition(":")
    try:
        value = float(arg) if arg else None
    except ValueError:
        raise ValueError(f"criterion {criterion!r}: {arg!r} is not a number") from None
    if name == "log-alpha":
        return name, check_threshold(DEFAULT_THRESHOLD if value is None else value)
    if name == "delta-f":
        if prior != "ghs":
            raise ValueError(
                "delta-f needs a proper prior: the group normal-Jeffreys prior is improper "
                "(use bc-ghs, or log-alpha:T)"
            )
        from pyro_sbp.reduction.bayesian_compression import DEFAULT_PRECISION, check_precision

        return name, check_precision(DEFAULT_PRECISION if value is None else value)
    raise ValueError(f"unknown Bayesian Compression criterion {criterion!r}; {CRITERIA_HELP}")


@dataclass
class GroupPruningResult:
    """Keep-masks per layer (a bool per group) with the scores that decided them."""

    criterion: str
    score_name: str
    scores: dict[str, Tensor] = field(default_factory=dict)
    keep: dict[str, Tensor] = field(default_factory=dict)

    def masks(self) -> dict[str, Tensor]:
        return {name: k.clone() for name, k in self.keep.items()}

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "score": self.score_name,
            "units_before": sum(int(k.numel()) for k in self.keep.values()),
            "units_after": sum(int(k.sum()) for k in self.keep.values()),
            "layers": {
                name: {
                    "units_before": int(k.numel()),
                    "units_after": int(k.sum()),
                    "scores": [float(s) for s in self.scores[name]],
                    "keep": [bool(b) for b in k],
                }
                for name, k in self.keep.items()
            },
        }

    def summary(self) -> str:
        rows = [f"{'layer':<24} {'groups':>7} {'kept':>7}"]
        for name, k in self.keep.items():
            rows.append(f"{name:<24} {k.numel():>7} {int(k.sum()):>7}")
        before = sum(int(k.numel()) for k in self.keep.values())
        after = sum(int(k.sum()) for k in self.keep.values())
        rows.append(f"{'total':<24} {before:>7} {after:>7}   ({self.criterion})")
        return "\n".join(rows)


@torch.no_grad()
def compute_group_masks(net: nn.Module, criterion: str = "log-alpha:-3") -> GroupPruningResult:
    """Keep-masks of every layer's groups (on top of the masks already applied):
    ``log-alpha:T`` keeps a group iff :math:`\\log\\alpha_z < T` (the tutorial's rule);
    ``delta-f:P`` (horseshoe) keeps it iff :math:`\\Delta F < 0`
    (:func:`~pyro_sbp.reduction.bayesian_compression.delta_f_horseshoe`)."""
    layers = _layers(net)
    prior = layers[0][1].prior_name
    name, value = parse_criterion(criterion, prior)
    scores, keep = {}, {}
    for layer_name, layer in layers:
        current = layer.mask.detach().cpu() > 0
        if name == "log-alpha":
            s = layer.log_alpha().detach().cpu()
            k = s < value
        else:
            from pyro_sbp.reduction.bayesian_compression import delta_f_layer

            s = delta_f_layer(layer, precision=value).detach().cpu()
            k = s < 0
        scores[layer_name] = s
        keep[layer_name] = k & current
    score = "log_alpha" if name == "log-alpha" else "delta_f"
    return GroupPruningResult(criterion, score, scores, keep)


def check_group_masks(net: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """ValueError unless ``masks`` has one mask of the right length per BC layer of ``net``."""
    layers = dict(_layers(net))
    if set(masks) != set(layers):
        raise ValueError(f"masks for layers {sorted(masks)}, expected {sorted(layers)}")
    for name, m in masks.items():
        if tuple(m.shape) != (layers[name].num_groups,):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(m.shape)}, expected "
                f"({layers[name].num_groups},)"
            )


@torch.no_grad()
def apply_group_masks(net: nn.Module, masks: Mapping[str, Tensor] | GroupPruningResult) -> None:
    """Write keep-masks into the layers' ``mask`` buffers."""
    if isinstance(masks, GroupPruningResult):
        masks = masks.masks()
    check_group_masks(net, masks)
    layers = dict(_layers(net))
    for name, m in masks.items():
        layers[name].mask.copy_(m.to(layers[name].mask))


class BCMethod(LayerMasksMethod):
    """Bayesian Compression on the pipeline (:mod:`pyro_sbp.methods`): masks per layer, one
    bool per group; export removes the groups physically
    (:func:`pyro_sbp.export.bit_precision.export_bc`) and writes the quantised network and
    the bit precisions and compression rates (``compression.json``)."""

    criteria_help = CRITERIA_HELP

    def __init__(self, prior: str):
        self.prior = check_prior(prior)
        self.name = f"bc-{prior}"
        kind = "group normal-Jeffreys" if prior == "gnj" else "group horseshoe"
        self.description = f"Bayesian Compression, {kind} prior: a scale z per unit"
        self.default_criterion = f"log-alpha:{DEFAULT_THRESHOLD:g}"

    def prepare(self, net, config):
        tau0 = getattr(config, "tau0", DEFAULT_TAU0)
        return make_bayesian_compression(net, self.prior, tau0=tau0)

    def build_model(self, net, num_data, input_shape, config):
        return BCModel(net, num_data, input_shape, kl_weight=config.kl_weight)

    def build_guide(self, net, num_data, config):
        return BCGuide(net, num_data)

    def is_variational(self, key):
        last = key.rpartition(".")[2]
        return last in _VARIATIONAL_KEYS

    def set_stochastic(self, net, enabled):
        set_stochastic(net, enabled)

    def epoch_summary(self, net, guide, config):
        kept = compute_group_masks(net, self.default_criterion).keep
        return {
            "units_kept": {n: int(k.sum()) for n, k in kept.items()},
            "units_total": {n: int(k.numel()) for n, k in kept.items()},
        }

    def check_criterion(self, criterion):
        if criterion is not None:
            parse_criterion(criterion, self.prior)

    def compute_masks(self, net, guide, criterion, data=None, *, progress=False):
        return compute_group_masks(net, criterion)

    def layers(self, net):
        return _layers(net)

    def check_layer_masks(self, net, masks):
        check_group_masks(net, masks)

    def apply_masks(self, net, masks):
        apply_group_masks(net, masks)

    def export(self, net, input_shape):
        from pyro_sbp.export.bit_precision import export_bc

        full = {name: torch.ones_like(layer.mask) for name, layer in _layers(net)}
        return export_bc(net, input_shape, masks=full), export_bc(net, input_shape)

    def write_exports(self, net, input_shape, run_dir):
        import json

        from pyro_sbp.export.bit_precision import compression_report, export_bc, quantize_bc
        from pyro_sbp.export.exporter import save_torchscript
        from pyro_sbp.infer.checkpoint import write_text_atomic

        run_dir = Path(run_dir)
        bits = quantize_bc(net)
        save_torchscript(export_bc(net, input_shape, bits=bits), run_dir / "quantized.pt")
        report = compression_report(net, input_shape, bits=bits)
        write_text_atomic(json.dumps(report, indent=1) + "\n", run_dir / "compression.json")
        return ["quantized.pt", "compression.json"]

    def to_arviz(self, net, guide, num_chains=4, num_draws=500, seed=0):
        return to_arviz_bc(net, num_chains=num_chains, num_draws=num_draws, seed=seed)

    def report(self, run_dir, criterion=None, *, bench=True, min_run_time=0.5):
        from pyro_sbp.export.bit_precision import make_bc_report

        return make_bc_report(run_dir, criterion, bench=bench, min_run_time=min_run_time)

    def format_summary(self, report):
        from pyro_sbp.export.bit_precision import format_bc_summary

        return format_bc_summary(report)


_VARIATIONAL_KEYS = {
    "weight_log_sigma2",
    "mask",
    "z_loc",
    "z_log_sigma2",
    *(f"{s}_{p}" for s in ("s_a", "s_b", "z_a", "z_b") for p in ("loc", "log_scale")),
}


@torch.no_grad()
def to_arviz_bc(net: nn.Module, num_chains: int = 4, num_draws: int = 500, seed: int = 0):
    """Posterior draws of :math:`z` per group and :math:`\\log\\alpha_z` per layer as ArviZ
    data: variables ``"<layer>.z"`` (dims chain, draw, group) and ``"<layer>.log_alpha"``
    (a constant per group, in ``constant_data``)."""
    import arviz as az

    gen = torch.Generator().manual_seed(int(seed))
    posterior, constant = {}, {}
    for name, layer in _layers(net):
        draws = {}
        for site, q in layer.group_posteriors().items():
            loc = q.loc.detach().cpu().double()
            scale = q.scale.detach().cpu().double()
            eps = torch.randn((num_chains, num_draws, *loc.shape), generator=gen, dtype=loc.dtype)
            x = loc + scale * eps
            draws[site] = x if layer.prior_name == "gnj" else x.exp()
        z = layer._z_from(draws) * layer.mask.detach().cpu().double()
        posterior[f"{name}.z"] = z.numpy()
        constant[f"{name}.log_alpha"] = layer.log_alpha().detach().cpu().numpy()
    return az.from_dict(posterior=posterior, constant_data=constant)


BC_GNJ = register_method(BCMethod("gnj"))
BC_GHS = register_method(BCMethod("ghs"))
