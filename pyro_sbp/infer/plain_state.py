"""Training state in the forms that ``torch.load(weights_only=True)`` accepts.

A checkpoint must load without unpickling arbitrary objects (a pickle can run any code when it
is loaded), so everything in it is a tensor, a number, a string, ``None``, or a list, tuple or
dict of those. Three parts of a run's state are not naturally so, and are converted here:

* Pyro's parameter store keeps a :class:`~torch.distributions.constraints.Constraint` object
  per parameter: stored by name (``"positive"``, or ``{"name": "interval", "lower_bound": 0,
  "upper_bound": 1}`` for a parametrised one) and rebuilt on load;
* Python's ``random`` state and NumPy's legacy global state: their integer arrays become int64
  tensors;
* the CUDA generators' states are tensors already; they are kept when CUDA is in use.
"""

import random
from typing import Any

import numpy as np
import torch
from pyro.distributions import constraints
from torch import Tensor

__all__ = [
    "UnsafeStateError",
    "check_plain",
    "constraint_from_plain",
    "constraint_to_plain",
    "get_plain_rng_state",
    "param_store_from_plain",
    "param_store_to_plain",
    "set_plain_rng_state",
]

_PLAIN_SCALARS = (bool, int, float, str, type(None))

# The parametrised constraints Pyro and torch define, by factory name, with the attributes that
# rebuild them. Only exact types are matched: a subclass may add state these would lose.
_PARAMETRISED: dict[str, tuple[type, tuple[str, ...]]] = {
    "interval": (constraints.interval, ("lower_bound", "upper_bound")),
    "half_open_interval": (constraints.half_open_interval, ("lower_bound", "upper_bound")),
    "integer_interval": (constraints.integer_interval, ("lower_bound", "upper_bound")),
    "greater_than": (constraints.greater_than, ("lower_bound",)),
    "greater_than_eq": (constraints.greater_than_eq, ("lower_bound",)),
    "less_than": (constraints.less_than, ("upper_bound",)),
    "independent": (constraints.independent, ("base_constraint", "reinterpreted_batch_ndims")),
}


class UnsafeStateError(TypeError):
    """A value that a checkpoint cannot hold without pickling an arbitrary object."""


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise :class:`UnsafeStateError` naming the first value under ``obj`` that is not a
    tensor, a plain scalar, or a list, tuple or dict of those (dict keys: str or int)."""
    if isinstance(obj, (Tensor, *_PLAIN_SCALARS)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise UnsafeStateError(f"{where}: key {key!r} of type {type(key).__name__}")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, list | tuple) and type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise UnsafeStateError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}")


def _singletons() -> dict[int, str]:
    out = {}
    for name in dir(constraints):
        value = getattr(constraints, name)
        if isinstance(value, constraints.Constraint):
            out.setdefault(id(value), name)
    return out


def constraint_to_plain(c: constraints.Constraint) -> str | dict:
    """A constraint's name (a singleton such as ``constraints.positive``) or a dict that
    rebuilds it (a parametrised one); :class:`UnsafeStateError` for any other."""
    name = _singletons().get(id(c))
    if name is not None:
        return name
    for name, (cls, attrs) in _PARAMETRISED.items():
        if type(c) is cls:
            out: dict[str, Any] = {"name": name}
            for attr in attrs:
                value = getattr(c, attr)
                if isinstance(value, constraints.Constraint):
                    value = constraint_to_plain(value)
                out[attr] = value
            return out
    raise UnsafeStateError(
        f"constraint {c!r} ({type(c).__qualname__}) has no stored form; checkpoints hold "
        "Pyro's and torch's named constraints and interval, greater_than(_eq), less_than and "
        "independent"
    )


def constraint_from_plain(spec: str | dict) -> constraints.Constraint:
    """Inverse of :func:`constraint_to_plain`."""
    if isinstance(spec, str):
        value = getattr(constraints, spec, None)
        if not isinstance(value, constraints.Constraint):
            raise ValueError(f"unknown constraint {spec!r}")
        return value
    if not isinstance(spec, dict) or spec.get("name") not in _PARAMETRISED:
        raise ValueError(f"unknown constraint {spec!r}")
    cls, attrs = _PARAMETRISED[spec["name"]]
    args = []
    for attr in attrs:
        value = spec[attr]
        if isinstance(value, str | dict) and attr == "base_constraint":
            value = constraint_from_plain(value)
        args.append(value)
    return cls(*args)


def param_store_to_plain(state: dict) -> dict:
    """Pyro's ``ParamStoreDict.get_state()`` with its constraints by name."""
    return {
        "params": dict(state["params"]),
        "constraints": {k: constraint_to_plain(c) for k, c in state["constraints"].items()},
    }


def param_store_from_plain(state: dict) -> dict:
    """Inverse of :func:`param_store_to_plain`, for ``ParamStoreDict.set_state``."""
    return {
        "params": dict(state["params"]),
        "constraints": {k: constraint_from_plain(c) for k, c in state["constraints"].items()},
    }


def get_plain_rng_state() -> dict:
    """torch's, Python's and NumPy's global random states (and CUDA's, once CUDA is in use),
    as tensors and numbers: what :func:`pyro.util.get_rng_state` holds, loadable safely."""
    version, internal, gauss_next = random.getstate()
    # The legacy global state is what pyro.set_rng_seed seeds, and what user code may draw from.
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()  # noqa: NPY002
    out = {
        "torch": torch.get_rng_state(),
        "random": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_plain_rng_state(state: dict) -> None:
    """Inverse of :func:`get_plain_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    r = state["random"]
    random.setstate((r["version"], tuple(int(v) for v in r["state"].tolist()), r["gauss_next"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    cuda = state.get("cuda")
    # A run resumed on a machine with another number of GPUs cannot continue their streams.
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
