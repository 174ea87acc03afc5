"""Data sources of the lab: MNIST-1D, IDX files, CSV and NPZ, and their errors."""

import gzip
import os

import numpy as np
import pytest
import torch

from batchnorm.lab import data


def test_mnist1d_standard_split_and_global_rng_untouched():
    np.random.seed(123)
    expected_next = np.random.RandomState(123).rand()  # what the global generator gives next
    dataset = data.mnist1d()
    assert dataset.x_train.shape == (4000, 40) and dataset.x_test.shape == (1000, 40)
    assert dataset.x_train.dtype == torch.float32 and dataset.y_train.dtype == torch.int64
    assert dataset.num_classes == 10
    assert set(dataset.y_train.tolist()) == set(range(10))
    # the package seeds numpy's global generator; load() puts it back
    data._MNIST1D_CACHE.clear()
    np.random.seed(123)
    data.mnist1d()
    assert np.random.rand() == expected_next
    # standardized as the package does: mean 0, std 1 over the whole set
    both = torch.cat([dataset.x_train, dataset.x_test])
    assert abs(both.mean().item()) < 1e-4 and abs(both.std().item() - 1) < 1e-3


def _write_idx(path, array, magic, compress):
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path + ".gz", "wb") as handle:
            handle.write(raw)
    else:
        with open(path, "wb") as handle:
            handle.write(raw)


def _fake_mnist(directory, compress=True, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (n_train, 28, 28)), 0x803),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, n_train), 0x801),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (n_test, 28, 28)), 0x803),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, n_test), 0x801),
    }
    for name, (array, magic) in parts.items():
        _write_idx(os.path.join(directory, name), array, magic, compress)
    return parts


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_reads_gzipped_and_raw(tmp_path, compress):
    parts = _fake_mnist(str(tmp_path), compress)
    dataset = data.load(f"mnist:{tmp_path}")
    assert dataset.x_train.shape == (12, 1, 28, 28) and dataset.x_test.shape == (5, 1, 28, 28)
    images = parts["train-images-idx3-ubyte"][0]
    torch.testing.assert_close(dataset.x_train[:, 0], torch.tensor(images / 255.0, dtype=torch.float32))
    assert dataset.y_test.tolist() == parts["t10k-labels-idx1-ubyte"][0].tolist()


def test_mnist_idx_errors_name_the_file(tmp_path):
    _fake_mnist(str(tmp_path), compress=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    raw = labels.read_bytes()
    labels.write_bytes(raw[:-1])  # one label short of the header's count
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte: 12 bytes, expected 13 for shape \(5,\)"):
        data.load(f"mnist:{tmp_path}")
    labels.write_bytes(b"\x00\x00\x08\x03" + raw[4:])
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte: magic number 0x00000803, expected 0x00000801"):
        data.load(f"mnist:{tmp_path}")
    labels.write_bytes((0x801).to_bytes(4, "big") + (6).to_bytes(4, "big") + bytes(6))
    with pytest.raises(data.DataError, match=r"5 images but .*t10k-labels-idx1-ubyte has 6 labels"):
        data.load(f"mnist:{tmp_path}")
    labels.unlink()
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\]: file not found"):
        data.load(f"mnist:{tmp_path}")
    with pytest.raises(data.DataError, match="not a directory"):
        data.load(f"mnist:{tmp_path / 'nowhere'}")


def test_csv_with_named_label_column(tmp_path):
    path = tmp_path / "points.csv"
    rows = ["a,b,kind"] + [f"{i},{-i * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    dataset = data.load(f"csv:{path}:kind")
    assert dataset.x_train.shape == (16, 2) and dataset.x_test.shape == (4, 2)
    assert dataset.num_classes == 2
    x = torch.cat([dataset.x_train, dataset.x_test])
    y = torch.cat([dataset.y_train, dataset.y_test])
    # each row keeps its label: odd a are cats (index 0 in sorted order), even a dogs
    assert torch.equal(y, (x[:, 0] % 2 == 0).long())
    torch.testing.assert_close(x[:, 1], -0.5 * x[:, 0])


def test_csv_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,label\n1,2,0\n3,x,1\n")
    with pytest.raises(data.DataError, match=r"bad.csv: line 3 has a value that is not a number: \[.3., .x., .1.\]"):
        data.load(f"csv:{path}")
    path.write_text("a,b,y\n1,2,0\n3,4,1\n")
    with pytest.raises(data.DataError, match=r"bad.csv: no label column 'label'; columns are \['a', 'b', 'y'\]"):
        data.load(f"csv:{path}")
    with pytest.raises(data.DataError, match="missing.csv: file not found"):
        data.load(f"csv:{tmp_path / 'missing.csv'}")


def test_npz_with_and_without_test_arrays(tmp_path):
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    y = np.arange(10) % 3
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    dataset = data.load(f"npz:{tmp_path / 'plain.npz'}")
    assert len(dataset.y_train) == 8 and len(dataset.y_test) == 2
    np.savez(tmp_path / "split.npz", x=x, y=y, x_test=x[:4], y_test=y[:4])
    dataset = data.load(f"npz:{tmp_path / 'split.npz'}")
    assert torch.equal(dataset.x_test, torch.tensor(x[:4], dtype=torch.float32))
    assert dataset.y_train.tolist() == y.tolist()


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(data.DataError, match=r"objects.npz: not a readable .npz archive without pickled objects"):
        data.load(f"npz:{tmp_path / 'objects.npz'}")
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 2)))
    with pytest.raises(data.DataError, match=r"noy.npz: no array 'y'; arrays are \['x'\]"):
        data.load(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "short.npz", x=np.zeros((3, 2)), y=np.zeros(2, dtype=int))
    with pytest.raises(data.DataError, match=r"short.npz: x must be \(N, ...\) and y \(N,\), got \(3, 2\) and \(2,\)"):
        data.load(f"npz:{tmp_path / 'short.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match=r"junk.npz: not a .npz archive \(not a zip file"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")


def test_digits():
    from sklearn.datasets import load_digits

    dataset = data.load("digits")
    assert dataset.example_shape == (1, 8, 8) and len(dataset.y_train) + len(dataset.y_test) == 1797
    assert dataset.x_train.min() == 0 and dataset.x_train.max() == 1  # pixels 0..16, scaled
    # every image is one of scikit-learn's, over 16, with its label
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16
    first = dataset.x_train[0, 0]
    index = int(((images - first).abs().flatten(1).sum(1)).argmin())
    assert torch.equal(images[index], first) and int(bunch.target[index]) == int(dataset.y_train[0])


def test_unknown_source():
    with pytest.raises(data.DataError, match=r"data must be one of mnist1d, digits, .*got 'cifar'"):
        data.load("cifar")
