"""SyncBatchNorm over 2 and 3 gloo processes on 127.0.0.1 (tests/sync_workers.py), each run
with a deadline so that a hang fails the test; and its one-process behaviour."""

import time

import pytest
import torch
import torch.multiprocessing as mp

import batchnorm
import sync_workers
from batchnorm.lab.processes import free_port

DEADLINE = 120  # seconds for a spawned group to finish


def _run(world: int, checks: list[tuple[str, tuple]]) -> None:
    context = mp.start_processes(
        sync_workers.entry, args=(world, free_port(), checks), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{[c for c, _ in checks]} on {world} processes did not finish in {DEADLINE} s (a hang)")


def test_two_processes():
    """Uneven batches (float64), channels_last float32, bfloat16 data: equal to BatchNorm on the
    concatenated batch; a NaN on one rank stops every update; one value over the group raises
    on both ranks; a model through convert_sync_batchnorm equals the unconverted one on the
    whole batch; population statistics over two shards equal one pass over both."""
    _run(
        2,
        [
            ("concatenated", ((3, 5), "contiguous_format", "float64")),
            ("concatenated", ((2, 6), "channels_last", "float32")),
            ("concatenated", ((4, 4), "contiguous_format", "bfloat16")),
            ("nonfinite", ()),
            ("too_few", ()),
            ("converted_model", ()),
            ("population", ()),
        ],
    )


def test_three_processes_with_an_empty_rank():
    _run(3, [("concatenated", ((4, 0, 3), "channels_last", "float64"))])


def test_outside_a_group_it_is_batch_norm():
    x = torch.randn(6, 4, 3, 3)
    sync, plain = batchnorm.SyncBatchNorm(4), batchnorm.BatchNorm2d(4)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)
    assert set(sync.state_dict()) == set(torch.nn.SyncBatchNorm(4).state_dict())
    sync.load_state_dict(torch.nn.SyncBatchNorm(4).state_dict())
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.randn(4))


def test_lab_training_over_two_processes_equals_one(tmp_path):
    """batchnorm train --nproc 2 (SyncBatchNorm, DistributedDataParallel on gloo) ends with the
    metrics of one process with the same global batch and seed."""
    import json
    import subprocess
    import sys

    from batchnorm.lab import processes, train

    arguments = ["--steps", "30", "--eval-every", "15", "--batch-size", "30", "--train-eval-size", "200"]
    out = tmp_path / "two"
    finished = subprocess.run(
        [sys.executable, "-m", "batchnorm", "train", *arguments, "--nproc", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]
    two = json.loads((out / "metrics.json").read_text())["metrics"]
    one = train.train(train.Config(steps=30, eval_every=15, batch_size=30, train_eval_size=200), progress=False)
    assert len(two) == len(one.metrics) == 2
    for a, b in zip(one.metrics, two, strict=True):
        for key in ("train_loss", "test_loss", "test_accuracy", "train_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    with pytest.raises(ValueError, match="norm='renorm' has none"):
        processes.train(train.Config(norm="renorm"), 2)
