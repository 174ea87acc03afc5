"""bench --sweep: its shapes, its rows, and its worst and geometric mean recomputed by hand."""

import math
import re

import pytest

from batchnorm import cli, sweep


def test_sweep_covers_the_shapes_the_issue_names():
    shapes = {shape for _, shape in sweep.SHAPES}
    for shape in [(32, 64, 56, 56), (32, 2048, 7, 7), (128, 16, 32, 32), (128, 64, 8, 8), (32, 96, 56, 56)]:
        assert shape in shapes
    assert {len(shape) for shape in shapes} == {2, 3, 4, 5}


def test_sweep_prints_a_row_per_shape_and_layout(capsys):
    argv = ["bench", "--sweep", "--repeat", "1", "--shape", "4,8,3,3", "--shape", "2,4,2,2,2", "--shape", "16,8"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("Machine: ")
    rows = re.findall(
        r"^\| --shape \| ([\dx]+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]*) \| ([\d.]+)x \| ([\d.]+)x \|$",
        text,
        re.M,
    )
    assert [(shape, layout) for shape, layout, *_ in rows] == [
        ("4x8x3x3", "NCHW"),
        ("4x8x3x3", "channels_last"),
        ("2x4x2x2x2", "NCHW"),
        ("2x4x2x2x2", "channels_last"),
        ("16x8", "contiguous"),
    ]
    for _shape, layout, ours, same, other, *_ in rows:
        assert float(ours) > 0 and float(same) > 0
        assert (other == "") == (layout == "contiguous")
    assert re.search(r"same layout / ours: worst [\d.]+x \(\S+ \w+\), geometric mean [\d.]+x over 5 rows", text)


def test_sweep_worst_and_geometric_mean_from_made_up_rows():
    rows = [
        sweep.SweepRow("a", (2, 3, 4, 4), "NCHW", ours=1e-3, same=2e-3, other=1.5e-3),
        sweep.SweepRow("a", (2, 3, 4, 4), "channels_last", ours=2e-3, same=1e-3, other=4e-3),
        sweep.SweepRow("b", (8, 3), "contiguous", ours=1e-3, same=4e-3, other=None),
    ]
    assert [row.vs_same for row in rows] == [2.0, 0.5, 4.0]
    assert [row.vs_best for row in rows] == [1.5, 0.5, 4.0]
    text = sweep.report(rows, 1e10, 1 << 20)
    assert "same layout / ours: worst 0.50x (2x3x4x4 channels_last), geometric mean 1.59x over 3 rows" in text
    assert f"faster torch / ours: worst 0.50x (2x3x4x4 channels_last), geometric mean {math.cbrt(3.0):.2f}x" in text


def test_five_sizes_need_sweep(capsys):
    assert cli.main(["bench", "--shape", "2,4,2,2,2", "--repeat", "1"]) == 2
    assert "error: --shape with 5 sizes needs --sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--shape", "1,2,3,4,5,6"])
