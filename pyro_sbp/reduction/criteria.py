"""Named pruning criteria: guide statistics -> per-unit scores -> keep-masks.

=====================  ==========================================================================
criterion              keeps a unit iff
=====================  ==========================================================================
``bmrs-n``             :math:`\\Delta F < 0` for the reduced prior
                       :math:`\\mathrm{LogN}_{[a,b]}(a, (10^{-6})^2)` (BMRS_N: "theta pinned at
                       its lower bound")
``bmrs-n-published``   the published BMRS code's :math:`\\Delta F_N`, which omits the normal
                       density's :math:`-\\tfrac12\\log 2\\pi` and so is
                       :math:`\\Delta F_N + 0.919`: it removes a unit iff the posterior density
                       of :math:`\\log\\theta` at :math:`a` is at least :math:`1/\\sqrt{2\\pi}`
                       times the prior's. For comparison with the paper's numbers only.
``bmrs-u:P``           :math:`\\Delta F < 0` for :math:`\\mathrm{LogU}` on
                       :math:`[2^{-23}, 2^{-P}]` (BMRS_U-P, the published criterion)
``bmrs-u-low:P``       the same on :math:`[e^{a}, 2^{-P}]`: "anything below :math:`2^{-P}` is off"
                       (also removes units whose posterior collapsed below :math:`2^{-23}`)
``snr:T``              :math:`\\mathbb E[\\theta]/\\mathrm{sd}[\\theta] > T` (SBP uses ``snr:1``)
``mean:T``             :math:`\\mathbb E[\\theta] > T`
``l2:T``               the L2 norm of the unit's incoming weights (of an input feature: its
                       weights in the layer it enters) exceeds ``T``
``match:BASE:TARGET``  ``BASE`` (``snr``, ``mean`` or ``l2``) with the global threshold that
                       removes as many units as ``TARGET`` (any criterion above) does
``elbo``               :math:`\\Delta F < 0` for the network without the unit, by its free
                       energy (the ELBO it was fitted to, KL weights included) estimated on the
                       training data, the unit's KL its Occam factor; removed jointly as the
                       prefix of the ranking with the largest free energy
                       (:mod:`pyro_sbp.reduction.elbo_ablation`; needs ``data``)
``trained``            the masks already on the gates, as they are: those a run pruned with
                       during training (no further pruning; the default of a run that did)
=====================  ==========================================================================

BMRS criteria need no threshold. Masks are cumulative: a unit removed before stays removed.
Scores are computed in float64 on the CPU, so the units kept do not depend on the device or on
the batch size of training.
"""

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform
from pyro_sbp.models import gated_layer_name, is_input_gate, named_gates
from pyro_sbp.reduction.delta_f import delta_f, posterior64, snr
from pyro_sbp.reduction.elbo_ablation import elbo_delta_f

#: The criterion used when none is named (and a run did not prune during training): BMRS_U-4,
#: exact BMR, which removes a unit whose posterior is the prior (docs/math.md, section 4).
DEFAULT_CRITERION = "bmrs-u:4"
#: The reduced prior's scale for BMRS_N (on log theta).
BMRS_N_SCALE = 1e-6
#: log 2^-23: the float32 mantissa, the published lower end of BMRS_U's reduced prior.
BMRS_U_LOW = 2.0**-23

#: What the published BMRS code adds to Delta F_N: it drops the -log(2 pi)/2 of the normal density.
PUBLISHED_BMRS_N_OFFSET = 0.5 * math.log(2 * math.pi)

CRITERIA_HELP = (
    "elbo, bmrs-n, bmrs-n-published, bmrs-u:P, bmrs-u-low:P, snr:T, mean:T, l2:T, "
    "match:BASE:TARGET (BASE one of snr, mean, l2; TARGET any other criterion), trained (the "
    "masks of pruning during training, as they are), e.g. bmrs-u:4, snr:1, match:snr:bmrs-n"
)
#: The criterion that keeps the masks on the gates as they are.
TRAINED = "trained"
#: The criterion that compares free energies on the training data.
ELBO = "elbo"

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


@dataclass
class LayerPruning:
    """The decision for one gated layer: a score per unit and which units are kept."""

    site: str
    scores: Tensor
    keep: Tensor

    @property
    def units_before(self) -> int:
        return int(self.keep.numel())

    @property
    def units_after(self) -> int:
        return int(self.keep.sum())

    def to_dict(self) -> dict:
        return {
            "units_before": self.units_before,
            "units_after": self.units_after,
            "scores": [float(s) for s in self.scores],
            "keep": [bool(k) for k in self.keep],
        }


@dataclass
class PruningResult:
    r"""Keep-masks for every gate, with the scores that decided them.

    ``score_name`` says what the scores are (``delta_f``: a unit is kept iff its score is
    negative; ``delta_f_elbo``: each unit's own :math:`\Delta F`, the units removed being
    those with the best joint reduction, all with :math:`\Delta F \ge 0`; ``mask``: the masks
    as they were; otherwise a unit is kept iff its score exceeds ``threshold``).
    """

    criterion: str
    score_name: str
    layers: dict[str, LayerPruning] = field(default_factory=dict)
    threshold: float | None = None

    @property
    def units_before(self) -> int:
        return sum(lp.units_before for lp in self.layers.values())

    @property
    def units_after(self) -> int:
        return sum(lp.units_after for lp in self.layers.values())

    @property
    def fraction_removed(self) -> float:
        return 1.0 - self.units_after / max(self.units_before, 1)

    def masks(self) -> dict[str, Tensor]:
        return {site: lp.keep.clone() for site, lp in self.layers.items()}

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "score": self.score_name,
            "threshold": self.threshold,
            "units_before": self.units_before,
            "units_after": self.units_after,
            "fraction_removed": self.fraction_removed,
            "layers": {site: lp.to_dict() for site, lp in self.layers.items()},
        }

    def summary(self) -> str:
        rows = [f"{'layer':<24} {'before':>7} {'after':>7}"]
        for site, lp in self.layers.items():
            rows.append(f"{site:<24} {lp.units_before:>7} {lp.units_after:>7}")
        rows.append(
            f"{'total':<24} {self.units_before:>7} {self.units_after:>7}"
            f"   ({100 * self.fraction_removed:.1f}% removed, {self.criterion})"
        )
        return "\n".join(rows)


def _posteriors64(guide) -> dict[str, tuple[TruncatedLogNormal, float, float]]:
    """Every gate's posterior in float64 on the CPU, with the gate's bounds."""
    return {site: posterior64(guide, site) for site, _ in guide._gates}


def _l2_scores(net: nn.Module, site: str) -> Tensor:
    if getattr(net, "_sbp_graph", None) is not None:
        from pyro_sbp.models.graph import unit_weight_norms

        return unit_weight_norms(net, site)
    layer = net.get_submodule(gated_layer_name(site))
    w = layer.weight.detach().cpu().double()
    if is_input_gate(site):
        # An input feature's weights are its column of the layer it enters.
        return w.norm(dim=0)
    return w.reshape(w.shape[0], -1).norm(dim=1)


def _scores(name: str, arg: float | None, net, guide) -> tuple[str, dict[str, Tensor]]:
    posts = _posteriors64(guide)
    f64 = torch.float64
    if name in ("bmrs-n", "bmrs-n-published"):
        offset = PUBLISHED_BMRS_N_OFFSET if name == "bmrs-n-published" else 0.0
        out = {}
        for site, (q, lo, hi) in posts.items():
            n = q.loc.shape[0]
            prior = TruncatedLogUniform(torch.tensor(lo, dtype=f64), hi).expand([n])
            reduced = TruncatedLogNormal(
                torch.tensor(math.log(lo), dtype=f64), BMRS_N_SCALE, lo, hi, validate_args=False
            ).expand([n])
            out[site] = delta_f(q, prior, reduced) + offset
        return "delta_f", out
    if name in ("bmrs-u", "bmrs-u-low"):
        out = {}
        for site, (q, lo, hi) in posts.items():
            n = q.loc.shape[0]
            low = BMRS_U_LOW if name == "bmrs-u" else lo
            high = 2.0 ** -float(arg)
            if not lo <= low < high <= hi:
                raise ValueError(
                    f"{name}:{arg:g}: the reduced prior [{low:.3g}, {high:.3g}] must lie inside "
                    f"the gate's bounds [{lo:.3g}, {hi:.3g}]"
                )
            prior = TruncatedLogUniform(torch.tensor(lo, dtype=f64), hi).expand([n])
            reduced = TruncatedLogUniform(torch.tensor(low, dtype=f64), high).expand([n])
            out[site] = delta_f(q, prior, reduced)
        return "delta_f", out
    if name == "snr":
        return "snr", {site: snr(q) for site, (q, _, _) in posts.items()}
    if name == "mean":
        return "mean", {site: q.mean for site, (q, _, _) in posts.items()}
    if name == "l2":
        return "l2", {site: _l2_scores(net, site) for site in posts}
    raise AssertionError(name)


_PREFIX = re.compile(
    r"elbo|bmrs-n-published|bmrs-n|(?:bmrs-u-low|bmrs-u):"
    + _NUMBER
    + r"|(?:snr|mean|l2):"
    + _NUMBER
)


def _unknown(criterion: str) -> ValueError:
    c = criterion.strip().lower()
    m = _PREFIX.match(c)
    trailing = f" (unexpected {c[m.end() :]!r} after {c[: m.end()]!r})" if m else ""
    return ValueError(f"unknown pruning criterion {criterion!r}{trailing}; valid: {CRITERIA_HELP}")


def criterion_for_run(criterion: str | None, training_criterion: str | None) -> str:
    """``criterion`` if one is named; else ``"trained"`` (the masks as they are) for a run that
    pruned during training, whose fine-tuning was done with those masks; else
    :data:`DEFAULT_CRITERION`."""
    if criterion is not None:
        return criterion
    return TRAINED if training_criterion else DEFAULT_CRITERION


def parse_criterion(criterion: str) -> tuple[str, float | None, str | None]:
    """``(name, argument, match target)``; ValueError listing the valid criteria otherwise
    (and, for a valid criterion followed by more text, what follows it)."""
    if not isinstance(criterion, str):
        raise ValueError(f"a pruning criterion is a string, got {criterion!r}")
    c = criterion.strip().lower()
    if c in (ELBO, "bmrs-n", "bmrs-n-published", TRAINED):
        return c, None, None
    m = re.fullmatch(r"(bmrs-u|bmrs-u-low):" + _NUMBER, c)
    if m:
        return m.group(1), float(m.group(2)), None
    m = re.fullmatch(r"(snr|mean|l2):" + _NUMBER, c)
    if m:
        return m.group(1), float(m.group(2)), None
    m = re.fullmatch(r"match:(snr|mean|l2):(.+)", c)
    if m:
        target = m.group(2)
        if target.startswith("match:") or target == TRAINED:
            raise ValueError(f"match: cannot target another match or trained: {criterion!r}")
        try:
            parse_criterion(target)
        except ValueError as e:
            raise ValueError(f"in {criterion!r}: {e}") from None
        return "match", None, m.group(1) + "|" + target
    raise _unknown(criterion)


def compute_masks(
    net: nn.Module, guide, criterion: str, data=None, *, progress: bool = False
) -> PruningResult:
    """Keep-masks for every gate of ``net`` under ``criterion`` (see the module's table).

    The masks already on the gates are respected: a unit removed before stays removed.

    :param net: the gated network.
    :param guide: its fitted :class:`~pyro_sbp.guides.SBPGuide`.
    :param str criterion: e.g. ``"elbo"``, ``"bmrs-n"``, ``"bmrs-u:4"``, ``"snr:1"``,
        ``"match:snr:bmrs-n"``.
    :param data: the training inputs and labels ``(x, y)`` (or a ``TensorDataset`` of them),
        which ``elbo`` needs; the other criteria ignore it.
    :param bool progress: a progress bar for ``elbo``'s passes over the data.
    """
    name, arg, target = parse_criterion(criterion)
    previous = {site: gate.mask.detach().cpu() > 0 for site, gate in named_gates(net)}
    result = PruningResult(criterion=criterion, score_name="")
    if name == TRAINED:
        result.score_name = "mask"
        for site, keep in previous.items():
            result.layers[site] = LayerPruning(site, keep.to(torch.float64), keep.clone())
        return result
    if name == "match":
        base, target_criterion = target.split("|", 1)
        wanted = compute_masks(net, guide, target_criterion, data, progress=progress)
        score_name, scores = _scores(base, None, net, guide)
        # Remove, among the units still in, the ones with the lowest scores, as many as the
        # target criterion removes (ties broken by position, deterministically).
        flat = torch.cat([scores[s].masked_fill(~previous[s], -math.inf) for s in scores])
        n_remove = wanted.units_before - wanted.units_after
        order = torch.sort(flat, stable=True).indices
        keep_flat = torch.ones_like(flat, dtype=torch.bool)
        keep_flat[order[:n_remove]] = False
        keep_flat &= torch.cat([previous[s] for s in scores])
        threshold = float(flat[order[n_remove - 1]]) if n_remove > 0 else None
        result.score_name, result.threshold = score_name, threshold
        start = 0
        for site, sc in scores.items():
            n = sc.numel()
            result.layers[site] = LayerPruning(site, sc, keep_flat[start : start + n].clone())
            start += n
        return result
    if name == ELBO:
        if data is None:
            raise ValueError(
                "criterion 'elbo' compares the network with and without each unit on the "
                "training data: pass data=(x, y)"
            )
        if hasattr(data, "tensors"):
            data = data.tensors[:2]
        scores, remove = elbo_delta_f(net, guide, data, progress=progress)
        result.score_name = "delta_f_elbo"
        for site, sc in scores.items():
            result.layers[site] = LayerPruning(site, sc, ~remove[site] & previous[site])
        return result
    score_name, scores = _scores(name, arg, net, guide)
    result.score_name = score_name
    if score_name == "delta_f":
        # Removed iff the reduced model has at least the evidence of the full one.
        for site, sc in scores.items():
            result.layers[site] = LayerPruning(site, sc, (sc < 0) & previous[site])
    else:
        result.threshold = arg
        for site, sc in scores.items():
            result.layers[site] = LayerPruning(site, sc, (sc > arg) & previous[site])
    return result


def check_masks(net: nn.Module, masks: dict[str, Tensor]) -> None:
    """Raise ValueError unless ``masks`` maps gate sites of ``net`` to keep-masks of their
    shapes (a subset of the sites is fine)."""
    gates = dict(named_gates(net))
    unknown = set(masks) - set(gates)
    if unknown:
        raise ValueError(f"masks for unknown gate sites {sorted(unknown)}; gates: {list(gates)}")
    for site, keep in masks.items():
        if not isinstance(keep, Tensor):
            raise ValueError(f"mask for {site!r} is a {type(keep).__name__}, not a tensor")
        n = gates[site].num_units
        if keep.shape != (n,):
            raise ValueError(f"mask for {site!r} has shape {tuple(keep.shape)}, expected ({n},)")


@torch.no_grad()
def apply_masks(net: nn.Module, masks: dict[str, Tensor] | PruningResult) -> None:
    """Write keep-masks into the gates of ``net`` (removed units become exactly zero).

    Every mask is checked (:func:`check_masks`) before any is written.
    """
    if isinstance(masks, PruningResult):
        masks = masks.masks()
    check_masks(net, masks)
    gates = dict(named_gates(net))
    for site, keep in masks.items():
        gates[site].mask.copy_(keep.to(gates[site].mask))
