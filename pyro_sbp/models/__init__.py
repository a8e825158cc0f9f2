"""Networks with multiplicative noise gates on their units, as Pyro models.

:func:`make_prunable` puts an :class:`SBPGate` after chosen layers of any network;
:class:`SBPModel` is the Pyro model (categorical likelihood, per-example gate noise, KL scaled to
the data set); :mod:`pyro_sbp.models.nets` holds the built-in plain networks and
:mod:`pyro_sbp.models.resnet` the CIFAR ResNets (:class:`ResNet20`, :class:`ResNet56`).
"""

from pyro_sbp.models.gate import DEFAULT_HIGH, DEFAULT_LOW, SBPGate
from pyro_sbp.models.nets import INPUT_SHAPES, NETWORKS, Normalize, build_network
from pyro_sbp.models.prunable import (
    commutes_with_max,
    gated_layer_name,
    is_input_gate,
    make_prunable,
    named_gates,
    set_gates_enabled,
)
from pyro_sbp.models.resnet import ResNet20, ResNet56
from pyro_sbp.models.sbp_model import SBPModel, check_input, set_kl_weight

__all__ = [
    "DEFAULT_HIGH",
    "DEFAULT_LOW",
    "INPUT_SHAPES",
    "NETWORKS",
    "Normalize",
    "ResNet20",
    "ResNet56",
    "SBPGate",
    "SBPModel",
    "build_network",
    "check_input",
    "commutes_with_max",
    "gated_layer_name",
    "is_input_gate",
    "make_prunable",
    "named_gates",
    "set_gates_enabled",
    "set_kl_weight",
]
