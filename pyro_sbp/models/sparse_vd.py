r"""Sparse Variational Dropout (Molchanov, Ashukha, Vetrov 2017) as a Pyro model and guide.

Every weight of every ``nn.Linear`` and ``nn.Conv2d`` (the classifier's included) is latent:

.. math::

    p(w) \propto \frac{1}{|w|}, \qquad q(w) = \mathcal N(\theta, \sigma^2), \qquad
    \log\alpha = \mathrm{clip}\big(\log\sigma^2 - \log\theta^2, -10, 10\big),

with the parameters :math:`\theta` (the layer's ``weight``) and :math:`\log\sigma^2`
(``log_sigma2``), the additive reparameterisation. :func:`make_sparse_vd` prepares a network in
one call; :class:`SparseVDModel` and :class:`SparseVDGuide` are the Pyro model and guide,
fitted with :class:`~pyro.infer.TraceMeanField_ELBO` (the KL of
:class:`~pyro_sbp.distributions.SparseVDNormal` to
:class:`~pyro_sbp.distributions.ImproperLogUniform` is registered). A weight is removed when
:math:`\log\alpha > 3`; a unit goes when all its incoming weights are removed
(:func:`dead_units`), physically so in :func:`pyro_sbp.export.sparse.export_sparse_vd`.

**Local reparameterisation.** In training the layers sample their pre-activations, not their
weights (Kingma et al. 2015): for a ``Linear``,

.. math::

    b = x\theta^\top + \mathrm{bias} + \sqrt{x^2 (\sigma^2)^\top}\odot\varepsilon, \qquad
    \varepsilon \sim \mathcal N(0, I),

and for a ``Conv2d`` the same with convolutions; each example gets its own draw, which is
its pre-activation's exact marginal under :math:`q(W)`. The weight sites of the guide are
still sampled (their KL is what the ELBO needs), but the forward pass does not use their
values: the likelihood term's expectation is the same, with a lower-variance gradient.

**References**

[1] Molchanov, Ashukha, Vetrov, *Variational Dropout Sparsifies Deep Neural Networks*, ICML
    2017.
[2] Kingma, Salimans, Welling, *Variational Dropout and the Local Reparameterization Trick*,
    NeurIPS 2015.
"""

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

from pyro_sbp.distributions import ImproperLogUniform, SparseVDNormal
from pyro_sbp.distributions.sparse_vd import LOG_ALPHA_MAX, LOG_ALPHA_MIN, THETA2_EPS
from pyro_sbp.methods import LayerMasksMethod, register_method
from pyro_sbp.models.sbp_model import check_input, check_kl_weight, data_indices

#: The papers' threshold: a weight is removed when its log alpha exceeds it.
DEFAULT_THRESHOLD = 3.0
#: The initial log sigma^2 of every weight (the authors' code: -10).
DEFAULT_INIT_LOG_SIGMA2 = -10.0
#: Added to the pre-activations' variance before the square root (the authors' 1e-8).
_VAR_EPS = 1e-8


class _SparseVDMixin:
    """What the two layers share: ``log_sigma2``, the weight ``mask``, log alpha, the
    posterior, and the switch between the noisy and the deterministic forward pass."""

    def _init_sparse_vd(self, init_log_sigma2: float, threshold: float) -> None:
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, float(init_log_sigma2)))
        self.register_buffer("mask", torch.ones_like(self.weight))
        # A buffer, so that a checkpoint restores it (inf once masks decide alone).
        self.register_buffer("log_alpha_threshold", torch.tensor(float(threshold)))
        #: Noise on (SVI) or off (deterministic pretraining: the weights are theta).
        self.stochastic = True
        #: The KL weight beta of this layer's site (set by SparseVDModel).
        self.kl_weight = 1.0

    @property
    def threshold(self) -> float:
        """A weight is removed in evaluation when its log alpha exceeds this (``inf``: the
        mask alone decides)."""
        return float(self.log_alpha_threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.log_alpha_threshold.fill_(float(value))

    @property
    def site_name(self) -> str:
        """The name of the layer's weight site: ``"<layer>.w"``."""
        return f"{self._pyro_name}.w" if getattr(self, "_pyro_name", "") else "w"

    def log_alpha(self) -> Tensor:
        r""":math:`\mathrm{clip}(\log\sigma^2 - \log(\theta^2 + 10^{-8}), -10, 10)` per weight."""
        theta2 = self.weight.square() + THETA2_EPS
        return (self.log_sigma2 - theta2.log()).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def variance(self) -> Tensor:
        r""":math:`\alpha(\theta^2 + 10^{-8})`, the posterior variance of every weight."""
        return self.log_alpha().exp() * (self.weight.square() + THETA2_EPS)

    def posterior(self) -> SparseVDNormal:
        """:math:`q(w)` of every weight of the layer (batch shape: the weight's)."""
        return SparseVDNormal(self.weight, self.log_sigma2)

    def prior(self) -> ImproperLogUniform:
        return ImproperLogUniform(self.weight.shape)

    def keep(self) -> Tensor:
        """The weights evaluation keeps: the mask, and log alpha at most the threshold."""
        with torch.no_grad():
            return (self.mask > 0) & (self.log_alpha() <= self.threshold)

    def eval_weight(self) -> Tensor:
        """:math:`\\theta` times :meth:`keep` (the weights of the network in evaluation)."""
        return self.weight * self.keep().to(self.weight.dtype)

    def _pre_activation(self, x: Tensor, linear) -> Tensor:
        if not self.training:
            return linear(x, self.eval_weight(), self.bias)
        if not self.stochastic:
            return linear(x, self.weight * self.mask, self.bias)
        mean = linear(x, self.weight * self.mask, self.bias)
        var = linear(x.square(), self.variance() * self.mask, None)
        return mean + (var + _VAR_EPS).sqrt() * torch.randn_like(mean)


class SparseVDLinear(_SparseVDMixin, nn.Linear):
    r"""An ``nn.Linear`` whose weights have Sparse VD's posterior
    :math:`\mathcal N(\theta, \sigma^2)`, with the local reparameterisation in training
    (mean :math:`x\theta^\top + b`, variance :math:`x^2 (\sigma^2)^\top`) and the weights
    :math:`\theta` times :meth:`keep` in evaluation. Built by :func:`make_sparse_vd` from an
    ``nn.Linear``, whose ``weight`` (:math:`\theta`) and ``bias`` it keeps.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init_log_sigma2: float = DEFAULT_INIT_LOG_SIGMA2,
        threshold: float = DEFAULT_THRESHOLD,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self._init_sparse_vd(init_log_sigma2, threshold)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_features} input features, got input "
                f"of shape {tuple(x.shape)}"
            )
        return self._pre_activation(x, F.linear)


class SparseVDConv2d(_SparseVDMixin, nn.Conv2d):
    r"""An ``nn.Conv2d`` whose weights have Sparse VD's posterior, with the local
    reparameterisation in training (mean :math:`x * \theta + b`, variance
    :math:`x^2 * \sigma^2`, both convolutions) and :math:`\theta` times :meth:`keep` in
    evaluation. Built by :func:`make_sparse_vd` from an ``nn.Conv2d`` (zero padding only).
    """

    def __init__(
        self,
        *args,
        init_log_sigma2: float = DEFAULT_INIT_LOG_SIGMA2,
        threshold: float = DEFAULT_THRESHOLD,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(
                f"Sparse VD convolutions need zero padding (the variance's convolution pads "
                f"with zeros), got padding_mode={self.padding_mode!r}"
            )
        self._init_sparse_vd(init_log_sigma2, threshold)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects inputs (batch, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}"
            )

        def conv(inp, weight, bias):
            s = self
            return F.conv2d(inp, weight, bias, s.stride, s.padding, s.dilation, s.groups)

        return self._pre_activation(x, conv)


SPARSE_VD_LAYERS = (SparseVDLinear, SparseVDConv2d)


def _check_threshold(threshold: float) -> float:
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if not (number and LOG_ALPHA_MIN <= threshold <= LOG_ALPHA_MAX):
        raise ValueError(
            f"the log alpha threshold must be a number in [{LOG_ALPHA_MIN:g}, "
            f"{LOG_ALPHA_MAX:g}] (log alpha is clipped there), got {threshold!r}"
        )
    return float(threshold)


def _convert(m: nn.Module, init_log_sigma2: float, threshold: float) -> nn.Module:
    if isinstance(m, nn.Linear):
        new = SparseVDLinear(
            m.in_features,
            m.out_features,
            bias=m.bias is not None,
            init_log_sigma2=init_log_sigma2,
            threshold=threshold,
        )
    else:
        if m.padding_mode != "zeros":
            raise ValueError(
                f"Sparse VD convolutions need zero padding, got padding_mode={m.padding_mode!r}"
            )
        new = SparseVDConv2d(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
            init_log_sigma2=init_log_sigma2,
            threshold=threshold,
        )
    new = new.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
        new.log_sigma2.fill_(init_log_sigma2)
    new.train(m.training)
    return new


def make_sparse_vd(
    net: nn.Module,
    layers: list[str] | None = None,
    *,
    init_log_sigma2: float = DEFAULT_INIT_LOG_SIGMA2,
    threshold: float = DEFAULT_THRESHOLD,
) -> nn.Module:
    """Make the weights of ``net``'s ``nn.Linear`` and ``nn.Conv2d`` layers latent, in place::

        net = make_sparse_vd(build_network("lenet5-caffe"))

    Every such layer (by default all of them, the classifier included: Sparse VD sparsifies
    every weight) becomes a :class:`SparseVDLinear` or :class:`SparseVDConv2d` with the same
    ``weight`` (now :math:`\\theta`) and ``bias`` (a point estimate, as in the papers) and a
    ``log_sigma2`` of ``init_log_sigma2``; the network is converted to a
    :class:`~pyro.nn.PyroModule` tree, so its parameters are Pyro parameters named by their
    paths (``"features.0.weight"``, ``"features.0.log_sigma2"``) and each layer's weight site
    is ``"<layer>.w"``.

    :param layers: names of the layers to convert (default: every Linear and Conv2d).
    :param float init_log_sigma2: initial :math:`\\log\\sigma^2` of every weight.
    :param float threshold: a weight is removed in evaluation when :math:`\\log\\alpha`
        exceeds it (the papers' 3), in :math:`[-10, 10]`.
    :raises ValueError: for a layer name that is not a Linear or Conv2d of ``net``, a network
        without one, or a threshold out of range.
    """
    threshold = _check_threshold(threshold)
    if not math.isfinite(init_log_sigma2):
        raise ValueError(f"init_log_sigma2 must be finite, got {init_log_sigma2}")
    convertible = {
        name: m
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and not isinstance(m, SPARSE_VD_LAYERS)
    }
    if layers is None:
        names = list(convertible)
        if not names:
            raise ValueError("the network has no nn.Linear or nn.Conv2d layer to make Sparse VD")
    else:
        names = list(layers)
        unknown = [n for n in names if n not in convertible]
        if unknown:
            raise ValueError(
                f"not nn.Linear/nn.Conv2d layers of the network: {unknown}; "
                f"layers: {list(convertible)}"
            )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        if not name:
            raise ValueError("the network itself is a layer: wrap it in an nn.Sequential")
        setattr(parent, child, _convert(convertible[name], init_log_sigma2, threshold))
    to_pyro_module_(net)
    return net


def named_sparse_vd_layers(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(layer name, layer)`` for every Sparse VD layer of ``net``, in module order."""
    for name, m in net.named_modules():
        if isinstance(m, SPARSE_VD_LAYERS):
            yield name, m


def _layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    found = list(named_sparse_vd_layers(net))
    if not found:
        raise ValueError("the network has no Sparse VD layers: call make_sparse_vd on it first")
    return found


def set_stochastic(net: nn.Module, enabled: bool) -> None:
    """Switch the local reparameterisation noise on (SVI) or off (pretraining)."""
    for _, layer in named_sparse_vd_layers(net):
        layer.stochastic = bool(enabled)


def set_threshold(net: nn.Module, threshold: float) -> None:
    """Set the log alpha threshold of evaluation on every layer (``math.inf``: none)."""
    if threshold != math.inf:
        threshold = _check_threshold(threshold)
    for _, layer in named_sparse_vd_layers(net):
        layer.threshold = float(threshold)


def set_kl_weight(net: nn.Module, kl_weight: float | Mapping[str, float]) -> dict[str, float]:
    """Give every layer's weight site its KL weight: one number, or ``{site: weight}`` (sites
    ``"<layer>.w"``; those left out keep 1). Returns the weights by site.

    :raises ValueError: for a weight that is not a positive finite number, or an unknown site.
    """
    layers = {layer.site_name: layer for _, layer in _layers(net)}
    if isinstance(kl_weight, Mapping):
        unknown = sorted(set(kl_weight) - set(layers))
        if unknown:
            raise ValueError(f"kl_weight for unknown weight sites {unknown}; sites: {list(layers)}")
        weights = {site: kl_weight.get(site, 1.0) for site in layers}
    else:
        weights = dict.fromkeys(layers, kl_weight)
    for site, w in weights.items():
        check_kl_weight(w, f"the KL weight of {site!r}")
        layers[site].kl_weight = float(w)
    return {site: float(w) for site, w in weights.items()}


def _weight_sites(net: nn.Module, kl_weight: float, sample) -> None:
    for _, layer in _layers(net):
        with poutine.scale(scale=kl_weight * layer.kl_weight):
            sample(layer)


class SparseVDModel:
    r"""The Pyro model of a Sparse VD classifier: the log-uniform prior on every weight and a
    categorical likelihood on the logits.

    .. math::

        p(y, W \mid x) = \prod_{l,k} p(w_{lk}) \prod_{i=1}^N
            \mathrm{Cat}\big(y_i \mid f_W(x_i)\big), \qquad p(w) \propto 1/|w| .

    Called as ``model(x, y, idx, kl_weight)`` with a minibatch and the positions ``idx`` of its
    examples in the training set of ``num_data``: the likelihood sits in
    ``pyro.plate("data", num_data, subsample=idx)`` (scaled by ``N / batch``), the weight
    sites ``"<layer>.w"`` (one per layer, ``to_event`` over the weight's shape) outside it,
    each scaled by :math:`\beta_l` times the call's ``kl_weight`` (the trainer's KL warm-up
    factor), so that the loss is

    .. math::

        -\sum_{i=1}^N \mathbb E_q \log p(y_i \mid x_i, W)
            + \mathrm{kl\_weight}\sum_l \beta_l\, \mathrm{KL}\big(q(W_l) \,\|\, p(W_l)\big),

    the negative ELBO at :math:`\beta = 1`, as :class:`~pyro_sbp.models.SBPModel` has it for
    the gates (a :math:`\beta > 1` tempers the likelihood to :math:`1/\beta`). The weight
    sites' values are not used by the forward pass (see the module's docstring). A weight
    removed by a layer's ``mask`` keeps its KL term, which then only drives its log alpha to the
    clipping bound 10, where the term is :math:`2\cdot10^{-5}` nats.

    :param nn.Module net: a network prepared with :func:`make_sparse_vd`.
    :param int num_data: the size of the training set.
    :param input_shape: the shape of one input, checked on every call (optional).
    :param kl_weight: :math:`\beta`, one for every layer or ``{site: beta}``.
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
        """:math:`\\beta` of every weight site."""
        return {layer.site_name: layer.kl_weight for _, layer in _layers(self.net)}

    def __call__(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, kl_weight: float = 1.0
    ) -> Tensor:
        check_input(x, self.input_shape)
        idx = data_indices(x, idx, self.num_data)

        def prior(layer):
            pyro.sample(layer.site_name, layer.prior().to_event(layer.weight.dim()))

        _weight_sites(self.net, kl_weight, prior)
        with pyro.plate("data", self.num_data, subsample=idx):
            logits = self.net(x)
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


class SparseVDGuide(PyroModule):
    r"""The mean-field guide of a Sparse VD network: :math:`q(w) = \mathcal N(\theta,
    \sigma^2)` per weight (:class:`~pyro_sbp.distributions.SparseVDNormal`), its parameters
    the layers' own ``weight`` and ``log_sigma2``.

    It samples every layer's weight site ``"<layer>.w"`` in module order, with the model's KL
    scale, from the family whose KL to the prior is registered, so
    :class:`~pyro.infer.TraceMeanField_ELBO` uses the analytic (fitted) KL. It holds no
    parameters of its own.

    :param nn.Module net: the network prepared with :func:`make_sparse_vd`.
    :param int num_data: the size of the training set (as given to the model).
    """

    def __init__(self, net: nn.Module, num_data: int):
        super().__init__(name="")
        # A plain list, so that the network is not a submodule of the guide.
        self._layers = _layers(net)
        self.num_data = int(num_data)

    @property
    def site_names(self) -> list[str]:
        return [layer.site_name for _, layer in self._layers]

    def posteriors(self) -> dict[str, SparseVDNormal]:
        """:math:`q` of every layer's weights, by layer name."""
        return {name: layer.posterior() for name, layer in self._layers}

    def forward(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, kl_weight: float = 1.0
    ) -> dict[str, Tensor]:
        data_indices(x, idx, self.num_data)
        out = {}

        def posterior(layer):
            q = layer.posterior().to_event(layer.weight.dim())
            out[layer.site_name] = pyro.sample(layer.site_name, q)

        for _, layer in self._layers:
            with poutine.scale(scale=kl_weight * layer.kl_weight):
                posterior(layer)
        return out


# --- masks -----------------------------------------------------------------------------------


@torch.no_grad()
def log_alphas(net: nn.Module) -> dict[str, Tensor]:
    """Log alpha of every weight (on the CPU), by layer name."""
    return {name: layer.log_alpha().detach().cpu() for name, layer in _layers(net)}


@torch.no_grad()
def weight_masks(net: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Tensor]:
    """Keep-masks of the weights, by layer name: log alpha at most ``threshold`` and not
    removed by the layer's ``mask`` (bool tensors of the weights' shapes, on the CPU)."""
    threshold = _check_threshold(threshold)
    return {
        name: (layer.mask.cpu() > 0) & (layer.log_alpha().cpu() <= threshold)
        for name, layer in _layers(net)
    }


def _incoming(keep: Tensor) -> Tensor:
    return keep.reshape(keep.shape[0], -1).any(dim=1)


@torch.no_grad()
def dead_units(net: nn.Module, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The units whose incoming weights are all removed, by layer name (bool per output unit
    or channel): they output a constant (their bias, through the activation), so export
    removes them, folding that constant into the next layer's bias.

    :param masks: the weight keep-masks (default: each layer's :meth:`keep`).
    """
    if masks is None:
        masks = {name: layer.keep().cpu() for name, layer in _layers(net)}
    return {name: ~_incoming(keep) for name, keep in masks.items()}


@dataclass
class WeightPruningResult:
    """Keep-masks of every weight of a Sparse VD network, with the log alphas that decided
    them (the analogue of :class:`~pyro_sbp.reduction.PruningResult` for weights)."""

    criterion: str
    threshold: float | None
    keep: dict[str, Tensor] = field(default_factory=dict)
    log_alpha: dict[str, Tensor] = field(default_factory=dict)

    def masks(self) -> dict[str, Tensor]:
        return {name: k.clone() for name, k in self.keep.items()}

    @property
    def weights_before(self) -> int:
        return sum(k.numel() for k in self.keep.values())

    @property
    def weights_after(self) -> int:
        return sum(int(k.sum()) for k in self.keep.values())

    @property
    def compression(self) -> float:
        r""":math:`|W| / |W \neq 0|` of the whole network."""
        return self.weights_before / max(self.weights_after, 1)

    def layer_rows(self) -> dict[str, dict]:
        rows = {}
        for name, k in self.keep.items():
            alive = _incoming(k)
            rows[name] = {
                "weights_before": k.numel(),
                "weights_after": int(k.sum()),
                "compression": k.numel() / max(int(k.sum()), 1),
                "units_before": int(alive.numel()),
                "units_after": int(alive.sum()),
            }
        return rows

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "score": "log_alpha",
            "threshold": self.threshold,
            "weights_before": self.weights_before,
            "weights_after": self.weights_after,
            "compression": self.compression,
            "layers": self.layer_rows(),
        }

    def summary(self) -> str:
        lines = [
            f"{'layer':<22} {'weights':>9} {'kept':>8} {'|W|/|W!=0|':>11} {'units':>11}",
        ]
        for name, r in self.layer_rows().items():
            lines.append(
                f"{name:<22} {r['weights_before']:>9} {r['weights_after']:>8} "
                f"{r['compression']:>11.1f} {r['units_after']:>5}/{r['units_before']:<5}"
            )
        lines.append(
            f"total: {self.weights_after} of {self.weights_before} weights kept "
            f"(|W|/|W!=0| = {self.compression:.1f}, {self.criterion})"
        )
        return "\n".join(lines)


#: The criteria of Sparse VD's ``prune``.
CRITERIA_HELP = (
    "log-alpha:T (a weight goes when log alpha > T, T in [-10, 10]; the papers' 3), "
    "trained (the masks as they are)"
)


def parse_criterion(criterion: str) -> float | None:
    """The threshold of ``"log-alpha:T"`` (``None`` for ``"trained"``).

    :raises ValueError: for another criterion, or a threshold out of range.
    """
    if criterion == "trained":
        return None
    name, sep, arg = str(criterion).partition(":")
    if name != "log-alpha" or not sep:
        raise ValueError(f"unknown Sparse VD criterion {criterion!r}; expected {CRITERIA_HELP}")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"the threshold of {criterion!r} is not a number") from None
    return _check_threshold(value)


@torch.no_grad()
def compute_weight_masks(net: nn.Module, criterion: str = "log-alpha:3") -> WeightPruningResult:
    """Keep-masks under ``criterion`` (``"log-alpha:T"`` or ``"trained"``), on top of the
    layers' masks (a weight removed before stays removed)."""
    threshold = parse_criterion(criterion)
    result = WeightPruningResult(criterion=criterion, threshold=threshold)
    for name, layer in _layers(net):
        la = layer.log_alpha().detach().cpu()
        keep = layer.mask.cpu() > 0
        if threshold is not None:
            keep = keep & (la <= threshold)
        result.keep[name] = keep
        result.log_alpha[name] = la
    return result


def check_weight_masks(net: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """ValueError unless ``masks`` maps Sparse VD layers of ``net`` to tensors of their
    weights' shapes."""
    layers = dict(_layers(net))
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"masks for unknown Sparse VD layers {unknown}; layers: {list(layers)}")
    for name, keep in masks.items():
        if not isinstance(keep, Tensor):
            raise ValueError(f"mask for {name!r} is a {type(keep).__name__}, not a tensor")
        shape = tuple(layers[name].weight.shape)
        if tuple(keep.shape) != shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(keep.shape)}, expected {shape}")


@torch.no_grad()
def apply_weight_masks(net: nn.Module, masks: Mapping[str, Tensor] | WeightPruningResult):
    """Write weight keep-masks into the layers; from then on the masks alone decide
    (the layers' threshold is switched off), in training and in evaluation."""
    if isinstance(masks, WeightPruningResult):
        masks = masks.masks()
    check_weight_masks(net, masks)
    layers = dict(_layers(net))
    for name, keep in masks.items():
        layers[name].mask.copy_(keep.to(layers[name].mask))
    set_threshold(net, math.inf)


@torch.no_grad()
def to_arviz(
    net: nn.Module, num_chains: int = 4, num_draws: int = 500, seed: int = 0, max_weights=1000
):
    """ArviZ data of a fitted Sparse VD network.

    ``constant_data`` holds, for every weight of each layer (flattened, dim
    ``<layer>_weight``): ``log_alpha_<layer>``, ``theta_<layer>`` and ``keep_<layer>`` (the
    evaluation's keep-mask). ``posterior`` holds independent draws from :math:`q(w)` of the
    layer's kept weights, at most ``max_weights`` of them (those of lowest log alpha; their
    flat positions are ``index_<layer>`` in ``constant_data``), as ``w_<layer>`` with dims
    ``(chain, draw, <layer>_kept)``: all weights of LeNet5-Caffe at 2000 draws would be 3 GB.

    :return: :class:`arviz.InferenceData` (ArviZ 0.x) or :class:`xarray.DataTree` (1.x).
    """
    import arviz as az
    import numpy as np
    import xarray as xr

    gen = torch.Generator().manual_seed(seed)
    posterior, constant = {}, {}
    for name, layer in _layers(net):
        var = name.replace(".", "_")
        la = layer.log_alpha().detach().cpu().reshape(-1).double()
        theta = layer.weight.detach().cpu().reshape(-1).double()
        keep = layer.keep().cpu().reshape(-1)
        kept = keep.nonzero().squeeze(-1)
        kept = kept[torch.argsort(la[kept], stable=True)[:max_weights]].sort().values
        sd = layer.variance().detach().cpu().reshape(-1).double().sqrt()
        eps = torch.randn((num_chains, num_draws, kept.numel()), generator=gen, dtype=torch.float64)
        draws = theta[kept] + sd[kept] * eps
        posterior[f"w_{var}"] = (["chain", "draw", f"{var}_kept"], draws.numpy())
        dim = f"{var}_weight"
        constant[f"log_alpha_{var}"] = ([dim], la.numpy())
        constant[f"theta_{var}"] = ([dim], theta.numpy())
        constant[f"keep_{var}"] = ([dim], keep.numpy().astype(np.int8))
        constant[f"index_{var}"] = ([f"{var}_kept"], kept.numpy())
    coords = {"chain": np.arange(num_chains), "draw": np.arange(num_draws)}
    attrs = {"created_by": "pyro_sbp", "inference": "SVI (TraceMeanField_ELBO), Sparse VD"}
    post = xr.Dataset(posterior, coords=coords, attrs=attrs)
    const = xr.Dataset(constant, attrs=attrs)
    if hasattr(az, "InferenceData"):
        return az.InferenceData(posterior=post, constant_data=const)
    return xr.DataTree.from_dict({"posterior": post, "constant_data": const})


class SparseVDMethod(LayerMasksMethod):
    """Sparse VD on the pipeline (:mod:`pyro_sbp.methods`): masks are per weight (by layer
    name), the default criterion ``log-alpha:3``; export removes the dead units and stores the
    kept weights as CSR (:mod:`pyro_sbp.export.sparse`)."""

    name = "sparse-vd"
    description = "Sparse Variational Dropout: every weight latent, log-uniform prior"
    default_criterion = f"log-alpha:{DEFAULT_THRESHOLD:g}"
    criteria_help = CRITERIA_HELP

    def prepare(self, net, config):
        return make_sparse_vd(net)

    def build_model(self, net, num_data, input_shape, config):
        return SparseVDModel(net, num_data, input_shape, kl_weight=config.kl_weight)

    def build_guide(self, net, num_data, config):
        return SparseVDGuide(net, num_data)

    def is_variational(self, key):
        return key.endswith((".log_sigma2", ".mask", ".log_alpha_threshold"))

    def set_stochastic(self, net, enabled):
        set_stochastic(net, enabled)

    def epoch_summary(self, net, guide, config):
        rows = WeightPruningResult(
            "current", None, {n: layer.keep().cpu() for n, layer in _layers(net)}
        ).layer_rows()
        before = sum(r["weights_before"] for r in rows.values())
        after = sum(r["weights_after"] for r in rows.values())
        return {
            "units_kept": {n: r["units_after"] for n, r in rows.items()},
            "units_total": {n: r["units_before"] for n, r in rows.items()},
            "weights_kept": {n: r["weights_after"] for n, r in rows.items()},
            "weights_total": {n: r["weights_before"] for n, r in rows.items()},
            "compression": before / max(after, 1),
        }

    def check_criterion(self, criterion):
        if criterion is not None:
            parse_criterion(criterion)

    def compute_masks(self, net, guide, criterion, data=None, *, progress=False):
        return compute_weight_masks(net, criterion)

    def layers(self, net):
        return _layers(net)

    def check_layer_masks(self, net, masks):
        check_weight_masks(net, masks)

    def apply_masks(self, net, masks):
        apply_weight_masks(net, masks)

    def export(self, net, input_shape):
        from pyro_sbp.export.sparse import export_sparse_vd

        return (
            export_sparse_vd(net, input_shape, masks="all"),
            export_sparse_vd(net, input_shape),
        )

    def write_exports(self, net, input_shape, run_dir):
        import json

        from pyro_sbp.export.sparse import export_sparse_vd, save_sparse, sparse_storage
        from pyro_sbp.infer.checkpoint import write_text_atomic

        sparse = export_sparse_vd(net, input_shape, sparse=True)
        run_dir = Path(run_dir)
        save_sparse(sparse, run_dir / "sparse.pt")
        report = sparse_storage(sparse, net)
        write_text_atomic(json.dumps(report, indent=1) + "\n", run_dir / "sparse.json")
        return ["sparse.pt", "sparse.json"]

    def to_arviz(self, net, guide, num_chains=4, num_draws=500, seed=0):
        return to_arviz(net, num_chains=num_chains, num_draws=num_draws, seed=seed)

    def report(self, run_dir, criterion=None, *, bench=True, min_run_time=0.5):
        from pyro_sbp.export.sparse import make_sparse_vd_report

        return make_sparse_vd_report(run_dir, criterion, bench=bench, min_run_time=min_run_time)

    def format_summary(self, report):
        from pyro_sbp.export.sparse import format_sparse_vd_summary

        return format_sparse_vd_summary(report)


SPARSE_VD = register_method(SparseVDMethod())
