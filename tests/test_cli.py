"""The command line, in-process through ``pyro_sbp.cli.main`` and once as ``python -m pyro_sbp``."""

import json
import subprocess
import sys

import pytest
import torch

from pyro_sbp.cli import main
from pyro_sbp.data import DATASETS
from pyro_sbp.infer import load_checkpoint
from pyro_sbp.models import NETWORKS

TINY = [
    "--model",
    "digits-mlp",
    "--dataset",
    "digits",
    "--network-kwargs",
    '{"hidden": [16, 8]}',
    "--pretrain-epochs",
    "1",
    "--no-progress",
]


def test_module_help_in_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "pyro_sbp", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout
    assert "usage: pyro-sbp" in result.stdout


def test_train_help_lists_the_models_and_data_sets(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in [*NETWORKS, *DATASETS]:
        assert name in out, name
    for option in ("--out", "--resume", "--epochs", "--gate-lr", "--network-kwargs"):
        assert option in out, option


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_train_writes_checkpoint_and_history_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").is_file()
    history = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history] == ["pretrain", "svi"]
    stdout = capsys.readouterr().out
    assert "done: 2 epochs" in stdout and str(out) in stdout
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["network_kwargs"] == {"hidden": [16, 8]}
    assert (ckpt["pretrain_done"], ckpt["svi_done"]) == (1, 1)
    steps = ckpt["global_step"]
    before = ckpt["guide_params"]["params"]["classifier.1.gate.loc"].clone()

    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    history2 = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history2] == ["pretrain", "svi", "svi"]
    assert history2[:2] == history  # the first two epochs are kept as they were
    ckpt = load_checkpoint(out)
    assert (ckpt["pretrain_done"], ckpt["svi_done"]) == (1, 2)
    per_epoch = steps // 2  # the first run had one pretraining and one SVI epoch
    assert ckpt["global_step"] == steps + per_epoch  # one more SVI epoch
    assert not torch.equal(ckpt["guide_params"]["params"]["classifier.1.gate.loc"], before)
    assert "done: 3 epochs" in capsys.readouterr().out


def test_shape_mismatch_returns_2_with_a_message(tmp_path, capsys):
    code = main(
        [
            "train",
            "--model",
            "lenet-300-100",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert "(1, 28, 28)" in err and "(1, 8, 8)" in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_without_checkpoint_returns_2(tmp_path, capsys):
    code = main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "none"), "--resume"])
    assert code == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    code = main(["train", *TINY, "--epochs", "-1", "--out", str(tmp_path)])
    assert code == 2
    assert "epochs must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--network-kwargs", "[1, 2]", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "resnet", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arg", "stored"),
    [("25", 25.0), ('{"classifier.3.gate": 7}', {"classifier.3.gate": 7})],
)
def test_train_takes_a_kl_weight(tmp_path, capsys, arg, stored):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--kl-weight", arg, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["kl_weight"] == stored
    weights = {"classifier.1.gate": 1.0, "classifier.3.gate": 7.0}
    expected = 25.0 if stored == 25.0 else weights
    assert json.loads((out / "history.json").read_text())[-1]["kl_weight"] == expected


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("[1]", "expected a JSON object"),
        ('{"classifier.3.gate": "x"}', "expected numbers by gate site"),
    ],
)
def test_bad_kl_weight_arguments(tmp_path, capsys, arg, message):
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, "--kl-weight", arg, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_kl_weight_for_an_unknown_site_is_one_line(tmp_path, capsys):
    args = ["train", *TINY, "--kl-weight", '{"nope.gate": 2}', "--out", str(tmp_path)]
    assert main(args) == 2
    assert "kl_weight for unknown gate sites ['nope.gate']" in capsys.readouterr().err


def test_train_takes_the_recipe_options(tmp_path):
    out = tmp_path / "run"
    options = ["--noise", "batch", "--lr-schedule", "cosine", "--prune-masks", "fresh"]
    args = ["train", *TINY, "--epochs", "2", "--prune-criterion", "snr:1", *options]
    assert main([*args, "--out", str(out)]) == 0
    config = load_checkpoint(out)["config"]
    assert (config["noise"], config["lr_schedule"], config["prune_masks"]) == (
        "batch",
        "cosine",
        "fresh",
    )
    assert [r.get("lr_factor") for r in json.loads((out / "history.json").read_text())] == [
        None,
        1.0,
        0.5,
    ]


def test_train_keep_best_says_which_epoch_it_kept(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "1", "--finetune-epochs", "2", "--keep-best"]
    assert main([*args, "--out", str(out)]) == 0
    best = load_checkpoint(out)["best"]
    assert best["kept"] and best["epoch"] in (2, 3)
    assert f"kept the network of SVI epoch {best['epoch']}" in capsys.readouterr().out


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
    assert "already holds a run (checkpoint.pt): pass --resume" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(["train", *TINY, "--epochs", "1", "--overwrite", "--out", str(out)]) == 0


def test_resume_says_which_options_it_ignores(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    args = ["train", "--resume", "--epochs", "1", "--lr", "0.5", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "--resume continues with the run's own settings; ignored: --lr" in err, err
    assert main(["train", "--resume", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    assert "ignored" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained, pruned run directory exported as TorchScript and ONNX."""
    pytest.importorskip("onnxruntime")
    run = tmp_path_factory.mktemp("exported") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    # About half of this briefly trained network's units (l2 scores 0.5-0.7).
    assert main(["prune", str(run), "--criterion", "l2:0.58"]) == 0
    assert main(["export", str(run), "--onnx"]) == 0
    return run


QUICK_BENCH = ["--min-run-time", "0.01", "--batch-sizes", "1,3"]


def test_export_onnx_writes_onnx_beside_the_torchscript(exported, capsys):
    from pyro_sbp.export import load_onnx, load_torchscript

    shape = tuple(load_checkpoint(exported)["input_shape"])
    x = torch.rand(5, *shape)
    for name in ("full", "pruned"):
        session = load_onnx(exported / f"{name}.onnx")
        assert session.get_inputs()[0].shape == ["batch", *shape]
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            expected = load_torchscript(exported / f"{name}.pt")(x)
        assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))


def test_bench_times_each_runtime(exported, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    capsys.readouterr()
    args = ["bench", str(run), "--runtime", "eager,torchscript,onnxruntime", *QUICK_BENCH]
    assert main(args) == 0
    out = capsys.readouterr().out
    bench = json.loads((run / "bench.json").read_text())
    assert bench["runtimes"] == ["eager", "torchscript", "onnxruntime"]
    rows = [(r["runtime"], r["device"], r["batch_size"]) for r in bench["latency"]]
    assert rows == [(rt, "cpu", bs) for rt in bench["runtimes"] for bs in (1, 3)]
    for r in bench["latency"]:
        assert r["full_median_s"] > 0 and r["pruned_median_s"] > 0 and r["speedup"] > 0
    assert bench["params_pruned"] < bench["params_full"]
    assert "onnxruntime_version" in bench
    lines = out.splitlines()
    assert lines[2].split()[:2] == ["runtime", "device"]
    assert [line.split()[0] for line in lines[3:9]] == ["eager"] * 2 + ["torchscript"] * 2 + [
        "onnxruntime"
    ] * 2
    # The default is what bench always timed: full.pt and pruned.pt.
    assert main(["bench", str(run), *QUICK_BENCH]) == 0
    bench = json.loads((run / "bench.json").read_text())
    assert bench["runtimes"] == ["torchscript"]
    assert [r["runtime"] for r in bench["latency"]] == ["torchscript"] * 2
    assert "onnxruntime_version" not in bench


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        (
            "torchscript,tensorrt",
            "unknown runtime 'tensorrt' in --runtime 'torchscript,tensorrt'; expected a "
            "comma-separated list of eager, torchscript, onnxruntime",
        ),
        ("", "unknown runtime '' in --runtime ''"),
        ("eager,eager", "--runtime 'eager,eager' names 'eager' twice"),
    ],
)
def test_bench_refuses_an_unknown_runtime(tmp_path, capsys, runtime, message):
    # Checked before anything is read: no run directory needed.
    assert main(["bench", str(tmp_path / "none"), "--runtime", runtime]) == 2
    line = _one_line_error(capsys)
    assert line.startswith("pyro-sbp bench: error: " + message), line


def test_bench_onnxruntime_needs_the_onnx_files_of_this_export(exported, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    capsys.readouterr()
    bench = ["bench", str(run), "--runtime", "onnxruntime", *QUICK_BENCH]
    # ONNX files of another network: refused before anything is timed.
    shutil.copy(run / "full.onnx", run / "pruned.onnx")
    assert main(bench) == 2
    line = _one_line_error(capsys)
    assert f"{run / 'pruned.onnx'} does not compute what {run / 'pruned.pt'} does" in line, line
    assert f"run `pyro-sbp export {run}` again" in line
    assert not (run / "bench.json").exists()
    (run / "pruned.onnx").write_bytes(b"garbage")
    assert main(bench) == 2
    assert f"{run / 'pruned.onnx'} is not an ONNX file, or is corrupt" in _one_line_error(capsys)
    (run / "pruned.onnx").unlink()
    assert main(bench) == 2
    line = _one_line_error(capsys)
    assert f"no pruned.onnx in {run}: run `pyro-sbp export {run} --onnx`" in line, line
    assert main([*bench[:4], "--device", "cuda"]) == 2
    assert "the onnxruntime runtime is timed on the CPU only" in _one_line_error(capsys)


def test_bench_eager_needs_the_masks_of_the_export(exported, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    # pruned.pt from other masks (those of another criterion, not saved): every unit removed.
    assert main(["export", str(run), "--criterion", "snr:1000"]) == 0
    capsys.readouterr()
    assert main(["bench", str(run), "--runtime", "eager", *QUICK_BENCH]) == 2
    line = _one_line_error(capsys)
    assert "the pruned network of" in line and "and its masks.pt does not compute what" in line
    (run / "masks.pt").unlink()
    assert main(["bench", str(run), "--runtime", "eager", *QUICK_BENCH]) == 2
    assert f"no masks.pt in {run}" in _one_line_error(capsys)


def test_without_the_onnx_extra_export_onnx_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(tmp_path), "--onnx"]) == 2
    line = _one_line_error(capsys)
    assert line.endswith("need the onnxruntime package: pip install 'pyro-sbp[onnx]'"), line
    assert main(["bench", str(tmp_path), "--runtime", "onnxruntime"]) == 2
    assert "pip install 'pyro-sbp[onnx]'" in _one_line_error(capsys)
