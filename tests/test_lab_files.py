"""The lab's files and command line under bad input: crafted, damaged or foreign checkpoints
and kept runs, bad output folders and data files. Each is refused in one line that names
the file or argument, with exit status 2, before anything is trained or written."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from batchnorm import cli
from batchnorm.lab import checkpoints, data, experiments, report
from batchnorm.lab import train as train_module

TRAIN = ["train", "--steps", "20", "--eval-every", "10", "--batch-size", "30", "--checkpoint-every", "10"]


class _RunsACommand:
    """A pickled object whose unpickling would run a shell command (touch a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _listing(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, code, *fragments):
    """Exit status 2 and one line on stderr, `batchnorm <command>: error: ...`, holding each fragment."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and " error: " in lines[0], err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def checkpointed(tmp_path, capsys):
    """A real run folder with a checkpoint at step 10 of 20 (the run stopped there)."""
    out = tmp_path / "run"
    assert cli.main([*TRAIN[:2], "10", *TRAIN[3:], "--out", str(out)]) == 0
    capsys.readouterr()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["steps"] = 20  # as if a 20-step run had been stopped after its checkpoint at 10
    torch.save(state, out / "checkpoint.pt")
    (out / "metrics.json").unlink()
    (out / "metrics.csv").unlink()
    return out


def test_the_real_checkpoint_resumes(checkpointed, capsys):
    """The control: the fixture's checkpoint is one that --resume takes."""
    assert cli.main([*TRAIN, "--out", str(checkpointed), "--resume"]) == 0
    assert "step 20" in capsys.readouterr().out


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(checkpointed, tmp_path, capsys):
    marker = tmp_path / "ran"
    state = torch.load(checkpointed / "checkpoint.pt", weights_only=True)
    state["metrics"] = [_RunsACommand(marker)]
    torch.save(state, checkpointed / "checkpoint.pt")
    before = _listing(checkpointed)
    code = cli.main([*TRAIN, "--out", str(checkpointed), "--resume"])
    _refused(capsys, code, checkpointed / "checkpoint.pt", "refused", "GLOBAL posix.system")
    assert not marker.exists()
    assert _listing(checkpointed) == before


def test_a_crafted_kept_run_is_refused_and_runs_nothing(tmp_path, capsys):
    marker, out = tmp_path / "ran", tmp_path / "report"
    (out / "runs").mkdir(parents=True)
    torch.save({"config": {}, "metrics": [_RunsACommand(marker)], "state": b""}, out / "runs" / "0123456789abcdef.pt")
    before = _listing(out)
    code = cli.main(["experiment", "placement", "--scale", "tiny", "--out", str(out)])
    _refused(capsys, code, out / "runs" / "0123456789abcdef.pt", "refused")
    assert not marker.exists()
    assert _listing(out) == before


def _damage(path, how):
    raw = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        state = torch.load(path, weights_only=True)
        if how == "missing key":
            del state["optimizer"]
        elif how == "size mismatch":
            state["model"]["1.weight"] = torch.zeros(7, 3)
        elif how == "step past --steps":
            state["step"] = 999
        elif how == "not a dict":
            state = [1, 2]
        torch.save(state, path)


@pytest.mark.parametrize(
    "how, says",
    [
        ("empty", "not a checkpoint: the file is empty"),
        ("truncated", "not a readable checkpoint (truncated or damaged)"),
        ("random bytes", "not a checkpoint: the file is not a file written by torch.save"),
        ("missing key", "no 'optimizer' in it"),
        ("size mismatch", "does not fit this configuration's model: Error(s) in loading state_dict"),
        ("step past --steps", "is at step 999, outside 1..20 (--steps)"),
        ("not a dict", "it holds a list, not a dict"),
    ],
)
def test_a_damaged_or_foreign_checkpoint_is_refused(checkpointed, capsys, how, says):
    path = checkpointed / "checkpoint.pt"
    _damage(path, how)
    before = _listing(checkpointed)
    code = cli.main([*TRAIN, "--out", str(checkpointed), "--resume"])
    _refused(capsys, code, path, says)
    assert _listing(checkpointed) == before


def test_a_checkpoint_of_another_configuration_says_what_differs(checkpointed, capsys):
    code = cli.main([*TRAIN, "--width", "50", "--out", str(checkpointed), "--resume"])
    _refused(capsys, code, "was written with another configuration: width=100 (now 50)")


def test_all_kept_runs_truncated_is_refused_before_training(tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    assert cli.main(["experiment", "placement", "--scale", "tiny", "--out", str(out)]) == 0
    capsys.readouterr()
    kept = sorted((out / "runs").glob("*.pt"))
    assert len(kept) >= 2
    for path in kept:
        _damage(path, "truncated")
    before = _listing(out)
    monkeypatch.setattr(experiments, "train", _must_not_train)
    code = cli.main(["experiment", "placement", "--scale", "tiny", "--out", str(out)])
    _refused(capsys, code, kept[0], "not a readable kept run (truncated or damaged)")
    assert _listing(out) == before


def _must_not_train(*args, **kwargs):
    raise AssertionError("trained before the error")


@pytest.mark.parametrize("command", [TRAIN, ["experiment", "placement", "--scale", "tiny"]], ids=["train", "lab"])
def test_out_under_a_regular_file_is_refused_before_training(tmp_path, capsys, monkeypatch, command):
    (tmp_path / "file").write_text("keep me")
    monkeypatch.setattr(train_module, "train", _must_not_train)
    monkeypatch.setattr(experiments, "train", _must_not_train)
    for out, says in [
        (tmp_path / "file" / "sub", "is a file, not a directory"),
        (tmp_path / "file", "not a directory"),
    ]:
        code = cli.main([*command, "--out", str(out)])
        _refused(capsys, code, f"--out {out}", says)
    assert _listing(tmp_path) == {tmp_path / "file": b"keep me"}


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--lr", "inf"], "lr must be a positive finite number, got lr=inf"),
        (["--lr", "nan"], "lr must be a positive finite number, got lr=nan"),
        (["--dropout", "1.5"], "dropout must be a number in [0, 1), got dropout=1.5"),
        (["--bn-momentum", "2"], "bn_momentum must be in [0, 1] or None, got bn_momentum=2.0"),
    ],
)
def test_bad_numbers_are_refused(tmp_path, capsys, argv, says):
    code = cli.main([*TRAIN, *argv, "--out", str(tmp_path / "run")])
    _refused(capsys, code, says)
    assert not (tmp_path / "run").exists()


def test_a_cnn_on_three_features_is_refused(tmp_path, capsys):
    path = tmp_path / "three.csv"
    rows = ["a,b,c,label"] + [f"{i},{i + 1},{i * 2},{i % 2}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    code = cli.main([*TRAIN, "--model", "cnn", "--data", f"csv:{path}", "--out", str(tmp_path / "run")])
    _refused(capsys, code, "cnn pools by 2 in each of its 2 blocks: it needs examples of at least 4 values")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ data files


def test_npz_errors_name_the_file(tmp_path):
    def saved(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return f"npz:{tmp_path / name}"

    x, y = np.random.default_rng(0).normal(size=(20, 4)), np.arange(20) % 3
    cases = [
        (saved("features.npz", x=x, y=y, x_test=x[:5, :3], y_test=y[:5]), "x_test examples are (3,), x examples (4,)"),
        (saved("complex.npz", x=x + 1j, y=y), "x must hold real numbers (integers or floats), got dtype complex128"),
        (saved("complex_y.npz", x=x, y=y + 1j), "complex labels"),
        (saved("million.npz", x=x, y=np.where(y == 2, 1_000_000, y)), "label 1000000 would make a model of 1000001"),
        (saved("million_float.npz", x=x, y=np.where(y == 2, 1e6, y)), "label 1000000.0 would make a model"),
    ]
    for spec, says in cases:
        with pytest.raises(data.DataError) as info:
            data.load(spec)
        assert str(info.value).startswith(spec[4:] + ":") and says in str(info.value), str(info.value)
    (tmp_path / "renamed.npz").write_bytes(b"\x93NUMPY not a zip")
    with pytest.raises(data.DataError, match=r"renamed.npz: not a .npz archive"):
        data.load(f"npz:{tmp_path / 'renamed.npz'}")
    assert len(data.load(saved("fine.npz", x=x, y=y)).y_train) == 16  # the control


def test_csv_errors_and_byte_order_mark(tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("a,label\n1,0\n")
    with pytest.raises(data.DataError, match=r"one.csv: 1 example\(s\), too few to split"):
        data.load(f"csv:{one}")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("caf\u00e9,label\n1,0\n2,1\n3,0\n".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1.csv: not UTF-8 text \(byte 3 is 0xe9\)"):
        data.load(f"csv:{bad}")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbflabel,a,b\n" + b"".join(f"{i % 2},{i},{-i}\n".encode() for i in range(10)))
    dataset = data.load(f"csv:{bom}")  # the first column is "label", not "\ufefflabel"
    assert dataset.num_features == 2 and sorted(set(dataset.y_train.tolist()) | set(dataset.y_test.tolist())) == [0, 1]


def test_idx_header_dimensions_that_overflow_name_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    big = 2**32 - 1
    path.write_bytes((0x803).to_bytes(4, "big") + b"".join(big.to_bytes(4, "big") for _ in range(3)) + b"\0" * 8)
    expected = 16 + big**3  # past int64: np.prod wrapped around
    with pytest.raises(data.DataError, match=rf"train-images-idx3-ubyte: 24 bytes, expected {expected} for shape"):
        data.read_idx(str(path), 3)


# ------------------------------------------------------------------ kept runs and writes


def _dataset(seed, n=240, features=40):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return data.Dataset("same-name", x[:200], y[:200], x[200:], y[200:])


def test_kept_runs_are_keyed_on_the_data_values(tmp_path):
    """The same --data string with other values of the same shape, or of another shape,
    trains anew instead of reading the old runs (which gave stale accuracies, or crashed)."""
    scale = experiments.SCALES["tiny"]
    lines = []
    first = experiments.Lab(scale, _dataset(0), store=str(tmp_path), log=lines.append).runs(norm="bn")
    for other in (_dataset(1), _dataset(2, features=30)):
        lines.clear()
        again = experiments.Lab(scale, other, store=str(tmp_path), log=lines.append).runs(norm="bn")
        assert [line.split()[0] for line in lines] == ["train", "train"]
        assert again[0].metrics != first[0].metrics
    lines.clear()
    kept = experiments.Lab(scale, _dataset(0), store=str(tmp_path), log=lines.append).runs(norm="bn")
    assert [line.split()[0] for line in lines] == ["kept", "kept"]  # the control
    assert kept[0].metrics == first[0].metrics


def test_save_fsyncs_the_file_and_the_directory_before_and_after_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "checkpoint.pt"
    checkpoints.save_atomically({"x": torch.ones(2)}, str(target))
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert os.path.basename(calls[0][1]).startswith(".partial-checkpoint.pt-")
    assert calls[2][1] == str(tmp_path)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))


def test_a_killed_write_leaves_no_partial_file_for_good(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    checkpoints.save_atomically({"step": 1}, str(target))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".partial-checkpoint.pt-abc123.{dead.pid}.tmp"  # a writer killed mid-write
    stale.write_bytes(b"PK\x03\x04half")
    live = tmp_path / f".partial-other.pt-def456.{os.getppid()}.tmp"  # another process, still writing
    live.write_bytes(b"PK")

    def interrupted(obj, stream):
        stream.write(b"PK\x03\x04part")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_atomically({"step": 2}, str(target))
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [live.name, "checkpoint.pt"]  # the killed writer's file went, this one's too
    assert checkpoints.load(str(target), {"step": int})["step"] == 1  # the old file is intact


def test_a_second_report_into_the_same_folder_drops_the_first_ones_figures(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["experiment", "placement", "--scale", "tiny", "--out", str(out)]) == 0
    assert (out / "placement-1.png").exists()
    (out / "notes.png").write_bytes(b"mine")  # not a figure of the lab: left alone
    assert cli.main(["experiment", "fig1", "--scale", "tiny", "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["fig1-1.png", "fig1-2.png", "notes.png"]
    assert report.EXPERIMENTS  # the names the cleanup matches


def test_inspect_reports_a_real_checkpoint_and_refuses_a_crafted_one(checkpointed, tmp_path, capsys):
    """batchnorm inspect on the lab's checkpoint: the report table with every batch-norm layer of
    the paper's MLP (three), over the batches asked for; a crafted file is refused, nothing run."""
    path = checkpointed / "checkpoint.pt"
    assert cli.main(["inspect", str(path), "--batches", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: step 10, 3 training batches of 30" in out
    rows = [line for line in out.splitlines() if "| BatchNorm1d |" in line]
    assert len(rows) == 3 and all("| 0.1 | train |" in row for row in rows)
    marker = tmp_path / "ran"
    state = torch.load(path, weights_only=True)
    state["metrics"] = [_RunsACommand(marker)]
    torch.save(state, path)
    _refused(capsys, cli.main(["inspect", str(path)]), path, "refused")
    assert not marker.exists()
