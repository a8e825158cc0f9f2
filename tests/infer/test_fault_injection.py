"""Kill a training process with SIGKILL again and again, resume it each time, and end where an
uninterrupted run ends: bit for bit, with a readable checkpoint on disk after every kill."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyro_sbp.infer import load_checkpoint
from tests.infer.test_resume import _assert_same

HARNESS = Path(__file__).with_name("killable_train.py")
KILLED = -signal.SIGKILL


def _start(out: Path, die: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, str(HARNESS), str(out)] + (["--die", die] if die else [])
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def _final_state(out: Path) -> dict:
    ckpt = load_checkpoint(out)
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in ckpt["history"]]
    keep = ("net_state", "guide_params", "optim_state", "pretrain_optim_state", "rng_state")
    return {k: ckpt[k] for k in keep} | {
        "history": history,
        "global_step": ckpt["global_step"],
        "epoch_progress": ckpt["epoch_progress"],
        "sampler_rng": ckpt["sampler_rng"],
        "loader_rng": ckpt["loader_rng"],
    }


def _checkpoint_readable(out: Path) -> int | None:
    """The step of the checkpoint on disk (None before the first); it must always load."""
    if not (out / "checkpoint.pt").exists():
        return None
    return load_checkpoint(out)["global_step"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = _start(tmp_path / "reference")  # runs beside the killed ones
    out = tmp_path / "killed"
    rng = random.Random(0)
    events = []
    # Deterministic kills inside a checkpoint write, an evaluation and an SVI step, then kills
    # at random moments of training.
    for die in ("save:3", "eval:2", "step:7", None, None, None):
        p = _start(out, die)
        if die is None:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.3))
            p.send_signal(signal.SIGKILL)
        code, err = _finish(p)
        assert code in (KILLED, 0), err
        events.append((die or "random", code, _checkpoint_readable(out)))
        # Whatever the kill interrupted, the checkpoint on disk loads and only moves forward.
        steps = [e[2] for e in events if e[2] is not None]
        assert steps == sorted(steps), events
    print("kills (where, exit code, checkpoint step on disk after it):", events)
    assert [e[1] for e in events[:3]] == [KILLED] * 3, events
    code, err = _finish(_start(out))
    assert code == 0, err
    code, err = _finish(reference)
    assert code == 0, err
    _assert_same(_final_state(tmp_path / "reference"), _final_state(out))
    # The kill inside a write left its half-written temporary file, which the next run removed.
    assert not list(out.glob("*.tmp")), list(out.iterdir())
