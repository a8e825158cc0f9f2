"""``masks.pt``: the keep-masks of a pruned run, as a file of plain tensors.

The file is a ``torch.save`` d dict ``{gate site: bool tensor of shape (units,)}``, written
atomically and read with the safe loader (no arbitrary object is unpickled; see
:func:`pyro_sbp.infer.checkpoint.safe_load`).
"""

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from pyro_sbp.infer.checkpoint import CheckpointError, safe_load, save_atomic
from pyro_sbp.reduction.criteria import PruningResult, check_masks

__all__ = ["MASKS_NAME", "load_masks", "save_masks"]

MASKS_NAME = "masks.pt"


def save_masks(masks: dict[str, Tensor] | PruningResult, path: str | os.PathLike) -> None:
    """Write keep-masks (or a :class:`~pyro_sbp.reduction.PruningResult` 's) to ``path``."""
    if isinstance(masks, PruningResult):
        masks = masks.masks()
    save_atomic({site: m.detach().cpu().to(torch.bool) for site, m in masks.items()}, path)


def load_masks(path: str | os.PathLike, net: nn.Module | None = None) -> dict[str, Tensor]:
    """Read a masks file written by :func:`save_masks`, safely.

    :param net: if given, the masks are checked against its gates (sites and shapes).
    :raises FileNotFoundError: if there is no such file.
    :raises CheckpointError: if the file is corrupt, holds anything but ``{site: bool
        tensor}``, or (with ``net``) holds masks for another network; the message names the
        file.
    """
    path = Path(path)
    masks = safe_load(path, "masks file")
    if not isinstance(masks, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) and v.dtype == torch.bool and v.dim() == 1
        for k, v in masks.items()
    ):
        raise CheckpointError(f"{path}: not a masks file ({{gate site: 1-d bool tensor}})")
    if net is not None:
        try:
            check_masks(net, masks)
        except ValueError as e:
            raise CheckpointError(f"{path} holds masks for another network: {e}") from None
    return masks
