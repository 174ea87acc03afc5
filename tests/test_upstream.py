"""PyTorch's own batch-norm tests, ported: the ``module_db`` cases of torch 2.13 for
BatchNorm1d/2d/3d (common_modules.py, with the checks of test_modules.py that apply on a
CPU), the batch-norm tests of test_nn.py and those of test_lazy_modules.py.

Each runs on torch's classes as the control and on ours: a test that fails on torch's
class is a wrong port, one that fails only on ours a gap. Written anew from what the
upstream tests check; torch.testing._internal is not imported (it is not an API).
"""

import copy
import io
import pickle
from functools import partial

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

import batchnorm
import routing

import oracle

CLASSES = {
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "batchnorm": {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d},
}
LAZY = {
    "torch": {1: nn.LazyBatchNorm1d, 2: nn.LazyBatchNorm2d, 3: nn.LazyBatchNorm3d},
    "batchnorm": {1: batchnorm.LazyBatchNorm1d, 2: batchnorm.LazyBatchNorm2d, 3: batchnorm.LazyBatchNorm3d},
}
FUNCTIONAL = {"torch": nn.functional.batch_norm, "batchnorm": batchnorm.functional.batch_norm}
impls = pytest.mark.parametrize("impl", ["torch", "batchnorm"])

# (which class, constructor args, constructor kwargs, forward input shape, desc), as module_db lists them
MODULE_DB = [
    (1, (10,), {}, (4, 10), "affine"),
    (1, (5,), {}, (4, 5, 3), "3d_input"),
    (1, (10, 1e-3, None), {}, (4, 10), "affine_simple_average"),
    (1, (10, 1e-3, 0.3, False), {}, (4, 10), "not_affine"),
    (1, (10, 1e-3, 0.3, True, False), {}, (4, 10), "not_tracking_stats"),
    (1, (5, 1e-3, 0.3, False), {}, (4, 5, 3), "3d_input_not_affine"),
    (1, (5, 1e-3, 0.3, False), {}, (0, 5, 9), "zero_batch"),
    (1, (10,), {"bias": False}, (4, 10), "affine_not_bias"),
    (2, (3,), {}, (2, 3, 6, 6), ""),
    (2, (3, 1e-3, None), {}, (2, 3, 6, 6), "2d_simple_average"),
    (2, (3, 1e-3, 0.8), {}, (2, 3, 6, 6), "momentum"),
    (2, (3, 1e-3, 0.8, False), {}, (2, 3, 6, 6), "not_affine"),
    (2, (3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6), "not_tracking_stats"),
    (2, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2), "zero_batch"),
    (2, (3,), {"bias": False}, (2, 3, 6, 6), "affine_not_bias"),
    (3, (3,), {}, (2, 3, 4, 4, 4), ""),
    (3, (3, 1e-3, None), {}, (2, 3, 4, 4, 4), "3d_simple_average"),
    (3, (3, 1e-3, 0.7), {}, (2, 3, 4, 4, 4), "momentum"),
    (3, (3, 1e-3, 0.7, False), {}, (2, 3, 4, 4, 4), "not_affine"),
    (3, (3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4), "not_tracking_stats"),
    (3, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2, 2), "zero_batch"),
    (3, (3,), {"bias": False}, (2, 3, 4, 4, 4), "affine_not_bias"),
]
module_db = pytest.mark.parametrize(
    "dim, args, kwargs, shape",
    [case[:4] for case in MODULE_DB],
    ids=[f"{c[0]}d-{c[4] or 'default'}" for c in MODULE_DB],
)


def _make(impl, dim, args, kwargs, **extra):
    module = CLASSES[impl][dim](*args, **{**kwargs, **extra})
    with torch.no_grad():  # parameters other than ones and zeros, so that they count
        for p in module.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    return module


def _input(shape, dtype=torch.float32):
    return torch.randn(shape, dtype=torch.float64).mul_(2).add_(1).to(dtype)


def _hparams(module):
    eps = module.eps
    momentum = module.momentum
    return eps, momentum


# ---------------------------------------------------------------- module_db (test_modules.py)


@impls
@module_db
def test_module_db_forward_train_then_eval(impl, dim, args, kwargs, shape):
    """test_forward: the output in training against the plain float64 formula, the running
    statistics against the plain update, then the output in eval from those statistics."""
    module = _make(impl, dim, args, kwargs)
    eps, momentum = _hparams(module)
    weight, bias = module.weight, module.bias
    for _ in range(2):
        x = _input(shape)
        y = module(x)
        if x.numel():
            y_ref, mu, var = oracle.train_forward(x, weight, bias, eps)
            torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
        else:
            assert y.shape == x.shape
    if module.track_running_stats and x.numel():
        assert int(module.num_batches_tracked) == 2
    module.eval()
    x = _input(shape)
    if module.running_mean is None:  # no running statistics: eval uses the batch's
        torch.testing.assert_close(
            module(x).double(), oracle.train_forward(x, weight, bias, eps)[0], rtol=1e-5, atol=1e-5
        )
    else:
        y_ref = oracle.eval_forward(x, module.running_mean, module.running_var, weight, bias, eps)
        torch.testing.assert_close(module(x).double(), y_ref, rtol=1e-5, atol=1e-5)


@impls
@module_db
def test_module_db_running_statistics(impl, dim, args, kwargs, shape):
    """The running update of two batches against the formula (momentum=None: the cumulative
    average), with the unbiased variance."""
    module = _make(impl, dim, args, kwargs)
    if not module.track_running_stats or 0 in shape:
        pytest.skip("no running statistics to update")
    rm, rv = torch.zeros(module.num_features, dtype=torch.float64), torch.ones(module.num_features, dtype=torch.float64)
    m = torch.Size(shape).numel() // shape[1]
    for step in range(2):
        x = _input(shape)
        module(x)
        _, mu, var = oracle.train_forward(x, None, None)
        factor = 1.0 / (step + 1) if module.momentum is None else module.momentum
        rm, rv = oracle.running_update(rm, rv, mu, var, m, factor)
    torch.testing.assert_close(module.running_mean.double(), rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.running_var.double(), rv, rtol=1e-5, atol=1e-6)


@impls
@module_db
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_db_gradcheck_and_gradgradcheck(impl, dim, args, kwargs, shape, training):
    """test_grad and test_gradgrad: float64, the input and every parameter."""
    module = _make(impl, dim, args, kwargs, dtype=torch.float64).train(training)
    if not training and module.track_running_stats:
        with torch.no_grad():
            module.running_mean.copy_(torch.randn(module.num_features))
            module.running_var.copy_(torch.rand(module.num_features) + 0.5)
    names = [name for name, _ in module.named_parameters()]
    x = _input(shape, torch.float64).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    buffers = dict(module.named_buffers())

    def f(x, *params):  # each call from fresh copies of the same running statistics
        fresh = {name: b.clone() for name, b in buffers.items()}
        return torch.func.functional_call(module, {**dict(zip(names, params, strict=True)), **fresh}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))
    if x.numel():
        assert torch.autograd.gradgradcheck(f, (x, *params))


@impls
@module_db
def test_module_db_non_contiguous_tensors(impl, dim, args, kwargs, shape):
    """test_non_contiguous_tensors: a non-contiguous input and grad_output give the outputs
    and gradients of their contiguous copies."""
    module = _make(impl, dim, args, kwargs)
    twin = copy.deepcopy(module)
    x = _input(shape)
    dy = torch.randn(shape)
    wide = torch.stack([x, x], dim=-1)[..., 0]  # same values, every other element of a larger tensor
    dy_wide = torch.stack([dy, dy], dim=-1)[..., 0]
    assert x.numel() == 0 or not wide.is_contiguous()
    a = x.clone().requires_grad_(True)
    b = wide.detach().requires_grad_(True)
    ya, yb = module(a), twin(b)
    ya.backward(dy)
    yb.backward(dy_wide)
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(b.grad, a.grad)
    for (name, p), q in zip(module.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, msg=key)


@impls
@module_db
def test_module_db_memory_format(impl, dim, args, kwargs, shape):
    """test_memory_format: a channels_last input gives a channels_last output of the same
    values as the contiguous input."""
    if len(shape) not in (4, 5):
        pytest.skip("channels_last is for 4D and 5D inputs")
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    module = _make(impl, dim, args, kwargs)
    twin = copy.deepcopy(module)
    x = _input(shape)
    y, y_last = module(x), twin(x.contiguous(memory_format=layout))
    torch.testing.assert_close(y_last, y)
    assert y_last.is_contiguous(memory_format=layout)


@impls
@module_db
def test_module_db_train_and_eval_modes_differ(impl, dim, args, kwargs, shape):
    """test_if_train_and_eval_modes_differ: with running statistics the two modes give
    different outputs; without, the same."""
    module = _make(impl, dim, args, kwargs)
    x = _input(shape)
    module(x)
    y_train = module(x)
    y_eval = module.eval()(x)
    if module.track_running_stats and x.numel():
        assert not torch.allclose(y_train, y_eval)
    else:
        torch.testing.assert_close(y_train, y_eval)


@impls
@module_db
def test_module_db_factory_kwargs_and_to(impl, dim, args, kwargs, shape):
    """test_factory_kwargs and test_to: dtype= and device= reach every parameter and float
    buffer; the counter stays int64; .to(float64) and back keeps working."""
    module = _make(impl, dim, args, kwargs, dtype=torch.float64)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        expected = torch.int64 if name == "num_batches_tracked" else torch.float64
        assert tensor.dtype == expected, name
    meta = CLASSES[impl][dim](*args, **kwargs, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    module = module.float()
    assert module(_input(shape)).dtype == torch.float32
    module = module.to(torch.float64)
    assert module(_input(shape, torch.float64)).dtype == torch.float64


@impls
@module_db
def test_module_db_pickle_and_save_load(impl, dim, args, kwargs, shape):
    """test_pickle and test_save_load: the module pickled, and its state_dict saved and
    loaded with weights_only=True, give the same outputs and state."""
    module = _make(impl, dim, args, kwargs)
    module(_input(shape))
    copied = pickle.loads(pickle.dumps(module))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    loaded = CLASSES[impl][dim](*args, **kwargs)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    x = _input(shape)
    for other in (copied, loaded):
        assert list(other.state_dict()) == list(module.state_dict())
        torch.testing.assert_close(other.eval()(x), copy.deepcopy(module).eval()(x))
    assert repr(module) == repr(CLASSES["torch"][dim](*args, **kwargs))


@impls
@pytest.mark.parametrize("dim, shape", [(1, (2, 10)), (2, (2, 10, 5, 5)), (3, (2, 10, 4, 4, 4))])
@pytest.mark.parametrize("eps", [-1.0, 0.0])
def test_module_db_error_inputs(impl, dim, shape, eps):
    """module_error_inputs: eps <= 0 is refused in the training forward with ValueError
    (torch counts the batch before it refuses it; here the state is left as it was)."""
    module = CLASSES[impl][dim](10, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        module(_input(shape))
    assert int(module.num_batches_tracked) == (0 if impl == "batchnorm" else 1)


# ---------------------------------------------------------------- test_nn.py


@impls
def test_nn_raises_error_if_less_than_one_value_per_channel(impl):
    with pytest.raises(ValueError):
        CLASSES[impl][1](10)(torch.rand(10)[None, :, None])


@impls
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_nn_raises_error_if_tensor_is_not_same_size_as_input(impl, name, size):
    x = torch.rand(2, 10)
    given = {"running_mean": torch.rand(10), "running_var": torch.rand(10)}
    given[name] = nn.Parameter(torch.rand(size)) if name in ("weight", "bias") else torch.rand(size)
    with pytest.raises(RuntimeError):
        FUNCTIONAL[impl](x, **given)


@impls
@pytest.mark.parametrize("shape", [(3, 2, 5), (64, 2, 2100)], ids=["small", "kernels"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nn_raises_error_if_running_stats_have_forward_grad(impl, shape, training, monkeypatch):
    """Forward-mode AD: a tangent on the input works; tangents on the running statistics
    together with one on the input are refused (torch's words)."""
    monkeypatch.setattr(batchnorm.crossover, "OVERRIDE", routing.TABLE)
    args = (torch.randn(shape), torch.randn(2), torch.rand(2) + 0.5)
    fn = partial(FUNCTIONAL[impl], training=training, momentum=0.1)
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = [torch.rand_like(a) for a in args]
        with fwAD.dual_level():
            duals = [
                fwAD.make_dual(a.clone(), t) if i in dual_indices else a.clone()
                for i, (a, t) in enumerate(zip(args, tangents, strict=True))
            ]
            if 0 in dual_indices and (1 in dual_indices or 2 in dual_indices) and not training:
                refused = "batch_norm is not differentiable wrt running_mean and running_var"
                with pytest.raises(RuntimeError, match=refused):
                    fn(*duals)
            else:
                y = fn(*duals)
                if 0 in dual_indices:
                    # the tangent against a finite difference of the primal function
                    h = 1e-3
                    x64 = args[0].double()
                    plain = partial(nn.functional.batch_norm, training=training, momentum=0.0)
                    stats = (args[1].double(), args[2].double())
                    step = h * tangents[0].double()
                    diff = (plain(x64 + step, *stats) - plain(x64 - step, *stats)) / (2 * h)
                    torch.testing.assert_close(fwAD.unpack_dual(y).tangent.double(), diff, rtol=1e-3, atol=1e-3)


@impls
def test_nn_buffer_update_when_stats_are_not_tracked(impl):
    bn = CLASSES[impl][1](4, track_running_stats=True)
    bn.track_running_stats = False  # use the buffers, do not update them
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.rand(32, 4))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


@impls
@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)])
@pytest.mark.parametrize("dtype, mixed", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_nn_batchnorm_nhwc_cpu(impl, shape, dtype, mixed):
    """channels_last in, channels_last out; the output and every gradient as the
    contiguous input's (NC11 and N1HW shapes; bfloat16 with float32 parameters)."""
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    bn = CLASSES[impl][2](shape[1]).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_bn = copy.deepcopy(bn)
    if mixed:
        bn.float(), ref_bn.float()
    ref_x = x.detach().clone().contiguous().requires_grad_(True)
    out, ref_out = bn(x), ref_bn(ref_x)
    out.backward(dy)
    ref_out.backward(dy.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last) and ref_out.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, **tol)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad, **tol)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)


@impls
def test_nn_batchnorm_non_contig_cpu(impl):
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = CLASSES[impl][2](2).eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref = copy.deepcopy(bn)
    out, ref_out = bn(x), ref(x.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last) and ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)


@impls
def test_nn_batchnorm_simple_average(impl):
    """momentum=None: the running statistics are the plain average of the batches'; after
    reset_running_stats the same again."""
    module = CLASSES[impl][1](3, momentum=None)
    xs = [torch.rand(4, 3) for _ in range(2)]
    for _ in range(2):
        for x in xs:
            module(x)
        means = torch.stack([x.mean(0) for x in xs])
        variances = torch.stack([x.var(0, unbiased=True) for x in xs])
        torch.testing.assert_close(module.running_mean, means.mean(0))
        torch.testing.assert_close(module.running_var, variances.mean(0))
        assert int(module.num_batches_tracked) == 2
        module.reset_running_stats()
        assert torch.equal(module.running_mean, torch.zeros(3)) and torch.equal(module.running_var, torch.ones(3))


@impls
def test_nn_batchnorm_update_stats(impl):
    module = CLASSES[impl][1](3)
    data = torch.rand(4, 3)
    module(data)  # training: the update
    torch.testing.assert_close(module.running_mean, 0.1 * data.mean(0))
    torch.testing.assert_close(module.running_var, 0.9 + 0.1 * data.var(0, unbiased=True))
    assert int(module.num_batches_tracked) == 1
    module.eval()  # eval: no update
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module(data)
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key


@impls
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nn_batchnorm_eval(impl, dtype):
    """In eval the output and the gradient do not depend on the batch: twice the same."""
    module = CLASSES[impl][1](3).to(dtype)
    module(torch.rand(4, 3, dtype=dtype))
    module.eval()
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    results = []
    for _ in range(2):
        data.grad = None
        y = module(data)
        y.backward(grad)
        results.append((y.detach(), data.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # with the running statistics of one batch, the same in eval as in a fresh layer's
    module = CLASSES[impl][1](3, momentum=1).to(dtype)
    data = torch.rand(4, 3, dtype=dtype)
    y_train = module(data)
    torch.testing.assert_close(module.eval()(data), (data - data.mean(0)) / (data.var(0) + 1e-5).sqrt())
    assert not torch.allclose(y_train, module(data))  # the biased and the unbiased variance


@impls
def test_nn_batchnorm_affine(impl):
    """affine=False is affine=True with weight one and bias zero: same output and input
    gradient."""
    x = torch.rand(4, 3, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    plain, affine = CLASSES[impl][1](3, affine=False), CLASSES[impl][1](3, affine=True)
    grad = torch.rand(4, 3, 5)
    plain(x).backward(grad)
    y = affine(x2)
    y.backward(grad)
    torch.testing.assert_close(plain(x), affine(x2))
    torch.testing.assert_close(x.grad, x2.grad)


@impls
def test_nn_batchnorm_load_state_dict(impl):
    """A version-1 state_dict (before num_batches_tracked) loads with the counter at 0;
    assign=True onto a meta-device module takes the loaded tensors."""
    bn = CLASSES[impl][2](3)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(0)
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    empty = CLASSES[impl][2](3)
    state = bn.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # version 1: no counter
    empty.load_state_dict(state)
    assert empty.state_dict()["num_batches_tracked"] == torch.tensor(0)
    with torch.device("meta"):
        meta = CLASSES[impl][2](3)
    meta.load_state_dict(CLASSES[impl][2](3).state_dict(), assign=True)
    assert meta.state_dict()["num_batches_tracked"].device.type == "cpu"
    assert meta(torch.randn(2, 3, 4, 4)).device.type == "cpu"


@impls
@pytest.mark.parametrize("dim, shape", [(1, (0, 5, 9)), (2, (0, 5, 2, 2)), (3, (0, 5, 2, 2, 2))])
def test_nn_batchnorm_empty_input(impl, dim, shape):
    """A batch of zero samples: an empty output, zero gradients for weight and bias, the
    running statistics untouched."""
    module = CLASSES[impl][dim](5)
    x = torch.randn(shape, requires_grad=True)
    y = module(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(module.weight.grad, torch.zeros(5)) and torch.equal(module.bias.grad, torch.zeros(5))
    assert torch.equal(module.running_mean, torch.zeros(5)) and torch.equal(module.running_var, torch.ones(5))


@impls
def test_nn_batchnorm_half_overflow(impl):
    """float16 input whose sum of squares overflows float16: the statistics in float32
    keep the output finite and equal to the float32 computation's."""
    x = torch.randn(2, 4, 32, 32).mul(100).half()
    module = CLASSES[impl][2](4).half()
    y = module(x)
    assert torch.isfinite(y).all()
    ref = CLASSES[impl][2](4)(x.float())
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- test_lazy_modules.py


def _uninitialized(module):
    """has_uninitialized_params, which torch's lazy layer loses when it becomes the eager class."""
    return any(is_lazy(t) for t in [*module.parameters(), *module.buffers()])


def _lazy_cases():
    return [(1, (16, 3, 6)), (2, (16, 3, 6, 7)), (3, (16, 3, 6, 7, 8))]


@impls
@pytest.mark.parametrize("dim, shape", _lazy_cases())
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_lazy_norm(impl, dim, shape, affine, track):
    """_check_lazy_norm: uninitialized tensors before the first forward, then the state and
    output of the eager class built with the inferred num_features."""
    lazy = LAZY[impl][dim](affine=affine, track_running_stats=track)
    assert _uninitialized(lazy) == (affine or track)
    if affine:
        assert isinstance(lazy.weight, UninitializedParameter) and isinstance(lazy.bias, UninitializedParameter)
    if track:
        assert isinstance(lazy.running_mean, UninitializedBuffer)
        assert isinstance(lazy.running_var, UninitializedBuffer)
    x = torch.rand(shape)
    y = lazy(x)
    assert isinstance(lazy, CLASSES[impl][dim]) and not _uninitialized(lazy)
    if impl == "batchnorm" or affine or track:  # torch's stays at 0 with no tensor to infer it from
        assert lazy.num_features == shape[1]
    eager = CLASSES[impl][dim](shape[1], affine=affine, track_running_stats=track)
    y_eager = eager(x)
    torch.testing.assert_close(y, y_eager)
    assert list(lazy.state_dict()) == list(eager.state_dict())
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(lazy.state_dict()[key], value, msg=key)


@impls
@pytest.mark.parametrize("dim, shape", _lazy_cases())
def test_lazy_norm_pickle(impl, dim, shape):
    lazy = LAZY[impl][dim]()
    copied = pickle.loads(pickle.dumps(lazy))
    assert _uninitialized(copied)
    copied(torch.rand(shape))
    again = pickle.loads(pickle.dumps(copied))
    assert not _uninitialized(again) and again.num_features == shape[1]


@impls
@pytest.mark.parametrize("dim, shape", _lazy_cases())
def test_lazy_batchnorm_state(impl, dim, shape):
    """_check_lazy_batchnorm_state: a lazy layer loaded from an eager one's state_dict has
    its tensors and num_features, and runs; an eager layer refuses a lazy one's state."""
    eager = CLASSES[impl][dim](10)
    eager(torch.rand(shape[0], 10, *shape[2:]))
    lazy = LAZY[impl][dim](affine=True, track_running_stats=True)
    lazy.load_state_dict(eager.state_dict())
    assert not _uninitialized(lazy)
    assert lazy.weight.shape == (10,) and lazy.running_mean.shape == (10,)
    x = torch.rand(shape[0], 10, *shape[2:])
    if impl == "batchnorm":  # torch 2.13 leaves num_features at 0 here and refuses this input
        assert lazy.num_features == 10
        torch.testing.assert_close(lazy.eval()(x), eager.eval()(x))
    with pytest.raises(RuntimeError, match="shape of an uninitialized"):
        CLASSES[impl][dim](10).load_state_dict(LAZY[impl][dim]().state_dict())


@impls
@pytest.mark.parametrize("dim, shape", _lazy_cases())
def test_lazy_norm_with_dict_input(impl, dim, shape):
    """_check_lazy_norm_with_dict_input: the input as a keyword argument."""
    lazy = LAZY[impl][dim]()
    x = torch.rand(shape)
    torch.testing.assert_close(lazy(input=x), CLASSES[impl][dim](shape[1])(input=x))
    assert not _uninitialized(lazy)


@impls
@pytest.mark.parametrize("dim, shape", _lazy_cases())
def test_lazy_bias_false_and_no_tensors(impl, dim, shape):
    """bias=False, as torch 2.13 takes it; affine=False with track_running_stats=False, no
    tensor to materialize, still learns num_features from its first input."""
    lazy = LAZY[impl][dim](bias=False)
    x = torch.rand(shape)
    lazy(x)
    assert lazy.bias is None and lazy.weight.shape == (shape[1],)
    bare = LAZY[impl][dim](affine=False, track_running_stats=False)
    y = bare(x)
    torch.testing.assert_close(y, CLASSES[impl][dim](shape[1], affine=False, track_running_stats=False)(x))
