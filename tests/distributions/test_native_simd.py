"""The eight-lane float32 kernels (:mod:`pyro_sbp._native`, ``simd.h``): their special functions
against scipy, and the independence of the lanes (each element's result is the same bit for bit
whatever its neighbours in a vector or a block take, whichever place it has in the block, at
every block edge), for the sampler, the KL and the moments, derivatives included.

Their accuracy on every branch is held to float64 by test_native_kl and test_native_sample (the
float32 kernels are the vector ones where this file's tests run)."""

import math
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special

from pyro_sbp import _native


@pytest.fixture(scope="module")
def ops():
    assert _native.load(), _native._state["error"]
    if _native.ops().float_lanes() == 1:
        pytest.skip("this build of the kernels has no vector code (no AVX2 and FMA)")
    return _native.ops()


def test_vector_code_is_built_where_the_cpu_has_it():
    assert _native.load(), _native._state["error"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert _native.ops().float_lanes() == 8
    else:
        assert _native.ops().float_lanes() == 1


def _relative_error(ops, name, x, ref):
    got = ops.simd_special(torch.from_numpy(x), name).numpy().astype(np.float64)
    want = ref(x.astype(np.float64))
    ok = np.abs(want) > 1e-37  # normal float results
    return np.max(np.abs(got[ok] - want[ok]) / np.abs(want[ok]))


# Dense grids (every float32 exponent, and linear where the functions bend).
_POS = np.concatenate([np.linspace(0.0, 30.0, 300_001), np.logspace(-30, 7.5, 100_000)])
_ALL = np.concatenate([-_POS[_POS < 12], _POS]).astype(np.float32)
_POS = _POS.astype(np.float32)


@pytest.mark.parametrize(
    ("name", "ref", "x", "bound"),
    [
        # erfcx in double, rounded once: within an ulp (2^-23 relative).
        ("erfcx", special.erfcx, _POS, 1.2e-7),
        # erf and erfc in float: within 2 ulp, erfc within 2.5 in its far tail (exp(-x^2)).
        ("erfc", special.erfc, _ALL, 3.0e-7),
        ("erf", special.erf, _ALL, 2.4e-7),
    ],
)
def test_special_functions_against_scipy(ops, name, ref, x, bound):
    assert _relative_error(ops, name, x, ref) <= bound


def test_ndtri_against_scipy(ops):
    p = np.concatenate([np.logspace(-38, math.log10(0.5), 200_000), np.linspace(1e-3, 0.5, 1000)])
    p = p.astype(np.float32)
    assert _relative_error(ops, "ndtri_lower", p, special.ndtri) <= 1.2e-7
    assert ops.simd_special(torch.tensor([0.5]), "ndtri_lower").item() == 0.0


def test_special_functions_keep_nan_and_infinity(ops):
    x = torch.tensor([math.nan, math.inf, 0.0, 1e30])
    erfcx = ops.simd_special(x, "erfcx")
    assert math.isnan(erfcx[0]) and erfcx[1] == 0.0 and erfcx[2] == 1.0
    assert erfcx[3] == pytest.approx(1.0 / (1e30 * math.sqrt(math.pi)), rel=1e-6)
    erf = ops.simd_special(torch.tensor([math.inf, -math.inf, 4.0, -0.0]), "erf")
    assert erf.tolist()[:3] == [1.0, -1.0, 1.0] and math.copysign(1.0, erf[3]) == -1.0


def _mixed(n, seed):
    """Gates of every branch in one vector: straddling, near and far tails on either side of
    the mirror, nearly flat (wide scales), in random order."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.empty(n).uniform_(-45.0, 25.0, generator=g)
    far = torch.rand(n, generator=g) < 0.1
    loc = torch.where(far, torch.empty(n).uniform_(-3000.0, 3000.0, generator=g), loc)
    scale = torch.empty(n).uniform_(math.log(1e-6), math.log(1e3), generator=g).exp()
    u = torch.rand(3, n, generator=g)
    return loc, scale, u


def _all(ops, loc, scale, u, bounds):
    lo, hi = (torch.tensor(b) for b in bounds)
    elo, ehi = lo.exp(), hi.exp()
    out = []
    out += ops.tn_kl_uniform(loc, scale, lo, hi, lo, hi, True)
    out.append(ops.tn_kl_uniform(loc, scale, lo, hi, lo - 1.0, hi, False)[0])
    out += ops.tln_moments(loc, scale, lo, hi)
    for grad in (True, False):
        # One sample per unit, and three per unit (the plate's rows), in log space and not.
        for log_space in (True, False):
            x, dl, ds = ops.tn_rsample(loc, scale, lo, hi, elo, ehi, u[0], log_space, grad)
            out += [x] + ([dl, ds] if grad else [])
            x, dl, ds = ops.tn_rsample(loc, scale, lo, hi, elo, ehi, u, log_space, grad)
            out += [x.T] + ([dl.T, ds.T] if grad else [])
    return out


@pytest.mark.parametrize("bounds", [(-20.0, 0.0), (-0.7, -0.6)], ids=["-20..0", "narrow"])
@pytest.mark.parametrize("n", [1, 7, 9, 255, 256, 257, 1031])
def test_lanes_are_independent(ops, n, bounds):
    loc, scale, u = _mixed(n, seed=n)
    want = _all(ops, loc, scale, u, bounds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    got = _all(ops, loc[perm], scale[perm], u[:, perm].contiguous(), bounds)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w[perm]), f"output {k} depends on the order of the elements"
    for i in {0, n // 2, n - 1}:
        alone = _all(ops, loc[i : i + 1], scale[i : i + 1], u[:, i : i + 1].contiguous(), bounds)
        for k, (g, w) in enumerate(zip(alone, want, strict=True)):
            assert torch.equal(g[0], w[i]), f"output {k} of element {i} depends on its block"


def test_every_branch_is_taken(ops):
    # The grid of test_lanes_are_independent reaches every branch: straddle, moderate and far
    # tails, and (narrow bounds) the nearly flat quadrature.
    loc, scale, _ = _mixed(1031, seed=1031)
    for lo, hi in [(-20.0, 0.0), (-0.7, -0.6)]:
        alpha, beta = (lo - loc) / scale, (hi - loc) / scale
        flip = alpha + beta < 0
        al = torch.where(flip, -beta, alpha)
        be = torch.where(flip, -alpha, beta)
        h = 0.5 * (hi - lo) / scale
        flat = 0.5 * (al + be).abs() * h + 0.5 * h * h < 0.05
        assert ((al > 0) & (al < 10)).any() and (al >= 10).any()
        assert flip.any() and (~flip).any()
        if hi - lo < 1:
            assert flat.any()
        else:
            assert (al <= 0).any()


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="the scalar build is the only one here, tested by the other files",
)
def test_the_scalar_build_passes_the_float32_accuracy_tests():
    # A CPU without AVX2 runs the scalar kernels in float32: build them (PYRO_SBP_SIMD=0, cached
    # under their own name) and run the float32 accuracy tests of both kernel files on them.
    import os
    import subprocess
    import sys

    here = Path(__file__).parent
    env = dict(os.environ, PYRO_SBP_SIMD="0")
    code = (
        "import sys, pytest, torch; from pyro_sbp import _native; "
        "assert _native.load() and _native.ops().float_lanes() == 1; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
        f"'{here / 'test_native_kl.py'}', '{here / 'test_native_sample.py'}', "
        "'-k', 'float32 or dtype0']))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
