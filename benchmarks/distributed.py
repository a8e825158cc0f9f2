"""SVI throughput of data-parallel training (DistributedTrainer, DDP) at 1 and 2 processes.

For gated LeNet5-Caffe (1x28x28 inputs) and the built-in VGG-16 (``vgg-like``, 3x32x32, at
``--vgg-width`` of its widths) on random inputs, labels and training-set positions, it starts
``W`` processes (``torch.multiprocessing``, one thread each, gloo on the CPU or nccl on CUDA)
for each ``W`` of ``--worlds``, runs ``--warmup`` SVI steps of
:class:`~pyro_sbp.infer.DistributedTrainer` (the library's step: the ranks' minibatch ELBOs
through DDP, the gradient all-reduce, the losses averaged and checked, Adam) with a per-rank
batch of ``--batch-size``, then times ``--steps`` more between two barriers. The throughput is
``W * batch * steps / seconds`` (examples per second, all ranks together) and the scaling
efficiency ``throughput(2) / (2 * throughput(1))``: 1 is perfect scaling, the target on a
2-core machine is >= 0.8 for VGG-16. Each ``W`` is measured ``--repeats`` times, alternating
the world sizes, and the median is kept; the single-process :class:`~pyro_sbp.infer.Trainer`
(no DDP) is timed in the same way beside them (``throughput_plain_trainer``,
``efficiency_2_vs_plain``). Results go to ``benchmarks/results/distributed.json`` (``--out``),
with the machine's core count and load averages (other processes on the cores lower the
efficiency: rerun on a quiet machine), and, less sensitive to them, ``efficiency_2_cpu_time``:
examples per CPU-second of the ranks together at 2 over that at 1 (the extra work of the
second process, but not its waiting).

    python benchmarks/distributed.py                  # CPU, 1 and 2 processes
    python benchmarks/distributed.py --device cuda    # one process per GPU (nccl)
"""

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

NETWORKS = {"lenet5-caffe": (1, 28, 28), "vgg-like": (3, 32, 32)}


def _splits(shape, num_data: int, seed: int):
    from pyro_sbp.data import DataSplits

    g = torch.Generator().manual_seed(seed)
    x = torch.rand((num_data, *shape), generator=g)
    y = torch.randint(0, 10, (num_data,), generator=g)
    test = TensorDataset(x[:64], y[:64])
    split = {"sizes": {"train": num_data, "val": 0, "test": 64}}
    channels = shape[0]
    return DataSplits(
        "random", TensorDataset(x, y), None, test, shape, 10, (0.5,) * channels, (0.3,) * channels,
        split,
    )  # fmt: skip


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from pyro_sbp.infer import DistributedTrainer, TrainConfig, Trainer

    name = args["network"]
    kwargs = {"width_multiplier": args["vgg_width"]} if name == "vgg-like" else {}
    steps, warmup, batch = args["steps"], args["warmup"], args["batch_size"]
    config = TrainConfig(
        model=name,
        dataset="random",
        network_kwargs=kwargs,
        pretrain_epochs=0,
        epochs=1,
        batch_size=batch,
        device=args["device"],
        checkpoint_every=0,
    )
    splits = _splits(NETWORKS[name], world * batch * (steps + warmup), seed=0)
    plain = args.get("plain", False)
    cls = Trainer if plain else DistributedTrainer
    trainer = cls(config, None, progress=False, splits=splits)
    trainer.net.train()
    batches = iter(trainer.loaders["train"])
    device = trainer.device

    def step():
        x, y, idx = (t.to(device) for t in next(batches))
        trainer._step(0, x, y, idx, 1.0)

    for _ in range(warmup):
        step()
    barrier = (lambda: None) if plain else dist.barrier
    if device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu = time.process_time() - cpu
    barrier()
    seconds = time.perf_counter() - start
    Path(f"{out}.{rank}").write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu}))
    if not plain:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(network: str, world: int, args, plain: bool = False) -> tuple[float, float]:
    """Examples per second of ``world`` processes together, and per CPU-second of them all
    (``plain``: one process of the single-process Trainer, no DDP)."""
    spec = vars(args) | {"network": network, "plain": plain}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(
            _worker,
            args=(world, _free_port(), spec, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        times = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    examples = world * args.batch_size * args.steps
    seconds = max(t["seconds"] for t in times)
    return examples / seconds, examples / sum(t["cpu_seconds"] for t in times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vgg-width", type=float, default=1.0, help="VGG-16's width multiplier")
    p.add_argument("--out", default="benchmarks/results/distributed.json")
    args = p.parse_args(argv)
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if max(args.worlds) > gpus:
            print(f"only {gpus} GPU(s): world sizes above it are skipped", file=sys.stderr)
            args.worlds = [w for w in args.worlds if w <= gpus]
    cores = os.cpu_count()
    if args.device == "cpu" and max(args.worlds) > (cores or 1):
        print(f"note: {max(args.worlds)} processes on {cores} cores", file=sys.stderr)
    result = {
        "command": "python benchmarks/distributed.py " + " ".join(argv or sys.argv[1:]),
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor(),
        "cpu_count": cores,
        "load_average_at_start": list(os.getloadavg()),
        "threads_per_process": 1,
        "batch_size_per_rank": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "vgg_width_multiplier": args.vgg_width,
        "torch": torch.__version__,
        "networks": {},
    }
    for network in args.networks:
        runs = {w: [] for w in args.worlds}
        per_cpu = {w: [] for w in args.worlds}
        plain, plain_cpu = [], []
        for _ in range(args.repeats):
            wall, cpu = measure(network, 1, args, plain=True)
            plain.append(wall)
            plain_cpu.append(cpu)
            print(f"{network} plain Trainer: {wall:.1f} examples/s", flush=True)
            for world in args.worlds:
                wall, cpu = measure(network, world, args)
                runs[world].append(wall)
                per_cpu[world].append(cpu)
                print(f"{network} W={world}: {wall:.1f} examples/s, {cpu:.1f} per CPU-s")
        med = {w: statistics.median(v) for w, v in runs.items()}
        med_cpu = {w: statistics.median(v) for w, v in per_cpu.items()}
        entry = {
            "throughput": {str(w): v for w, v in med.items()},
            "throughput_runs": {str(w): v for w, v in runs.items()},
            "throughput_per_cpu_second": {str(w): v for w, v in med_cpu.items()},
            "throughput_plain_trainer": statistics.median(plain),
            "throughput_plain_trainer_runs": plain,
            "throughput_per_cpu_second_plain_trainer": statistics.median(plain_cpu),
        }
        if 1 in runs and 2 in runs:
            entry["efficiency_2"] = med[2] / (2 * med[1])
            entry["efficiency_2_vs_plain"] = med[2] / (2 * statistics.median(plain))
            # The work per example at 2 against 1 (CPU time, waiting excluded): the
            # efficiency on cores of their own, which a loaded machine cannot show.
            entry["efficiency_2_cpu_time"] = med_cpu[2] / med_cpu[1]
        result["networks"][network] = entry
        print(json.dumps({network: entry}), flush=True)
    result["load_average_at_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
