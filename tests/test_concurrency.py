"""Two Python threads at once, and forked DataLoader workers."""

import threading

import torch
from torch.utils.data import DataLoader, Dataset

import batchnorm


def test_two_threads_at_once():
    torch.manual_seed(0)
    inputs = [torch.randn(16, 8, 12, 12) for _ in range(2)]
    expected = [torch.nn.functional.batch_norm(x, None, None, training=True) for x in inputs]
    errors, results = [], [None, None]

    def work(index):
        try:
            module = batchnorm.BatchNorm2d(8)
            for _ in range(20):
                y = module(inputs[index].clone().requires_grad_(True))
                y.sum().backward()
            results[index] = module(inputs[index])
        except Exception as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _Normalized(Dataset):
    """Each item is normalized by a batch-norm layer inside the worker process."""

    def __init__(self):
        self.module = batchnorm.BatchNorm1d(4)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        torch.manual_seed(index)
        x = torch.randn(32, 4) * 5 + index
        with torch.no_grad():
            return self.module(x), torch.nn.functional.batch_norm(x, None, None, training=True)


def test_forked_dataloader_workers():
    batchnorm.BatchNorm1d(4)(torch.randn(8, 4))  # the parent has run the kernels first
    loader = DataLoader(_Normalized(), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=120)
    items = list(loader)
    assert len(items) == 4
    for ours, theirs in items:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
