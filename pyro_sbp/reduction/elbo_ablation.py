r"""Variational model comparison by ablation: :math:`\Delta F` of the network without a unit.

The free energy (the ELBO, or with KL weights :math:`\beta_j` the tempered objective the network
was fitted to) of the gated network is

.. math::

    F = N\, \mathbb E_{x, y}\, \mathbb E_q \log p(y \mid x, W, \theta)
        - \sum_j \beta_j\, \mathrm{KL}\big(q(\theta_j) \,\|\, p(\theta_j)\big).

The reduced model "unit ``j`` is off" has :math:`\theta_j = 0` (its mask is 0) and no factor
for :math:`\theta_j`, so its free energy under the same :math:`q` for every other unit is

.. math::

    \Delta F_j = F_{\setminus j} - F
        = N\, \mathbb E\big[\log p(y \mid x, \theta_{\setminus j}, \theta_j = 0)
                            - \log p(y \mid x, \theta)\big]
          + \beta_j\, \mathrm{KL}\big(q(\theta_j) \,\|\, p(\theta_j)\big).

The unit's KL is its Occam factor: what keeping it costs in nats. A unit goes iff
:math:`\Delta F_j \ge 0`, with no threshold. A posterior equal to the prior costs nothing
(KL = 0), and the network without it has at least the evidence of the one with it as soon as
the data do not need it; the BMR formula :math:`\log \mathbb E_q[\tilde p / p]` is the same
comparison with the expected log-likelihood replaced by :math:`\log q / p`, which is exact only
for a free-form posterior (``docs/math.md``, section 4).

The expectations are estimated on a fixed, seeded subsample of the training set with one draw of
every gate per example, and the same draws (common random numbers) in every comparison, so the
estimate of a difference is much less noisy than either term. Units are then removed jointly:
ranked by :math:`\Delta F_j`, the candidates (:math:`\Delta F_j \ge 0`) are removed as the
prefix :math:`k^\star` of that ranking whose joint reduction has the largest free energy
(:math:`F(k)` of the network without the first :math:`k`), so that units that are each
redundant given the others are not all removed together.

For a network that is a (nested) :class:`~torch.nn.Sequential` the forward pass is split into
stages: a unit's reduction only runs the stages after its gate, from the gated activations with
the unit's channel zeroed (an input feature of a ``Linear``: its column's contribution
subtracted), which is checked against a full rerun for each gate on the first chunk of
examples; other networks are rerun from the stage of the gate (the whole network) per unit.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import kl_divergence

from pyro_sbp.distributions import TruncatedLogUniform
from pyro_sbp.models import gated_layer_name, is_input_gate, named_gates
from pyro_sbp.reduction.delta_f import posterior64

#: Training examples the expectations are estimated on (a seeded subsample; all when fewer).
ELBO_EXAMPLES = 2048
#: Examples per forward pass.
CHUNK = 256
#: Prefix lengths evaluated per round of the search for the best joint reduction.
GRID = 8


def _flatten(module: nn.Module) -> Iterator[nn.Module]:
    # A plain Sequential (no hooks of its own) is the composition of its children.
    plain = (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )
    if plain:
        for child in module:
            yield from _flatten(child)
    else:
        yield module


class _Stages:
    """The network as a list of stages, with the stage in which each gate acts (recorded by the
    first :class:`_Chunk` run through them)."""

    def __init__(self, net: nn.Module):
        self.stages = list(_flatten(net))
        self.stage_of: dict[str, int] = {}

    def run(self, h: Tensor, start: int) -> Tensor:
        for stage in self.stages[start:]:
            h = stage(h)
        return h


def _log_lik(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example log-likelihood, in float64."""
    return F.log_softmax(logits.double(), dim=-1).gather(1, y[:, None]).squeeze(1)


def _draw_thetas(guide, gates, m: int, seed: int, device) -> dict[str, Tensor]:
    """One draw of every gate per example, from the guide, by inverse CDF in float64 on the CPU
    with a seeded generator (the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for site, gate in gates:
        q, _, _ = posterior64(guide, site)
        u = torch.rand((m, gate.num_units), generator=gen, dtype=torch.float64)
        out[site] = q.icdf(u).to(device=device, dtype=gate.mask.dtype)
    return out


def unit_kls(guide) -> dict[str, Tensor]:
    """:math:`\\mathrm{KL}(q(\\theta_j) \\| p(\\theta_j))` of every unit, in float64."""
    out = {}
    with torch.no_grad():
        for site, gate in guide._gates:
            q, low, high = posterior64(guide, site)
            prior = TruncatedLogUniform(torch.tensor(low, dtype=torch.float64), high)
            out[site] = kl_divergence(q, prior.expand([gate.num_units]))
    return out


class _Evaluator:
    """Log-likelihoods of the gated network on fixed examples and fixed gate draws."""

    def __init__(self, net, guide, data, examples: int, seed: int):
        x_all, y_all = data
        if x_all.shape[0] != y_all.shape[0] or x_all.shape[0] == 0:
            raise ValueError(
                f"the training data for criterion 'elbo' must be non-empty inputs and labels of "
                f"one length, got {tuple(x_all.shape)} and {tuple(y_all.shape)}"
            )
        self.net = net
        self.num_data = int(x_all.shape[0])
        gen = torch.Generator().manual_seed(seed)
        m = min(int(examples), self.num_data)
        idx = torch.randperm(self.num_data, generator=gen)[:m].sort().values
        param = next(net.parameters())
        self.device = param.device
        self.x = x_all[idx].to(device=self.device, dtype=param.dtype)
        self.y = y_all[idx].to(self.device)
        self.gates = list(named_gates(net))
        self.thetas = _draw_thetas(guide, self.gates, m, seed + 1, self.device)
        self.chunks = [(s, min(s + CHUNK, m)) for s in range(0, m, CHUNK)]

    def __enter__(self):
        self._training = {name: mod.training for name, mod in self.net.named_modules()}
        self._gate_state = [(g.enabled, g._theta) for _, g in self.gates]
        self._masks = [g.mask.clone() for _, g in self.gates]
        self.net.eval()
        for _, gate in self.gates:
            gate.train()
            gate.enabled = True
        return self

    def __exit__(self, *exc):
        modules = dict(self.net.named_modules())
        for name, training in self._training.items():
            modules[name].training = training
        for (_, gate), (enabled, theta), mask in zip(
            self.gates, self._gate_state, self._masks, strict=True
        ):
            gate.enabled, gate._theta = enabled, theta
            gate.mask.copy_(mask)
        return False

    def set_chunk(self, s: int, e: int) -> None:
        for site, gate in self.gates:
            gate._theta = self.thetas[site][s:e]

    @torch.no_grad()
    def log_lik(self) -> Tensor:
        """Summed log-likelihood of the examples under the current masks."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for s, e in self.chunks:
            self.set_chunk(s, e)
            total += _log_lik(self.net(self.x[s:e]), self.y[s:e]).sum()
        return total

    def scale(self) -> float:
        """From a sum over the examples to the whole training set."""
        return self.num_data / self.x.shape[0]


class _Chunk:
    """One chunk of examples run through the stages once, with every stage's input and output
    kept, and the reductions of single units computed from them."""

    def __init__(self, staged: _Stages, gates, x: Tensor):
        self.staged = staged
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.gate_in: dict[str, Tensor] = {}
        self.gate_out: dict[str, Tensor] = {}
        self._current = 0
        handles = [gate.register_forward_hook(self._keep(site)) for site, gate in gates]
        try:
            h = x
            for i, stage in enumerate(staged.stages):
                self._current = i
                self.inputs.append(h)
                h = stage(h)
                self.outputs.append(h)
        finally:
            for handle in handles:
                handle.remove()
        self.logits = h

    def _keep(self, site: str):
        def hook(module, inputs, output):
            if inputs:  # a traced network's gate node takes no input: no shortcut for it
                self.gate_in[site], self.gate_out[site] = inputs[0], output
            self.staged.stage_of.setdefault(site, self._current)

        return hook

    def fast_applies(self, site: str, gate, layer: nn.Module, i: int) -> bool:
        out = self.outputs[i]
        if site not in self.gate_out:
            return False
        if is_input_gate(site):
            return isinstance(layer, nn.Linear) and out.dim() == 2
        return out.dim() >= 2 and out.shape[1] == gate.num_units

    def probe(self, site: str, units: list[int]) -> list[int]:
        """Units to check the shortcut on: the first and the one with the largest activations
        (a unit that changes nothing would pass any check)."""
        act = self.gate_out[site][:, units]
        energy = act.reshape(act.shape[0], act.shape[1], -1).square().sum((0, 2))
        return sorted({units[0], units[int(energy.argmax())]})

    def reduced_fast(self, site: str, layer: nn.Module, i: int, j: int) -> Tensor:
        """Logits without unit ``j``: the gated activations with its channel zeroed (an input
        feature: its column's contribution taken out of the layer's response, before the
        layer's own gate and bias when they act in the same stage)."""
        out = self.outputs[i]
        if is_input_gate(site):
            column = self.gate_out[site][:, j, None] * layer.weight[:, j]
            own = getattr(layer, "gate", None)
            if own is not None and self.staged.stage_of.get(own.site_name) == i:
                # conv / linear -> gate -> bias: the gate's input is the bias-free response.
                out = own(self.gate_in[own.site_name] - column)
                if layer.bias is not None:
                    out = out + layer.bias * own.mask
            else:
                out = out - column
        else:
            out = out.clone()
            out[:, j] = 0
        return self.staged.run(out, i + 1)

    def reduced_slow(self, gate, i: int, j: int) -> Tensor:
        """Logits without unit ``j``: its mask set to 0 and the stages rerun from the gate's."""
        gate.mask[j] = 0
        try:
            return self.staged.run(self.inputs[i], i)
        finally:
            gate.mask[j] = 1


def _unit_log_lik_changes(ev: _Evaluator, progress=None) -> tuple[dict[str, Tensor], Tensor]:
    """Summed change of log-likelihood when each unit still kept is switched off alone, and the
    summed log-likelihood of the network as it is."""
    gates = ev.gates
    keep = {site: (gate.mask > 0).nonzero().flatten().tolist() for site, gate in gates}
    delta = {
        site: torch.zeros(gate.num_units, dtype=torch.float64, device=ev.device)
        for site, gate in gates
    }
    staged = _Stages(ev.net)
    base_total = torch.zeros((), dtype=torch.float64, device=ev.device)
    fast: dict[str, bool] = {}
    for s, e in ev.chunks:
        ev.set_chunk(s, e)
        y = ev.y[s:e]
        chunk = _Chunk(staged, gates, ev.x[s:e])
        base = _log_lik(chunk.logits, y)
        base_total += base.sum()
        for site, gate in gates:
            i = staged.stage_of.get(site)
            units = keep[site]
            if i is None or not units:
                continue
            layer = ev.net.get_submodule(gated_layer_name(site))
            if site not in fast:
                # The shortcut, checked once per gate against a rerun of the stages.
                ok = chunk.fast_applies(site, gate, layer, i)
                for j in chunk.probe(site, units) if ok else []:
                    ref = chunk.reduced_slow(gate, i, j)
                    got = chunk.reduced_fast(site, layer, i, j)
                    ok = ok and got.shape == ref.shape
                    ok = ok and torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
                fast[site] = ok
            d = delta[site]
            for j in units:
                if fast[site]:
                    logits = chunk.reduced_fast(site, layer, i, j)
                else:
                    logits = chunk.reduced_slow(gate, i, j)
                d[j] += (_log_lik(logits, y) - base).sum()
        if progress is not None:
            progress.update(1)
    return {site: d.cpu() for site, d in delta.items()}, base_total


def _best_prefix(
    ev: _Evaluator, order: list[tuple[str, int]], kl_cost: list[float], base: Tensor
) -> int:
    """The prefix length k of ``order`` whose joint removal has the largest free energy
    (``base``: the summed log-likelihood with every unit of ``order`` in)."""
    gates = dict(ev.gates)
    cum = [0.0]
    for c in kl_cost:
        cum.append(cum[-1] + c)
    cache: dict[int, float] = {0: 0.0}

    def free_energy(k: int) -> float:
        if k not in cache:
            for site, j in order[:k]:
                gates[site].mask[j] = 0
            try:
                cache[k] = float(ev.scale() * (ev.log_lik() - base)) + cum[k]
            finally:
                for site, j in order[:k]:
                    gates[site].mask[j] = 1
        return cache[k]

    lo, hi = 0, len(order)
    while True:
        if hi - lo <= GRID:
            ks = list(range(lo, hi + 1))
        else:
            ks = sorted({lo + round(t * (hi - lo) / GRID) for t in range(GRID + 1)})
        best = max(ks, key=lambda k: (free_energy(k), k))
        if hi - lo <= GRID:
            return best
        pos = ks.index(best)
        lo, hi = ks[max(pos - 1, 0)], ks[min(pos + 1, len(ks) - 1)]


@torch.no_grad()
def elbo_delta_f(
    net: nn.Module,
    guide,
    data: tuple[Tensor, Tensor],
    *,
    examples: int = ELBO_EXAMPLES,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(delta_f, remove)``: every unit's :math:`\\Delta F_j` (float64; the KL term alone for a
    unit already removed) and the units the best joint reduction removes.

    :param net: the gated network (its masks are respected and left as they were).
    :param guide: its fitted :class:`~pyro_sbp.guides.SBPGuide`.
    :param data: the training inputs and labels ``(x, y)``: the data set the ELBO is on.
    :param int examples: how many training examples estimate the expectations.
    :param int seed: seeds the subsample and the gate draws.
    :param bool progress: show a progress bar on standard error.
    """
    kl = unit_kls(guide)
    beta = {site: float(gate.kl_weight) for site, gate in named_gates(net)}
    with _Evaluator(net, guide, data, examples, seed) as ev:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(ev.chunks), desc="elbo ablation", unit="chunk", leave=False, disable=None
            )
        try:
            changes, base = _unit_log_lik_changes(ev, bar)
        finally:
            if bar is not None:
                bar.close()
        delta_f = {site: ev.scale() * changes[site] + beta[site] * kl[site] for site in changes}
        candidates = [
            (float(delta_f[site][j]), n, site, j)
            for n, (site, gate) in enumerate(ev.gates)
            for j in range(gate.num_units)
            if gate.mask[j] > 0 and delta_f[site][j] >= 0
        ]
        # Largest Delta F first; ties by position, deterministically.
        candidates.sort(key=lambda t: (-t[0], t[1], t[3]))
        order = [(site, j) for _, _, site, j in candidates]
        cost = [beta[site] * float(kl[site][j]) for site, j in order]
        k = _best_prefix(ev, order, cost, base) if order else 0
    remove = {site: torch.zeros(gate.num_units, dtype=torch.bool) for site, gate in ev.gates}
    for site, j in order[:k]:
        remove[site][j] = True
    return delta_f, remove


__all__ = ["ELBO_EXAMPLES", "elbo_delta_f", "unit_kls"]
