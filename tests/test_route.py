"""route.route: each destination of its table, for the reason the table gives; and the
house's one direction: each module imports only the floors below it, so that a layer's call
reaches the kernels going down (layers -> functional -> route -> ops -> launch -> kernels)."""

import ast
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
from batchnorm import crossover, route

SRC = Path(batchnorm.__file__).parent


def _where(x, weight=None, bias=None, training=True, axis=1):
    C, like = x.shape[axis], dict(dtype=x.dtype, device=x.device)
    if training:
        running = (torch.zeros(C, **like), torch.ones(C, **like), torch.tensor(0, device=x.device), 2, 0.1)
    else:
        running = (torch.zeros(C, **like), torch.ones(C, **like), None, 0, 0.0)
    return route.route(x, weight, bias, running, training, axis)


@pytest.fixture
def torch_below(monkeypatch):
    """Every kind of call below 2^14 values to torch's kernel."""
    monkeypatch.setattr(crossover, "OVERRIDE", 1 << 14)


def test_small_plain_input_takes_torchs_kernel_in_both_modes(torch_below):
    x = torch.randn(16, 8, 4, 4)  # 2^11 values
    assert _where(x) is route.TORCH
    assert _where(x, training=False) is route.TORCH
    assert _where(x.to(memory_format=torch.channels_last)) is route.TORCH


def test_from_the_threshold_the_kernels(torch_below):
    x = torch.randn(64, 16, 4, 4)  # 2^14 values
    assert _where(x) is route.KERNELS
    weight = torch.ones(16, requires_grad=True)
    assert _where(x, weight) is route.KERNELS_RECORDED
    with torch.no_grad():
        assert _where(x, weight) is route.KERNELS


def test_what_torchs_kernel_is_not_asked_to_take(torch_below):
    """Half precision (the kernels at any size), another channel axis, more than TOP values."""
    x = torch.randn(16, 8, 4, 4)
    assert _where(x.half()) is route.KERNELS
    assert _where(x.bfloat16()) is route.KERNELS
    assert _where(x.permute(0, 2, 3, 1).contiguous(), axis=3) is route.KERNELS
    big = torch.randn(crossover.TOP + 8, 1)
    assert _where(big.reshape(-1, 8), training=False) is route.KERNELS


def test_gaps_in_memory_take_torchs_kernel(monkeypatch):
    monkeypatch.setattr(crossover, "OVERRIDE", 0)  # the kernels for anything dense
    x = torch.randn(16, 8, 8, 8)[:, :, :, :5]
    assert launch_shape(x) is None
    assert _where(x) is route.TORCH
    assert _where(x.contiguous()) is route.KERNELS


def launch_shape(x):
    return batchnorm.launch.dense_shape(x, 1)


def test_transforms_and_forward_ad_take_the_reference_ops():
    x = torch.randn(16, 8)
    seen = []
    torch.func.vmap(lambda row: seen.append(_where(row.reshape(2, 4, 1))) or row)(x)
    assert seen == [route.REFERENCE]
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert _where(fwAD.make_dual(x, torch.ones_like(x))) is route.REFERENCE


def test_modes_subclasses_and_other_devices_take_the_custom_ops():
    x = torch.randn(16, 8)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert _where(x) is route.OP

    class Sub(torch.Tensor):
        pass

    assert _where(x.as_subclass(Sub)) is route.OP
    assert _where(x.to("meta")) is route.OP
    assert _where(x.to("meta"), training=False) is route.OP


def test_a_tensor_on_another_device_is_refused_by_name():
    """No destination takes tensors on two devices: refused before any runs (torch's layer
    refuses them too)."""
    x = torch.randn(16, 8)
    with pytest.raises(RuntimeError, match="^weight is on device meta, not on the input's device cpu$"):
        _where(x, torch.ones(8, device="meta"))
    with pytest.raises(RuntimeError, match="^running_mean is on device cpu, not on the input's device meta$"):
        route.route(x.to("meta"), None, None, (torch.zeros(8), torch.ones(8), None, 0, 0.0), False, 1)


def test_compile_takes_the_custom_ops():
    seen = []

    def f(x):
        seen.append(_where(x))
        return x + 1

    torch.compile(f, backend="eager", fullgraph=False)(torch.randn(16, 8))
    assert route.OP in seen


# the floors, top down: a module may import those after it in this list, never those before
FLOORS = [
    {"__main__.py"},
    {"__init__.py", "cli.py"},
    {"sweep.py"},
    {"conversion_bench.py", "sync_bench.py"},
    {"bench.py", "model_bench.py"},
    {"lab"},
    {"fold.py"},
    {"frozen.py", "accumulate.py", "health.py", "sync_conversion.py"},
    {"stats.py", "networks.py", "conversion.py"},
    {"activated.py", "ghost.py", "renorm.py", "keras.py", "lp.py", "sync.py"},
    {"layers.py"},
    {"functional.py"},
    {"route.py", "torch_stats.py", "normalizations.py", "synced.py"},
    {"fused_ops.py"},
    {"ops.py"},
    {"launch.py"},
    {"buffers.py", "crossover.py", "epilogue.py", "layout.py", "kernels"},
]


def _floor(name: str) -> int:
    for level, names in enumerate(FLOORS):
        if name in names:
            return level
    raise AssertionError(f"{name} is on no floor of FLOORS")


def _imports(path: Path) -> set[str]:
    """The package's modules ``path`` imports, as the first part of their path under batchnorm."""
    found = set()
    inside = path.parent != SRC  # a subpackage: "from .. import x" climbs to batchnorm
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 1 and inside:
                continue  # within its own subpackage
            base = parts[0] if parts else None
            names = [base] if base else [alias.name for alias in node.names]
            for name in names:
                found.add(name if name in ("lab", "kernels") else f"{name}.py")
    return found


def test_every_module_imports_only_the_floors_below():
    checked = 0
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        name = relative.parts[0] if len(relative.parts) > 1 else relative.name
        for imported in _imports(path):
            if imported == name:
                continue
            assert _floor(imported) > _floor(name), f"{relative} imports {imported}, which is not below it"
            checked += 1
    assert checked > 20


def test_the_layer_calls_only_functional():
    """layers.py reaches the route only through functional.normalize."""
    tree = ast.parse((SRC / "layers.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "functional" in imported
    assert not imported & {"ops", "route", "launch", "crossover"}
