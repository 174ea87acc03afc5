"""gradcheck, gradgradcheck, the channels_last twin, opcheck, torch.compile and torch.export."""

import pytest
import torch

import batchnorm
from batchnorm import functional as F
from batchnorm import ops


def _inputs(layout=torch.contiguous_format):
    x = (torch.randn(4, 3, 3, 2, dtype=torch.float64) * 2 + 1).contiguous(memory_format=layout)
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    bias = torch.randn(3, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (x, weight, bias)]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_gradcheck_and_gradgradcheck(layout, training, axis):
    running_mean = torch.randn(2 if axis == -1 else 3, dtype=torch.float64)
    running_var = torch.rand(2 if axis == -1 else 3, dtype=torch.float64) + 0.5
    x, weight, bias = _inputs(layout)
    if axis == -1:
        weight = torch.rand(2, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        return F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training=training, axis=axis)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_channels_last_twin_loaded_with_state_dict():
    torch.manual_seed(3)
    first = batchnorm.BatchNorm2d(6)
    with torch.no_grad():
        first.weight.uniform_(0.5, 1.5)
        first.bias.normal_()
    twin = batchnorm.BatchNorm2d(6)
    twin.load_state_dict(first.state_dict())
    x = torch.randn(8, 6, 5, 7) * 2 + 1
    dy = torch.randn(8, 6, 5, 7)
    for mode in (True, True, False):
        first.train(mode)
        twin.train(mode)
        a = x.clone().requires_grad_(True)
        b = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        ya, yb = first(a), twin(b)
        assert yb.is_contiguous(memory_format=torch.channels_last)
        ya.backward(dy)
        yb.backward(dy.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
        for p, q in zip(first.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
            p.grad = q.grad = None
        torch.testing.assert_close(first.running_var, twin.running_var)


def test_opcheck_every_op():
    x, weight, bias = _inputs()
    x32 = x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    mean, invstd = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    for args in [(x, weight, bias, 1e-5, 1), (x32, None, None, 1e-3, 1), (x, weight, bias, 1e-5, -1)]:
        if args[4] == -1:
            args = (x, None, None, 1e-5, -1)
        torch.library.opcheck(ops.forward_train, args)
    torch.library.opcheck(ops.forward_eval, (x, mean, invstd, weight, bias, 1e-5, 1))
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.backward, (dy, x.detach(), mean, invstd, weight.detach(), True, 1, True))
    rm, rv, n = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor(0)
    torch.library.opcheck(ops.update_running_stats, (rm, rv, n, mean, invstd, 24, 0.1))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), torch.nn.ReLU())


def test_torch_compile_fullgraph_matches_eager():
    eager, compiled = _model(), _model()
    run = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for training in (True, True, False):
        eager.train(training)
        compiled.train(training)
        x = torch.randn(4, 3, 8, 8)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = eager(a), run(b)
        torch.testing.assert_close(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value)


def test_torch_export_sees_single_ops():
    model = _model().eval()
    exported = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "batchnorm.forward_eval.default" in targets
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(exported.module()(x), model(x))

    trained = torch.export.export(_model().train(), (torch.randn(2, 3, 8, 8),))
    targets = [str(node.target) for node in trained.graph.nodes if node.op == "call_function"]
    assert "batchnorm.forward_train.default" in targets
    assert any("update_running_stats" in target for target in targets)


def test_make_fx_graph_has_one_op_per_call():
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, training=True)

    graph = make_fx(fn)(torch.randn(4, 3, 5), torch.ones(3), torch.zeros(3))
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count("batchnorm.forward_train.default") == 1


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["train without running statistics", "eval"])
def test_torch_func_grad_and_vmap_match_torch(mode, layout):
    """Under torch.func transforms the layer runs the differentiable torch ops of
    kernels/reference.py (route._transformed): grad and vmap agree with torch's layer."""
    kwargs = {"track_running_stats": False} if mode != "eval" else {}
    ours, theirs = batchnorm.BatchNorm2d(3, **kwargs), torch.nn.BatchNorm2d(3, **kwargs)
    if mode == "eval":
        for module in (ours, theirs):
            module.eval()
            module.running_mean.copy_(torch.tensor([0.3, -1.0, 2.0]))
            module.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    with torch.no_grad():
        for module in (ours, theirs):
            module.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
            module.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).contiguous(memory_format=layout)
    k = torch.arange(1.0, 4.0).view(1, 3, 1, 1)
    grads = [torch.func.grad(lambda x, m=m: (m(x) ** 2 * k).sum())(x) for m in (ours, theirs)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    batch = torch.randn(2, 4, 3, 5, 5)
    torch.testing.assert_close(torch.func.vmap(ours)(batch), torch.func.vmap(theirs)(batch), rtol=1e-4, atol=1e-5)


def test_torch_func_grad_with_running_statistics_fails_as_torchs():
    """Updating captured running buffers inside torch.func.grad is refused, by torch's layer too."""
    x = torch.randn(4, 3, 5, 5)
    for module in (batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        with pytest.raises(RuntimeError, match="would mutate a captured Tensor"):
            torch.func.grad(lambda x, m=module: m(x).sum())(x)
