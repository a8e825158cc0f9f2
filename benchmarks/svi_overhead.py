"""Cost of one SVI step of a gated network against one plain PyTorch step, side by side.

For LeNet5-Caffe (570 gates: 20 + 50 + 500 units) and a minibatch of random inputs, labels and
training-set positions on the CPU, times

* svi (the headline): one step of the README's quickstart, ``optim.zero_grad()``,
  ``CompactMeanField_ELBO().differentiable_loss(model, guide, x, y, idx).backward()``,
  ``optim.step()`` with ``model = SBPModel(net, 60000, (1, 28, 28))``,
  ``guide = SBPGuide(net, 60000)``, ``net = make_prunable(build_network("lenet5-caffe"))`` and
  ``optim = pyro_sbp.infer.adam(...)`` (one ``torch.optim.Adam``, two parameter groups, fused),
  with Pyro's validation as a user has it (Pyro's default: on, ``__debug__``, unless
  ``python -O``), against
* plain: one training step of a separate plain ``build_network("lenet5-caffe")`` (no gates):
  cross-entropy, ``torch.optim.Adam`` (its defaults) ``zero_grad`` / ``backward`` / ``step``,

alternating them (and the variants below) in one run, in an order that rotates every
repetition, and writes the medians, their interquartile ranges and the ratio
(svi / plain) to ``benchmarks/results/svi_overhead.json``. Target: ratio <= 1.3. It also counts,
with ``torch.profiler``, the operator calls (``aten::`` and the native gate kernels'
``pyro_sbp::``, nested ones included) and the host synchronisations (``_local_scalar_dense``,
``nonzero``) of one step of each of plain, svi, plain_fused_adam, svi_trace_mean_field and
svi_lean, before the timing, at the gates' initial posteriors: ``ops``, ``ops_svi``,
``ops_plain``, ``ops_ratio`` (target <= 3) and ``host_syncs_svi``. Operation counts are exact and
machine-independent. On the CPU the gate distributions run the native kernels
(:mod:`pyro_sbp._native`: one operator call per sampler or KL, each unit's branch taken inside
it); on CUDA the PyTorch operators take every branch densely and synchronise nothing.
``peak_memory_bytes`` and ``peak_memory_ratio`` (target <= 2) are each step's peak from the
profiler's memory timeline.

Variants, timed in the same loop to show where the time goes (``--no-variants`` skips them):

* svi_no_validation: the same step under ``pyro.enable_validation(False)``;
* plain_fused_adam: the plain step with ``torch.optim.Adam(..., fused=True)``, the svi step's
  optimiser (``ops_ratio_to_plain_fused_adam``);
* svi_trace_mean_field: the path this benchmark timed first, ``SVI(model, guide,
  pyro.optim.Adam(...), TraceMeanField_ELBO()).step(x, y, idx)`` (``ops_ratio_trace_mean_field``);
* svi_jit (only with ``--jit``): ``JitTraceMeanField_ELBO`` (own SVI on the same network and
  parameters). The gate distributions have no data-dependent branch (``_standard._overlay``
  runs every branch and picks by ``torch.where``), so the trace records the whole step; it was
  several times slower than the default step, its memory growing by some 20 MB a step, when
  last measured (torch 2.14, Pyro 1.9.2);
* svi_lean: ``SVI(model, guide, pyro.optim.Adam(...), CompactMeanField_ELBO()).step``: the
  library's ELBO (``TraceMeanField_ELBO``'s loss and gradients without the log-densities of the
  latent sites that it computes and never uses, each gate KL computed once per unit on the
  un-expanded parameters) with Pyro's optimiser per parameter;
* svi_textbook_gates: the svi_trace_mean_field step with the gates' posteriors, their samples
  and their KL computed by the textbook formulas (:class:`TextbookTruncatedLogNormal`; wrong in
  the tails): the floor of such an SVI step with SBP's truncated gates in eager PyTorch
  (``svi_textbook_floor_ratio``);
* svi_gate_at_layer: the svi_trace_mean_field step on a network made prunable with
  ``make_prunable(..., gate_after_pool=False)``: each convolution's gate on the convolution's
  output instead of after its max-pooling (the same function, four times the elements);
* torch_gated: the same gated computation in plain PyTorch, no Pyro (:func:`_gated_logits`,
  gates placed as ``make_prunable`` places them): per-example gate noise from
  ``TruncatedLogNormal.rsample``, the analytic KL once per unit, one ``torch.optim.Adam``;
* torch_gated_as_pyro: the same, plus the tensor work ``TraceMeanField_ELBO`` does on top: the
  KL of the plate-expanded distributions (batch x units) and the unused log-densities of the
  guide's and the prior's samples;
* torch_gated_fused: torch_gated with one ``TruncatedLogNormal`` over all 570 gates (one
  ``rsample`` and one KL instead of one per layer);
* torch_gated_lognormal: the gated network with untruncated log-normal gates
  (``exp(loc + scale * eps)``, Normal-to-Normal KL): the cost of gating the network alone, and a
  floor for any gated step (``floor_ratio``): where its ratio to plain is above the target, no
  gate distribution and no inference library meets the target;
* torch_gated_textbook: the same with truncated log-normal gates and their KL by the textbook
  formulas (:func:`_textbook_gates`, wrong in the tails): the floor for a step with SBP's
  truncated gates, in eager PyTorch and without Pyro (``truncated_floor_ratio``).

``--profile`` instead profiles the svi_trace_mean_field step (cProfile, by function; then
``torch.profiler``, by operator, on one thread) and prints the tables.

``--device cuda`` runs the same figures on a GPU: every tensor is created there
(``torch.set_default_device``), each step is timed between two CUDA events read after it, and the
peak memory is the allocator's (``torch.cuda.max_memory_allocated``). On CUDA the gate
distributions take every branch densely, so ``host_syncs_svi`` counts what the rest of the step
asks of the device.

    python benchmarks/svi_overhead.py [--repeats 200] [--batch-size 128] [--warmup 20]
        [--threads N] [--device cpu|cuda] [--no-variants] [--jit] [--profile]
"""

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
import statistics
import time
import warnings
from pathlib import Path

import pyro
import pyro.infer.util
import pyro.poutine.util
import textbook_formulas as tb
import torch
import torch.nn.functional as F
import torch.profiler
from pyro import poutine
from pyro.infer import SVI, JitTraceMeanField_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from torch.distributions import Normal, kl_divergence, register_kl

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, _standard
from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.infer.optim import adam
from pyro_sbp.models import (
    DEFAULT_HIGH,
    DEFAULT_LOW,
    SBPModel,
    build_network,
    gated_layer_name,
    make_prunable,
    named_gates,
)

RESULTS = Path(__file__).parent / "results" / "svi_overhead.json"
CPU = torch.device("cpu")
NETWORK = "lenet5-caffe"
INPUT_SHAPE = (1, 28, 28)
NUM_DATA = 60000
LR, GATE_LR, BETAS = 1e-3, 1e-2, (0.95, 0.999)  # the Trainer's defaults


def _optim_args(name: str) -> dict:
    gate = name.endswith((".gate.loc", ".gate.log_scale"))
    return {"lr": GATE_LR if gate else LR, "betas": BETAS}


# --- plain-PyTorch references -----------------------------------------------------------------


class TorchGates:
    """Per-example gate noise for :func:`_gated_logits`, with no Pyro.

    :param str kind: ``"truncated"`` (``TruncatedLogNormal`` posterior, KL once per unit),
        ``"as_pyro"`` (the same plus what ``TraceMeanField_ELBO`` computes on top),
        ``"lognormal"`` (untruncated log-normal noise, Normal-to-Normal KL) or ``"textbook"``
        (truncated log-normal noise and its KL to the log-uniform prior by the textbook formulas:
        wrong where the truncated mass is small, a cost floor only; :func:`_textbook_gates`).
    :param bool fuse_sites: one distribution over the gates of all layers, split afterwards.
    """

    def __init__(self, layers, num_units, kind, fuse_sites=False):
        self.kind, self.fuse_sites = kind, fuse_sites
        self.num_units = dict(zip(layers, num_units, strict=True))
        self.loc = {n: torch.zeros(u, requires_grad=True) for n, u in self.num_units.items()}
        self.log_scale = {
            n: torch.full((u,), -5.0, requires_grad=True) for n, u in self.num_units.items()
        }
        if fuse_sites:
            total = sum(num_units)
            self.loc = {"all": torch.zeros(total, requires_grad=True)}
            self.log_scale = {"all": torch.full((total,), -5.0, requires_grad=True)}
        self.theta = {}

    def parameters(self):
        return [*self.loc.values(), *self.log_scale.values()]

    def _truncated(self, loc, log_scale, batch):
        q = TruncatedLogNormal(loc, log_scale.exp(), DEFAULT_LOW, DEFAULT_HIGH)
        prior = TruncatedLogUniform(q.low.new_tensor(DEFAULT_LOW), DEFAULT_HIGH)
        if self.kind == "as_pyro":
            q, prior = q.expand((batch, *q.batch_shape)), prior.expand((batch, *q.batch_shape))
            theta = q.rsample()
            q.log_prob(theta)  # computed by TraceMeanField_ELBO, never used
            prior.log_prob(theta)
            return theta, kl_divergence(q, prior).sum() / batch
        return q.rsample((batch,)), kl_divergence(q, prior.expand(q.batch_shape)).sum()

    def sample(self, batch: int) -> torch.Tensor:
        """Draw every gate's per-example noise into ``self.theta``; return the total KL."""
        kl = 0.0
        for key in self.loc:
            loc, log_scale = self.loc[key], self.log_scale[key]
            if self.kind == "textbook":
                theta, site_kl = _textbook_gates(loc, log_scale.exp(), batch)
                kl = kl + site_kl
            elif self.kind == "lognormal":
                eps = torch.randn(batch, loc.shape[0])
                theta = (loc + log_scale.exp() * eps).exp().clamp(DEFAULT_LOW, DEFAULT_HIGH)
                kl = kl + kl_divergence(Normal(loc, log_scale.exp()), Normal(0.0, 1.0)).sum()
            else:
                theta, site_kl = self._truncated(loc, log_scale, batch)
                kl = kl + site_kl
            if self.fuse_sites:
                thetas = theta.split(list(self.num_units.values()), dim=-1)
                self.theta.update(zip(self.num_units, thetas, strict=True))
            else:
                self.theta[key] = theta
        return kl


def _gated_logits(net, theta: dict, x):
    """Logits of the plain LeNet5-Caffe ``net`` gated by ``theta`` (layer name -> per-example
    gates) as ``make_prunable`` gates it: ``layer -> gate -> bias``, each convolution's gate and
    bias after its max-pooling (``conv -> pool -> gate -> bias -> ReLU``)."""
    h = net.normalize(x)
    for name, pool in (("features.0", net.features[2]), ("features.3", net.features[5])):
        conv = net.get_submodule(name)
        h = pool(F.conv2d(h, conv.weight, None, conv.stride, conv.padding))
        h = torch.relu(torch.addcmul(conv.bias.view(1, -1, 1, 1), h, theta[name][:, :, None, None]))
    fc1, fc2 = net.classifier[1], net.classifier[3]
    h = F.linear(h.flatten(1), fc1.weight)
    return fc2(torch.relu(torch.addcmul(fc1.bias, h, theta["classifier.1"])))


_LOG_LOW, _LOG_HIGH = math.log(DEFAULT_LOW), math.log(DEFAULT_HIGH)


def _textbook_gates(loc, scale, batch):
    """Per-example truncated log-normal gates (inverse CDF through ``erfinv``) and the summed
    KL to the log-uniform prior, by the textbook formulas in as few passes as we could write
    them. Wrong where the truncated mass is below float precision: a cost floor, not an
    implementation (compare ``benchmarks/distributions.py``'s ``textbook``)."""
    _, _, e_alpha, z, t = tb.terms(loc, scale, _LOG_LOW, _LOG_HIGH)
    u = torch.rand(batch, loc.shape[0])
    theta = tb.sample(loc, scale, e_alpha, z, u, _LOG_LOW, _LOG_HIGH)
    return theta, tb.kl(scale, z, t, _LOG_LOW, _LOG_HIGH).sum()


class TextbookTruncatedLogNormal(TruncatedLogNormal):
    """``TruncatedLogNormal`` on the default gate bounds with ``rsample``, ``log_prob`` and the
    KL to the log-uniform prior by the textbook formulas (:mod:`textbook_formulas`; wrong where
    the truncated mass is small): what an SVI step would cost with the cheapest truncated gates
    we could write, for the variant svi_textbook_gates. Not an implementation."""

    def _compact(self):
        return _standard.compact(self.batch_shape, self.loc, self.scale)

    def rsample(self, sample_shape=torch.Size()):
        loc, scale = self._compact()
        _, _, e_alpha, z, _ = tb.terms(loc, scale, _LOG_LOW, _LOG_HIGH)
        u = torch.rand(self._extended_shape(sample_shape))
        return tb.sample(loc, scale, e_alpha, z, u, _LOG_LOW, _LOG_HIGH)

    def log_prob(self, value):
        loc, scale = self._compact()
        _, _, _, z, _ = tb.terms(loc, scale, _LOG_LOW, _LOG_HIGH)
        x = value.log()
        xi = (x - loc) / scale
        return -0.5 * xi.square() - x - (scale * z).log() - 0.5 * math.log(2.0 * math.pi)


@register_kl(TextbookTruncatedLogNormal, TruncatedLogUniform)
def _kl_textbook(p, q):
    loc, scale = p._compact()
    _, _, _, z, t = tb.terms(loc, scale, _LOG_LOW, _LOG_HIGH)
    return tb.kl(scale, z, t, _LOG_LOW, _LOG_HIGH).expand(p.batch_shape)


class TextbookGuide(SBPGuide):
    """``SBPGuide`` whose posteriors are :class:`TextbookTruncatedLogNormal`."""

    def posterior(self, site):
        gate = dict(self._gates)[site]
        loc, log_scale = self.params(site)
        return TextbookTruncatedLogNormal(loc, log_scale.exp(), gate.low, gate.high)


# --- the benchmark ----------------------------------------------------------------------------


def _plain_step(net, optim, x, y):
    optim.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optim.step()


def _torch_gated_step(net, gates, optim, x, y, num_data):
    optim.zero_grad()
    kl = gates.sample(x.shape[0])
    logits = _gated_logits(net, gates.theta, x)
    nll = F.cross_entropy(logits, y, reduction="sum") * (num_data / x.shape[0])
    (nll + kl).backward()
    optim.step()


def _gated_setup(gate_after_pool=True):
    net = make_prunable(build_network(NETWORK), gate_after_pool=gate_after_pool)
    model = SBPModel(net, NUM_DATA, INPUT_SHAPE)
    guide = SBPGuide(net, NUM_DATA)
    return net, model, guide


def _validation_state() -> dict:
    return {
        "pyro.infer": pyro.infer.util.is_validation_enabled(),
        "pyro.poutine": pyro.poutine.util.is_validation_enabled(),
        "pyro.distributions": pyro.distributions.is_validation_enabled(),
        "torch.distributions": bool(torch.distributions.Distribution._validate_args),
    }


def _iqr(values):
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def _p90(values):
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


#: Differences of medians that split the SVI step into its parts: (label, minuend, subtrahend).
BREAKDOWN = (
    ("network: the plain step", "plain", None),
    ("gating the activations (with cheap log-normal noise)", "torch_gated_lognormal", "plain"),
    (
        "truncated gate distributions (rsample, KL) over log-normal",
        "torch_gated",
        "torch_gated_lognormal",
    ),
    ("TraceMeanField_ELBO's extra tensor work", "torch_gated_as_pyro", "torch_gated"),
    (
        "Pyro bookkeeping (traces, PyroModule, per-param optimizers, the gates' hooks)",
        "svi_no_validation",
        "torch_gated_as_pyro",
    ),
    ("Pyro's validation", "svi", "svi_no_validation"),
)


def build_steps(args, x, y, idx):
    """Name -> zero-argument callable doing one training step; and the number of gates."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    net, model, guide = _gated_setup()
    default_validation = is_validation_enabled()

    # The README's quickstart: CompactMeanField_ELBO's loss, one torch.optim.Adam
    # (pyro_sbp.infer.adam: two parameter groups, fused).
    elbo = CompactMeanField_ELBO()
    elbo.differentiable_loss(model, guide, x, y, idx)  # creates every parameter
    optim = adam(lr=LR, gate_lr=GATE_LR, betas=BETAS)

    def svi_step():
        optim.zero_grad()
        elbo.differentiable_loss(model, guide, x, y, idx).backward()
        optim.step()

    plain = build_network(NETWORK)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if ".gate." not in k})
    plain_optim = torch.optim.Adam(plain.parameters(), lr=LR, betas=BETAS)

    steps = {"plain": lambda: _plain_step(plain, plain_optim, x, y), "svi": svi_step}
    num_gates = sum(gate.num_units for _, gate in named_gates(net))
    if args.no_variants:
        return steps, num_gates

    def no_validation():
        pyro.enable_validation(False)
        try:
            svi_step()
        finally:
            pyro.enable_validation(default_validation)

    steps["svi_no_validation"] = no_validation
    # The same plain step with torch's fused Adam (as the svi step has it).
    plain_fused = build_network(NETWORK)
    plain_fused.load_state_dict(plain.state_dict())
    fused_optim = torch.optim.Adam(plain_fused.parameters(), lr=LR, betas=BETAS, fused=True)
    steps["plain_fused_adam"] = lambda: _plain_step(plain_fused, fused_optim, x, y)
    # The original headline: SVI with TraceMeanField_ELBO and pyro.optim.Adam.
    svi_tmf = SVI(model, guide, pyro.optim.Adam(_optim_args), TraceMeanField_ELBO())
    steps["svi_trace_mean_field"] = lambda: svi_tmf.step(x, y, idx)

    if args.jit:
        svi_jit = SVI(model, guide, pyro.optim.Adam(_optim_args), JitTraceMeanField_ELBO())
        steps["svi_jit"] = lambda: svi_jit.step(x, y, idx)
    # The same parameters (Pyro names them alike), the gates on the convolutions' outputs.
    _, model_at_layer, guide_at_layer = _gated_setup(gate_after_pool=False)
    svi_at_layer = SVI(
        model_at_layer, guide_at_layer, pyro.optim.Adam(_optim_args), TraceMeanField_ELBO()
    )
    steps["svi_gate_at_layer"] = lambda: svi_at_layer.step(x, y, idx)
    # The same step with the textbook truncated gates (same parameters, Pyro names them alike).
    net_tb, model_tb, _ = _gated_setup()
    svi_tb = SVI(
        model_tb,
        TextbookGuide(net_tb, NUM_DATA),
        pyro.optim.Adam(_optim_args),
        TraceMeanField_ELBO(),
    )
    steps["svi_textbook_gates"] = lambda: svi_tb.step(x, y, idx)
    svi_lean = SVI(model, guide, pyro.optim.Adam(_optim_args), CompactMeanField_ELBO())
    steps["svi_lean"] = lambda: svi_lean.step(x, y, idx)

    sites = list(named_gates(net))
    layers = [gated_layer_name(site) for site, _ in sites]
    units = [gate.num_units for _, gate in sites]
    # The plain-PyTorch references compute the library's gated network (checked once).
    check_gates = TorchGates(layers, units, "lognormal")
    with torch.no_grad():
        check_gates.sample(x.shape[0])
        data = {f"{layer}.gate": check_gates.theta[layer] for layer in layers}
        with poutine.condition(data=data):
            expected = net(x)
        err = (_gated_logits(plain, check_gates.theta, x) - expected).abs().max().item()
    assert err < 1e-4, f"the plain-PyTorch gating differs from make_prunable's by {err}"

    for label, kind, options in (
        ("torch_gated", "truncated", {}),
        ("torch_gated_as_pyro", "as_pyro", {}),
        ("torch_gated_lognormal", "lognormal", {}),
        ("torch_gated_fused", "truncated", {"fuse_sites": True}),
        ("torch_gated_textbook", "textbook", {}),
    ):
        tnet = build_network(NETWORK)
        tnet.load_state_dict(plain.state_dict())
        gates = TorchGates(layers, units, kind, **options)
        optim = torch.optim.Adam(
            [
                {"params": list(tnet.parameters()), "lr": LR},
                {"params": gates.parameters(), "lr": GATE_LR},
            ],
            betas=BETAS,
        )
        steps[label] = lambda tnet=tnet, gates=gates, optim=optim: _torch_gated_step(
            tnet, gates, optim, x, y, NUM_DATA
        )
    return steps, num_gates


def _timer(device: torch.device):
    """``time(step) -> seconds`` of one call: wall time on the CPU; on CUDA the time between
    two events around the step, read after it (the step itself runs asynchronously)."""
    if device.type != "cuda":

        def wall(step):
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0

        return wall
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def events(step):
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return events


def run(args) -> dict:
    device = torch.device(args.device)
    # Every tensor the steps create (data, networks, parameters, noise) on the device.
    torch.set_default_device(device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, *INPUT_SHAPE)
    y = torch.randint(10, (args.batch_size,))
    idx = torch.randperm(NUM_DATA)[: args.batch_size]
    timed = _timer(device)
    validation = _validation_state()
    steps, num_gates = build_steps(args, x, y, idx)
    # Counted first, at the gates' initial posteriors: the operations of a step depend on the
    # branches its gates take (a gate that moves beyond a bound takes the tail formulas).
    counted = [
        name
        for name in ("plain", "svi", "plain_fused_adam", "svi_trace_mean_field", "svi_lean")
        if name in steps
    ]
    ops = {name: count_ops(steps[name], device) for name in counted}
    peak = {name: peak_memory(steps[name], device) for name in counted}
    names = list(steps)
    errors = {}
    with warnings.catch_warnings():
        # JIT tracing warns about Python scalars it records as constants.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.*", category=FutureWarning)
        for name in list(names):
            try:
                for _ in range(args.warmup):
                    steps[name]()
            except Exception as e:  # a variant that does not run is reported, not fatal
                errors[name] = f"{type(e).__name__}: {e}"
                names.remove(name)
        times = {name: [] for name in names}
        load_before = os.getloadavg()
        for rep in range(args.repeats):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed(steps[name]))
        load_after = os.getloadavg()

    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "network": NETWORK,
        "gates": num_gates,
        "batch_size": args.batch_size,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "ratio": med["svi"] / med["plain"],
        "target": 1.3,
        # The cheapest gated step (torch_gated_lognormal), and the cheapest with truncated gates
        # (torch_gated_textbook), over the plain one; None when the variants were skipped.
        "floor_ratio": (
            med["torch_gated_lognormal"] / med["plain"] if "torch_gated_lognormal" in med else None
        ),
        "svi_textbook_floor_ratio": (
            med["svi_textbook_gates"] / med["plain"] if "svi_textbook_gates" in med else None
        ),
        "truncated_floor_ratio": (
            med["torch_gated_textbook"] / med["plain"] if "torch_gated_textbook" in med else None
        ),
        "svi_median_s": med["svi"],
        "plain_median_s": med["plain"],
        "svi_iqr_s": _iqr(times["svi"]),
        "plain_iqr_s": _iqr(times["plain"]),
        "svi_p90_s": _p90(times["svi"]),
        "plain_p90_s": _p90(times["plain"]),
        "svi_path": "CompactMeanField_ELBO.differentiable_loss, pyro_sbp.infer.adam (fused)",
        "validation_default": validation,
        "variants": {
            name: {
                "median_s": med[name],
                "iqr_s": _iqr(times[name]),
                "p90_s": _p90(times[name]),
                "ratio_to_plain": med[name] / med["plain"],
            }
            for name in names
            if name not in ("svi", "plain")
        },
        "variant_errors": errors,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    result["ops"] = ops
    result["ops_svi"] = ops["svi"]["aten_calls"]
    result["ops_plain"] = ops["plain"]["aten_calls"]
    result["ops_ratio"] = ops["svi"]["aten_calls"] / ops["plain"]["aten_calls"]
    result["host_syncs_svi"] = ops["svi"]["host_syncs"]
    # Peak memory of one step (bytes, every category the profiler's memory timeline tracks:
    # parameters, gradients, activations, optimiser state, temporaries); target ratio <= 2.
    result["peak_memory_bytes"] = peak
    result["peak_memory_ratio"] = peak["svi"] / peak["plain"]
    if "svi_trace_mean_field" in ops:
        # The original headline path and the plain step with the svi step's optimiser.
        tmf = ops["svi_trace_mean_field"]["aten_calls"]
        result["ops_ratio_trace_mean_field"] = tmf / ops["plain"]["aten_calls"]
        result["ops_ratio_to_plain_fused_adam"] = (
            ops["svi"]["aten_calls"] / ops["plain_fused_adam"]["aten_calls"]
        )
        result["peak_memory_ratio_trace_mean_field"] = peak["svi_trace_mean_field"] / peak["plain"]
    if all(a in med and (b is None or b in med) for _, a, b in BREAKDOWN):
        result["breakdown_ms"] = {
            label: 1e3 * (med[a] - (med[b] if b else 0.0)) for label, a, b in BREAKDOWN
        }
    if "svi_jit" in names:
        result["variants"]["svi_jit"]["note"] = (
            "JitTraceMeanField_ELBO: a trace of the whole step (the gates have no data-dependent "
            "branch)"
        )
    return result


#: The operators at which the host waits for the device: every ``.item()``, ``bool(tensor)``
#: and ``.all()`` / ``.any()`` test ends in ``_local_scalar_dense``; ``nonzero`` sizes its output.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def peak_memory(step, device: torch.device = CPU) -> int:
    """Peak memory of one call of ``step`` in bytes: on the CPU from ``torch.profiler``'s
    memory timeline (the sum over its categories at each instant; tensors that exist before the
    call, such as the parameters, count as the profiler infers them); on CUDA the allocator's
    peak (``torch.cuda.max_memory_allocated``, everything allocated on the device)."""
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    for attempt in range(5):
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            step()
        try:
            timeline = MemoryProfileTimeline(prof._memory_profile())
        except AssertionError:
            # The profiler's data-flow graph now and then fails to match a tensor's versions
            # (torch 2.14: "version mismatch", on the same step that profiles the next time).
            if attempt == 4:
                raise
            continue
        _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
        return int(max(sum(s) for s in sizes)) if sizes else 0


def count_ops(step, device: torch.device = CPU) -> dict:
    """aten operator calls (nested ones included) and host synchronisations of one call of
    ``step``, counted by ``torch.profiler``: exact and machine-independent (on CUDA too: the
    aten calls are recorded on the host, each launching the device's kernels)."""
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    names = [e.name for e in prof.events()]
    return {
        # Operator calls: PyTorch's and the native gate kernels' (pyro_sbp::...).
        "aten_calls": sum(n.startswith(("aten::", "pyro_sbp::")) for n in names),
        "native_calls": sum(n.startswith("pyro_sbp::") for n in names),
        "host_syncs": sum(n in SYNC_OPS for n in names),
    }


def profile(args) -> None:
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, *INPUT_SHAPE)
    y = torch.randint(10, (args.batch_size,))
    idx = torch.randperm(NUM_DATA)[: args.batch_size]
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    _, model, guide = _gated_setup()
    svi = SVI(model, guide, pyro.optim.Adam(_optim_args), TraceMeanField_ELBO())
    for _ in range(args.warmup):
        svi.step(x, y, idx)
    n = 50
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        svi.step(x, y, idx)
    pr.disable()
    stats = pstats.Stats(pr)
    print(f"cProfile of {n} SVI steps (times are totals over the {n} steps)")
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(25)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-operator times are stable on one thread
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        for _ in range(10):
            svi.step(x, y, idx)
    torch.set_num_threads(threads)
    print("torch.profiler of 10 SVI steps on 1 thread")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=30
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (CUDA time between events around each step)"
    )
    parser.add_argument("--no-variants", action="store_true", help="time only svi and plain")
    parser.add_argument("--jit", action="store_true", help="also time JitTraceMeanField_ELBO")
    parser.add_argument("--profile", action="store_true", help="profile the SVI step instead")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not math.isfinite(result["ratio"]):
        raise SystemExit("non-finite ratio")


if __name__ == "__main__":
    main()
