"""Every command that reads a file refuses a malicious pickle without running it, and bad input
gets one line naming what is wrong, exit code 2 and no traceback."""

import os
import shutil

import pytest
import torch

from pyro_sbp.cli import main
from tests.test_cli import TINY as TINY_TRAIN

TINY = [*TINY_TRAIN, "--epochs", "1"]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A trained, pruned and exported run directory."""
    run = tmp_path_factory.mktemp("fitted") / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert main(["prune", str(run), "--criterion", "snr:1"]) == 0
    assert main(["export", str(run)]) == 0
    return run


@pytest.fixture
def run(fitted, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(fitted, copy)
    return copy


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _fill(text: str, **paths) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _doctor(path, marker) -> None:
    torch.save({"config": Payload(marker), "net_state": {}}, path)


@pytest.mark.parametrize(
    ("command", "file"),
    [
        (["train", *TINY, "--pretrained", "{file}", "--out", "{tmp}/new"], "evil.pt"),
        (["train", "--resume", "--no-progress", "--out", "{run}"], "run/checkpoint.pt"),
        (["train", *TINY, "--resume", "--out", "{run}"], "run/checkpoint.pt"),
        (["prune", "{run}"], "run/checkpoint.pt"),
        (["export", "{run}"], "run/checkpoint.pt"),
        (["export", "{run}"], "run/masks.pt"),
        (["bench", "{run}", "--min-run-time", "0.01", "--batch-sizes", "1"], "run/checkpoint.pt"),
        (["report", "{run}", "--no-bench"], "run/checkpoint.pt"),
    ],
    ids=["pretrained", "resume", "resume+model", "prune", "export", "masks", "bench", "report"],
)
def test_a_malicious_pickle_never_runs(run, tmp_path, capsys, command, file):
    marker = tmp_path / "PWNED"
    path = tmp_path / file
    _doctor(path, marker)
    args = [_fill(a, file=path, tmp=tmp_path, run=run) for a in command]
    assert main(args) == 2
    line = _error(capsys)
    assert str(path) in line, line
    assert "refusing to unpickle it" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["full.pt", "pruned.pt"])
def test_bench_refuses_a_pickle_in_place_of_torchscript(run, tmp_path, capsys, name):
    marker = tmp_path / "PWNED"
    _doctor(run / name, marker)
    assert main(["bench", str(run), "--min-run-time", "0.01", "--batch-sizes", "1"]) == 2
    line = _error(capsys)
    assert f"{run / name} is not a TorchScript file" in line, line
    assert not marker.exists()


def _other_network_masks(run, tmp_path):
    other = tmp_path / "other"
    tiny = [a if a != '{"hidden": [16, 8]}' else '{"hidden": [12, 8]}' for a in TINY]
    assert main(["train", *tiny, "--out", str(other)]) == 0
    assert main(["prune", str(other), "--criterion", "snr:1"]) == 0
    shutil.copy(other / "masks.pt", run / "masks.pt")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["prune", "{run}", "--criterion", "snr:1junk"], "(unexpected 'junk' after 'snr:1')"),
        (["prune", "{run}", "--criterion", "bmrs-n;"], "(unexpected ';' after 'bmrs-n')"),
        (["report", "{run}", "--criterion", "bmrs-u:4 x"], "(unexpected ' x' after 'bmrs-u:4')"),
        (["train", *TINY, "--resume", "--out", "{tmp}/none"], "no checkpoint at {tmp}/none"),
        (["train", "--resume", "--out", "{tmp}/none"], "no checkpoint at {tmp}/none"),
        (["prune", "{tmp}/none"], "no checkpoint at {tmp}/none/checkpoint.pt"),
        (
            ["train", *TINY, "--data-dir", "{tmp}", "--out", "{tmp}/r"],
            "'digits' is embedded in scikit-learn and reads no files",
        ),
        (["export", "{run}"], "{run}/masks.pt holds masks for another network"),
        (["prune", "{run}"], "{run}/checkpoint.pt is corrupt"),
    ],
    ids=[
        "criterion garbage",
        "criterion semicolon",
        "report criterion",
        "resume nothing",
        "resume nothing, no model",
        "prune nothing",
        "digits data-dir",
        "masks of another network",
        "text checkpoint",
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(run, tmp_path, capsys, command, expected):
    if "another network" in expected:
        _other_network_masks(run, tmp_path)
        capsys.readouterr()
    if "corrupt" in expected:
        (run / "checkpoint.pt").write_text("garbage\n")
    args = [_fill(a, tmp=tmp_path, run=run) for a in command]
    assert main(args) == 2
    line = _error(capsys)
    assert _fill(expected, tmp=tmp_path, run=run) in line, line
    assert line.startswith(f"pyro-sbp {command[0]}: error: "), line


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--threads", "-1", "argument --threads: must be a positive integer, got -1"),
        ("--threads", "0", "argument --threads: must be a positive integer, got 0"),
        ("--threads", "two", "argument --threads: not an integer: 'two'"),
        ("--checkpoint-every", "-5", "argument --checkpoint-every: must be >= 0, got -5"),
    ],
)
def test_bad_numbers_are_argparse_errors(tmp_path, capsys, option, value, expected):
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY, option, value, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(expected), err
