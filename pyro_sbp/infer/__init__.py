"""Inference: SVI of gated networks with the analytic-KL ELBO, checkpoints and resumption."""

from pyro_sbp.infer.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    safe_load,
    save_atomic,
    save_checkpoint,
)
from pyro_sbp.infer.compact_elbo import CompactMeanField_ELBO
from pyro_sbp.infer.distributed import DistributedRunFailed, DistributedTrainer
from pyro_sbp.infer.optim import adam, param_groups
from pyro_sbp.infer.run_lock import RunDirectoryLocked, RunLock
from pyro_sbp.infer.trainer import (
    DEFAULT_CHECKPOINT_EVERY,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    evaluate,
    units_kept_snr,
)

__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "CheckpointError",
    "CompactMeanField_ELBO",
    "DistributedRunFailed",
    "DistributedTrainer",
    "NonFiniteLossError",
    "RunDirectoryLocked",
    "RunLock",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "adam",
    "evaluate",
    "load_checkpoint",
    "load_weights",
    "param_groups",
    "safe_load",
    "save_atomic",
    "save_checkpoint",
    "units_kept_snr",
]

#: Behind the optional ``lightning`` extra: imported on first use, so that the library works
#: without Lightning installed.
_LIGHTNING = ("KLWarmup", "PruneEveryEpoch", "SBPLightningModule")


def __getattr__(name: str):
    if name in _LIGHTNING:
        from pyro_sbp.infer import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
