"""The Sparse VD / Bayesian Compression benchmark's bookkeeping: the architecture notation,
aggregation over seeds, targets and the docs page (no training)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    path = BENCHMARKS / "bayesian_compression.py"
    spec = importlib.util.spec_from_file_location("bench_bc", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_bc"] = module
    spec.loader.exec_module(module)
    return module


def _run(method, seed, error, ratio, fast, flops):
    return {
        "network": "lenet5-caffe",
        "method": method,
        "seed": seed,
        "error": error,
        "error_reference": 9.0,
        "ratio": ratio,
        "architecture": [12, 20, 300, 100],
        "bits": {"a": 8, "b": 7},
        "compression_pruning": ratio,
        "compression_fast_prediction": fast,
        "compression_maximum": None if fast is None else 2 * fast,
        "compression_note": None,
        "flops_reduction": flops,
        "cpu_speedup": 1.5,
    }


def test_paper_architecture(bench):
    net = nn.Sequential(
        nn.Conv2d(1, 7, 5), nn.Conv2d(7, 9, 5), nn.Flatten(), nn.Linear(144, 30), nn.Linear(30, 10)
    )
    assert bench.paper_architecture(net) == [7, 9, 144, 30]


def test_aggregate_targets_and_page(bench):
    runs = [
        _run("sparse-vd", 1, 9.8, 70.0, 20.0, 1.2),
        _run("sparse-vd", 0, 9.4, 50.0, 18.0, 1.1),
        _run("bc-gnj", 0, 9.5, 40.0, 150.0, 6.0),
    ]
    rows = bench.aggregate(runs)
    assert [(r["network"], r["method"]) for r in rows] == [
        ("lenet5-caffe", "bc-gnj"),
        ("lenet5-caffe", "sparse-vd"),
    ]
    svd = rows[1]
    assert svd["seeds"] == [0, 1]
    assert svd["ratio_mean"] == pytest.approx(60.0)
    assert svd["ratio_std"] == pytest.approx(math.sqrt(200.0))
    assert svd["error_increase_mean"] == pytest.approx(0.6)
    t = bench.targets(rows)
    assert t["sparse-vd"]["met"] and t["bc-gnj"]["met"]
    runs[0]["error"] = 11.0  # error +1.2 points on average: missed
    t = bench.targets(bench.aggregate(runs))
    assert not t["sparse-vd"]["met"] and t["sparse-vd"]["error_increase"] == pytest.approx(1.2)
    data = {
        "rows": bench.aggregate(runs),
        "targets": t,
        "runs": runs,
        "networks": ["lenet5-caffe"],
        "methods": ["sparse-vd", "bc-gnj"],
        "skipped": {"bc-ghs": "not available"},
        "seeds": [0, 1],
        "quick": False,
        "wall_seconds": 60.0,
        "torch": "2.x",
        "machine": "x86_64",
    }
    page = bench.render(data)
    assert "| lenet5-caffe | sparse-vd | 10.20 ± 1.13 (9.00) | 12-20-300-100, 12-20-300-100" in page
    assert "| sparse-vd | \\|W\\|/\\|W≠0\\| >= 60 | 60.0, error +1.20 points | no |" in page
    assert (
        "| lenet5-caffe | bc-gnj | 8-13-88-13 | 18-10-7-9 | 0.9 | 108 | 361 | 573 | 1.0 |" in page
    )
    assert "Skipped: bc-ghs (not available)." in page
    assert "bc-ghs | 5-10-76-16" not in page  # published rows of the methods run only
