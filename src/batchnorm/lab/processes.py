"""Training one configuration over several processes on this machine: ``batchnorm train --nproc N``.

N processes are spawned, each with one torch thread, joined in a gloo group on 127.0.0.1;
each runs ``train.train`` on the same configuration, which then takes each global batch in N
parts, synchronizes batch norm (batchnorm.SyncBatchNorm through convert_sync_batchnorm) and
averages gradients (DistributedDataParallel). With the same global batch and seed the run
ends with the metrics of one process, to float rounding (without dropout, whose masks each
process draws for its own examples). Rank 0 writes the outputs and hands back its metrics and
weights. ``torchrun --nproc-per-node N -m batchnorm train ...`` does the same through torchrun.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import train as train_module

GROUP_TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer fails the run


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int, timeout: datetime.timedelta = GROUP_TIMEOUT) -> None:
    """This spawned process, with one torch thread, into a gloo group of ``world`` on 127.0.0.1."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)


def _worker(rank, nproc, port, config, out, resume, result_path) -> None:
    join_group(rank, nproc, port)
    try:
        run = train_module.train(config, out=out, resume=resume, log=print if rank == 0 else None, progress=False)
        if rank == 0:  # through a file: a pipe would block this process until the parent reads it
            torch.save({"metrics": run.metrics, "model": run.model.state_dict()}, result_path)
    finally:
        dist.destroy_process_group()


def train(config: train_module.Config, nproc: int, out: str | None = None, resume: bool = False) -> train_module.Run:
    """``config`` trained over ``nproc`` processes; returns rank 0's run (its model, metrics)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got nproc={nproc!r}")
    if nproc == 1:
        return train_module.train(config, out=out, resume=resume)
    if config.batch_size < nproc:
        raise ValueError(f"batch_size={config.batch_size} cannot be split over nproc={nproc} processes")
    train_module.check_synchronizable(config)
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "rank0.pt")
        mp.start_processes(
            _worker, args=(nproc, free_port(), config, out, resume, result_path), nprocs=nproc, join=True,
            start_method="spawn",
        )  # fmt: skip
        result = torch.load(result_path, weights_only=True)
    torch.manual_seed(config.seed)
    model = train_module.build_model(config, train_module.data_module.load(config.data))
    model.load_state_dict(result["model"])
    return train_module.Run(config, model, result["metrics"])
