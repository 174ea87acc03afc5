"""The README's usage example runs as written, and does what it says."""

import os
import pathlib
import re

import torch

import batchnorm

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_its_checkpoint_loads_into_torch(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one usage example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model[1], batchnorm.BatchNorm2d) and not model.training
    # "loads into the torch.nn version too": the same keys and values in torch's layer
    state = torch.load(os.path.join(tmp_path, "model.pt"), weights_only=True)
    theirs = torch.nn.BatchNorm2d(16)
    theirs.load_state_dict({k.removeprefix("1."): v for k, v in state.items() if k.startswith("1.")})
    torch.testing.assert_close(theirs.running_var, state["1.running_var"])
    # population_statistics replaced the moving averages by the statistics of the ten batches
    with torch.no_grad():
        inputs = torch.cat([model[0](x) for x, _ in namespace["loader"]]).double()
    torch.testing.assert_close(model[1].running_mean, inputs.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, inputs.var((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    # the functional form updated the buffers it was given in place
    assert not torch.equal(namespace["mean"], torch.zeros(100))
    # convert fused the pair into one layer (a copy), revert gave torch's back, fold removed the BN
    fast, plain, served, net = (namespace[k] for k in ("fast", "plain", "served", "net"))
    assert [type(m) for m in fast.modules()].count(batchnorm.BatchNormAct2d) == 1
    assert type(net[1]) is torch.nn.BatchNorm2d and type(plain.get_submodule("1")) is torch.nn.BatchNorm2d
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, batchnorm.BatchNorm2d)) for m in served.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(served(x), fast.eval()(x), rtol=1e-5, atol=1e-5)
    assert type(namespace["backbone"][1]) is batchnorm.FrozenBatchNorm2d
    assert namespace["ghost"](torch.randn(8, 16, 2, 2)).shape == (8, 16, 2, 2)
    assert namespace["renorm"].limits(40000) == (3.0, 5.0)
