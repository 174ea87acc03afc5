"""This project's layers against torch.nn.BatchNorm*: outputs, gradients, running statistics."""

import itertools
from collections import OrderedDict

import pytest
import torch

from batchnorm import crossover, launch
from batchnorm.kernels import cpu

import oracle
from conftest import LAYOUTS, OURS, SHAPES, TORCH, tolerance

CASES = [
    (rank, layout, dtype) for rank in SHAPES for layout in LAYOUTS[rank] for dtype in (torch.float32, torch.float64)
]


def twins(rank, dtype, channels=5, **kwargs):
    ours = OURS[rank](channels, **kwargs).to(dtype)
    theirs = TORCH[rank](channels, **kwargs).to(dtype)
    if ours.affine:
        with torch.no_grad():
            ours.weight.copy_(torch.rand(channels) + 0.5)
            ours.bias.copy_(torch.randn(channels))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def step(module, x, grad):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    params = [p.grad.clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return y.detach(), x.grad, params


def assert_same(ours, theirs, x, grad, tol):
    y1, dx1, dp1 = step(ours, x, grad)
    y2, dx2, dp2 = step(theirs, x, grad)
    torch.testing.assert_close(y1, y2, **tol)
    assert y1.stride() == x.stride(), "output must keep the input's memory format"
    torch.testing.assert_close(dx1, dx2, **tol)
    for a, b in zip(dp1, dp2, strict=True):
        torch.testing.assert_close(a, b, **tol)
    for name, buffer in theirs.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, **tol)


@pytest.mark.parametrize("rank,layout,dtype", CASES)
@pytest.mark.parametrize("affine,track,momentum", list(itertools.product([True, False], [True, False], [0.1, None])))
def test_matches_torch_over_steps(rank, layout, dtype, affine, track, momentum, kernel_order):
    ours, theirs = twins(rank, dtype, affine=affine, track_running_stats=track, momentum=momentum)
    tol = tolerance(dtype)
    for mode in ("train", "train", "train", "eval", "train"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = (torch.randn(SHAPES[rank], dtype=dtype) * 3 + 2).contiguous(memory_format=layout)
        grad = torch.randn(SHAPES[rank], dtype=dtype)
        assert_same(ours, theirs, x, grad, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("row_bytes", [4096 - 64, 4096])
def test_rows_on_both_sides_of_the_prefetch_threshold(dtype, row_bytes, monkeypatch):
    """The channel-major kernels prefetch rows shorter than cpu.PREFETCH_ROW_BYTES, not longer ones."""
    monkeypatch.setattr(launch, "STREAM_MAX_BYTES", 0)
    length = row_bytes // (4 if dtype == torch.float32 else 8)
    ours, theirs = twins(3, dtype)
    x = torch.randn(6, 5, length, dtype=dtype) * 3 + 2
    grad = torch.randn(6, 5, length, dtype=dtype)
    assert_same(ours, theirs, x, grad, tolerance(dtype))


@pytest.mark.parametrize("rank,layout,dtype", CASES)
def test_weight_gradients_when_the_input_needs_none(rank, layout, dtype, kernel_order):
    """A first layer on data: only gamma and beta want gradients (the kernels skip dx)."""
    ours, theirs = twins(rank, dtype)
    tol = tolerance(dtype)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = (torch.randn(SHAPES[rank], dtype=dtype) * 3 + 2).contiguous(memory_format=layout)
        grad = torch.randn(SHAPES[rank], dtype=dtype).contiguous(memory_format=layout)
        for module in (ours, theirs):
            module(x).backward(grad)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert a.grad is not None
            torch.testing.assert_close(a.grad, b.grad, **tol)
            a.grad = b.grad = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_half_precision_input_computed_in_float32(dtype, layout):
    """float32 parameters and statistics with half-precision data, as under autocast."""
    ours, theirs = twins(4, torch.float32)
    x = torch.randn(8, 5, 4, 4).to(dtype).contiguous(memory_format=layout)
    grad = torch.randn(8, 5, 4, 4).to(dtype)
    y1, dx1, dp1 = step(ours, x, grad)
    y2, dx2, dp2 = step(theirs, x, grad)
    assert y1.dtype == dtype and dx1.dtype == dtype
    assert y1.stride() == x.stride()
    torch.testing.assert_close(y1, y2, **tolerance(dtype))
    torch.testing.assert_close(dx1, dx2, **tolerance(dtype))
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    # parameter gradients: torch's half-precision CPU path rounds its sums more than
    # float32 accumulation does, so these are held to the float64 oracle instead
    _, dweight, dbias = oracle.train_backward(grad, x, ours.weight)
    torch.testing.assert_close(dp1[0].double(), dweight, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dp1[1].double(), dbias, rtol=1e-5, atol=1e-4)
    for a, b in zip(dp1, dp2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_half_precision_above_the_pool_threshold(dtype, layout):
    """Half-precision data large enough that its float32 copies, dy's and the outputs come
    from the buffer pool (over 1 MiB): train outputs and input gradients kept alive
    together, then eval, against torch; "sliced" has gaps in memory (a dense copy)."""
    ours, theirs = twins(4, torch.float32, channels=8)
    shape = (16, 8, 48, 48)
    grad = torch.randn(shape).to(dtype)

    def sources():
        if layout == "sliced":
            return [torch.randn(16, 8, 48, 96).to(dtype) for _ in range(2)]
        memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        return [torch.randn(shape).to(dtype).contiguous(memory_format=memory) for _ in range(2)]

    def view(source):
        return source[..., ::2] if layout == "sliced" else source

    results = {}
    for name, module in (("ours", ours), ("torch", theirs)):
        torch.manual_seed(1)
        leaves = [source.requires_grad_() for source in sources()]
        outputs = [module(view(leaf)) for leaf in leaves]
        for y in outputs:
            y.backward(grad)
        results[name] = [(y.detach(), view(leaf.grad)) for y, leaf in zip(outputs, leaves, strict=True)]
    for (y1, dx1), (y2, dx2) in zip(results["ours"], results["torch"], strict=True):
        assert y1.dtype == dtype and dx1.dtype == dtype
        torch.testing.assert_close(y1, y2, **tolerance(dtype))
        torch.testing.assert_close(dx1, dx2, **tolerance(dtype))
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        data = [view(source) for source in sources()]
        evaluated = [ours(x) for x in data]
        for x, y in zip(data, evaluated, strict=True):
            torch.testing.assert_close(y, theirs(x), **tolerance(dtype))


def test_state_dict_round_trip_both_ways():
    ours, theirs = twins(4, torch.float32)
    for _ in range(3):
        theirs(torch.randn(4, 5, 3, 3))
    assert (
        list(ours.state_dict())
        == list(theirs.state_dict())
        == [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
    )
    ours.load_state_dict(theirs.state_dict())
    back = TORCH[4](5)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert ours.num_batches_tracked.item() == 3


def test_old_checkpoint_without_num_batches_tracked_loads():
    ours = OURS[4](5)
    state = OrderedDict((k, v) for k, v in TORCH[4](5).state_dict().items() if k != "num_batches_tracked")
    state._metadata = {"": {"version": 1}}  # as saved before torch added the counter
    ours.load_state_dict(state)
    assert ours.num_batches_tracked.item() == 0


def test_drop_in_inside_a_model():
    """Replace torch's layers in a small CNN: same outputs and gradients."""
    import batchnorm

    def model(bn):
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3), bn(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3), bn(4), torch.nn.Flatten()
        )

    ours, theirs = model(batchnorm.BatchNorm2d), model(torch.nn.BatchNorm2d)
    x = torch.randn(6, 3, 10, 10)
    out1, out2 = ours(x), theirs(x)
    torch.testing.assert_close(out1, out2, rtol=1e-4, atol=1e-5)
    out1.square().sum().backward()
    out2.square().sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)


def test_lazy_modules_infer_num_features():
    import batchnorm

    for rank, lazy, final in [
        (3, batchnorm.LazyBatchNorm1d, batchnorm.BatchNorm1d),
        (4, batchnorm.LazyBatchNorm2d, batchnorm.BatchNorm2d),
        (5, batchnorm.LazyBatchNorm3d, batchnorm.BatchNorm3d),
    ]:
        module = lazy()
        x = torch.randn(SHAPES[rank])
        y = module(x)
        assert type(module) is final and module.num_features == 5
        reference = TORCH[rank](5)
        torch.testing.assert_close(y, reference(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.running_var, reference.running_var)


def test_repr_and_resets():
    import batchnorm

    module = batchnorm.BatchNorm(7, axis=-1, momentum=None)
    assert repr(module) == (
        "BatchNorm(7, eps=1e-05, momentum=None, affine=True, bias=True, track_running_stats=True, axis=-1)"
    )
    assert repr(batchnorm.BatchNorm2d(3)) == repr(torch.nn.BatchNorm2d(3))
    module(torch.randn(4, 3, 7) * 5 + 1)
    assert module.num_batches_tracked.item() == 1
    module.reset_running_stats()
    assert module.num_batches_tracked.item() == 0
    assert torch.equal(module.running_mean, torch.zeros(7)) and torch.equal(module.running_var, torch.ones(7))


def test_bias_false_as_torch():
    import batchnorm

    ours, theirs = batchnorm.BatchNorm2d(5, bias=False), torch.nn.BatchNorm2d(5, bias=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_which_kernels_take_nchw_data(monkeypatch):
    """Memory order for rows shorter than cpu.PREFETCH_ROW_BYTES in a tensor of at most
    launch.STREAM_MAX_BYTES, channel-major otherwise."""
    monkeypatch.setattr(launch, "STREAM_MAX_BYTES", 1 << 24)
    short = cpu.PREFETCH_ROW_BYTES // 4 - 1  # float32 values in a row just under the threshold
    assert launch._in_memory_order(32, 256, 196, 4)
    assert launch._in_memory_order(4, 8, short, 4)
    assert not launch._in_memory_order(4, 8, short + 1, 4)  # a 4 KiB row
    rows = (1 << 24) // (short * 4)
    assert launch._in_memory_order(rows, 1, short, 4)
    assert not launch._in_memory_order(rows + 1, 1, short, 4)
    assert not launch._in_memory_order(128, 256, 196, 4)  # 26 MB


def test_which_short_rows_are_folded(monkeypatch):
    """launch.folds: rows of at most a cache line with at least 4 * B rows; columns (C * B
    values of at least float32) under the limit measured for that row length (here the
    table's 32 KiB), or under FOLD_COLUMN_BYTES[0] without asking. Such data goes to the
    folded kernels."""
    monkeypatch.setattr(crossover, "OVERRIDE", {("fold",): 1 << 15})
    assert launch.folds(256, 512, 4, 4) and launch.family(256, 512, 4, 4) == "folded"  # 2x2 maps
    assert launch.folds(128, 128, 9, 4)  # 3x3 float32 maps, 36 bytes
    assert launch.folds(64, 2047, 4, 4) and not launch.folds(64, 2048, 4, 4)  # 8192 columns of float32
    assert launch.folds(64, 1023, 4, 8) and not launch.folds(64, 1024, 4, 8)  # 4096 of float64
    assert launch.folds(128, 4095, 2, 2) and not launch.folds(128, 4096, 2, 2)  # half: summed in float32
    assert launch.folds(128, 256, 16, 2)  # 4x4 half maps: 32 bytes a row
    assert launch.folds(64, 128, 16, 4)  # 4x4 float32 maps: 64 bytes, one line
    assert not launch.folds(1024, 16, 17, 4) and launch.family(1024, 16, 17, 4) == "stream"  # 68 bytes
    assert not launch.folds(1024, 16, 9, 8)  # float64 rows of 72 bytes
    assert launch.folds(16, 512, 4, 4) and not launch.folds(15, 512, 4, 4)  # at least 4 * B rows
    assert launch.family(256, 512, 1, 4) == "rows"
    monkeypatch.setattr(crossover, "OVERRIDE", 0)  # nothing folds that asks
    assert launch.folds(64, 255, 4, 4) and not launch.folds(64, 256, 4, 4)  # 4 KiB of columns: not asked


def test_the_fold_limit_is_measured_once_per_row_length(monkeypatch):
    """Without an override the folded and maps kernels are timed on data of the row length
    asked for (crossover.measure) and the limit is one of the sizes measured, or past them."""
    monkeypatch.setattr(crossover, "OVERRIDE", None)
    monkeypatch.setattr(crossover, "_measured", {})
    folded = launch.folds(64, 1024, 4, 4)  # 16 KiB of columns in rows of 16 bytes
    [(key, limit)] = crossover.measured().items()
    assert key[:3] == ("fold", 16, 4)
    assert limit in (*launch.FOLD_COLUMN_BYTES, launch.FOLD_COLUMN_BYTES[-1] + 1)
    assert folded == (16 * 1024 < limit)
    launch.folds(128, 1024, 4, 4)
    assert len(crossover.measured()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_stores_past_the_caches_match_torch(dtype, layout, kernel_order, monkeypatch):
    """With launch.NONTEMPORAL_MIN_BYTES at 0, every map pass on rows of whole cache lines
    (here 4 x 16 = 64 values a row in NCHW, 16 channels a row in channels_last) stores past
    the caches (cpu.py); outputs, gradients and running statistics as torch's."""
    monkeypatch.setattr(launch, "NONTEMPORAL_MIN_BYTES", 0)
    decided = []
    decide = launch._past_caches
    monkeypatch.setattr(launch, "_past_caches", lambda *args: decided.append(decide(*args)) or decided[-1])
    ours, theirs = twins(4, dtype, channels=16)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = (torch.randn(3, 16, 4, 16, dtype=dtype) * 3 + 2).contiguous(memory_format=layout)
        grad = torch.randn(3, 16, 4, 16, dtype=dtype).contiguous(memory_format=layout)
        assert_same(ours, theirs, x, grad, tolerance(dtype))
    assert decided == [True] * 6  # three forwards, three backwards


def test_which_outputs_go_past_the_caches(monkeypatch):
    """Past the caches when the call's tensors fill NONTEMPORAL_MIN_BYTES and the output's rows
    are whole cache lines from a line boundary."""
    monkeypatch.setattr(launch, "NONTEMPORAL_MIN_BYTES", 1 << 15)
    y = torch.empty(4, 16, 64)  # 16 KiB, rows of 256 bytes
    assert launch._past_caches(2, y, 16, 64)
    assert not launch._past_caches(1, y, 16, 64)  # 16 KiB of tensors, under 32 KiB
    assert not launch._past_caches(3, torch.empty(4, 16, 49), 16, 49)  # rows of 196 bytes
    shifted = torch.empty(4 * 16 * 64 + 4)[4:].view(4, 16, 64)  # 16 bytes past a line
    assert not launch._past_caches(3, shifted, 16, 64)
    assert launch._past_caches(3, torch.empty(512, 16), 16, 1)  # channels last: rows of C values
    assert not launch._past_caches(3, torch.empty(512, 8), 8, 1)
    assert launch._past_caches(3, torch.empty(512, 8, dtype=torch.float64), 8, 1)


def test_last_level_cache_bytes_reads_the_index_entries(tmp_path):
    for name, size in (("index0", "32K"), ("index2", "512K"), ("index3", "32768K")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")  # a file next to the index directories, as in sysfs
    assert launch.last_level_cache_bytes(str(tmp_path)) == 32 * 1024**2
    (tmp_path / "index3" / "size").write_text("8M\n")
    assert launch.last_level_cache_bytes(str(tmp_path)) == 8 * 1024**2
    assert launch.last_level_cache_bytes(str(tmp_path / "missing")) == 32 * 1024**2


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "nothing requires grad"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_unrecorded_calls_skip_autograd_and_match_torch(context, layout, kernel_order):
    """Calls autograd does not record go to the kernels without the autograd.Function
    (route._recorded): same outputs and running statistics as torch's layer, no grad_fn."""
    ours, theirs = twins(4, torch.float32, affine=context != "nothing requires grad")
    manager = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = (torch.randn(6, 5, 4, 3) * 2 + 1).contiguous(memory_format=layout)
        with manager():
            y1, y2 = ours(x), theirs(x)
        assert y1.grad_fn is None and not y1.requires_grad
        assert y1.stride() == x.stride()
        torch.testing.assert_close(y1, y2, **tolerance(torch.float32))
        for name, buffer in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, **tolerance(torch.float32))


@pytest.mark.parametrize("extra", [0, 37, cpu.SPAN - 1])
def test_rows_of_several_spans_against_the_float64_oracle(extra, monkeypatch):
    """Rows longer than cpu.SPAN are summed span by span (cpu._row_sums): whole spans, then the
    rest. Channel-major kernels (the route of long rows), float32 data far from zero, against
    the float64 algorithm: the statistics (momentum 1: the running buffers are the batch's),
    the output, and all gradients."""
    monkeypatch.setattr(launch, "STREAM_MAX_BYTES", 0)
    length = 2 * cpu.SPAN + extra
    torch.manual_seed(extra)
    x = (torch.randn(3, 4, length) * 2 + 1000).requires_grad_(True)
    dy = torch.randn(3, 4, length)
    layer = OURS[3](4, momentum=1.0)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    y = layer(x)
    y.backward(dy)
    x64 = x.detach().double()
    torch.testing.assert_close(layer.running_mean.double(), x64.mean((0, 2)), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(layer.running_var.double(), x64.var((0, 2)) * 1.0, rtol=1e-5, atol=1e-6)
    expected_y = oracle.train_forward(x.detach(), layer.weight, layer.bias)[0]
    # x - mean in float32 at 1000: one ulp there is 6.1e-5
    torch.testing.assert_close(y.detach().double(), expected_y, rtol=1e-5, atol=1e-4)
    dx, dgamma, dbeta = oracle.train_backward(dy, x.detach(), layer.weight)
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-4, atol=1e-5)
    # the parameter gradients are sums of 3 * length terms that cancel: held to float32's
    # rounding of those terms (1e-6 of their absolute sum), which torch's layer also needs
    xhat = (x64 - x64.mean((0, 2), keepdim=True)) / (x64.var((0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
    mass_gamma = (dy.double() * xhat).abs().sum((0, 2))
    mass_beta = dy.double().abs().sum((0, 2))
    assert ((layer.weight.grad.double() - dgamma).abs() <= 1e-6 * mass_gamma).all()
    assert ((layer.bias.grad.double() - dbeta).abs() <= 1e-6 * mass_beta).all()
    theirs = TORCH[3](4, momentum=1.0)
    theirs.load_state_dict(layer.state_dict())
    leaf = x.detach().requires_grad_(True)
    theirs(leaf).backward(dy)
    assert ((theirs.weight.grad.double() - dgamma).abs() <= 1e-6 * mass_gamma).all()
