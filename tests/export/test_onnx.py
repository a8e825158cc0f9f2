"""ONNX export: the same outputs as the exported network at any batch size, files that load
without pyro or pyro_sbp, latency under ONNX Runtime, and bad input."""

import re
import subprocess
import sys

import pytest
import torch
import torch.fx
from torch import nn

from pyro_sbp.export import (
    compare,
    compare_onnx,
    export_pruned,
    load_onnx,
    measure_latency_onnx,
    save_onnx,
    save_torchscript,
)
from pyro_sbp.models import build_network, make_prunable, named_gates

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _exported(name="lenet5-caffe", seed=0, input_gates=True):
    """An exported network of ``name`` with random masks and ``theta_mean`` (and BatchNorm
    statistics), and its input shape (input gates on the Linear layers of nn.Sequential
    networks; a traced network, such as a ResNet, has none)."""
    g = torch.Generator().manual_seed(seed)
    net = build_network(name)
    input_gates = input_gates and isinstance(net, nn.Sequential)
    inputs = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)] if input_gates else []
    net = make_prunable(net, input_layers=inputs)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    for _, gate in named_gates(net):
        gate.theta_mean.copy_(torch.rand(gate.num_units, generator=g) * 0.99 + 0.01)
        gate.mask.copy_((torch.rand(gate.num_units, generator=g) < 0.5).float())
    shape = tuple(net.input_shape)
    return export_pruned(net.eval(), shape), shape


def _assert_close(got, expected):
    got = torch.as_tensor(got)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    tol = 1e-5 * max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= tol


def _run(session, x: torch.Tensor):
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.mark.parametrize("name", ["lenet5-caffe", "bmrs-mlp", "resnet-20"])
def test_onnx_model_computes_what_the_exported_network_does(name, tmp_path):
    module, shape = _exported(name)
    path = tmp_path / "pruned.onnx"
    save_onnx(module, path, shape)
    session = load_onnx(path)
    spec = session.get_inputs()[0]
    assert spec.name == "input" and spec.shape == ["batch", *shape]
    # The batch dimension is dynamic: two batch sizes, neither the one it was traced at.
    for batch in (1, 5):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = module(x)
        _assert_close(_run(session, x), expected)


def test_a_graph_module_exports_too(tmp_path):
    module, shape = _exported()
    graph = torch.fx.symbolic_trace(module)
    assert isinstance(graph, torch.fx.GraphModule)
    save_onnx(graph, tmp_path / "graph.onnx", shape, opset=17)
    session = load_onnx(tmp_path / "graph.onnx")
    x = torch.rand(3, *shape)
    with torch.no_grad():
        _assert_close(_run(session, x), module(x))


def test_the_opset_is_the_one_asked_for(tmp_path):
    import onnx

    module, shape = _exported("bmrs-mlp")
    save_onnx(module, tmp_path / "m.onnx", shape, opset=13)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [13]


@pytest.mark.parametrize(
    ("opset", "message"),
    [
        (9, "opset must be an integer >= 11, got 9"),
        ("17", "opset must be an integer >= 11, got '17'"),
        (True, "opset must be an integer >= 11, got True"),
        (99, "opset 99 is not supported by torch"),
    ],
)
def test_bad_opsets_are_refused_and_nothing_is_written(opset, message, tmp_path):
    module, shape = _exported("bmrs-mlp")
    with pytest.raises(ValueError, match="^" + re.escape(message)) as info:
        save_onnx(module, tmp_path / "m.onnx", shape, opset=opset)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_the_previous_file(tmp_path):
    module, shape = _exported("bmrs-mlp")
    path = tmp_path / "m.onnx"
    save_onnx(module, path, shape)
    before = path.read_bytes()
    message = f"^ONNX export of Sequential to {re.escape(str(path))} failed: "
    with pytest.raises(RuntimeError, match=message) as info:
        save_onnx(module, path, (3, 5), opset=17)  # the wrong input shape: the trace fails
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("name", ["lenet5-caffe", "resnet-20"])
def test_torchscript_and_onnx_files_run_without_pyro(name, tmp_path):
    module, shape = _exported(name)
    save_torchscript(module, tmp_path / "pruned.pt")
    save_onnx(module, tmp_path / "pruned.onnx", shape)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        expected = module(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    # A fresh interpreter in which pyro and pyro_sbp cannot be imported, with torch for the
    # TorchScript file and onnxruntime (and NumPy) for the ONNX file.
    code = (
        "import sys, warnings\n"
        "sys.modules['pyro'] = None\n"
        "sys.modules['pyro_sbp'] = None\n"
        "for name in ('pyro', 'pyro_sbp'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(name + ' was importable')\n"
        "warnings.simplefilter('ignore')\n"
        "import numpy as np\n"
        "import onnxruntime as ort\n"
        "import torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"m = torch.jit.load({str(tmp_path / 'pruned.pt')!r})\n"
        # Within rounding: this interpreter's thread count (the convolutions' summation
        # order) may differ from the test's.
        "tol = 1e-5 * max(1.0, float(np.abs(io['y'].numpy()).max()))\n"
        "assert (m(io['x']) - io['y']).abs().max().item() <= tol\n"
        f"s = ort.InferenceSession({str(tmp_path / 'pruned.onnx')!r},\n"
        "                         providers=['CPUExecutionProvider'])\n"
        "y = s.run(None, {'input': io['x'].numpy()})[0]\n"
        "assert y.dtype == np.float32 and np.abs(y - io['y'].numpy()).max() <= tol\n"
        "assert 'pyro' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^no ONNX file at .*nope\.onnx$"):
        load_onnx(tmp_path / "nope.onnx")
    module, shape = _exported("bmrs-mlp")
    save_onnx(module, tmp_path / "good.onnx", shape)
    save_torchscript(module, tmp_path / "pruned.pt")
    good = (tmp_path / "good.onnx").read_bytes()
    cases = {
        "garbage.onnx": b"not a model",
        "empty.onnx": b"",
        "truncated.onnx": good[: len(good) // 2],
        "torchscript.onnx": (tmp_path / "pruned.pt").read_bytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as info:
            load_onnx(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name} is not an ONNX file, or is corrupt ("), name
        assert "\n" not in message, name
    with pytest.raises(ValueError, match="num_threads must be an integer >= 0, got -1"):
        load_onnx(tmp_path / "good.onnx", num_threads=-1)


def test_latency_under_onnx_runtime(tmp_path):
    module, shape = _exported("bmrs-mlp")
    save_onnx(module, tmp_path / "m.onnx", shape)
    result = measure_latency_onnx(tmp_path / "m.onnx", shape, 4, min_run_time=0.01)
    assert set(result) == {"median_s", "iqr_s", "runs"}
    assert result["median_s"] > 0 and result["iqr_s"] >= 0 and result["runs"] >= 1
    session = load_onnx(tmp_path / "m.onnx", num_threads=2)
    assert measure_latency_onnx(session, shape, 1, 0.01, num_threads=2)["median_s"] > 0
    with pytest.raises(ValueError, match="session runs 2 intra-op threads"):
        measure_latency_onnx(session, shape, 1, 0.01)
    with pytest.raises(ValueError, match=r"takes inputs of shape \['batch', 1, 32, 32\], not"):
        measure_latency_onnx(tmp_path / "m.onnx", (1, 8, 8), 1, 0.01)
    # compare_onnx's rows have the keys of compare's, for the same batch sizes.
    rows = compare_onnx(tmp_path / "m.onnx", session, shape, (1, 3), 0.01, num_threads=2)
    torch_rows = compare(module, module, shape, (1, 3), ("cpu",), 0.01)["latency"]
    assert [set(r) for r in rows] == [set(r) for r in torch_rows]
    assert [r["batch_size"] for r in rows] == [1, 3]
    assert all(r["device"] == "cpu" and r["speedup"] > 0 for r in rows)


def test_without_the_extra_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    module, shape = _exported("bmrs-mlp")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"need the onnx package: pip install 'pyro-sbp\[onnx\]'"):
        save_onnx(module, tmp_path / "m.onnx", shape)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"onnxruntime package: pip install 'pyro-sbp\[onnx\]'"):
        load_onnx(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
