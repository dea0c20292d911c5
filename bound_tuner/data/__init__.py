"""Data sets through one registry: ``load_dataset(name, m=..., seed=...)``.

Every loader returns a ``DataSplit`` with a training set of m points and a test set:

- the built-in sets (``swiss_roll``, ``gaussian``, ``two_moons``, ``ring``, and the image sets
  ``fashion_mnist`` and ``mnist`` from ``bound_tuner.data.images``);
- ``load_dataset("file", path=...)``: a user's .npy, .npz, .csv or .pt file, or a folder of
  images (``bound_tuner.data.files``);
- ``load_dataset("tensors", train=x, test=None)``: arrays or tensors in memory.

``prepare_for(split, model)`` applies what a model needs of its data, the same for the Python API
and for specs: images in [0, 1] become pixel bin centres in [-1, 1] for diffusion
(``bound_tuner.data.preprocess``); images for a VAE are flattened. The objectives call it, so a
split straight from ``load_dataset`` works with either model. Torch and scikit-learn are
imported only when data are loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bound_tuner.data.split import DataSplit

if TYPE_CHECKING:
    import torch

__all__ = [
    "DataSplit",
    "DATASETS",
    "IMAGE_SETS",
    "USER_SOURCES",
    "load_dataset",
    "prepare_for",
    "swiss_roll",
    "gaussian",
    "two_moons",
    "ring",
    "validate_points",
]

_LAZY = {
    "swiss_roll": "synthetic",
    "gaussian": "synthetic",
    "two_moons": "synthetic",
    "ring": "synthetic",
    "validate_points": "validate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swiss_roll(*, m: int, seed: int, test_size: int, **kw) -> DataSplit:
    from bound_tuner.data.synthetic import swiss_roll  # torch only when data are loaded

    # the test set is drawn with another seed: an independent sample of the same distribution
    train = swiss_roll(m, seed=seed, **kw)
    test = swiss_roll(test_size, seed=seed + 1_000_003, **kw)
    return DataSplit(train, test, "swiss_roll", {"m": m, "seed": seed, "d": 2})


def _points(name: str) -> Callable[..., DataSplit]:
    def load(*, m: int, seed: int, test_size: int, **kw) -> DataSplit:
        from bound_tuner.data import synthetic  # torch only when data are loaded

        draw = getattr(synthetic, name)
        train = draw(m, seed=seed, **kw)
        test = draw(test_size, seed=seed + 1_000_003, **kw)
        return DataSplit(train, test, name, {"m": m, "seed": seed, "d": 2})

    return load


def _gaussian(*, m: int, seed: int, test_size: int, d: int = 2, std: float = 2.0) -> DataSplit:
    from bound_tuner.data.synthetic import gaussian  # torch only when data are loaded

    train = gaussian(m, d=d, std=std, seed=seed)
    test = gaussian(test_size, d=d, std=std, seed=seed + 1_000_003)
    return DataSplit(train, test, "gaussian", {"m": m, "seed": seed, "d": d, "std": std})


def _image(name: str) -> Callable[..., DataSplit]:
    def load(**kw) -> DataSplit:
        from bound_tuner.data import images  # torch only when data are loaded

        split = images.load_image_dataset(name, **kw)
        split.info.setdefault("pixels", "[0, 1]")
        return split

    return load


IMAGE_SETS = ("fashion_mnist", "mnist")
# a user's own data: a file or image folder (data.path in a spec), or tensors from Python
USER_SOURCES = ("file", "tensors")

DATASETS: dict[str, Callable[..., DataSplit]] = {
    "swiss_roll": _swiss_roll,
    "gaussian": _gaussian,
    "two_moons": _points("two_moons"),
    "ring": _points("ring"),
    "fashion_mnist": _image("fashion_mnist"),
    "mnist": _image("mnist"),
}


def load_dataset(
    name: str,
    *,
    m: int | str | None = None,
    seed: int = 0,
    test_size: int = 1000,
    model: str | None = None,
    **kw,
) -> DataSplit:
    """Load data set ``name`` with m training points chosen by ``seed`` and a test split.

    For the image sets ``m=None`` or ``m="all"`` takes every training image. ``name="file"``
    reads ``path=...`` (``bound_tuner.data.files.load_file``: ``test_fraction``, ``image_size``,
    ``fit``, ``binarize``); ``name="tensors"`` takes ``train=...`` and optionally ``test=...``
    (``test_fraction`` splits when there is no test set). For both, ``m=None`` or ``"all"`` keeps
    every training point. ``model`` ("diffusion" or "vae") also applies ``prepare_for``.
    """
    from bound_tuner.data.validate import validate_points  # torch only when data are loaded

    if name in USER_SOURCES:
        from bound_tuner.data import files  # torch only when data are loaded

        if m == "all":
            m = None
        if name == "file":
            if "path" not in kw:
                raise ValueError('load_dataset("file", path=...) needs the path of the data file')
            split = files.load_file(kw.pop("path"), m=m, seed=seed, **kw)
        else:
            if "train" not in kw:
                raise ValueError('load_dataset("tensors", train=x) needs the training points x')
            split = files.load_tensors(kw.pop("train"), kw.pop("test", None), m=m, seed=seed, **kw)
        return prepare_for(split, model) if model is not None else split
    if name not in DATASETS:
        raise ValueError(
            f"unknown data set {name!r}; choose one of {', '.join(sorted(DATASETS))}, or "
            "'file' with path=... for your own data"
        )
    if m is None or m == "all":
        if name not in IMAGE_SETS:
            raise ValueError(
                f"m={m!r} (every training point) applies only to the image sets "
                f"{', '.join(IMAGE_SETS)}; give {name} an integer m of at least 2"
            )
        m = None
    elif not isinstance(m, int) or isinstance(m, bool) or m < 2:
        raise ValueError(
            f"m={m!r} must be an integer of at least 2 training points (or 'all' for image sets)"
        )
    split = DATASETS[name](m=m, seed=seed, test_size=test_size, **kw)
    split.train = validate_points(split.train, name=f"{name} training set")
    split.test = validate_points(split.test, name=f"{name} test set", min_points=1)
    return prepare_for(split, model) if model is not None else split


def _in_unit_range(x: torch.Tensor) -> bool:
    return x.numel() > 0 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def prepare_for(split: DataSplit, model: str) -> DataSplit:
    """The data as ``model`` ("diffusion" or "vae") trains on them; a new split, idempotent.

    Diffusion: images [n, C, H, W] with pixels in [0, 1] become the centres of their 8-bit bins
    in [-1, 1] (``preprocess.to_symmetric``), so held-out bits per dimension count 8-bit pixels;
    the UNet needs sides divisible by 4. VAE: images are flattened to [n, C*H*W]; the Bernoulli
    likelihood needs values in [0, 1] (binarized by the loader's ``binarize``, or grey values as
    Bernoulli means). Point data pass unchanged.
    """
    if model not in ("diffusion", "vae"):
        raise ValueError(f"model={model!r}; choose diffusion or vae")
    done = split.info.get("prepared_for")
    if done == model:
        return split
    if done is not None:
        raise ValueError(f"these data were prepared for a {done} model, not {model}; reload them")
    train, test, info = split.train, split.test, dict(split.info)
    if model == "diffusion" and train.dim() == 4:
        H, W = train.shape[2:]
        if H % 4 or W % 4:
            raise ValueError(
                f"images of {H}x{W} pixels do not fit the UNet (sides divisible by 4); set "
                f"data.image_size = {H - H % 4 or 4} (load_dataset(..., image_size=...))"
            )
        # pixels in [0, 1] as loaded (data scaled by hand already have values below 0)
        pixels = (
            info.get("pixels", "[0, 1]") == "[0, 1]"
            and _in_unit_range(train)
            and (test.numel() == 0 or _in_unit_range(test))
        )
        if pixels:
            from bound_tuner.data.preprocess import to_symmetric  # torch only when data are loaded

            train, test = to_symmetric(train), to_symmetric(test)
            info["pixels"] = "[-1, 1] bin centres"
            info["preprocess"] = "symmetric [-1, 1], bin centres"
    if model == "vae" and train.dim() == 4:
        # images for a VAE: flattened, [n, C*H*W], binarized (or not) by the loader
        info["image_shape"] = list(train.shape[1:])
        train = train.reshape(train.shape[0], -1)
        test = test.reshape(test.shape[0], -1)
        info["flatten"] = True
    info["prepared_for"] = model
    return dataclasses.replace(split, train=train, test=test, info=info)
