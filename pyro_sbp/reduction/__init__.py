"""Bayesian Model Reduction and the baseline criteria: which units can go."""

from pyro_sbp.reduction.criteria import (
    CRITERIA_HELP,
    DEFAULT_CRITERION,
    LayerPruning,
    PruningResult,
    apply_masks,
    check_masks,
    compute_masks,
    criterion_for_run,
    parse_criterion,
)
from pyro_sbp.reduction.delta_f import (
    delta_f,
    delta_f_monte_carlo,
    expected_theta,
    register_delta_f,
    snr,
)
from pyro_sbp.reduction.masks_file import MASKS_NAME, load_masks, save_masks

__all__ = [
    "CRITERIA_HELP",
    "DEFAULT_CRITERION",
    "MASKS_NAME",
    "LayerPruning",
    "PruningResult",
    "apply_masks",
    "check_masks",
    "compute_masks",
    "criterion_for_run",
    "delta_f",
    "delta_f_monte_carlo",
    "expected_theta",
    "load_masks",
    "parse_criterion",
    "register_delta_f",
    "save_masks",
    "snr",
]
