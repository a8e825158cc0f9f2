"""The Fashion-MNIST benchmark's bookkeeping: aggregation over seeds, targets, the docs page, and
one quick fit end to end where the data are installed."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.test_examples import _fashion_mnist_installed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fmnist", BENCHMARKS / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fmnist"] = module  # multiprocessing-style lookups by module name
    spec.loader.exec_module(module)
    return module


def _result(criterion, removed, params, accuracy):
    return {
        "criterion": criterion,
        "spec": criterion,
        "accuracy": accuracy,
        "units": {"classifier.1.gate": [round(50 * (1 - removed / 100)), 50]},
        "compression_units": removed,
        "compression_params": params,
        "flops_reduction": 1 / (1 - params / 100),
    }


def _tasks():
    return [
        {
            "network": "bmrs-mlp",
            "seed": seed,
            "seconds": 1.0,
            "results": [
                _result("none", 0.0, 0.0, 88.0 + seed),
                _result("bmrs-n", 90.0 + 2 * seed, 80.0 + seed, 87.0 + seed),
            ],
        }
        for seed in (0, 1, 2)
    ]


def test_rows_have_the_schema_and_the_statistics_over_seeds(bench):
    rows = bench._aggregate(list(reversed(_tasks())))
    assert [(r["network"], r["criterion"]) for r in rows] == [
        ("bmrs-mlp", "none"),
        ("bmrs-mlp", "bmrs-n"),
    ]
    row = rows[1]
    for key in (
        "compression_units_mean",
        "compression_units_std",
        "compression_params_mean",
        "accuracy_mean",
        "accuracy_std",
        "seeds",
    ):
        assert key in row
    assert row["seeds"] == [0, 1, 2]
    assert row["compression_units_mean"] == pytest.approx(92.0)
    assert row["compression_units_std"] == pytest.approx(statistics.stdev([90.0, 92.0, 94.0]))
    assert row["accuracy_mean"] == pytest.approx(88.0)
    assert row["compression_params_mean"] == pytest.approx(81.0)


def test_targets_and_the_docs_page(bench):
    rows = bench._aggregate(_tasks())
    targets = bench._targets(rows)
    # 92% removed >= 90%, and 1 point below none: met.
    assert targets["bmrs-mlp"]["met"]
    assert targets["bmrs-mlp"]["accuracy_drop"] == pytest.approx(1.0)
    rows[1]["accuracy_mean"] -= 1.5  # 2.5 points below none
    assert not bench._targets(rows)["bmrs-mlp"]["met"]
    data = {
        "rows": rows,
        "targets": targets,
        "seeds": [0, 1, 2],
        "wall_seconds": 60.0,
        "jobs": 2,
        "machine": "x86_64",
        "torch": "2",
    }
    page = bench.render(data)
    assert "| `bmrs-n` | 92.00 ± 2.00 |" in page
    assert "93.20 ± 0.66 | 84.99 ± 0.35" in page  # the published BMRS_N figures side by side
    assert "**met**" in page


@pytest.mark.skipif(not _fashion_mnist_installed(), reason="Fashion-MNIST is not installed")
def test_one_quick_fit_end_to_end(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BMRS_CRITERIA", {"none": None, "bmrs-u:4": "bmrs-u:4"})
    monkeypatch.setitem(
        bench.SETTINGS["bmrs-mlp"], "quick", dict(pretrain_epochs=1, epochs=1, finetune_epochs=0)
    )
    task = dict(network="bmrs-mlp", seed=0, quick=True, data_dir=None, work_dir=str(tmp_path))
    out = bench.run_task(task)
    assert [r["criterion"] for r in out["results"]] == ["none", "bmrs-u:4"]
    none = out["results"][0]
    assert none["compression_units"] == 0.0 and none["compression_params"] == 0.0
    assert 10.0 < none["accuracy"] <= 100.0
    assert out["settings"]["train_examples"] == bench.QUICK_TRAIN
    # Cached: a second call reads the result instead of fitting again.
    cached = json.loads((tmp_path / "bmrs-mlp-seed0" / "result.json").read_text())
    assert bench.run_task(task) == cached
    # A criterion added later is evaluated on the cached fit; the others are read back.
    monkeypatch.setitem(bench.BMRS_CRITERIA, "snr:1", "snr:1")
    more = bench.run_task(task)
    assert more["results"][:2] == cached["results"]
    assert more["results"][2]["criterion"] == "snr:1"
    assert more["fit_seconds"] >= cached["fit_seconds"]
