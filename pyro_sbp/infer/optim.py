r"""One ``torch.optim`` optimiser over the parameters of a Pyro model and guide.

``pyro.optim.Adam`` keeps one torch optimiser per parameter and steps them one by one: for a
gated LeNet5-Caffe (16 parameters) that is some 300 operator calls per step, as many as the
network's own forward and backward passes. One ``torch.optim.Adam`` with two parameter groups
(the weights, and the variational parameters at their own rate), fused into one kernel where
PyTorch has one, does the same arithmetic per element. It is Pyro's own idiom for a torch
optimiser (``ELBO.differentiable_loss``, as in Pyro's Lightning example)::

    elbo = CompactMeanField_ELBO()
    elbo.differentiable_loss(model, guide, x, y, idx)  # creates the guide's parameters
    optim = adam(lr=1e-3, gate_lr=1e-2)
    for x, y, idx in loader:
        optim.zero_grad()
        elbo.differentiable_loss(model, guide, x, y, idx).backward()
        optim.step()
"""

from collections.abc import Callable

import pyro
import torch


def _sbp_variational(name: str) -> bool:
    from pyro_sbp.models.prunable import in_gate

    return in_gate(name)


def param_groups(
    lr: float,
    gate_lr: float | None = None,
    is_variational: Callable[[str], bool] | None = None,
) -> list[dict]:
    """The parameters in Pyro's param store (unconstrained, as Pyro optimises them) in two
    groups: ``{"params": [...], "lr": lr, "names": [...]}`` for the rest and one with
    ``gate_lr`` for those ``is_variational(name)`` names (default: the SBP gates' posterior
    parameters); groups without parameters are left out.

    :raises ValueError: if the store is empty (run the model and guide once first) or a rate is
        not a positive number.
    """
    gate_lr = lr if gate_lr is None else gate_lr
    for what, value in (("lr", lr), ("gate_lr", gate_lr)):
        if not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"{what} must be a positive number, got {value!r}")
    is_variational = _sbp_variational if is_variational is None else is_variational
    store = pyro.get_param_store()
    names = list(store.keys())
    if not names:
        raise ValueError(
            "Pyro's param store is empty: run the model and guide once (e.g. "
            "elbo.differentiable_loss(model, guide, *batch)) before building the optimiser"
        )
    groups = {False: [], True: []}
    for name in names:
        groups[bool(is_variational(name))].append(name)
    out = []
    for variational, rate in ((False, lr), (True, gate_lr)):
        if groups[variational]:
            params = [store[n].unconstrained() for n in groups[variational]]
            out.append({"params": params, "lr": rate, "names": groups[variational]})
    return out


def adam(
    lr: float = 1e-3,
    gate_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    is_variational: Callable[[str], bool] | None = None,
    **kwargs,
) -> torch.optim.Adam:
    """``torch.optim.Adam`` over :func:`param_groups`, fused (one kernel for every parameter)
    where PyTorch supports it for their device and dtype, else PyTorch's default
    implementation. Other keyword arguments go to ``torch.optim.Adam``."""
    groups = param_groups(lr, gate_lr, is_variational)
    if "fused" not in kwargs and "foreach" not in kwargs:
        try:
            return torch.optim.Adam(groups, betas=betas, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # no fused kernel for these tensors
            pass
    return torch.optim.Adam(groups, betas=betas, **kwargs)
