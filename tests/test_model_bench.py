"""networks.py and model_bench.py (bench --models): the hand-fused networks compute what the
plain ones compute, and the report has every network, layout and variant."""

import pytest
import torch

from batchnorm import cli, conversion_bench, launch, model_bench, networks


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
    plain = model_bench.build(network, "torch", "NCHW").double()  # float64: kernels test_activated compiles
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for variant in model_bench.variants(network)[1:]:
        other = model_bench.build(network, variant, "NCHW").double()
        assert list(other.state_dict()) == list(plain.state_dict())
        other.load_state_dict(plain.state_dict())
        for training in (True, False):
            plain.train(training), other.train(training)
            a, b = plain(x), other(x)
            torch.testing.assert_close(b, a)
        a.sum().backward()
        b.sum().backward()
        first = next(p for p in plain.parameters())
        torch.testing.assert_close(next(p for p in other.parameters()).grad, first.grad)
        plain.zero_grad()


def test_inplace_vgg_keeps_at_most_six_tenths_of_torchs_activations():
    """The issue's memory target, in bytes (deterministic): saved_tensors_hooks, unique storages."""
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    saved = {v: model_bench.saved_bytes(model_bench.build("VGG-11-BN-LeakyReLU", v, "NCHW").double(), x) for v in
             ("torch", "fused", "in-place")}  # fmt: skip
    assert saved["in-place"] <= 0.6 * saved["torch"]
    assert saved["in-place"] < saved["fused"] < saved["torch"]


def test_bench_models_reports_every_network_layout_and_variant(monkeypatch, capsys):
    """The CLI's --models and the report's rows (results stand in for measure's: the float32
    networks would be more kernel specializations for CI to compile)."""
    fake = {
        (network, layout): {
            "step": {v: 0.1 * (k + 1) for k, v in enumerate(model_bench.variants(network))},
            "saved": {v: 2**20 * (4 - k) for k, v in enumerate(model_bench.variants(network))},
            "faults": {v: 1000 * (3 - k) for k, v in enumerate(model_bench.variants(network))},
        }
        for network in model_bench.NETWORKS
        for layout in model_bench.LAYOUTS
    }
    asked = []
    monkeypatch.setattr(model_bench, "measure", lambda repeat: asked.append(repeat) or fake)
    converted = {
        (network, layout): {
            "train": {"torch": 0.2, "convert": 0.1, **({"torch.compile": 0.4} if network == "ResNet-20" else {})},
            "eval": {"torch": 0.3, "convert": 0.2, "fold(convert)": 0.1},
        }
        for network in conversion_bench.NETWORKS
        for layout in conversion_bench.LAYOUTS
    }
    monkeypatch.setattr(conversion_bench, "measure", lambda repeat, compiled: asked.append(compiled) or converted)
    assert cli.main(["bench", "--models", "--repeat", "3"]) == 0
    assert asked == [3, True]
    out = capsys.readouterr().out
    assert "cores" in out and "Peak resident memory" in out
    for network in model_bench.NETWORKS:
        for layout in model_bench.LAYOUTS:
            assert f"| {network} | {layout} |" in out
    resnet = next(line for line in out.splitlines() if line.startswith("| ResNet-20 | NCHW"))
    assert resnet == "| ResNet-20 | NCHW | 100.0 | 200.0 (0.50x) | 300.0 (0.33x) | n/a | 4.0 MiB | 0.50x | n/a |"
    faults = [line for line in out.splitlines() if line.startswith("| ResNet-20 | NCHW")][1]
    assert faults == "| ResNet-20 | NCHW | 3000 | 2000 | 1000 | n/a |"
    rows = [line for line in out.splitlines() if line.startswith("| ResNet-20 | channels_last")]
    assert rows[-1] == (
        "| ResNet-20 | channels_last | 200.0 | 100.0 (2.00x) | 400.0 (0.50x) | 300.0 | 200.0 (1.50x) | 100.0 (3.00x) |"
    )
    assert "| ResNet-18 (112x112) | NCHW | 200.0 | 100.0 (2.00x) | n/a |" in out
    assert networks.VGG11.count("M") == 5


def test_conversion_measure_times_every_variant_on_a_small_network(monkeypatch):
    """conversion_bench.measure end to end on a stand-in network (torch's kernel at this size:
    the kernels' float32 specializations would be compile time for CI)."""
    from batchnorm import crossover

    monkeypatch.setattr(crossover, "OVERRIDE", crossover.TOP + 1)

    def small(norm):
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), norm(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 10)
        )

    monkeypatch.setattr(conversion_bench, "NETWORKS", {"ResNet-20": (small, 4, 6, 4)})
    results = conversion_bench.measure(1, compiled=False)
    assert list(results) == [("ResNet-20", "NCHW"), ("ResNet-20", "channels_last")]
    for result in results.values():
        assert set(result["train"]) == {"torch", "convert"} and set(result["eval"]) == set(conversion_bench.EVAL)
        assert all(t > 0 for mode in ("train", "eval") for t in result[mode].values())
    assert "| ResNet-20 | NCHW |" in conversion_bench.report(results)
