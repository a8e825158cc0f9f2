"""Checkpoints inside an epoch, SIGINT/SIGTERM, and one writer per run directory."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyro_sbp.cli import main
from pyro_sbp.infer import (
    RunDirectoryLocked,
    RunLock,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    load_checkpoint,
)
from tests.infer.test_resume import Crash, _assert_same, _crash_after_saves, _run, _snapshot


def _config(**kwargs) -> TrainConfig:
    base = dict(
        model="digits-mlp",
        dataset="digits",
        epochs=2,
        pretrain_epochs=1,
        network_kwargs={"hidden": [16, 8]},
        gate_lr=0.05,
        kl_warmup_epochs=2,
        checkpoint_every=4,
    )
    return TrainConfig(**(base | kwargs))


def _crash_then_resume(tmp_path, monkeypatch, saves: int, **options) -> dict:
    """An uninterrupted run, and a run crashed after its ``saves``-th checkpoint and resumed:
    the uninterrupted run's snapshot, after checking that the resumed one ends the same."""
    full = _run(_config(**options), tmp_path / "a")
    with monkeypatch.context() as m:
        _crash_after_saves(m, saves)
        with pytest.raises(Crash):
            _run(_config(**options), tmp_path / "b")
    resumed = Trainer(_config(**options), tmp_path / "b", resume=True, progress=False)
    resumed.fit()
    _assert_same(full, _snapshot(resumed))
    return full


# 9 batches an epoch. Every 4 steps: checkpoints at steps 4 and 8 (pretraining), then the
# epoch's, then 12, 16 (SVI epoch 1, batches 3 and 7), the epoch's, 20 (SVI epoch 2, batch 2).
# Every 3 steps, the third checkpoint is at the last batch of pretraining, before its evaluation.
@pytest.mark.parametrize(
    ("every", "saves", "where"),
    [
        (4, 1, ("pretrain", 0, 4)),
        (4, 2, ("pretrain", 0, 8)),
        (4, 4, ("svi", 0, 3)),
        (4, 7, ("svi", 1, 2)),
        (3, 3, ("pretrain", 0, 9)),
    ],
)
def test_a_checkpoint_inside_an_epoch_resumes_with_the_next_batch(
    tmp_path, monkeypatch, every, saves, where
):
    real_restore = Trainer._restore
    restored = {}

    def restore(self, ckpt):
        restored.update(ckpt["epoch_progress"] or {})
        real_restore(self, ckpt)

    monkeypatch.setattr(Trainer, "_restore", restore)
    _crash_then_resume(tmp_path, monkeypatch, saves, checkpoint_every=every)
    assert (restored["phase"], restored["epoch"], restored["batches_done"]) == where


def test_checkpoint_every_zero_writes_after_epochs_only(tmp_path, monkeypatch):
    count = {"saves": 0}
    real = Trainer.save

    def save(self):
        count["saves"] += 1
        real(self)

    monkeypatch.setattr(Trainer, "save", save)
    _run(_config(checkpoint_every=0), tmp_path / "a")
    assert count["saves"] == 3  # one pretraining and two SVI epochs
    count["saves"] = 0
    _run(_config(checkpoint_every=5), tmp_path / "b")
    assert count["saves"] == 3 + 27 // 5


def test_negative_checkpoint_interval_is_refused():
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        _config(checkpoint_every=-1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, sig):
    full = _run(_config(), tmp_path / "a")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = Trainer(_config(), tmp_path / "b", progress=False)
    real = trainer._step
    calls = {"n": 0}

    def step(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # the fifth SVI step, 14th in all
            os.kill(os.getpid(), sig)
        return real(*args)

    trainer._step = step
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.signum == sig
    message = str(info.value)
    assert f"interrupted by {signal.Signals(sig).name} after step 14" in message, message
    assert "svi epoch 1, batch 5 of 9" in message
    assert f"pyro-sbp train --out {tmp_path / 'b'} --resume" in message
    assert load_checkpoint(tmp_path / "b")["global_step"] == 14
    # The handlers are the previous ones again (the default, or SIG_IGN in a background job).
    assert {s: signal.getsignal(s) for s in before} == before
    resumed = Trainer(_config(), tmp_path / "b", resume=True, progress=False)
    resumed.fit()
    _assert_same(full, _snapshot(resumed))


def test_a_signal_during_evaluation_stops_after_the_epoch(tmp_path, monkeypatch):
    import pyro_sbp.infer.trainer as trainer_module

    real = trainer_module.evaluate
    calls = {"n": 0}

    def evaluate(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    with pytest.raises(TrainingInterrupted, match="after step 18;"):
        Trainer(_config(), tmp_path, progress=False).fit()
    ckpt = load_checkpoint(tmp_path)
    assert (ckpt["pretrain_done"], ckpt["svi_done"], ckpt["epoch_progress"]) == (1, 1, None)


def test_sigint_to_the_command_line_exits_130_with_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pyro_sbp", "train", "--model", "digits-mlp", "--epochs"]
    p = subprocess.Popen(
        [*args, "1000", "--pretrain-epochs", "0", "--no-progress", "--out", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        # Wait for the first checkpoint: training is under way.
        for _ in range(6000):
            if (out / "checkpoint.pt").exists():
                break
            if p.poll() is not None:
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err, err
    assert f"pyro-sbp train --out {out} --resume" in err
    ckpt = load_checkpoint(out)
    assert ckpt["global_step"] > 0
    # The command it prints resumes the run with its own settings.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1", "--no-progress"]) == 0
    assert load_checkpoint(out)["svi_done"] == 1


# --- one writer per run directory ---------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_pid(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryLocked) as info:
            Trainer(_config(), tmp_path, progress=False).fit()
        message = str(info.value)
        assert f"process {os.getpid()}" in message and str(tmp_path / ".lock") in message
        assert not (tmp_path / "checkpoint.pt").exists()
    Trainer(_config(epochs=0), tmp_path, progress=False).fit()  # released: fine now


def test_a_lock_held_by_another_process_then_released_by_its_death(tmp_path):
    code = (
        "import sys, time; from pyro_sbp.infer import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert p.stdout.readline().strip() == "locked"
        assert main(["train", "--epochs", "0", "--no-progress", "--out", str(tmp_path)]) == 2
        with pytest.raises(RunDirectoryLocked, match=f"process {p.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.communicate()
    # Killed: its lock file is still there, with its pid, but stale; the next run takes it.
    assert (tmp_path / ".lock").read_text().split()[0] == str(p.pid)
    with RunLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("saves", [3, 4, 6], ids=["after pretraining", "in svi", "after svi 1"])
def test_resumes_keep_the_learning_rate_schedule(tmp_path, monkeypatch, schedule, saves):
    options = dict(lr_schedule=schedule, epochs=3, noise="batch", prune_criterion="snr:0.5")
    full = _crash_then_resume(tmp_path, monkeypatch, saves, **options)
    assert [r.get("lr_factor") for r in full["history"]][1:] == [
        pytest.approx(f)
        for f in ([1.0, 2 / 3, 1 / 3] if schedule == "linear" else [1.0, 0.75, 0.25])
    ]


@pytest.mark.parametrize("saves", [5, 9], ids=["in fine-tuning", "after the best epoch"])
def test_resumes_keep_the_best_epoch(tmp_path, monkeypatch, saves):
    _crash_then_resume(tmp_path, monkeypatch, saves, epochs=1, finetune_epochs=3, keep_best=True)
    assert load_checkpoint(tmp_path / "b")["best"]["kept"]
