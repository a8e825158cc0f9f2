"""Checkpoints of a training run: atomic to write, safe to load, and saying what they are.

A checkpoint is a dict written by :func:`torch.save` that holds only what
``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, ``None``, lists, tuples
and dicts; see :mod:`pyro_sbp.infer.plain_state`), so loading one never unpickles an arbitrary
object: a pickle can run any code while it loads, and checkpoints and weights are shared
between people. Every file this package reads with :func:`torch.load` goes through
:func:`safe_load`, and no reader falls back to the unsafe loader.

Each checkpoint carries a format marker, :data:`FORMAT_VERSION` and the library version that
wrote it; :func:`load_checkpoint` refuses a file without the marker, of a newer format, or
whose archive fails its CRC checks (a truncated or corrupted file), naming the file. A
checkpoint of format 2 (whose optimiser state is Pyro's, one torch optimiser per parameter) is
converted on load to the current layout (:func:`optim_state_from_pyro`). Writes go to a
temporary file in the same directory that is renamed over the old one, so a failed or killed
save leaves the previous checkpoint as it was.
"""

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from pyro_sbp.infer.plain_state import UnsafeStateError, check_plain

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "OLDEST_FORMAT_VERSION",
    "CheckpointError",
    "architecture",
    "architecture_mismatch",
    "load_checkpoint",
    "load_weights",
    "optim_state_from_pyro",
    "safe_load",
    "save_atomic",
    "save_checkpoint",
    "write_atomic",
    "write_text_atomic",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: The marker of a pyro-sbp checkpoint (its ``"format"`` entry).
FORMAT = "pyro-sbp checkpoint"
#: The checkpoint layout written by this version. 3: the SVI optimiser's state is one torch
#: optimiser's ``state_dict()`` with its parameters' names in order (``{"param_names": [...],
#: "state_dict": {...}}``). 2: plain values only (constraints by name, RNG states as tensors)
#: and the position inside an epoch, with Pyro's optimiser state ``{param_name: state_dict}``;
#: still read (converted on load). Version 1 (unmarked) pickled arbitrary objects and is
#: refused.
FORMAT_VERSION = 3
#: The oldest format :func:`load_checkpoint` reads.
OLDEST_FORMAT_VERSION = 2

_REFUSED = (
    "not a pyro-sbp checkpoint, or one written by a version that stored arbitrary objects: "
    "refusing to unpickle it"
)


class CheckpointError(ValueError):
    """A file that cannot be loaded as what it was asked for; the message names the file."""


def _library_version() -> str:
    from pyro_sbp import __version__

    return __version__


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO], Any], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s directory, flush it to disk, and
    rename it over ``path``: a write that fails or is killed midway leaves the previous file
    intact (and at most a ``*.tmp`` file beside it, removed when the failure is an exception).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`write_atomic`: the previous file survives a failed save."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (see
    :func:`save_atomic`)."""
    write_atomic(path, lambda f: f.write(text), "w")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write a checkpoint atomically, with its format marker and versions.

    :raises TypeError: if ``state`` holds anything but plain values (it could not be loaded
        safely); nothing is written then.
    """
    try:
        check_plain(state, "checkpoint")
    except UnsafeStateError as e:
        raise TypeError(f"refusing to write a checkpoint that cannot be loaded safely: {e}") from e
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
    }
    save_atomic(header | state, path)


def _check_archive(path: Path) -> None:
    """Refuse a file whose zip archive (torch's format since 1.6) is truncated or fails its
    CRC checks: torch's own reader does not check them, and would load altered tensors."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return  # not a zip archive: torch.load decides (the legacy format, or garbage)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # whatever a damaged archive makes the reader raise
        raise CheckpointError(f"{path} is corrupt or truncated ({_reason(e)})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: its entry {bad!r} fails its CRC check")


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def safe_load(
    path: str | os.PathLike, what: str = "file", map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    :param what: what the file should be, for the messages (``"checkpoint"``, ``"masks
        file"``).
    :raises FileNotFoundError: if there is no such file.
    :raises CheckpointError: if the file is corrupt or truncated, or holds anything the safe
        unpickler refuses (it is never loaded with the unsafe one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path):
            refused = (
                _REFUSED
                if what == "checkpoint"
                else f"not a {what} of plain tensors and values: refusing to unpickle it"
            )
            raise CheckpointError(f"{path}: {refused}") from e
        raise CheckpointError(f"{path} is corrupt, or not written by torch.save") from e
    except Exception as e:  # a parser fed damaged bytes raises almost anything
        raise CheckpointError(f"{path} is corrupt or truncated ({_reason(e)})") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``path`` may be its run
    directory), safely: no arbitrary object is unpickled.

    :raises FileNotFoundError: if there is no checkpoint there.
    :raises CheckpointError: for a corrupt or truncated file, one that is not a pyro-sbp
        checkpoint (or is of the old, pickling format), or one of a newer format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (corrupt or truncated)")
    ckpt = _check_header(path, safe_load(path, "checkpoint", map_location))
    if ckpt["format_version"] == 2:
        ckpt["optim_state"] = optim_state_from_pyro(ckpt["optim_state"])
    return ckpt


def optim_state_from_pyro(state: dict[str, dict]) -> dict:
    """Pyro's optimiser state (``pyro.optim.PyroOptim.get_state()``: ``{param_name: the
    state_dict of that parameter's own torch optimiser}``, format 2) in the layout of format 3:
    ``{"param_names": [...], "state_dict": {...}}``, the state dict of one optimiser with a
    group per parameter. Each parameter's ``step``, ``exp_avg`` and ``exp_avg_sq`` (its
    optimiser's state of index 0, absent if it never stepped) go to its position; the trainer
    then gives them to the parameter of that name.
    """
    names, per_param, groups = [], {}, []
    for i, (name, optim) in enumerate(state.items()):
        names.append(name)
        own = optim.get("state") or {}
        if len(own) > 1 or len(optim.get("param_groups") or [{}]) != 1:
            raise CheckpointError(
                f"optimiser state of {name!r} is not that of one parameter's optimiser"
            )
        if own:
            per_param[i] = dict(next(iter(own.values())))
        group = dict((optim.get("param_groups") or [{}])[0])
        groups.append(group | {"params": [i]})
    return {"param_names": names, "state_dict": {"state": per_param, "param_groups": groups}}


def _check_header(path: Path, ckpt: Any) -> dict:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pyro-sbp checkpoint (no format marker)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: unknown checkpoint format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version} (written by pyro-sbp "
            f"{ckpt.get('library_version', '?')}); this is pyro-sbp {_library_version()}, which "
            f"reads format {FORMAT_VERSION}: upgrade pyro-sbp to load it"
        )
    if version < OLDEST_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, which this version ({FORMAT_VERSION}) "
            "no longer reads"
        )
    return ckpt


def load_weights(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A network's weights from a file, safely: a state dict saved with ``torch.save``
    (``{name: tensor}``, or such a dict under ``"state_dict"``), or a pyro-sbp checkpoint (its
    network's state).

    :raises FileNotFoundError: if there is no such file.
    :raises CheckpointError: if the file is corrupt, holds arbitrary objects, or holds no
        state dict.
    """
    path = Path(path)
    obj = safe_load(path, "weights file", map_location)
    if isinstance(obj, dict) and "format" in obj:
        return _check_header(path, obj)["net_state"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path}: not a state dict ({{name: tensor}}) or a pyro-sbp checkpoint"
        )
    return obj


def architecture(state_dict: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of a network's state dict: what a checkpoint must match to be loaded."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def architecture_mismatch(expected: dict, found: dict) -> list[str]:
    """Readable differences between two architectures (empty when they match)."""
    diffs = []
    for key in sorted(set(expected) | set(found)):
        if key not in found:
            diffs.append(f"{key}: missing from the checkpoint")
        elif key not in expected:
            diffs.append(f"{key}: in the checkpoint but not in the network")
        elif tuple(expected[key]) != tuple(found[key]):
            diffs.append(f"{key}: network {tuple(expected[key])}, checkpoint {tuple(found[key])}")
    return diffs
