"""What the step checkpoints (``--checkpoint-every``) cost a LeNet5-Caffe training run.

Builds the :class:`~pyro_sbp.infer.Trainer` of a Fashion-MNIST run of LeNet5-Caffe (the real
data set where it is installed, ``apt-get install dataset-fashion-mnist``; otherwise random
images of the same shape and number, which give a checkpoint of the same size), then alternates,
in one process and on one thread, ``--steps`` SVI steps of its training loop (``Trainer._step``
on the training loader's batches) and one ``Trainer.save()`` (the whole checkpoint: network,
gate posteriors, both optimisers, RNG states, the split record; written to a temporary file,
fsync'd and renamed), ``--rounds`` times. It writes the medians and

    cost_fraction = save / (checkpoint_every * step)

the share of training time the checkpoints take at the default interval
(:data:`~pyro_sbp.infer.DEFAULT_CHECKPOINT_EVERY`) and at a few others, with the checkpoint's
size and the time to load it and restore a trainer from it, to
``benchmarks/results/checkpoint_cost.json``. Target: cost_fraction < 0.02 at the default.

    python benchmarks/checkpoint_cost.py [--rounds 15] [--steps 20] [--batch-size 128]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from pyro_sbp.data import DataSplits, load_dataset
from pyro_sbp.infer import DEFAULT_CHECKPOINT_EVERY, TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "checkpoint_cost.json"
TARGET = 0.02


def _splits() -> tuple[DataSplits, str]:
    try:
        return load_dataset("fashion-mnist"), "fashion-mnist"
    except FileNotFoundError:
        pass
    # A stand-in of the same size: 48,000 / 12,000 / 10,000 images of 28x28.
    g = torch.Generator().manual_seed(0)

    def part(n):
        x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        return TensorDataset(x.float() / 255, torch.randint(0, 10, (n,), generator=g))

    sizes = {"train": 48000, "val": 12000, "test": 10000}
    split = {
        "dataset": "fashion-mnist",
        "source": "random stand-in",
        "sizes": sizes | {"total": 70000},
        "indices": {k: list(range(n)) for k, n in sizes.items()},
    }
    splits = DataSplits(
        name="fashion-mnist",
        train=part(48000),
        val=part(12000),
        test=part(10000),
        input_shape=(1, 28, 28),
        num_classes=10,
        mean=(0.5,),
        std=(0.29,),
        split=split,
    )
    return splits, "random stand-in of fashion-mnist's size"


def measure(rounds: int, steps: int, batch_size: int) -> dict:
    splits, data = _splits()
    config = TrainConfig(
        model="lenet5-caffe", dataset="fashion-mnist", batch_size=batch_size, pretrain_epochs=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, tmp, progress=False, splits=splits)
        trainer.net.train()
        batches = iter(trainer.loaders["train"])

        def step_time() -> float:
            nonlocal batches
            try:
                x, y, idx = next(batches)
            except StopIteration:
                batches = iter(trainer.loaders["train"])
                x, y, idx = next(batches)
            start = time.perf_counter()
            trainer._step(0, x, y, idx, 1.0)
            return time.perf_counter() - start

        for _ in range(5):  # warm-up: the optimisers and the param store fill up
            step_time()
        trainer.save()
        step_s, save_s = [], []
        for r in range(rounds):
            step_s += [step_time() for _ in range(steps)]
            start = time.perf_counter()
            trainer.save()
            save_s.append(time.perf_counter() - start)
            print(
                f"round {r + 1}/{rounds}: step {statistics.median(step_s) * 1e3:.1f} ms, "
                f"save {statistics.median(save_s) * 1e3:.1f} ms",
                file=sys.stderr,
            )
        path = Path(tmp) / "checkpoint.pt"
        size = path.stat().st_size
        load_s = []
        for _ in range(3):
            start = time.perf_counter()
            Trainer.from_run(tmp, progress=False)
            load_s.append(time.perf_counter() - start)
    step, save = statistics.median(step_s), statistics.median(save_s)
    intervals = sorted({50, 100, 200, 500, 1000, DEFAULT_CHECKPOINT_EVERY})
    return {
        "network": "lenet5-caffe",
        "data": data,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps_per_round": steps,
        "step_s": step,
        "step_iqr_s": _iqr(step_s),
        "save_s": save,
        "save_iqr_s": _iqr(save_s),
        "checkpoint_bytes": size,
        "restore_s": statistics.median(load_s),
        "default_checkpoint_every": DEFAULT_CHECKPOINT_EVERY,
        "cost_fraction": save / (DEFAULT_CHECKPOINT_EVERY * step),
        "cost_fraction_at": {str(n): save / (n * step) for n in intervals},
        "target": TARGET,
        "meets_target": save / (DEFAULT_CHECKPOINT_EVERY * step) < TARGET,
    }


def _iqr(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(args.rounds, args.steps, args.batch_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
