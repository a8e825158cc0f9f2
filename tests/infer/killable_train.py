"""A small training run that a test kills: ``python killable_train.py OUT [--die WHERE:N]``.

Starts the run in ``OUT`` (or resumes it when ``OUT`` holds a checkpoint), prints ``ready`` once
the imports are done, and trains to the end. ``--die`` sends the process SIGKILL at a chosen
moment, for the fault-injection test:

* ``save:N``  -- in the middle of writing the N-th checkpoint of this process (half the bytes
  are on disk, in the temporary file);
* ``eval:N``  -- in the middle of the N-th evaluation;
* ``step:N``  -- in the N-th SVI step, after the gradients and before the update.
"""

import argparse
import io
import os
import signal
import sys
from pathlib import Path

import torch

from pyro_sbp.infer import TrainConfig, Trainer

CONFIG = dict(
    model="digits-mlp",
    dataset="digits",
    network_kwargs={"hidden": [16, 8]},
    pretrain_epochs=1,
    epochs=3,
    finetune_epochs=1,
    prune_criterion="snr:0.5",
    kl_warmup_epochs=2,
    gate_lr=0.05,
    checkpoint_every=4,
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(where: str, n: int) -> None:
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    if where == "save":
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if not due():
                return real(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()

        torch.save = save
    elif where == "eval":
        import pyro_sbp.infer.trainer as trainer_module

        real_eval = trainer_module.evaluate

        def evaluate(net, loader, device):
            if due():
                next(iter(loader))
                _die()
            return real_eval(net, loader, device)

        trainer_module.evaluate = evaluate
    elif where == "step":
        real_build = Trainer._build_optimizer

        def build(self, *args, **kwargs):
            # The SVI optimiser's step, after the gradients and before the update.
            optim = real_build(self, *args, **kwargs)
            optim.register_step_pre_hook(lambda *_: _die() if due() else None)
            return optim

        Trainer._build_optimizer = build
    else:
        raise SystemExit(f"unknown --die {where!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--die", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.die:
        where, n = args.die.split(":")
        _arm(where, int(n))
    out = Path(args.out)
    resume = (out / "checkpoint.pt").exists()
    trainer = Trainer(TrainConfig(**CONFIG), out, resume=resume, progress=False)
    print("ready", flush=True)
    trainer.fit()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
