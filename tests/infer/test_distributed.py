"""Data-parallel training (DistributedTrainer): 2 CPU processes on gloo, launched as torchrun
launches them (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), against one
process with twice the batch."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler, TensorDataset

from pyro_sbp.infer import TrainConfig, Trainer, load_checkpoint
from pyro_sbp.infer.distributed import (
    DistributedTrainer,
    ShardSampler,
    gate_parameters,
    trainer_class,
)

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = Path(__file__).resolve().parents[2]
# digits: 1150 training examples, 23 steps of 50 (one process) or 2 x 25 (two).
CONFIG = dict(
    model="digits-mlp",
    dataset="digits",
    network_kwargs={"hidden": [16, 8]},
    pretrain_epochs=1,
    epochs=0,
    batch_size=25,
    pretrain_lr=0.03,
    lr=0.003,
    gate_lr=0.03,
    checkpoint_every=10,
    # Removes 2 of the 8 units of classifier.3 here: masks worth comparing.
    prune_criterion="l2:0.8",
)
SVI_EPOCHS = 2
STEPS_PER_EPOCH = 23
#: With the gates' noise on, the two runs draw different noise (each rank its own): the
#: per-epoch negative ELBO may differ by this fraction, the validation accuracy by this much.
#: (Measured: 4e-5 and 3e-4, one example of 288 and none.)
LOSS_RTOL = 0.005
ACCURACY_ATOL = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(spec: dict, tmp: Path, world: int = 2, wait: float = 120.0, others: float = 10.0):
    """Start ``world`` worker ranks; wait for rank 0 (then at most ``others`` seconds for the
    others, which are killed after that). Returns the return codes, the stderr texts and rank
    0's time."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = {"result": str(tmp), **spec}
    (tmp / "spec.json").write_text(json.dumps(spec))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp / "spec.json")],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.monotonic()
    errors = []
    for rank, proc in enumerate(procs):
        try:
            errors.append(proc.communicate(timeout=wait if rank == 0 else others)[1])
        except subprocess.TimeoutExpired:
            proc.kill()
            errors.append(proc.communicate()[1])
        if rank == 0:
            seconds = time.monotonic() - start
    return [p.returncode for p in procs], errors, seconds


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A 2-process run: pretraining, then (resumed) SVI with pruning after every epoch."""
    tmp = tmp_path_factory.mktemp("ddp")
    spec = {
        "config": CONFIG,
        "more_epochs": SVI_EPOCHS,
        "out": str(tmp / "run"),
        "mid_copy": str(tmp / "mid"),
    }
    codes, errors, _ = _launch(spec, tmp)
    assert codes == [0, 0], errors
    results = [torch.load(tmp / f"result.{r}.pt", weights_only=False) for r in range(2)]
    return tmp, results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in one process (the plain Trainer) with twice the batch."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    out = tmp_path_factory.mktemp("single")
    config = TrainConfig(**(CONFIG | {"batch_size": 2 * CONFIG["batch_size"]}))
    trainer = Trainer(config, out, progress=False)
    first = trainer.fit(), {k: v.clone() for k, v in trainer.net.state_dict().items()}
    config.epochs = SVI_EPOCHS
    trainer = Trainer(config, out, resume=True, progress=False)
    return first, trainer.fit()


@pytest.fixture
def single_process_group():
    """DistributedTrainer in this process: a group of one (no launcher's environment)."""
    assert "RANK" not in os.environ
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ranks_end_with_identical_parameters(two_ranks):
    _, (r0, r1) = two_ranks
    for stage in ("first", "second"):
        for part in ("net", "gates", "masks"):
            assert r0[stage][part].keys() == r1[stage][part].keys()
            for name, value in r0[stage][part].items():
                assert torch.equal(value, r1[stage][part][name]), (stage, part, name)
    assert len(r0["second"]["gates"]) == 4  # loc and log_scale of the two gate sites
    assert sum(int(m.sum()) for m in r0["second"]["masks"].values()) < 16 + 8
    timeless = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in res["second"]["history"]]
        for res in (r0, r1)
    ]
    assert timeless[0] == timeless[1]


def test_two_processes_take_the_steps_of_one_with_twice_the_batch(two_ranks, one_process):
    _, (r0, _) = two_ranks
    (history, net), svi_history = one_process
    # Pretraining draws no noise: the same steps, to float tolerance.
    for name, value in net.items():
        torch.testing.assert_close(r0["first"]["net"][name], value, rtol=1e-5, atol=1e-6)
    (mine,) = r0["first"]["history"]
    assert mine["loss"] == pytest.approx(history[0]["loss"], rel=1e-6)
    assert mine["val_accuracy"] == history[0]["val_accuracy"]
    assert mine["val_accuracy"] > 0.5  # trained, so that the comparison means something
    # SVI draws the gates' noise per rank: the trajectories agree within the noise.
    theirs = [r for r in svi_history if r["phase"] == "svi"]
    mine = [r for r in r0["second"]["history"] if r["phase"] == "svi"]
    assert len(mine) == len(theirs) == SVI_EPOCHS
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= ACCURACY_ATOL
        assert a["units_total"] == b["units_total"]


def test_checkpoints_are_written_once_by_rank_0(two_ranks):
    tmp, _ = two_ranks
    assert not (tmp / "saves.1").exists()
    steps = [int(s) for s in (tmp / "saves.0").read_text().split()]
    total = STEPS_PER_EPOCH * (1 + SVI_EPOCHS)
    every = CONFIG["checkpoint_every"]
    ends = range(STEPS_PER_EPOCH, total + 1, STEPS_PER_EPOCH)
    assert steps == sorted({*range(every, total + 1, every), *ends})
    ckpt = load_checkpoint(tmp / "run")
    assert ckpt["distributed"]["world_size"] == 2
    assert ckpt["global_step"] == total
    states = ckpt["distributed"]["rank_rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


def test_shard_sampler_shards_the_single_process_shuffle():
    dataset = TensorDataset(torch.arange(11))
    single = list(RandomSampler(dataset, generator=torch.Generator().manual_seed(5)))
    for world in (1, 2, 3):
        shards = [
            list(ShardSampler(dataset, world, r, torch.Generator().manual_seed(5)))
            for r in range(world)
        ]
        assert {len(s) for s in shards} == {-(-11 // world)}
        # Position k of rank r is position k * world + r of the (padded) shuffle.
        merged = [shards[k % world][k // world] for k in range(len(shards[0]) * world)]
        assert merged[:11] == single
        assert merged[11:] == single[: len(merged) - 11]
    rest = ShardSampler(dataset, 2, 1, torch.Generator().manual_seed(5), start=4)
    assert list(rest) == (single[4:] + single[4:5])[1::2] and len(rest) == 4


def test_gate_parameters_are_the_store_tensors_as_parameters(single_process_group):
    trainer = DistributedTrainer(TrainConfig(**CONFIG), None, progress=False)
    params = gate_parameters(trainer.guide)
    store = pyro.get_param_store()
    assert set(params) == {
        f"{s}.{p}" for s in trainer.guide.site_names for p in ("loc", "log_scale")
    }
    for name, param in params.items():
        assert isinstance(param, torch.nn.Parameter)
        assert store[name].unconstrained() is param
    module_params = set(map(id, trainer.ddp_elbo.parameters()))
    assert {id(p) for p in params.values()} <= module_params
    assert {id(p) for p in trainer.net.parameters()} <= module_params


def test_resume_on_another_number_of_processes(two_ranks, single_process_group, capsys):
    tmp, _ = two_ranks
    mid = load_checkpoint(tmp / "mid")
    progress = mid["epoch_progress"]
    assert progress["phase"] == "svi" and progress["batches_done"] > 0
    with pytest.raises(ValueError, match="written inside an epoch by a run of 2 processes"):
        Trainer.from_run(tmp / "mid")
    assert trainer_class(tmp / "mid") is DistributedTrainer
    trainer = DistributedTrainer.from_run(tmp / "mid", epochs=SVI_EPOCHS)
    assert trainer.resumed_world_size == 2
    assert "resuming a run of 2 processes on 1" in capsys.readouterr().err
    read = progress["batches_done"] * 2 * CONFIG["batch_size"]
    sampler = trainer.loaders["train"].sampler.sampler
    assert sampler.start == read and len(sampler) == 1150 - read
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 1, 2]
    # The epoch's unread examples in batches of 25 on one process, then a whole epoch.
    steps = mid["global_step"] + -(-(1150 - read) // 25) + 1150 // 25
    assert trainer.global_step == steps
    assert load_checkpoint(tmp / "mid")["distributed"]["world_size"] == 1


def test_failing_rank_stops_the_run(tmp_path):
    config = CONFIG | {"pretrain_epochs": 0, "epochs": 1, "prune_criterion": None}
    spec = {"config": config, "out": str(tmp_path / "run"), "fail": [1, 3], "timeout": 600}
    codes, errors, seconds = _launch(spec, tmp_path)
    # Both stop with an error, long before the process group's timeout.
    assert codes[0] != 0 and codes[1] != 0, errors
    assert seconds < 60
    assert "RuntimeError: injected failure on rank 1 at step 3" in errors[1]
    assert "DistributedRunFailed: rank 0 of 2: a collective operation failed" in errors[0]


def test_rank_that_stops_answering_times_out(tmp_path):
    config = CONFIG | {"pretrain_epochs": 0, "epochs": 1, "prune_criterion": None}
    spec = {"config": config, "out": None, "hang": [1, 3], "timeout": 3}
    # Rank 1 sleeps for an hour: killed once rank 0 has stopped.
    codes, errors, seconds = _launch(spec, tmp_path, others=0.5)
    assert codes[0] not in (0, None), errors
    assert seconds < 60
    assert "DistributedRunFailed" in errors[0] and "Timed out" in errors[0]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    config = CONFIG | {"pretrain_epochs": 0, "epochs": 1, "prune_criterion": None}
    spec = {"config": config, "out": str(tmp_path / "run"), "signal": [1, 3]}
    codes, errors, _ = _launch(spec, tmp_path)
    assert codes == [1, 1], errors
    for text in errors:
        assert "TrainingInterrupted: interrupted by SIGTERM after step 4" in text
    assert load_checkpoint(tmp_path / "run")["global_step"] == 4


def test_cli_trains_under_torchrun(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pyro_sbp",
        "train",
        "--model",
        "digits-mlp",
        "--network-kwargs",
        '{"hidden": [16, 8]}',
        "--pretrain-epochs",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "25",
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("done: 1 epochs") == 1  # rank 0 reports, rank 1 does not
    ckpt = load_checkpoint(out)
    assert ckpt["distributed"]["world_size"] == 2 and ckpt["global_step"] == STEPS_PER_EPOCH
