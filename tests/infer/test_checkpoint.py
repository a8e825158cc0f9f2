"""Checkpoints: plain values only, safe loading, format versions, corruption, failed saves."""

import errno
import os
import random
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions import constraints

import pyro_sbp
from pyro_sbp.infer import (
    CheckpointError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_weights,
    safe_load,
    save_checkpoint,
)
from pyro_sbp.infer.checkpoint import FORMAT, FORMAT_VERSION, save_atomic
from pyro_sbp.infer.plain_state import (
    UnsafeStateError,
    check_plain,
    constraint_from_plain,
    constraint_to_plain,
    get_plain_rng_state,
    set_plain_rng_state,
)


class Payload:
    """Unpickling it runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def run_dir(tmp_path):
    config = TrainConfig(
        epochs=1, pretrain_epochs=1, network_kwargs={"hidden": [16, 8]}, checkpoint_every=0
    )
    Trainer(config, tmp_path / "run", progress=False).fit()
    return tmp_path / "run"


# --- plain state ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "c",
    [
        constraints.real,
        constraints.positive,
        constraints.simplex,
        constraints.real_vector,
        constraints.unit_interval,
        constraints.interval(-1.0, 2.5),
        constraints.interval(torch.zeros(3), torch.ones(3)),
        constraints.half_open_interval(0.0, 1.0),
        constraints.greater_than(3.0),
        constraints.greater_than_eq(-2.0),
        constraints.less_than(7.0),
        constraints.integer_interval(0, 5),
        constraints.independent(constraints.positive, 2),
    ],
    ids=repr,
)
def test_constraints_round_trip_by_name(c, tmp_path):
    spec = constraint_to_plain(c)
    check_plain(spec)
    torch.save({"c": spec}, tmp_path / "c.pt")
    back = constraint_from_plain(torch.load(tmp_path / "c.pt", weights_only=True)["c"])
    assert type(back) is type(c)
    assert repr(back) == repr(c)
    x = torch.linspace(-3, 8, 21).reshape(7, 3)
    assert torch.equal(back.check(x), c.check(x))


def test_unknown_constraints_are_refused():
    class Odd(constraints.Constraint):
        def check(self, value):
            return value > 0

    with pytest.raises(UnsafeStateError, match="no stored form"):
        constraint_to_plain(Odd())
    with pytest.raises(ValueError, match="unknown constraint"):
        constraint_from_plain("no_such_constraint")
    with pytest.raises(ValueError, match="unknown constraint"):
        constraint_from_plain({"name": "os.system"})


def test_rng_states_round_trip_through_the_safe_loader(tmp_path):
    random.seed(3)
    np.random.seed(4)  # noqa: NPY002
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = get_plain_rng_state()
    check_plain(state)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))  # noqa: NPY002
    save_atomic(state, tmp_path / "rng.pt")
    random.seed(99)
    np.random.seed(99)  # noqa: NPY002
    torch.manual_seed(99)
    set_plain_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=3), children, max_size=3)
        ),
        max_leaves=10,
    )
)
@settings(max_examples=50, deadline=None)
def test_check_plain_accepts_what_the_safe_loader_loads(value):
    check_plain(value)


@pytest.mark.parametrize(
    "value",
    [{"a": np.zeros(2)}, {"a": [1, {2}]}, {"a": constraints.real}, {("t",): 1}, slice(1)],
    ids=["ndarray", "set", "constraint", "tuple key", "slice"],
)
def test_check_plain_names_what_is_not_plain(value):
    with pytest.raises(UnsafeStateError, match="checkpoint"):
        check_plain(value, "checkpoint")


def test_save_checkpoint_refuses_objects_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['optim'\]\[0\] is a"):
        save_checkpoint({"optim": [object()]}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


# --- what a checkpoint says it is ----------------------------------------------------------


def test_every_checkpoint_carries_its_format_and_versions(run_dir):
    ckpt = load_checkpoint(run_dir)
    assert ckpt["format"] == FORMAT
    assert ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["library_version"] == pyro_sbp.__version__
    # The whole file loads with torch's safe loader, without us.
    raw = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(raw) == set(ckpt)
    constraints_by_name = raw["guide_params"]["constraints"]
    assert constraints_by_name and set(constraints_by_name.values()) == {"real"}


def _rewrite(run_dir, **changes):
    ckpt = load_checkpoint(run_dir) | changes
    save_atomic({k: v for k, v in ckpt.items() if v is not None}, run_dir / "checkpoint.pt")


def test_a_newer_format_is_refused_with_both_versions(run_dir):
    _rewrite(run_dir, format_version=FORMAT_VERSION + 1, library_version="9.0")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run_dir)
    message = str(info.value)
    assert str(run_dir / "checkpoint.pt") in message
    assert f"format {FORMAT_VERSION + 1}" in message and "9.0" in message
    assert "upgrade pyro-sbp" in message


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": "2"}, "unknown checkpoint format version '2'"),
        ({"format_version": 1}, "format 1, which this version"),
        ({"format": None}, "not a pyro-sbp checkpoint"),
        ({"format": "something else"}, "not a pyro-sbp checkpoint"),
    ],
)
def test_unknown_formats_are_refused(run_dir, changes, match):
    _rewrite(run_dir, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(run_dir)


def test_a_plain_state_dict_is_not_a_checkpoint(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a pyro-sbp checkpoint"):
        load_checkpoint(tmp_path)


# --- corrupt and malicious files -----------------------------------------------------------


def _flip_bytes(data: bytes, where: float, n: int = 64) -> bytes:
    out = bytearray(data)
    start = int(len(out) * where)
    for i in range(start, start + n):
        out[i] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda d: b"garbage\n", "corrupt, or not written by torch.save"),
        (lambda d: b"", "is empty"),
        (lambda d: d[: len(d) // 2], "corrupt or truncated"),
        (lambda d: d[:-10], "corrupt or truncated"),
        # Wherever 64 bytes are altered (a record, a header, the directory): corrupt.
        *[(lambda d, w=w: _flip_bytes(d, w), "corrupt") for w in (0.1, 0.3, 0.5, 0.7, 0.95)],
    ],
    ids=["text", "empty", "half", "tail cut", *(f"flipped at {w}" for w in (10, 30, 50, 70, 95))],
)
def test_a_corrupt_checkpoint_names_the_file(run_dir, corrupt, match):
    path = run_dir / "checkpoint.pt"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(run_dir)
    assert str(path) in str(info.value)


def test_every_data_record_is_crc_checked(run_dir):
    # Altered tensor bytes load silently with torch's reader; each must be caught.
    path = run_dir / "checkpoint.pt"
    good = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 8]
    assert len(records) > 5
    for info in records[:: max(1, len(records) // 6)]:
        # The record's bytes start after its local header (30 bytes, the name, the extra
        # field: zip's layout); one bit flipped in the middle of the tensor's data.
        h = info.header_offset
        n, m = (
            int.from_bytes(good[h + 26 : h + 28], "little"),
            int.from_bytes(good[h + 28 : h + 30], "little"),
        )
        data = bytearray(good)
        data[h + 30 + n + m + info.file_size // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="fails its CRC check"):
            load_checkpoint(run_dir)
    path.write_bytes(good)
    load_checkpoint(run_dir)


@pytest.mark.parametrize(
    "load",
    [load_checkpoint, load_weights, lambda p: safe_load(p, "masks file")],
    ids=["checkpoint", "weights", "safe_load"],
)
def test_a_malicious_pickle_is_never_unpickled(tmp_path, load):
    marker = tmp_path / "PWNED"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "x": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle it") as info:
        load(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_load_weights_takes_state_dicts_and_checkpoints(run_dir, tmp_path):
    ckpt = load_checkpoint(run_dir)
    from_ckpt = load_weights(run_dir / "checkpoint.pt")
    assert from_ckpt.keys() == ckpt["net_state"].keys()
    torch.save(ckpt["net_state"], tmp_path / "plain.pt")
    torch.save({"state_dict": ckpt["net_state"], "epoch": 3}, tmp_path / "nested.pt")
    for name in ("plain.pt", "nested.pt"):
        got = load_weights(tmp_path / name)
        assert all(torch.equal(got[k], v) for k, v in ckpt["net_state"].items())
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_weights(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(tmp_path / "missing.pt")


# --- saves that fail ----------------------------------------------------------------------


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(run_dir, monkeypatch):
    path = run_dir / "checkpoint.pt"
    before = path.read_bytes()
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    trainer = Trainer.from_run(run_dir)
    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError) as info:
        trainer.save()
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt", "history.json"]
    load_checkpoint(run_dir)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    run = tmp_path_factory.mktemp("bytes") / "run"
    config = TrainConfig(epochs=1, pretrain_epochs=0, network_kwargs={"hidden": [8, 4]})
    Trainer(config, run, progress=False).fit()
    data = (run / "checkpoint.pt").read_bytes()
    return data, load_checkpoint(run)


@given(st.data())
@settings(max_examples=40, deadline=None)
def test_any_damage_is_refused_or_changes_nothing(checkpoint_bytes, tmp_path_factory, data):
    # Bytes altered anywhere: a CheckpointError, or (in zip padding) the very same content.
    good, expected = checkpoint_bytes
    damaged = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        damaged[i] ^= data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("damaged") / "checkpoint.pt"
    path.write_bytes(bytes(damaged))
    try:
        got = load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e)
    else:
        assert _same(got, expected)
