"""Atomic, resumable checkpoints of a training run."""

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``.

    A run interrupted while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # The checkpoint holds optimiser states, constraints and RNG states, not only tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


def architecture(state_dict: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of a network's state dict: what a checkpoint must match to be loaded."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def architecture_mismatch(expected: dict, found: dict) -> list[str]:
    """Readable differences between two architectures (empty when they match)."""
    diffs = []
    for key in sorted(set(expected) | set(found)):
        if key not in found:
            diffs.append(f"{key}: missing from the checkpoint")
        elif key not in expected:
            diffs.append(f"{key}: in the checkpoint but not in the network")
        elif tuple(expected[key]) != tuple(found[key]):
            diffs.append(f"{key}: network {tuple(expected[key])}, checkpoint {tuple(found[key])}")
    return diffs
