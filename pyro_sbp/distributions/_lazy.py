"""Distributions whose ``expand`` costs no tensor operation until an expanded tensor is read.

A Pyro plate expands every site's distribution along the batch at every step: a gate of
``(units,)`` parameters becomes one of ``(batch, units)``. Everything the gate distributions
compute (samples, KLs, moments) only needs the compact parameters, which the expanded tensors
merely broadcast. Here ``expand`` records the distribution it was expanded from and copies the
statistics that one has already computed (its compact parameters and lazily computed values,
valid for any expansion, since an expansion only broadcasts). An expanded parameter (``loc``,
...) is formed on first access, as ``torch.distributions`` would have formed it eagerly.
"""

import torch
from torch import Tensor


def broadcast(*values) -> tuple[Tensor, ...]:
    """``torch.distributions.utils.broadcast_all`` without its operations where they do nothing:
    tensors of one shape, dtype and device are returned as they are."""
    from torch.distributions.utils import broadcast_all

    first = values[0]
    if all(isinstance(v, Tensor) for v in values) and all(
        v.shape == first.shape and v.dtype == first.dtype and v.device == first.device
        for v in values[1:]
    ):
        return values
    return broadcast_all(*values)


class LazyExpand:
    """Mixin of a distribution whose parameters are :attr:`_param_names` and whose cached
    statistics (``lazy_property`` values) are :attr:`_shared_cache`: those of the distribution
    an expansion came from are shared with it."""

    _param_names: tuple[str, ...] = ()
    _shared_cache: tuple[str, ...] = ()

    def _lazy_expand(self, new, batch_shape: torch.Size):
        new.__dict__["_expanded_from"] = self
        for name in self._shared_cache:
            if name in self.__dict__:
                new.__dict__[name] = self.__dict__[name]
        return new

    @property
    def expanded_from(self):
        """The distribution this one is an ``expand`` of (``None`` if it is not one): its
        batch shape is a broadcast of this one's to :attr:`batch_shape`."""
        return self.__dict__.get("_expanded_from")

    def __getattr__(self, name: str):
        # Only reached when the attribute is missing: an expanded parameter not formed yet.
        source = self.__dict__.get("_expanded_from")
        if source is not None and name in type(self)._param_names:
            value = getattr(source, name).expand(self.batch_shape)
            self.__dict__[name] = value
            return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
