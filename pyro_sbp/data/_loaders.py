"""Batched :class:`~torch.utils.data.DataLoader` s over the in-memory splits."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from ._splits import DataSplits

__all__ = ["make_loaders"]


def _as_tuple(batch: Sequence[Tensor]) -> tuple[Tensor, ...]:
    # The dataset is indexed with a whole batch of indices at once (see make_loaders), so the
    # "collation" only has to keep the tuple a tuple.
    return tuple(batch)


def _batched_loader(
    dataset: TensorDataset,
    sampler: RandomSampler | SequentialSampler,
    batch_size: int,
    num_workers: int,
    seed: int,
) -> DataLoader:
    # Index the tensors with a list of indices per batch instead of collating batch_size single
    # examples: the same batches, an order of magnitude faster for in-memory data. The loader's
    # own generator (which draws the workers' base seed at every epoch) is a separate seeded
    # one, so that iterating a loader never advances torch's global random state.
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=False),
        num_workers=num_workers,
        collate_fn=_as_tuple,
        generator=torch.Generator().manual_seed(seed),
    )


def _check_positive(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def make_loaders(
    splits: DataSplits,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    eval_batch_size: int | None = None,
) -> dict[str, DataLoader]:
    """
    Make the data loaders of a :class:`DataSplits`.

    * ``'train'`` reshuffles every epoch with a :class:`torch.Generator` seeded with ``seed``
      (so the sequence of epochs is the same for the same seed) and yields ``(x, y, idx)``
      triples, ``idx`` being the int64 positions of the examples in ``splits.train`` -- the
      subsample indices of a Pyro ``plate("data", splits.num_train, subsample=idx)``.
    * ``'val'`` (only if ``splits.val`` is not ``None``) and ``'test'`` go through the examples
      in order and yield ``(x, y)`` pairs.

    The last batch of an epoch may be smaller than the batch size. Iterating the loaders does
    not touch torch's global random state (every generator they use is their own and seeded).

    :param DataSplits splits: The splits, e.g. from :func:`load_dataset`.
    :param int batch_size: Training batch size.
    :param int seed: Seed of the training shuffle.
    :param int num_workers: Worker processes per loader (0 loads in the main process, which
        is usually fastest for in-memory data).
    :param eval_batch_size: Batch size of the evaluation loaders; defaults to ``batch_size``.
    :type eval_batch_size: int or None
    :return: The loaders by split name.
    :rtype: dict[str, ~torch.utils.data.DataLoader]
    :raises ValueError: for a non-positive batch size, a negative seed or ``num_workers``.
    """
    batch_size = _check_positive("batch_size", batch_size)
    eval_batch_size = (
        batch_size
        if eval_batch_size is None
        else _check_positive("eval_batch_size", eval_batch_size)
    )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        isinstance(num_workers, bool)
        or not isinstance(num_workers, numbers.Integral)
        or num_workers < 0
    ):
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")

    x, y = splits.train.tensors
    indexed = TensorDataset(x, y, torch.arange(len(x), dtype=torch.int64))
    generator = torch.Generator().manual_seed(int(seed))
    loaders = {
        "train": _batched_loader(
            indexed,
            RandomSampler(indexed, generator=generator),
            batch_size,
            int(num_workers),
            int(seed),
        )
    }
    for key, dataset in (("val", splits.val), ("test", splits.test)):
        if dataset is not None:
            loaders[key] = _batched_loader(
                dataset, SequentialSampler(dataset), eval_batch_size, int(num_workers), int(seed)
            )
    return loaders
