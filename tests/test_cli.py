"""The command line: bench on one small shape, --help, a bad argument."""

import re
import subprocess
import sys

import pytest

from batchnorm import cli


def test_bench_prints_a_filled_table(capsys, tmp_path):
    out = tmp_path / "bench.md"
    assert (
        cli.main(
            ["bench", "--shape", "128,16,40", "--repeat", "2", "--no-compile", "--no-interleaved", "--out", str(out)]
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


def test_help():
    result = subprocess.run([sys.executable, "-m", "batchnorm.cli", "bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--repeat" in result.stdout and "--shape" in result.stdout


def test_bad_shape(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["bench", "--shape", "64,x"])
    assert error.value.code == 2
    assert "--shape must be comma-separated integers like 64,64,32,32, got '64,x'" in capsys.readouterr().err
