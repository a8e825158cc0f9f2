r"""The pruning methods on one pipeline: how the trainer, ``prune``, ``export``, ``bench`` and
``report`` treat a run of each.

:data:`METHODS` maps a method's name (``TrainConfig.method``, ``pyro-sbp train --method``) to
a :class:`Method`, which tells the pipeline everything that differs between methods:

=================  ===========================================================================
``"sbp"``          Structured Bayesian Pruning: a log-normal gate per unit
                   (:func:`~pyro_sbp.models.make_prunable`, :class:`~pyro_sbp.models.SBPModel`,
                   :class:`~pyro_sbp.guides.SBPGuide`); the default.
``"sparse-vd"``    Sparse Variational Dropout: every weight latent, log-uniform prior
                   (:mod:`pyro_sbp.models.sparse_vd`).
``"bc-gnj"``       Bayesian Compression, group normal-Jeffreys prior
                   (:mod:`pyro_sbp.models.bayesian_compression`).
``"bc-ghs"``       Bayesian Compression, group horseshoe prior (same module).
=================  ===========================================================================

**The interface.** An entry is an instance of a :class:`Method` subclass. Every method must
provide (the trainer and the CLI call nothing else that is method-specific):

* ``name``, ``description`` (one line), ``default_criterion`` (what ``prune`` uses when none
  is given) and ``criteria_help`` (one line for ``--help``);
* :meth:`Method.prepare` ``(net, config) -> net``: the one-call preparation of a plain built-in
  network (``make_prunable`` for SBP, ``make_sparse_vd`` for Sparse VD, ...);
* :meth:`Method.build_model` / :meth:`Method.build_guide`: the Pyro model and guide, both
  called as ``f(x, y, idx, kl_weight)`` (``idx``: the examples' positions in the training set
  for the data plate's ``subsample``; ``kl_weight``: the trainer's warm-up factor, which
  multiplies every site's KL weight :math:`\beta`). The model must have a ``kl_weights``
  property (``{site: beta}``). The trainer fits them with
  :class:`~pyro_sbp.infer.CompactMeanField_ELBO`;
* :meth:`Method.is_variational` ``(key) -> bool``: whether a parameter or buffer name belongs
  to the method's variational machinery rather than to the plain network (those parameters are
  trained at ``TrainConfig.gate_lr``; those keys are absent from a plain pretrained network);
* :meth:`Method.set_stochastic` ``(net, enabled)``: noise off for deterministic pretraining,
  on for SVI;
* :meth:`Method.update` ``(net, guide)``: called after every SVI epoch and before every
  evaluation of a restored run: copy what evaluation needs from the guide into the network
  (SBP: ``E[theta]`` into the gates);
* :meth:`Method.epoch_summary` ``(net, guide, config) -> dict``: what an SVI epoch's history
  record reports of the network; at least ``units_kept`` and ``units_total``
  (``{layer or site: int}``);
* masks: :meth:`Method.check_criterion`, :meth:`Method.criterion_for_run`,
  :meth:`Method.compute_masks` ``(net, guide, criterion, data, progress)`` (an object with
  ``masks() -> {name: bool tensor}``, ``summary() -> str`` and ``to_dict() -> dict``, as
  :class:`~pyro_sbp.reduction.PruningResult`), :meth:`Method.current_masks`,
  :meth:`Method.full_masks` (every weight or unit kept), :meth:`Method.apply_masks`,
  :meth:`Method.save_masks` and :meth:`Method.load_masks` (``masks.pt``);
* :meth:`Method.export` ``(net, input_shape) -> (full, pruned)``: plain dense ``nn.Module`` s
  in evaluation mode (``full``: every unit; ``pruned``: the removed units physically gone),
  which ``export`` writes as TorchScript and ``bench`` times; :meth:`Method.write_exports`
  ``(net, input_shape, run_dir) -> [file names]`` writes any further artefacts (default none);
* :meth:`Method.to_arviz` ``(net, guide, num_chains, num_draws, seed)``: posterior draws as
  ArviZ data (:mod:`pyro_sbp.diagnostics.arviz_data`'s form);
* :meth:`Method.report` ``(run_dir, criterion, bench, min_run_time) -> dict`` and
  :meth:`Method.format_summary` ``(report) -> str``: ``pyro-sbp report``.

**Registering.** :func:`register_method` adds an entry. Entries of modules not imported yet are
listed in ``_LAZY`` (name -> module): :func:`get_method` imports the module, which must call
:func:`register_method` for its methods when imported, so that importing this module stays
cheap and free of cycles (it imports nothing of the trainer at module level).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: The methods' names, in the order ``--help`` lists them.
METHOD_NAMES = ("sbp", "sparse-vd", "bc-gnj", "bc-ghs")

#: Methods registered by the module that defines them, imported on first use.
_LAZY = {
    "sparse-vd": "pyro_sbp.models.sparse_vd",
    "bc-gnj": "pyro_sbp.models.bayesian_compression",
    "bc-ghs": "pyro_sbp.models.bayesian_compression",
}


class Method:
    """What the pipeline needs to know of a pruning method (see the module's docstring for the
    contract of each member). Subclasses override every method that raises here."""

    name: str = ""
    description: str = ""
    default_criterion: str = ""
    criteria_help: str = ""

    # --- construction ----------------------------------------------------------------------

    def prepare(self, net: nn.Module, config: Any) -> nn.Module:
        """The network ready for this method's model and guide (may convert it in place)."""
        raise NotImplementedError(f"method {self.name!r} does not define prepare")

    def build_model(self, net: nn.Module, num_data: int, input_shape, config: Any):
        """The Pyro model, called as ``model(x, y, idx, kl_weight)``."""
        raise NotImplementedError(f"method {self.name!r} does not define build_model")

    def build_guide(self, net: nn.Module, num_data: int, config: Any):
        """The Pyro guide, called with the model's arguments."""
        raise NotImplementedError(f"method {self.name!r} does not define build_guide")

    # --- training --------------------------------------------------------------------------

    def is_variational(self, key: str) -> bool:
        """Whether parameter or buffer ``key`` is the method's, not the plain network's."""
        raise NotImplementedError(f"method {self.name!r} does not define is_variational")

    def set_stochastic(self, net: nn.Module, enabled: bool) -> None:
        """Noise on (SVI) or off (deterministic pretraining)."""
        raise NotImplementedError(f"method {self.name!r} does not define set_stochastic")

    def update(self, net: nn.Module, guide) -> None:
        """Copy what evaluation needs from the guide into the network (default: nothing)."""

    def epoch_summary(self, net: nn.Module, guide, config: Any) -> dict:
        """Entries of an SVI epoch's history record; at least ``units_kept``, ``units_total``."""
        raise NotImplementedError(f"method {self.name!r} does not define epoch_summary")

    # --- masks -----------------------------------------------------------------------------

    def check_criterion(self, criterion: str | None) -> None:
        """ValueError (one line, listing what is accepted) unless ``criterion`` is one of the
        method's (``None`` is always accepted: no pruning during training)."""
        raise NotImplementedError(f"method {self.name!r} does not define check_criterion")

    def criterion_for_run(self, criterion: str | None, training_criterion: str | None) -> str:
        """The criterion ``prune``/``export``/``report`` use when given ``criterion`` (may be
        ``None``) for a run that pruned during training with ``training_criterion``."""
        if criterion is not None:
            self.check_criterion(criterion)
            return criterion
        return training_criterion or self.default_criterion

    def compute_masks(self, net: nn.Module, guide, criterion: str, data=None, *, progress=False):
        """Keep-masks under ``criterion`` (on top of the masks already applied)."""
        raise NotImplementedError(f"method {self.name!r} does not define compute_masks")

    def current_masks(self, net: nn.Module) -> dict[str, Tensor]:
        """The keep-masks applied to ``net`` now (copies)."""
        raise NotImplementedError(f"method {self.name!r} does not define current_masks")

    def full_masks(self, net: nn.Module) -> dict[str, Tensor]:
        """Masks that keep everything (the unpruned network)."""
        return {k: torch.ones_like(m) for k, m in self.current_masks(net).items()}

    def apply_masks(self, net: nn.Module, masks) -> None:
        """Write keep-masks (a ``{name: tensor}`` dict or a :meth:`compute_masks` result)."""
        raise NotImplementedError(f"method {self.name!r} does not define apply_masks")

    def save_masks(self, masks, path: str | Path) -> None:
        raise NotImplementedError(f"method {self.name!r} does not define save_masks")

    def load_masks(self, path: str | Path, net: nn.Module | None = None) -> dict[str, Tensor]:
        raise NotImplementedError(f"method {self.name!r} does not define load_masks")

    # --- export and diagnostics ------------------------------------------------------------

    def export(self, net: nn.Module, input_shape) -> tuple[nn.Module, nn.Module]:
        """``(full, pruned)``: plain dense modules in evaluation mode."""
        raise NotImplementedError(f"method {self.name!r} does not define export")

    def write_exports(self, net: nn.Module, input_shape, run_dir: str | Path) -> list[str]:
        """Write further exported artefacts into ``run_dir``; return their file names."""
        return []

    def to_arviz(self, net: nn.Module, guide, num_chains=4, num_draws=500, seed=0):
        raise NotImplementedError(f"method {self.name!r} does not define to_arviz")

    def report(self, run_dir, criterion=None, *, bench=True, min_run_time=0.5) -> dict:
        raise NotImplementedError(f"method {self.name!r} does not define report")

    def format_summary(self, report: dict) -> str:
        raise NotImplementedError(f"method {self.name!r} does not define format_summary")

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {self.description}>"


class LayerMasksMethod(Method):
    """A method whose masks are one bool tensor per Bayesian layer (``{layer: mask}``, the
    layers' own ``mask`` buffers), saved as ``masks.pt``: Sparse VD's weight masks and Bayesian
    Compression's group masks. A subclass says which layers (:meth:`layers`), how a pruning
    result is turned into masks (its ``masks()``) and how masks are checked against a network
    (:meth:`check_layer_masks`, a ValueError naming what differs)."""

    def layers(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def check_layer_masks(self, net: nn.Module, masks: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def current_masks(self, net):
        return {name: layer.mask.detach().cpu() > 0 for name, layer in self.layers(net)}

    def save_masks(self, masks, path):
        from pyro_sbp.infer.checkpoint import save_atomic

        if not isinstance(masks, Mapping):
            masks = masks.masks()
        save_atomic({k: m.detach().cpu().to(torch.bool) for k, m in masks.items()}, path)

    def load_masks(self, path, net=None):
        from pyro_sbp.infer.checkpoint import CheckpointError, safe_load

        masks = safe_load(Path(path), "masks file")
        if not isinstance(masks, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) and v.dtype == torch.bool
            for k, v in masks.items()
        ):
            raise CheckpointError(f"{path}: not a masks file ({{layer: bool tensor}})")
        if net is not None:
            try:
                self.check_layer_masks(net, masks)
            except ValueError as e:
                raise CheckpointError(f"{path} holds masks for another network: {e}") from None
        return masks


class SBPMethod(Method):
    """Structured Bayesian Pruning, exactly the library's original path (gates, criteria of
    :mod:`pyro_sbp.reduction`, :func:`~pyro_sbp.export.export_pruned`, the SBP report)."""

    name = "sbp"
    description = "Structured Bayesian Pruning: a log-normal multiplicative gate per unit"
    default_criterion = "bmrs-n"

    @property
    def criteria_help(self) -> str:  # type: ignore[override]
        from pyro_sbp.reduction import CRITERIA_HELP

        return CRITERIA_HELP

    def prepare(self, net, config):
        from pyro_sbp.models import make_prunable

        return make_prunable(net, input_layers=config.input_gates, low=config.low, high=config.high)

    def build_model(self, net, num_data, input_shape, config):
        from pyro_sbp.models import SBPModel

        return SBPModel(net, num_data, input_shape, kl_weight=config.kl_weight, noise=config.noise)

    def build_guide(self, net, num_data, config):
        from pyro_sbp.guides import SBPGuide

        return SBPGuide(net, num_data, init_log_scale=config.init_log_scale)

    def is_variational(self, key):
        from pyro_sbp.models.prunable import in_gate

        return in_gate(key)

    def set_stochastic(self, net, enabled):
        from pyro_sbp.models import set_gates_enabled

        set_gates_enabled(net, enabled)

    def update(self, net, guide):
        guide.update_gates()

    def epoch_summary(self, net, guide, config):
        from pyro_sbp.infer.trainer import units_kept_snr
        from pyro_sbp.models import named_gates

        if config.prune_criterion is not None:
            kept = {site: int(g.mask.sum()) for site, g in named_gates(net)}
        else:
            kept = units_kept_snr(guide)
        return {
            "units_kept": kept,
            "units_total": {site: g.num_units for site, g in named_gates(net)},
        }

    def check_criterion(self, criterion):
        if criterion is not None:
            from pyro_sbp.reduction import parse_criterion

            parse_criterion(criterion)

    def criterion_for_run(self, criterion, training_criterion):
        from pyro_sbp.reduction import criterion_for_run

        return criterion_for_run(criterion, training_criterion)

    def compute_masks(self, net, guide, criterion, data=None, *, progress=False):
        from pyro_sbp.reduction import compute_masks

        return compute_masks(net, guide, criterion, data, progress=progress)

    def current_masks(self, net):
        from pyro_sbp.models import named_gates

        return {site: g.mask.clone() for site, g in named_gates(net)}

    def apply_masks(self, net, masks):
        from pyro_sbp.reduction import apply_masks

        apply_masks(net, masks)

    def save_masks(self, masks, path):
        from pyro_sbp.reduction import save_masks

        save_masks(masks, path)

    def load_masks(self, path, net=None):
        from pyro_sbp.reduction import load_masks

        return load_masks(path, net)

    def export(self, net, input_shape):
        from pyro_sbp.export import export_full, export_pruned

        return export_full(net, input_shape), export_pruned(net, input_shape)

    def to_arviz(self, net, guide, num_chains=4, num_draws=500, seed=0):
        from pyro_sbp.diagnostics.arviz_data import to_arviz

        return to_arviz(net, guide, num_chains=num_chains, num_draws=num_draws, seed=seed)

    def report(self, run_dir, criterion=None, *, bench=True, min_run_time=0.5):
        from pyro_sbp.diagnostics import make_report

        return make_report(run_dir, criterion, bench=bench, min_run_time=min_run_time)

    def format_summary(self, report):
        from pyro_sbp.diagnostics import format_summary

        return format_summary(report)


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under ``method.name`` (replacing an entry of that
    name); returns it, so that it can be used as ``X = register_method(XMethod())``."""
    if not isinstance(method, Method) or not method.name:
        raise ValueError(f"expected a Method with a name, got {method!r}")
    _REGISTRY[method.name] = method
    return method


def _unknown(name: object) -> ValueError:
    return ValueError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name``.

    :raises ValueError: for an unknown name (the message lists the known ones), or a known
        method whose module cannot be imported.
    """
    if not isinstance(name, str) or (name not in METHOD_NAMES and name not in _REGISTRY):
        raise _unknown(name)
    if name not in _REGISTRY and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ImportError as e:
            raise ValueError(f"method {name!r} is not available: {e}") from None
    if name not in _REGISTRY:
        raise ValueError(f"method {name!r} is not available: {_LAZY.get(name)} registers none")
    return _REGISTRY[name]


class _Methods(Mapping):
    """The registry as a read-only mapping, loading lazily registered entries on access."""

    def __getitem__(self, name: str) -> Method:
        try:
            return get_method(name)
        except ValueError as e:
            raise KeyError(str(e)) from None

    def __iter__(self) -> Iterator[str]:
        yield from METHOD_NAMES
        yield from (n for n in _REGISTRY if n not in METHOD_NAMES)

    def __len__(self) -> int:
        return len(set(METHOD_NAMES) | set(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in METHOD_NAMES or name in _REGISTRY

    def __repr__(self) -> str:
        return f"METHODS({', '.join(self)})"


#: The registry: ``METHODS["sparse-vd"]`` is the :class:`Method` of Sparse VD.
METHODS: Mapping[str, Method] = _Methods()

SBP = register_method(SBPMethod())
