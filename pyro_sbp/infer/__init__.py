"""Inference: SVI of gated networks with the analytic-KL ELBO, checkpoints and resumption."""

from pyro_sbp.infer.checkpoint import load_checkpoint, save_atomic
from pyro_sbp.infer.trainer import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    evaluate,
    units_kept_snr,
)

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "load_checkpoint",
    "save_atomic",
    "units_kept_snr",
]
