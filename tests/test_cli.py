"""The command line: bench on one small shape, --help, a bad argument; the order of bench's rounds."""

import json
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batchnorm import bench, cli, launch
from batchnorm.buffers import pool


def test_bench_prints_a_filled_table(capsys, tmp_path):
    out = tmp_path / "bench.md"
    assert (
        cli.main(
            [
                "bench",
                "--shape",
                "128,16,40",
                "--repeat",
                "2",
                "--no-compile",
                "--no-interleaved",
                "--no-models",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| 128x16x40")]
    assert [row.split("|")[3].strip() for row in rows] == ["forward-train", "forward-eval", "forward+backward"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[4:-1]]
        assert all(float(c.rstrip("x")) > 0 for c in cells), row
    assert re.search(r"Memory copy over \d+ MiB \(read \+ write\): [\d.]+ GB/s", text)
    assert out.read_text().strip() == text.strip()


def test_bench_times_half_precision_for_4d_shapes(capsys):
    """A 4-D shape gets float16 and bfloat16 rows (NCHW, ours against torch's); the ratio
    is torch's time over ours."""
    assert (
        cli.main(["bench", "--shape", "4,8,6,6", "--repeat", "1", "--no-compile", "--no-interleaved", "--no-models"])
        == 0
    )
    text = capsys.readouterr().out
    rows = re.findall(
        r"^\| 4x8x6x6 \| (float16|bfloat16) \| ([a-z+-]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", text, re.M
    )
    assert [(dtype, operation) for dtype, operation, *_ in rows] == [
        (dtype, operation) for dtype in ("float16", "bfloat16") for operation in bench.OPERATIONS
    ]
    for *_, ours, theirs, ratio in rows:  # the times are printed rounded, the ratio from the unrounded times
        half = {t: 0.5 * 10 ** -len(t.partition(".")[2]) for t in (ours, theirs)}  # half the last printed digit
        low = (float(theirs) - half[theirs]) / (float(ours) + half[ours])
        high = (float(theirs) + half[theirs]) / max(float(ours) - half[ours], 1e-9)
        assert low - 0.005 <= float(ratio) <= high + 0.005, (ours, theirs, ratio)


def test_help():
    result = subprocess.run([sys.executable, "-m", "batchnorm.cli", "bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--repeat" in result.stdout and "--shape" in result.stdout


def test_bad_shape(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["bench", "--shape", "64,x"])
    assert error.value.code == 2
    assert "--shape must be comma-separated integers like 64,64,32,32, got '64,x'" in capsys.readouterr().err


def test_bench_reports_the_mlp_training_step(capsys):
    assert (
        cli.main(["bench", "--shape", "128,16,40", "--repeat", "1", "--no-compile", "--no-interleaved", "--no-models"])
        == 0
    )
    text = capsys.readouterr().out
    match = re.search(
        r"- batchnorm ([\d.]+), torch.nn.BatchNorm1d ([\d.]+) \(([\d.]+)x\), no batch norm ([\d.]+)", text
    )
    assert match, text
    ours, theirs, ratio, _none = map(float, match.groups())
    assert ratio == pytest.approx(theirs / ours, abs=0.006)


def test_train_command_writes_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--steps", "20", "--eval-every", "10", "--batch-size", "30", "--out", str(out)])
    assert code == 0
    assert re.search(r"run: step 20, test accuracy 0\.\d{4} \(best 0\.\d{4}\)", capsys.readouterr().out)
    assert (out / "metrics.json").exists() and len((out / "metrics.csv").read_text().splitlines()) == 3


def test_train_bad_arguments(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["train", "--optimizer", "lbfgs"])
    assert error.value.code == 2
    assert "argument --optimizer: invalid choice: 'lbfgs'" in capsys.readouterr().err
    assert cli.main(["train", "--batch-size", "1"]) == 2
    assert "batch norm needs batch_size >= 2 in training, got batch_size=1" in capsys.readouterr().err
    assert cli.main(["train", "--data", "npz:/no/such.npz"]) == 2
    assert "/no/such.npz: file not found" in capsys.readouterr().err


def test_train_measure_and_threads(tmp_path, capsys, monkeypatch):
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    out = tmp_path / "run"
    argv = ["train", "--steps", "10", "--eval-every", "10", "--measure", "--norm", "bn-noisy", "--threads", "2"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert threads == [2]
    record = json.loads((out / "metrics.json").read_text())["metrics"][0]
    assert record["beta_smoothness"] > 0 and -1 <= record["ics_cosine"] <= 1
    assert cli.main(["train", "--model", "cnn", "--depth", "5", "--out", str(tmp_path / "cnn")]) == 2
    assert "depth=5 applies to the MLP only" in capsys.readouterr().err


def test_train_help():
    result = subprocess.run([sys.executable, "-m", "batchnorm.cli", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--resume" in result.stdout and "csv:PATH[:LABEL]" in result.stdout


def test_experiment_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "placement"
    assert cli.main(["experiment", "placement", "--scale", "tiny", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"placement +(holds|does not hold|inconclusive) +test accuracy .* before", text)
    assert re.search(r"\n +before - after [-+]\d\.\d{3} \[[-+]\d\.\d{3}, [-+]\d\.\d{3}\]\n", text)
    assert (out / "report.html").exists() and (out / "placement-1.png").exists()


def test_lab_commands_help_and_bad_name(capsys):
    for command in ("reproduce", "experiment"):
        result = subprocess.run(
            [sys.executable, "-m", "batchnorm.cli", command, "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and "--full" in result.stdout and "--seed" in result.stdout
    with pytest.raises(SystemExit) as error:
        cli.main(["experiment", "fig2"])
    assert error.value.code == 2
    assert "argument name: invalid choice: 'fig2'" in capsys.readouterr().err


def test_alternating_rounds_vary_the_order():
    """No function always runs right after the same one (bench._alternating)."""
    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = bench._alternating(functions, repeat=40, per_round=1, budget=0.0)
    assert set(times) == set("abcd")
    rounds = ["".join(calls[16 + 4 * r : 20 + 4 * r]) for r in range(40)]  # after four warm-up calls of each
    assert all(sorted(order) == list("abcd") for order in rounds)
    pairs = {order[i : i + 2] for order in rounds for i in range(3)}
    assert pairs == {x + y for x in "abcd" for y in "abcd" if x != y}


def test_bench_floor_column_and_lines():
    """A 4-D forward+backward row gets the five-pass floor, timed in its rounds; the ratio to
    torch's best layout ignores the floor, and the floor lines say what the targets need."""
    rows = bench.measure([(2, 3, 4, 4)], repeat=2, with_compile=False)
    for row in rows:
        assert (bench.FLOOR in row.times) == (row.operation == "forward+backward"), row
        assert (bench.LAYER_FLOOR in row.times) == (row.operation == "forward+backward"), row
        assert (bench.BATCH_NORM_PASSES in row.times) == (row.operation == "forward+backward"), row
        assert all(t > 0 for t in row.times.values())
    made_up = bench.Row(
        (2, 3, 4, 4), "NCHW", "forward+backward",
        {"batchnorm": 2e-3, "torch NCHW": 6e-3, "torch channels_last": 3e-3, bench.FLOOR: 1e-3},
    )  # fmt: skip
    text = bench.report([made_up], 1e10, 1 << 20, None)
    assert "| 2x3x4x4 | NCHW | forward+backward | 2.000 | 6.000 | 3.000 | 1.000 | 3.00x | 1.50x |" in text
    assert (
        "- 2x3x4x4 NCHW: floor 1.000 ms, ours 2.000 ms (2.00x the floor); 3x torch's same layout needs "
        "2.000 ms (2.00x the floor), 1.3x its faster layout 2.308 ms (2.31x the floor)"
    ) in text
    made_up.times[bench.LAYER_FLOOR] = 1.25e-3
    text = bench.report([made_up], 1e10, 1 << 20, None)
    assert "| 2x3x4x4 | NCHW | forward+backward | 2.000 | 6.000 | 3.000 | 1.000 | 1.250 | 3.00x | 1.50x |" in text
    assert (
        "- 2x3x4x4 NCHW: floor 1.000 ms, layer floor 1.250 ms (1.25x the floor), ours 2.000 ms (2.00x the "
        "floor); 3x torch's same layout needs 2.000 ms (2.00x the floor)"
    ) in text
    made_up.times[bench.BATCH_NORM_PASSES] = 1.75e-3
    text = bench.report([made_up], 1e10, 1 << 20, None)
    assert "| 2.000 | 6.000 | 3.000 | 1.000 | 1.250 | 1.750 | 3.00x | 1.50x |" in text
    assert (
        "- 2x3x4x4 NCHW: floor 1.000 ms, layer floor 1.250 ms (1.25x the floor), batch-norm passes 1.750 ms "
        "(1.75x the floor), ours 2.000 ms (2.00x the floor); 3x torch's same layout needs 2.000 ms"
    ) in text


def test_bench_layer_floor_runs_the_five_passes():
    """The layer floor's step computes what the five passes compute: y = x, and x.grad = dy + x
    as autograd hands it over (the pooled dx itself, not a copy of it)."""
    x = torch.randn(2, 64, 64, 64).contiguous(memory_format=torch.channels_last)  # 2 MB: pooled
    leaf = x.clone().requires_grad_(True)
    y = bench._PassesLayer(bench._FivePasses)(leaf)
    assert torch.equal(y, x) and y.stride() == x.stride()
    dy = torch.randn_like(x)
    y.backward(dy)
    assert torch.equal(leaf.grad, dy + x) and leaf.grad.stride() == x.stride()
    assert leaf.grad.data_ptr() in {array.ctypes.data for array in pool._arrays}


class _Aten(TorchDispatchMode):
    """Records the aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_bench_batch_norm_passes_read_before_they_write():
    """The batch-norm passes: the forward reads x whole (a sum) before y = x, the backward reads
    dy and x whole (two sums) before dx = dy + x, which autograd hands over as x.grad."""
    x = torch.randn(2, 64, 64, 64)  # 2 MB: pooled
    leaf = x.clone().requires_grad_(True)
    dy = torch.randn_like(x)
    with _Aten() as forward:
        y = bench._PassesLayer(bench._BatchNormPasses)(leaf)
    with _Aten() as backward:
        y.backward(dy)
    assert torch.equal(y, x) and torch.equal(leaf.grad, dy + x)
    assert [op for op in forward.ops if op in ("sum", "copy_")] == ["sum", "copy_"]
    assert [op for op in backward.ops if op in ("sum", "add")] == ["sum", "sum", "add"]


def test_machine_line_names_each_data_cache_from_sysfs(tmp_path):
    """bench.caches reads the index entries as sysfs writes them (instruction caches left out,
    sharing counted from the CPU list), so two machines' tables can be told apart."""
    entries = [
        ("1", "Data", "48K", "0"),
        ("1", "Instruction", "32K", "0"),
        ("2", "Unified", "1024K", "0"),
        ("3", "Unified", "32768K", "0-3,8,10-11"),
    ]
    for number, (level, kind, size, shared) in enumerate(entries):
        folder = tmp_path / f"index{number}"
        folder.mkdir()
        for name, text in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (folder / name).write_text(text + "\n")
    assert bench.caches(str(tmp_path)) == ["L1d 48 KiB", "L2 1 MiB", "L3 32 MiB (7 CPUs)"]
    assert bench.caches(str(tmp_path / "missing")) == []
    assert [launch.cache_size_bytes(t) for t in ("48K\n", "32M", "4096")] == [48 * 1024, 32 * 1024**2, 4096]
    assert "cores" in bench.machine() and "torch" in bench.machine()


def test_bench_reports_the_resnet20_steps(capsys):
    """The model rows: a CIFAR ResNet-20's training step and eval forward, both layouts, the
    ratio torch's time over ours as printed."""
    assert cli.main(["bench", "--shape", "128,16,40", "--repeat", "1", "--no-compile", "--no-interleaved"]) == 0
    text = capsys.readouterr().out
    rows = re.findall(r"^- (\S+ \w+): batchnorm ([\d.]+), torch.nn.BatchNorm2d ([\d.]+) \(([\d.]+)x\)$", text, re.M)
    assert [name for name, *_ in rows] == ["NCHW train", "NCHW eval", "channels_last train", "channels_last eval"]
    for _, ours, theirs, ratio in rows:
        assert float(ours) > 0 and abs(float(theirs) / float(ours) - float(ratio)) <= 0.01 + 1e-3 / float(ours)


def test_resnet20_is_the_papers_network():
    """He et al.'s CIFAR ResNet-20: 19 convolutions and one linear layer (20 weighted layers,
    plus two 1x1 shortcut convolutions), 0.27M parameters, 10 logits from a 32x32 image; its
    batch-norm layers are the class it is given."""
    import torch

    from batchnorm import BatchNorm2d
    from batchnorm.networks import resnet20

    model = resnet20(BatchNorm2d)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19 and len(convs) == 21
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
    assert all(
        isinstance(m, BatchNorm2d) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bench_prints_what_the_route_measured():
    """The crossovers the process measured, each as its kind and threshold: a power of two
    below the top, 'every size' past it, and the fold limit of a row length in KiB."""
    import torch

    from batchnorm import bench, crossover

    measured = {
        ("train, recorded", "maps", torch.float32, 2): 1 << 16,
        ("eval", "rows", torch.float64, 2): crossover.TOP + 1,
        ("fold", 16, 4, 2): 1 << 15,
    }
    lines = bench.crossovers(measured)
    assert lines[1] == (
        "Measured by this process (batchnorm.crossover): torch's kernel takes eval, rows, float64: at every size "
        "measured (up to 2^18 values); train, recorded, maps, float32: below 2^16 values"
    )
    assert lines[2] == "Short rows fold: rows of 16 B below 32 KiB of columns"
    assert bench.crossovers({}) == []
