"""The output buffer pool: never hands out memory in use, reuses memory that is idle, aligns it."""

import torch

import batchnorm
from batchnorm.buffers import BufferPool


def test_live_buffers_are_never_reused_and_idle_ones_are():
    pool = BufferPool(min_bytes=0)
    like = torch.empty(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    first = pool.empty_like(like)
    assert first.shape == like.shape and first.stride() == like.stride() and first.dtype == like.dtype
    second = pool.empty_like(like)
    assert first.data_ptr() != second.data_ptr()
    view = first[1:]
    address = first.data_ptr()
    del first
    third = pool.empty_like(like)  # the view keeps the first buffer busy
    assert third.data_ptr() not in (address, second.data_ptr())
    del view
    fourth = pool.empty_like(like)
    assert fourth.data_ptr() == address
    assert pool.idle_bytes == 0


def test_idle_bytes_capped():
    pool = BufferPool(min_bytes=0, max_idle_bytes=1000)
    held = [pool.empty_like(torch.empty(100)) for _ in range(3)]  # 400 bytes each
    del held
    assert pool.idle_bytes == 1200
    pool.empty_like(torch.empty(50))  # 200 more: idle ones dropped until they fit the cap
    assert pool.idle_bytes <= 1000


def test_large_outputs_alive_at_once_do_not_alias():
    """Inputs above the pool's 1 MiB threshold, several outputs kept alive, against torch."""
    ours, theirs = batchnorm.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    inputs = [torch.randn(16, 8, 48, 48) * (i + 1) for i in range(3)]
    outputs = [ours(x) for x in inputs]
    for x, y in zip(inputs, outputs, strict=True):
        torch.testing.assert_close(y, theirs(x), rtol=1e-4, atol=1e-5)
    del outputs
    torch.testing.assert_close(ours(inputs[0]), theirs(inputs[0]), rtol=1e-4, atol=1e-5)


def test_buffers_start_on_64_bytes_and_hold_their_values():
    """Outputs are aligned like torch's (numpy alone starts them 16 bytes past a page)."""
    pool = BufferPool(min_bytes=0)
    for dtype in (torch.float32, torch.float64):
        for count in (1, 7, 1 << 20):
            like = torch.empty(count, dtype=dtype)
            buffer = pool.empty_like(like)
            assert buffer.data_ptr() % 64 == 0
            buffer.copy_(torch.arange(count, dtype=dtype))
            torch.testing.assert_close(buffer, torch.arange(count, dtype=dtype))


def test_half_precision_buffers_have_the_dtype_asked_for():
    """bfloat16 (no numpy dtype: uint16 arrays viewed by torch) and float16, with the
    template's shape and strides; an idle buffer is reused only for its own kind."""
    pool = BufferPool(min_bytes=0)
    like = {
        dtype: torch.empty(4, 3, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
        for dtype in (torch.bfloat16, torch.float16)
    }
    for dtype, template in like.items():
        buffer = pool.empty_like(template)
        assert (buffer.dtype, buffer.shape, buffer.stride()) == (dtype, template.shape, template.stride())
        assert buffer.data_ptr() % 64 == 0
        values = torch.randn(template.shape).to(dtype)
        buffer.copy_(values)
        assert torch.equal(buffer, values)
    bf16 = pool.empty_like(like[torch.bfloat16])
    address = bf16.data_ptr()
    del bf16
    assert pool.empty_like(like[torch.float16]).data_ptr() != address  # a float16 array is not idle bfloat16
    assert pool.empty_like(like[torch.bfloat16]).data_ptr() == address
