"""One rank of a distributed training run that a test launches:
``python distributed_worker.py SPEC.json``, with the ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` that ``torchrun`` would set.

The spec (JSON) holds:

* ``config``: the :class:`~pyro_sbp.infer.TrainConfig` of the run (its first stage);
* ``more_epochs``: if given, a second stage resumes the run with this many SVI epochs;
* ``out``: the run directory (or ``null``), ``result``: where each rank writes its
  ``result.<rank>.pt`` (history, parameters, masks) and ``saves.<rank>`` (a line per
  checkpoint it writes);
* ``mid_copy``: copy rank 0's first checkpoint written inside an SVI epoch to this directory;
* ``fail``: ``[rank, step]``: that rank raises at that SVI step (a ``RuntimeError``);
* ``hang``: ``[rank, step]``: that rank stops answering at that SVI step;
* ``signal``: ``[rank, step]``: that rank gets SIGTERM at that SVI step;
* ``timeout``: the process group's timeout in seconds.
"""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pyro
import torch

from pyro_sbp.infer import TrainConfig
from pyro_sbp.infer import trainer as trainer_module
from pyro_sbp.infer.distributed import DistributedTrainer
from pyro_sbp.models import named_gates


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    result = Path(spec["result"])
    fail = spec.get("fail") or [None, None]
    hang = spec.get("hang") or [None, None]
    term = spec.get("signal") or [None, None]

    real_save = trainer_module.save_checkpoint

    def logged_save(state, path):
        real_save(state, path)
        with open(result / f"saves.{rank}", "a") as f:
            f.write(f"{state['global_step']}\n")
        progress = state["epoch_progress"]
        mid = spec.get("mid_copy")
        if mid and progress is not None and progress["phase"] == "svi" and not Path(mid).exists():
            Path(mid).mkdir(parents=True)
            shutil.copy(path, Path(mid) / Path(path).name)

    trainer_module.save_checkpoint = logged_save

    real_step = DistributedTrainer._step

    def step(self, *args):
        if rank == fail[0] and self.global_step == fail[1]:
            raise RuntimeError(f"injected failure on rank {rank} at step {self.global_step}")
        if rank == hang[0] and self.global_step == hang[1]:
            time.sleep(3600)
        if rank == term[0] and self.global_step == term[1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args)

    DistributedTrainer._step = step

    config = TrainConfig(**spec["config"])
    trainer = DistributedTrainer(config, spec["out"], progress=False, timeout=spec.get("timeout"))
    stages = {"first": _snapshot(trainer.fit(), trainer)}
    if spec.get("more_epochs"):
        config.epochs = spec["more_epochs"]
        trainer = DistributedTrainer(
            config, spec["out"], resume=True, progress=False, context=trainer.context
        )
        stages["second"] = _snapshot(trainer.fit(), trainer)
    torch.save(stages, result / f"result.{rank}.pt")


def _snapshot(history, trainer) -> dict:
    store = pyro.get_param_store()
    return {
        "history": history,
        "net": {k: v.detach().clone() for k, v in trainer.net.state_dict().items()},
        "gates": {k: store[k].detach().clone() for k in store.keys() if ".gate." in k},
        "masks": {site: g.mask.clone() for site, g in named_gates(trainer.net)},
    }


if __name__ == "__main__":
    main(sys.argv[1])
    sys.exit(0)
