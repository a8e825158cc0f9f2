"""Data sets, seeded splits and data loaders.

:func:`load_dataset` reads one of the data sets named in :data:`DATASETS` into memory and
splits it into train / validation / test :class:`~torch.utils.data.TensorDataset` s (a
:class:`DataSplits`); :func:`make_loaders` wraps those in
:class:`~torch.utils.data.DataLoader` s whose training loader also yields the example indices
that a Pyro ``plate`` subsample needs::

    splits = load_dataset("digits", seed=0)
    loaders = make_loaders(splits, batch_size=128, seed=0)
    for x, y, idx in loaders["train"]:
        ...

The data sets:

* ``digits`` -- scikit-learn's 8x8 hand-written digits (embedded, the default for quick runs);
  inputs ``(1, 8, 8)``.
* ``fashion-mnist`` -- inputs ``(1, 28, 28)``; the IDX files (gzip'd or not) are looked for in
  ``data_dir``, in the torchvision layout ``data_dir/FashionMNIST/raw``, and in
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
* ``mnist`` -- inputs ``(1, 28, 28)``, through :class:`torchvision.datasets.MNIST` with
  ``root=data_dir``.
* ``cifar10`` -- inputs ``(3, 32, 32)``, from the torchvision root ``data_dir``
  (``cifar-10-batches-py/``), md5-checked as torchvision does and unpickled with NumPy arrays
  and plain values allowed only (the batches are Python pickles).
* ``synthetic`` -- a seeded classification problem of flat vectors in which only the first
  ``informative`` features carry signal (see :func:`make_synthetic`).

Nothing is ever downloaded unless ``download=True`` is passed.

Inputs are float32 in ``[0, 1]``, labels int64. The inputs are not normalised; the per-channel
mean and standard deviation of the training inputs are in :attr:`DataSplits.mean` and
:attr:`DataSplits.std` for the network to normalise with. :attr:`DataSplits.split` records the
seed, the fractions and the indices of every part, so that a run can store it and be checked
against, or rebuilt from, the same split.
"""

from ._loaders import make_loaders
from ._sources import FASHION_MNIST_SYSTEM_DIRS, RawData, make_synthetic
from ._splits import DATASETS, DataSplits, load_dataset
from .idx import IDXFormatError, read_idx, write_idx

__all__ = [
    "DATASETS",
    "FASHION_MNIST_SYSTEM_DIRS",
    "DataSplits",
    "IDXFormatError",
    "RawData",
    "load_dataset",
    "make_loaders",
    "make_synthetic",
    "read_idx",
    "write_idx",
]
