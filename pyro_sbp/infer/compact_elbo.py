r"""``TraceMeanField_ELBO`` with each analytic KL computed once per distinct parameter."""

import math

import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan
from torch.distributions import kl_divergence
from torch.distributions.kl import _dispatch_kl

__all__ = ["CompactMeanField_ELBO"]


def _unwrap(fn):
    if isinstance(fn, Independent):
        return fn.base_dist, fn.reinterpreted_batch_ndims
    return fn, 0


def _params(d) -> dict[str, torch.Tensor] | None:
    out = {}
    for name in d.arg_constraints:
        value = getattr(d, name, None)
        if not isinstance(value, torch.Tensor):
            return None
        out[name] = value
    return out


def _expanded_sources(q, p, k: int):
    """``(q0, p0, copies)`` when ``q`` and ``p`` are expansions, along leading dims only, of
    distributions ``q0`` and ``p0`` of one batch shape (``expand`` of
    :class:`~pyro_sbp.distributions._lazy.LazyExpand`, which records its source): the
    compaction then needs no look at the parameters' strides and no tensor operation."""
    q0 = getattr(q, "expanded_from", None)
    p0 = getattr(p, "expanded_from", None)
    if q0 is None or p0 is None or q0.batch_shape != p0.batch_shape:
        return None
    lead = len(q.batch_shape) - len(q0.batch_shape)
    if lead <= 0 or lead > len(q.batch_shape) - k or q.batch_shape[lead:] != q0.batch_shape:
        return None
    return q0, p0, math.prod(q.batch_shape[:lead])


def _compact(q_fn, p_fn):
    """``(q, p, copies)``: the two distributions without the leading batch dims along which
    every parameter of both is only broadcast (stride 0, as a plate's ``expand`` leaves them),
    and how many copies those dims held; ``None`` when nothing can be compacted."""
    q, k = _unwrap(q_fn)
    p, kp = _unwrap(p_fn)
    if k != kp or q.batch_shape != p.batch_shape:
        return None
    lazy = _expanded_sources(q, p, k)
    if lazy is not None:
        q1, p1, copies = lazy
        if k:
            q1, p1 = Independent(q1, k), Independent(p1, k)
        return q1, p1, copies
    qp, pp = _params(q), _params(p)
    if qp is None or pp is None:
        return None
    tensors = [*qp.values(), *pp.values()]
    shape = q.batch_shape
    lead = 0
    # Only leading dims (the plates'), and never the event dims the Independent reinterprets.
    while lead < len(shape) - k and all(
        t.dim() == len(shape) and t.stride(lead) == 0 for t in tensors
    ):
        lead += 1
    if lead == 0:
        return None
    copies = math.prod(shape[:lead])
    index = (0,) * lead
    try:
        q1 = type(q)(**{n: t[index] for n, t in qp.items()}, validate_args=False)
        p1 = type(p)(**{n: t[index] for n, t in pp.items()}, validate_args=False)
    except TypeError:  # a constructor that does not take its arg_constraints by name
        return None
    if k:
        q1, p1 = Independent(q1, k), Independent(p1, k)
    return q1, p1, copies


def _fused_kl_sum(entries) -> torch.Tensor | float:
    """The weighted KL sum of ``(q, p, weight)`` entries (one-dimensional batches, analytic
    KLs), with one ``kl_divergence`` call for all the entries of the same pair of families: their
    parameters are concatenated, so that the operations per step do not grow with the number of
    gated layers. The KL is element-wise over the batch, so the value and the gradient are those
    of the per-site sums."""
    total = 0.0
    groups: dict[tuple, list] = {}
    for q, p, weight in entries:
        first = next(iter(_params(q).values()))
        key = (type(q), type(p), tuple(_params(q)), tuple(_params(p)), first.dtype, first.device)
        groups.setdefault(key, []).append((q, p, weight))
    for (q_type, p_type, q_names, p_names, *_), group in groups.items():
        q = q_type(
            **{n: torch.cat([getattr(g[0], n) for g in group]) for n in q_names},
            validate_args=False,
        )
        p = p_type(
            **{n: torch.cat([getattr(g[1], n) for g in group]) for n in p_names},
            validate_args=False,
        )
        kl = kl_divergence(q, p)
        weights = torch.cat([kl.new_ones(g[0].batch_shape) * g[2] for g in group])
        total = total + (kl * weights).sum()
    return total


def _check_reparametrized(name: str, guide_site) -> None:
    # Pyro's check_fully_reparametrized reads the site's score parts, not computed here.
    if is_validation_enabled() and not guide_site["fn"].has_rsample:
        raise NotImplementedError(
            f"All distributions in the guide must be reparameterizable: {name!r}"
        )


class CompactMeanField_ELBO(TraceMeanField_ELBO):
    r"""``TraceMeanField_ELBO`` that computes each latent site's analytic KL once per distinct
    parameter, with the same value and gradient.

    A gate site sampled in the data plate has batch shape ``(batch, units)``: the plate
    *expands* the ``(units,)`` posterior and prior along the batch (stride 0), and
    ``TraceMeanField_ELBO`` computes the KL on all ``batch * units`` elements before summing
    them. Here the leading batch dims along which every parameter of both distributions is only
    broadcast are dropped, the KL is computed on what is left and multiplied by the number of
    copies (exactly the sum of identical terms), then scaled as Pyro scales the site:

    .. math::

        \sum_{i=1}^{B} \sum_j s\, \mathrm{KL}(q_j \,\|\, p_j) = B\, s \sum_j
        \mathrm{KL}(q_j \,\|\, p_j).

    The compacted sites of the same pair of families (every gate of a network) share one KL
    call: their parameters are concatenated along the units, so the operations per step do
    not grow with the number of gated layers (the KL is element-wise, so the value and the
    gradient are the same). It also skips the log-densities of latent sites, which
    ``TraceMeanField_ELBO`` computes
    and then does not use when the KL is analytic. Sites whose KL is not registered, that are
    masked, or whose parameters are not broadcast fall back to exactly what
    ``TraceMeanField_ELBO`` does. Pyro's validation checks (model and guide sites, mean-field
    order, site shapes, full reparameterisation) run as they do there.
    """

    def _get_trace(self, model, guide, args, kwargs):
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            # A GuideMessenger (AutoNormalMessenger, ...) runs the model itself: Pyro's path.
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(model, trace=guide_trace), graph_type="flat"
        ).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] != "sample":
                        continue
                    if "log_prob" not in site:  # its shape, without computing it
                        site = site | {
                            "log_prob": torch.empty(site["fn"].batch_shape, device="meta")
                        }
                    check_site_shape(site, self.max_plate_nesting)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace

    def loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, _ = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_particle / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    @staticmethod
    def _log_prob_sum(site) -> torch.Tensor:
        log_prob = site["fn"].log_prob(site["value"])
        return scale_and_mask(log_prob, site["scale"], site["mask"]).sum()

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The negative ELBO as a differentiable tensor, with no host synchronisation (Pyro's
        ``Trace_ELBO.differentiable_loss`` reads the loss back twice and checks it for NaN,
        which would make a CUDA stream wait): check the loss where its value is needed."""
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._loss_tensor(model_trace, guide_trace) / self.num_particles
        return loss

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss = self._loss_tensor(model_trace, guide_trace)
        return torch_item(loss), loss

    def _loss_tensor(self, model_trace, guide_trace) -> torch.Tensor:
        elbo = 0.0
        fusable = []
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            _check_reparametrized(name, guide_site)
            entry = self._fusable(model_site, guide_site)
            if entry is not None:
                fusable.append(entry)
            else:
                elbo = elbo - self._kl_sum(model_site, guide_site)
        elbo = elbo - _fused_kl_sum(fusable)
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                # An auxiliary site of the guide: its entropy, as TraceMeanField_ELBO takes it.
                assert guide_site["infer"].get("is_auxiliary")
                _check_reparametrized(name, guide_site)
                elbo = elbo - self._log_prob_sum(guide_site)
        return -elbo

    @staticmethod
    def _fusable(model_site, guide_site):
        """``(q, p, weight)`` for a site whose compacted KL is element-wise over one dim of
        units (and so can share one KL call with the sites of the same families); else None."""
        q, p = guide_site["fn"], model_site["fn"]
        scale, mask = guide_site["scale"], guide_site["mask"]
        if mask is not None or (isinstance(scale, torch.Tensor) and scale.dim() > 0):
            return None
        compact = _compact(q, p)
        if compact is None:
            return None
        q1, p1, copies = compact
        qb, k = _unwrap(q1)
        pb, _ = _unwrap(p1)
        if k > 1 or len(qb.batch_shape) != 1 or qb.batch_shape != pb.batch_shape:
            return None
        if _dispatch_kl(type(qb), type(pb)) is NotImplemented:
            return None
        return qb, pb, copies * scale

    def _kl_sum(self, model_site, guide_site) -> torch.Tensor:
        q, p = guide_site["fn"], model_site["fn"]
        scale, mask = guide_site["scale"], guide_site["mask"]
        plain_scale = not isinstance(scale, torch.Tensor) or scale.dim() == 0
        compact = _compact(q, p) if mask is None and plain_scale else None
        try:
            if compact is not None:
                q1, p1, copies = compact
                return kl_divergence(q1, p1).sum() * (copies * scale)
            kl = scale_and_mask(kl_divergence(q, p), scale=scale, mask=mask)
            if torch.is_tensor(kl):
                return kl.sum()
            return kl * torch.Size(q.batch_shape).numel()
        except NotImplementedError:
            # No analytic KL: the Monte Carlo estimate, as TraceMeanField_ELBO takes it.
            return self._log_prob_sum(guide_site) - self._log_prob_sum(model_site)
