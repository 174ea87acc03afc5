"""What each process of tests/test_sync.py runs: a gloo group on 127.0.0.1, then checks of
SyncBatchNorm against BatchNorm on the concatenated batch, computed in the same process."""

import datetime
import traceback

import torch
import torch.distributed as dist

import batchnorm
from batchnorm.lab.processes import join_group


def entry(rank, world, port, checks):
    """Runs each (name, arguments) of ``checks`` in turn in one group (starting a group of
    processes costs seconds; the checks share it)."""
    join_group(rank, world, port, datetime.timedelta(seconds=60))
    try:
        for check, arguments in checks:
            CHECKS[check](rank, world, *arguments)
            dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _layers(C, dtype, **options):
    sync = batchnorm.SyncBatchNorm(C, momentum=0.3, dtype=dtype, **options)
    with torch.no_grad():
        sync.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=dtype))
        sync.bias.copy_(torch.linspace(-1, 1, C, dtype=dtype))
    plain = batchnorm.BatchNorm2d(C, momentum=0.3, dtype=dtype)
    plain.load_state_dict(sync.state_dict())
    return sync, plain


def _slice(full, sizes, rank):
    start = sum(sizes[:rank])
    return full[start : start + sizes[rank]]


def concatenated(rank, world, sizes, layout, dtype, steps=2):
    """Outputs, input and parameter gradients and running statistics over ``steps`` training
    steps equal those of BatchNorm2d on the whole batch; then evaluation agrees."""
    dtype = getattr(torch, dtype)
    layout = getattr(torch, layout)
    C = 3
    half = dtype in (torch.float16, torch.bfloat16)
    sync, plain = _layers(C, torch.float32 if half else dtype)  # half data: float32 parameters, as autocast
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}.get(
        dtype, dict(rtol=2e-2, atol=5e-2)
    )
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        full = (torch.randn(sum(sizes), C, 4, 5, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
        full = full.contiguous(memory_format=layout)
        dy = torch.randn(full.shape, generator=g, dtype=torch.float64).to(dtype)
        x = _slice(full, sizes, rank).clone().requires_grad_(True)
        y = sync(x)
        assert y.shape == x.shape
        y.backward(_slice(dy, sizes, rank))
        whole = full.clone().requires_grad_(True)
        expected = plain(whole)
        expected.backward(dy)
        torch.testing.assert_close(y, _slice(expected, sizes, rank), **tol)
        torch.testing.assert_close(x.grad, _slice(whole.grad, sizes, rank), **tol)
        for name in ("weight", "bias"):
            local = getattr(sync, name).grad.clone()
            dist.all_reduce(local)  # the parameter gradients stay local: DDP sums (averages) them
            torch.testing.assert_close(local, getattr(plain, name).grad, **tol, msg=name)
            getattr(sync, name).grad, getattr(plain, name).grad = None, None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(sync, name), getattr(plain, name), **tol, msg=name)
    sync.eval(), plain.eval()
    x = _slice(full, sizes, rank)
    torch.testing.assert_close(sync(x), plain(x), **tol)


def nonfinite(rank, world):
    """A NaN on one rank: no rank updates its running statistics, and all stay identical."""
    sync, _ = _layers(3, torch.float32)
    x = torch.randn(4, 3, 2, 2)
    if rank == 1:
        x[0, 1, 0, 0] = float("nan")
    sync(x)
    assert torch.equal(sync.running_mean, torch.zeros(3)) and torch.equal(sync.running_var, torch.ones(3))
    assert int(sync.num_batches_tracked) == 0


def too_few(rank, world):
    """One value per channel over the whole group raises on every rank (none waits for the others)."""
    sync, _ = _layers(3, torch.float32)
    x = torch.randn(1 if rank == 0 else 0, 3, 1, 1)
    try:
        sync(x)
    except ValueError as error:
        assert "more than 1 value per channel when training over the process group, got 1" in str(error)
    else:
        raise AssertionError("no error")
    dist.barrier()
    # one value on one rank but more over the group is fine
    y = sync(torch.randn(1, 3, 1, 1) if rank == 0 else torch.randn(2, 3, 1, 1))
    assert torch.isfinite(y).all()


def converted_model(rank, world):
    """A conv net through convert_sync_batchnorm: its training forward on each rank's half equals
    the unconverted net's on the whole batch, and so do the running statistics."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1),
        batchnorm.BatchNorm2d(4),
    ).double()  # fmt: skip
    synced = batchnorm.convert_sync_batchnorm(model)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = synced(x[rank * 3 : rank * 3 + 3])
    torch.testing.assert_close(y, model(x)[rank * 3 : rank * 3 + 3], rtol=1e-10, atol=1e-10)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[key], value, rtol=1e-10, atol=1e-10, msg=key)


def population(rank, world):
    """population_statistics with each rank on its own shard (of unequal lengths) equals one
    pass over all the shards, for both estimators, on every rank."""
    for estimator in ("exact", "paper"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(36, 5), torch.nn.BatchNorm1d(5),
        ).double()  # fmt: skip
        g = torch.Generator().manual_seed(2)
        batches = [torch.randn(4 + k, 3, 5, 5, dtype=torch.float64, generator=g) * (k + 1) for k in range(5)]
        shards = [batches[:2], batches[2:]]  # rank 0 two batches, rank 1 three
        reference = [layer for layer in model.modules() if hasattr(layer, "running_var")]
        one = batchnorm.population_statistics(model, batches, estimator=estimator, process_group=False)
        expected = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in reference]
        for layer in reference:
            layer.reset_running_stats()
        counts = batchnorm.population_statistics(model, shards[rank], estimator=estimator)
        assert counts == one, (counts, one)
        for layer, (mean, var) in zip(reference, expected, strict=True):
            torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12, msg=estimator)
            torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12, msg=estimator)


CHECKS = {
    "concatenated": concatenated,
    "nonfinite": nonfinite,
    "too_few": too_few,
    "converted_model": converted_model,
    "population": population,
}
