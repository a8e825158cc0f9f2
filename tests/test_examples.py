"""The scripts in ``examples/`` run end to end (a few steps each) and write what they promise."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pyro_sbp.data import FASHION_MNIST_SYSTEM_DIRS
from pyro_sbp.export import load_torchscript

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FILES = ("full.pt", "pruned.pt", "masks.pt", "posterior.nc", "result.json")
_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fashion_mnist_installed() -> bool:
    return any(
        all((Path(d) / s).exists() or (Path(d) / f"{s}.gz").exists() for s in _IDX_STEMS)
        for d in FASHION_MNIST_SYSTEM_DIRS
    )


def _check_outputs(out: Path, result: dict, input_shape: tuple[int, ...]) -> None:
    for name in FILES:
        assert (out / name).is_file(), name
    assert json.loads((out / "result.json").read_text())["units"] == result["units"]
    # The exported network is the gated one: same predictions, same logits up to rounding.
    acc = result["test_accuracy"]
    assert acc["exported"] == acc["pruned_finetuned"]
    assert result["max_abs_logit_difference"]["pruned"] < 1e-3
    assert result["max_abs_logit_difference"]["full"] < 1e-3
    masks = torch.load(out / "masks.pt")
    kept = {site: int(m.sum()) for site, m in masks.items()}
    assert kept == {site: u["after"] for site, u in result["units"].items()}
    pruned = load_torchscript(out / "pruned.pt")
    assert pruned(torch.rand(2, *input_shape)).shape == (2, 10)
    assert result["params"]["pruned"] <= result["params"]["full"]
    assert 0 < result["flops"]["pruned"] <= result["flops"]["full"]


def test_digits_mlp(tmp_path, capsys):
    example = _load("digits_mlp")
    out = tmp_path / "digits"
    argv = ["--pretrain-epochs", "1", "--epochs", "2", "--finetune-epochs", "1"]
    threads = torch.get_num_threads()
    result = example.main([*argv, "--out", str(out)])
    assert torch.get_num_threads() == threads
    _check_outputs(out, result, (1, 8, 8))
    for site, u in result["units"].items():
        assert u["before"] == {"classifier.1.gate": 100, "classifier.3.gate": 50}[site]
        assert 0 <= u["after"] == u["bmrs-u:4"] <= u["before"]
    printed = capsys.readouterr().out
    assert "BMRS_U-4" in printed
    assert "arviz.summary of theta in classifier.3.gate" in printed
    assert "theta_classifier_3[49]" in printed


@pytest.mark.skipif(
    not _fashion_mnist_installed(),
    reason="the Fashion-MNIST IDX files are not installed (apt-get install "
    f"dataset-fashion-mnist puts them in {', '.join(FASHION_MNIST_SYSTEM_DIRS)})",
)
def test_fashion_mnist_lenet5(tmp_path, capsys):
    example = _load("fashion_mnist_lenet5")
    out = tmp_path / "fashion"
    argv = ["--pretrain-epochs", "1", "--epochs", "1", "--finetune-epochs", "1"]
    argv += ["--steps-per-epoch", "2", "--eval-examples", "200", "--batch-size", "64"]
    result = example.main([*argv, "--out", str(out)])
    _check_outputs(out, result, (1, 28, 28))
    assert result["num_test_evaluated"] == 200
    assert result["num_train"] == 48000
    assert [u["before"] for u in result["units"].values()] == [20, 50, 500]
    assert set(result["fraction_removed"]) == {"bmrs-n", "bmrs-u:4", "bmrs-u-low:4", "snr:1"}
    printed = capsys.readouterr().out
    assert "bmrs-u-low:4" in printed
    assert "arviz.summary of theta in features.0.gate" in printed


def test_fashion_mnist_lenet5_without_the_files(tmp_path, monkeypatch):
    # Nowhere to find the files: the script stops with the loader's advice, and writes nothing.
    monkeypatch.setattr("pyro_sbp.data._sources.FASHION_MNIST_SYSTEM_DIRS", ())
    example = _load("fashion_mnist_lenet5")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        example.main(["--data-dir", str(tmp_path / "empty"), "--out", str(out)])
    message = str(info.value.code)
    assert "fashion-mnist" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert not out.exists()
