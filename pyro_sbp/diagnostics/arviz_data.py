"""Posterior draws of the gates as ArviZ data, built on xarray.

The data are plain :class:`xarray.Dataset` s, wrapped as :class:`arviz.InferenceData` where
ArviZ has it (0.x) and as an :class:`xarray.DataTree` otherwise (ArviZ 1.x), so the same code
serves both; either is saved as netCDF and read back with ``arviz.from_netcdf``.
"""

from pathlib import Path

import numpy as np
import torch
import xarray as xr

from pyro_sbp.reduction import compute_masks
from pyro_sbp.reduction.criteria import _posteriors64


def var_name(site: str) -> str:
    """A netCDF-safe variable name for a gate site: ``"features.0.gate"`` -> ``"features_0"``,
    ``"classifier.1.input_gate"`` -> ``"classifier_1_input_gate"``."""
    layer = site[: -len(".gate")] if site.endswith(".gate") else site
    return layer.replace(".", "_")


def _datasets(net, guide, num_chains: int, num_draws: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    posterior, constant = {}, {}
    stats = {
        "delta_f_bmrs_n": compute_masks(net, guide, "bmrs-n"),
        "delta_f_bmrs_u4": compute_masks(net, guide, "bmrs-u:4"),
        "snr": compute_masks(net, guide, "snr:1"),
    }
    for site, (q, _, _) in _posteriors64(guide).items():
        name = var_name(site)
        dim = f"{name}_unit"
        n = q.loc.shape[0]
        u = torch.rand((num_chains, num_draws, n), generator=gen, dtype=torch.float64)
        theta = q.icdf(u.clamp(1e-12, 1 - 1e-12))
        coords_dims = ["chain", "draw", dim]
        posterior[f"theta_{name}"] = (coords_dims, theta.numpy())
        posterior[f"log_theta_{name}"] = (coords_dims, theta.log().numpy())
        gate = dict(guide._gates)[site]
        constant[f"mean_theta_{name}"] = ([dim], q.mean.numpy())
        constant[f"loc_{name}"] = ([dim], q.loc.numpy())
        constant[f"scale_{name}"] = ([dim], q.scale.numpy())
        constant[f"mask_{name}"] = ([dim], gate.mask.detach().cpu().numpy().astype(np.int8))
        for key, result in stats.items():
            constant[f"{key}_{name}"] = ([dim], result.layers[site].scores.numpy())
    coords = {"chain": np.arange(num_chains), "draw": np.arange(num_draws)}
    attrs = {"created_by": "pyro_sbp", "inference": "SVI (TraceMeanField_ELBO)"}
    post = xr.Dataset(posterior, coords=coords, attrs=attrs)
    const = xr.Dataset(constant, attrs=attrs)
    for site, _ in guide._gates:
        const.attrs[f"site_{var_name(site)}"] = site
    return post, const


def to_arviz(net, guide, num_chains: int = 4, num_draws: int = 500, seed: int = 0):
    """ArviZ data of a fitted gated network.

    ``posterior`` holds draws of :math:`\\theta` and :math:`\\log\\theta` for every gate,
    as ``theta_<layer>`` and ``log_theta_<layer>`` with dims ``(chain, draw, <layer>_unit)``
    (independent draws from the variational posterior, one "chain" per block of draws).
    ``constant_data`` holds, per unit, :math:`\\mathbb E[\\theta]`, the posterior's ``loc`` and
    ``scale``, the keep-``mask``, :math:`\\Delta F` under BMRS_N and BMRS_U-4, and the SNR.

    :return: :class:`arviz.InferenceData` (ArviZ 0.x) or :class:`xarray.DataTree` (ArviZ 1.x).
    """
    import arviz as az

    post, const = _datasets(net, guide, num_chains, num_draws, seed)
    if hasattr(az, "InferenceData"):
        return az.InferenceData(posterior=post, constant_data=const)
    return xr.DataTree.from_dict({"posterior": post, "constant_data": const})


def save_netcdf(data, path: str | Path) -> Path:
    """Write ArviZ data (either flavour) as netCDF; read it back with ``arviz.from_netcdf``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.to_netcdf(str(path))
    return path


__all__ = ["save_netcdf", "to_arviz", "var_name"]
