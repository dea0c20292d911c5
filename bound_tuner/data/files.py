"""A user's own data: a file of points, a folder of images, or tensors in memory.

Formats (by suffix; a folder is read as images):

- ``.npy``: one array [n, d] (or [n, C, H, W]).
- ``.npz``: an array ``train`` and, optionally, ``test`` (the held-out set).
- ``.csv``: numeric columns, one point per row, comma separated; a first row that is not numeric
  is taken as a header and skipped.
- ``.pt``: a tensor saved with ``torch.save`` (read with ``weights_only=True``), or a dict with
  tensors ``train`` and optionally ``test``.
- a folder of PNG or JPEG files (read with torchvision, not its subfolders): pixels in [0, 1],
  [n, 1, H, W] when every image is grayscale, else [n, 3, H, W] (grayscale images repeated over
  the three channels; an alpha channel is dropped). Images of several sizes need a rule:
  ``image_size = S`` (or ``[H, W]``) with ``fit = "resize"`` (the default: bilinear, antialiased,
  the aspect ratio is not kept) or ``fit = "pad"`` (centred on a black canvas of that size; a
  larger image is centre-cropped). Files of other types in the folder are ignored.

Without a test set in the file, ``test_fraction`` (default 0.2) of the points, drawn by ``seed``,
are held out (0: none, every point trains); ``m`` keeps the first m of a permutation of the
rest drawn from ``seed`` (None: all of them). Every problem raises ``DataFileError`` with one
line naming the file, the problem and the mend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bound_tuner.data.split import DataSplit
from bound_tuner.data.validate import validate_points

if TYPE_CHECKING:
    from bound_tuner.data.split import DataSplit

__all__ = [
    "DataFileError",
    "IMAGE_SUFFIXES",
    "POINT_SUFFIXES",
    "FITS",
    "load_file",
    "load_tensors",
    "read_image_folder",
    "read_points",
]

POINT_SUFFIXES = (".npy", ".npz", ".csv", ".pt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FITS = ("resize", "pad")
DEFAULT_TEST_FRACTION = 0.2
_FORMATS = "a .npy, .npz, .csv or .pt file, or a folder of PNG/JPEG images"


class DataFileError(ValueError):
    """A data file that cannot be used; the message is one line with the mend."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


# ----------------------------------------------------------------------------- point files


def _as_array(value: Any, path: Path, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise DataFileError(f"{path}: {what} is a {type(value).__name__}, not an array of numbers")
    if value.dtype == np.bool_ or not (
        np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
    ):
        raise DataFileError(
            f"{path}: {what} has dtype {value.dtype}; save numbers (float or integer) instead"
        )
    return value


def _read_csv(path: Path) -> np.ndarray:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise DataFileError(
            f"{path}: not a text file; save the points as comma-separated numbers"
        ) from None
    if not lines:
        raise DataFileError(
            f"{path} is empty; write one point per row, its numbers comma-separated"
        )

    def numbers(line: str) -> list[float] | None:
        try:
            return [float(v) for v in line.split(",")]
        except ValueError:
            return None

    start = 0 if numbers(lines[0]) is not None else 1  # a first row of names is a header
    rows = []
    for i, line in enumerate(lines[start:], start=start + 1):
        row = numbers(line)
        if row is None:
            raise DataFileError(
                f"{path}: row {i} ({line[:40]!r}) is not all numbers; keep numeric columns only"
            )
        if rows and len(row) != len(rows[0]):
            raise DataFileError(
                f"{path}: row {i} has {len(row)} columns, the rows before it {len(rows[0])}; "
                "give every row the same columns"
            )
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)


def read_points(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """The training array and the test array (None if the file has none) of a point file."""
    path = Path(path)
    suffix = path.suffix.lower()
    test = None
    try:
        if suffix == ".npy":
            train = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "train" not in z.files:
                    raise DataFileError(
                        f"{path} holds {', '.join(z.files) or 'no arrays'} but no 'train'; save it "
                        "with np.savez(path, train=x) (optionally test=y)"
                    )
                train = z["train"]
                test = z["test"] if "test" in z.files else None
        elif suffix == ".csv":
            train = _read_csv(path)
        elif suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if "train" not in obj:
                    raise DataFileError(
                        f"{path} holds a dict without 'train'; save a tensor, or "
                        "{'train': x, 'test': y}"
                    )
                train, test = obj["train"], obj.get("test")
            else:
                train = obj
        else:
            raise DataFileError(f"{path}: unknown file type {suffix!r}; give {_FORMATS}")
    except DataFileError:
        raise
    except Exception as e:  # a damaged or foreign file: numpy, zipfile and pickle errors alike
        raise DataFileError(
            f"{path} is not a readable {suffix} file ({type(e).__name__}: {_one_line(e)}); "
            "save it again"
        ) from None
    train = _as_array(train, path, "the data")
    if test is not None:
        test = _as_array(test, path, "'test'")
    return train, test


# ----------------------------------------------------------------------------- image folders


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise DataFileError(f"image_size = {value!r} must be a positive integer or [height, width]")
    return int(value[0]), int(value[1])


def _fit_image(img: torch.Tensor, size: tuple[int, int], fit: str) -> torch.Tensor:
    """One image [C, h, w] (uint8) at ``size`` by the rule ``fit``."""
    if tuple(img.shape[1:]) == size:
        return img
    if fit == "resize":
        from torchvision.transforms.functional import resize

        return resize(img, list(size), antialias=True)
    from torchvision.transforms.functional import center_crop

    H, W = size
    h, w = img.shape[1:]
    if h > H or w > W:
        img = center_crop(img, [min(h, H), min(w, W)])
        h, w = img.shape[1:]
    top, left = (H - h) // 2, (W - w) // 2
    return torch.nn.functional.pad(img, (left, W - w - left, top, H - h - top))


def read_image_folder(
    folder: str | os.PathLike, *, image_size: Any = None, fit: str | None = None
) -> tuple[torch.Tensor, dict]:
    """Images [n, C, H, W] in [0, 1] from the PNG/JPEG files of ``folder`` (sorted by name)."""
    folder = Path(folder)
    if fit is not None and fit not in FITS:
        raise DataFileError(f"fit = {fit!r}; choose one of {', '.join(FITS)}")
    if fit is not None and image_size is None:
        raise DataFileError(f'fit = "{fit}" needs image_size = S (or [H, W]) to fit the images to')
    size = _size(image_size) if image_size is not None else None
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataFileError(f"{folder} is a folder without PNG or JPEG images; give {_FORMATS}")
    import warnings

    with warnings.catch_warnings():  # torchvision marks its image decoders as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image, read_file

    images = []
    for p in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                img = decode_image(read_file(str(p)), mode=ImageReadMode.UNCHANGED)
        except Exception as e:
            raise DataFileError(
                f"{p} is not a readable image ({_one_line(e)}); replace or remove it"
            ) from None
        if img.dtype != torch.uint8:
            raise DataFileError(f"{p} has {img.dtype} pixels; save it with 8 bits per channel")
        if img.shape[0] in (2, 4):  # drop alpha
            img = img[: img.shape[0] - 1]
        images.append(img)
    rgb = any(img.shape[0] == 3 for img in images)
    if rgb:
        images = [img.expand(3, -1, -1) if img.shape[0] == 1 else img for img in images]
    sizes = sorted({tuple(img.shape[1:]) for img in images})
    if size is None:
        if len(sizes) > 1:
            (h0, w0), (h1, w1) = sizes[0], sizes[-1]
            raise DataFileError(
                f"{folder} has images of {len(sizes)} sizes ({h0}x{w0} to {h1}x{w1}); set "
                f'data.image_size = {max(h1, w1)} and data.fit = "resize" or "pad" to bring them '
                "to one size"
            )
        size = sizes[0]
    fit = fit or "resize"
    x = torch.stack([_fit_image(img, size, fit) for img in images]).float() / 255.0
    info = {
        "source": str(folder),
        "files": len(files),
        "shape": list(x.shape[1:]),
        "d": int(x[0].numel()),
        "color": "rgb" if rgb else "grayscale",
        "image_size": list(size),
        "fit": fit if len(sizes) > 1 or sizes[0] != size else None,
        "pixels": "[0, 1]",
    }
    return x, info


# ----------------------------------------------------------------------------- splits


def _split(
    x: torch.Tensor,
    test: torch.Tensor | None,
    *,
    m: int | None,
    seed: int,
    test_fraction: float | None,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    info: dict[str, Any] = {}
    n = int(x.shape[0])
    if test is not None:
        if test_fraction not in (None, DEFAULT_TEST_FRACTION):
            raise DataFileError(
                f"{where} has its own test set; remove test_fraction (it splits files without one)"
            )
        pool = torch.arange(n)
        info["test_from"] = "file"
    else:
        frac = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
            raise DataFileError(
                f"test_fraction = {frac!r} must be a number in [0, 1) (0: no held-out points)"
            )
        n_test = 0 if frac == 0 else max(1, round(frac * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        pool, test_idx = perm[: n - n_test], perm[n - n_test :].sort().values
        test = x[test_idx]
        info.update(test_from="split", test_fraction=float(frac))
    if pool.numel() < 2:
        raise DataFileError(
            f"{where} leaves {pool.numel()} training point(s) after holding out the test "
            "set; at least 2 are needed (add points or lower test_fraction)"
        )
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, int) or not 2 <= m <= pool.numel():
            raise DataFileError(
                f"m = {m!r}; {where} has {pool.numel()} training points, choose 2 <= m <= "
                f"{pool.numel()} or leave m out (all of them)"
            )
        g = torch.Generator().manual_seed(seed + 1)
        pool = pool[torch.randperm(pool.numel(), generator=g)[:m]]
    train = x[pool]
    info.update(m=int(train.shape[0]), pool_size=int(n), test_size=int(test.shape[0]))
    return train, test, info


def _check(x: torch.Tensor, where: str, *, min_points: int) -> torch.Tensor:

    try:
        return validate_points(x, name=where, min_points=min_points)
    except ValueError as e:
        raise DataFileError(str(e)) from None


def _points_tensor(a: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        if a.ndim < 2:
            raise DataFileError(
                f"{where} has shape {a.shape}; expected [n, d] (save a 1-D data set as x[:, None])"
            )
        a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return a


def load_tensors(
    train: Any,
    test: Any = None,
    *,
    m: int | None = None,
    seed: int = 0,
    test_fraction: float | None = None,
    name: str = "tensors",
) -> DataSplit:
    """A ``DataSplit`` from arrays or tensors in memory, split as a file would be."""

    x = _check(_points_tensor(train, name), name, min_points=2)
    t = None
    if test is not None:
        t = _check(_points_tensor(test, f"{name} test set"), f"{name} test set", min_points=1)
        if t.shape[1:] != x.shape[1:]:
            raise DataFileError(
                f"{name}: test points have shape {tuple(t.shape[1:])}, training points "
                f"{tuple(x.shape[1:])}; give both the same shape"
            )
    tr, te, info = _split(x, t, m=m, seed=seed, test_fraction=test_fraction, where=name)
    info.update(seed=seed, d=int(tr[0].numel()), shape=list(tr.shape[1:]))
    if tr.dim() == 4 and float(tr.min()) >= 0 and float(tr.max()) <= 1:
        info["pixels"] = "[0, 1]"
    return DataSplit(tr, te, name, info)


def load_file(
    path: str | os.PathLike,
    *,
    m: int | None = None,
    seed: int = 0,
    test_fraction: float | None = None,
    image_size: Any = None,
    fit: str | None = None,
    binarize: str | None = None,
) -> DataSplit:
    """A ``DataSplit`` from a user's file or image folder (see the module docstring).

    ``binarize = "fixed"`` draws binary pixels x ~ Bernoulli(x) once by ``seed`` (the test set
    by a fixed seed); ``"dynamic"`` leaves the grey values for the VAE to resample per epoch.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFileError(f"data file {str(path)!r} not found; check data.path ({_FORMATS})")
    if binarize not in (None, "fixed", "dynamic"):
        raise DataFileError(f"binarize = {binarize!r}; choose fixed or dynamic (or leave it out)")
    where = str(path)
    if path.is_dir():
        x, info = read_image_folder(path, image_size=image_size, fit=fit)
        x = _check(x, where, min_points=2)
        test = None
    else:
        if image_size is not None or fit is not None:
            raise DataFileError(
                f"{where}: image_size and fit apply to a folder of images, not to a "
                f"{path.suffix} file; remove them"
            )
        try:
            arr, test_arr = read_points(path)
        except OSError as e:
            raise DataFileError(
                f"{where} cannot be read ({_one_line(e)}); check its permissions"
            ) from None
        x = _check(_points_tensor(arr, where), where, min_points=2)
        test = None
        if test_arr is not None:
            test = _check(
                _points_tensor(test_arr, f"{where} 'test'"), f"{where} 'test'", min_points=1
            )
            if test.shape[1:] != x.shape[1:]:
                raise DataFileError(
                    f"{where}: 'test' has points of shape {tuple(test.shape[1:])}, 'train' "
                    f"{tuple(x.shape[1:])}; give both the same shape"
                )
        info = {"source": where, "shape": list(x.shape[1:]), "d": int(x[0].numel())}
        if x.dim() == 4 and float(x.min()) >= 0 and float(x.max()) <= 1:
            info["pixels"] = "[0, 1]"
    train, test, split_info = _split(
        x, test, m=m, seed=seed, test_fraction=test_fraction, where=where
    )
    info.update(split_info, seed=seed)
    if binarize is not None:
        if not (float(x.min()) >= 0 and float(x.max()) <= 1):
            raise DataFileError(
                f"{where}: binarize needs values in [0, 1] (pixel intensities); remove it"
            )
        if binarize == "fixed":
            g = torch.Generator().manual_seed(seed)
            train = (torch.rand(train.shape, generator=g) < train).float()
            g = torch.Generator().manual_seed(1_000_003)
            test = (torch.rand(test.shape, generator=g) < test).float()
        info.update(binarize=binarize, dynamic_binarize=binarize == "dynamic")

    return DataSplit(train, test, path.name, info)
