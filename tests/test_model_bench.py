"""networks.py and model_bench.py (bench --models): the hand-fused networks compute what the
plain ones compute, and the report has every network, layout and variant."""

import pytest
import torch

from batchnorm import cli, launch, model_bench, networks


@pytest.fixture(autouse=True)
def _memory_order_kernels(monkeypatch):
    """Every NCHW map to the memory-order kernels: test_activated.py tests the fused
    channel-major ones, and each kernel specialization costs CI seconds to compile."""
    monkeypatch.setattr(launch.cpu, "PREFETCH_ROW_BYTES", 1 << 30)
    monkeypatch.setattr(launch, "STREAM_MAX_BYTES", 1 << 40)


@pytest.mark.parametrize("network", list(model_bench.NETWORKS))
def test_fused_networks_are_the_plain_ones(network):
    """The same state_dict keys; loaded with the plain network's weights, the same outputs
    in training and eval, and the same gradients."""
    plain = model_bench.build(network, "torch", "NCHW")
    x = torch.randn(4, 3, 32, 32)
    for variant in model_bench.variants(network)[1:]:
        other = model_bench.build(network, variant, "NCHW")
        assert list(other.state_dict()) == list(plain.state_dict())
        other.load_state_dict(plain.state_dict())
        for training in (True, False):
            plain.train(training), other.train(training)
            a, b = plain(x), other(x)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        a.sum().backward()
        b.sum().backward()
        first = next(p for p in plain.parameters())
        torch.testing.assert_close(next(p for p in other.parameters()).grad, first.grad, rtol=1e-3, atol=1e-3)
        plain.zero_grad()


def test_inplace_vgg_keeps_at_most_six_tenths_of_torchs_activations():
    """The issue's memory target, in bytes (deterministic): saved_tensors_hooks, unique storages."""
    x = torch.randn(8, 3, 32, 32)
    saved = {v: model_bench.saved_bytes(model_bench.build("VGG-11-BN-LeakyReLU", v, "NCHW"), x) for v in
             ("torch", "fused", "in-place")}  # fmt: skip
    assert saved["in-place"] <= 0.6 * saved["torch"]
    assert saved["in-place"] < saved["fused"] < saved["torch"]


def test_bench_models_reports_every_network_layout_and_variant(monkeypatch, capsys):
    real = model_bench.measure
    monkeypatch.setattr(model_bench, "measure", lambda repeat: real(repeat, batch=2))
    assert cli.main(["bench", "--models", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "cores" in out and "Peak resident memory" in out
    for network in model_bench.NETWORKS:
        for layout in model_bench.LAYOUTS:
            assert f"| {network} | {layout} |" in out
    resnet = next(line for line in out.splitlines() if line.startswith("| ResNet-20 | NCHW"))
    assert resnet.count("n/a") == 2  # no in-place ResNet (relu is not invertible)
    assert networks.VGG11.count("M") == 5
