"""A user's own data: every file format, image folders, splits, bad files, and one pipeline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bound_tuner.cli import main
from bound_tuner.config.schema import SpecError
from bound_tuner.config.spec import load_spec
from bound_tuner.data import load_dataset, prepare_for
from bound_tuner.data.files import DataFileError, load_file
from bound_tuner.data.split import DataSplit

RNG = np.random.default_rng(0)
POINTS = RNG.normal(size=(50, 3)).astype(np.float32)


def _rows(split: DataSplit) -> set[tuple]:
    return {tuple(np.round(r, 5)) for r in torch.cat([split.train, split.test]).numpy()}


# ----------------------------------------------------------------------------- formats


def test_npy_split_by_seed_and_subset(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, POINTS)
    a = load_file(path, seed=1)
    # 20% held out by default: 10 test points, 40 training points, together the file
    assert a.train.shape == (40, 3) and a.test.shape == (10, 3)
    assert _rows(a) == {tuple(np.round(r, 5)) for r in POINTS}
    assert not ({tuple(r) for r in a.train.tolist()} & {tuple(r) for r in a.test.tolist()})
    again, other = load_file(path, seed=1), load_file(path, seed=2)
    assert torch.equal(a.train, again.train) and torch.equal(a.test, again.test)
    assert not torch.equal(a.test, other.test)
    sub = load_file(path, seed=1, m=12, test_fraction=0.5)
    assert sub.train.shape == (12, 3) and sub.test.shape == (25, 3)
    assert sub.info["pool_size"] == 50 and sub.info["test_fraction"] == 0.5
    none_held = load_file(path, test_fraction=0)
    assert none_held.train.shape == (50, 3) and none_held.test.shape == (0, 3)


def test_npz_with_and_without_test(tmp_path):
    np.savez(tmp_path / "a.npz", train=POINTS[:30], test=POINTS[30:])
    s = load_file(tmp_path / "a.npz")
    assert torch.equal(s.train.sort(0).values, torch.from_numpy(POINTS[:30]).sort(0).values)
    assert torch.equal(s.test, torch.from_numpy(POINTS[30:]))
    assert s.info["test_from"] == "file"
    np.savez(tmp_path / "b.npz", train=POINTS)
    assert load_file(tmp_path / "b.npz").test.shape == (10, 3)


def test_csv_with_and_without_header(tmp_path):
    body = "\n".join(",".join(f"{v:.6f}" for v in row) for row in POINTS)
    (tmp_path / "h.csv").write_text("a,b,c\n" + body + "\n")
    (tmp_path / "n.csv").write_text(body)
    h = load_file(tmp_path / "h.csv", test_fraction=0)
    n = load_file(tmp_path / "n.csv", test_fraction=0)
    assert h.train.shape == (50, 3)
    np.testing.assert_allclose(np.sort(h.train.numpy(), 0), np.sort(POINTS, 0), atol=1e-6)
    assert torch.equal(h.train, n.train)


def test_pt_tensor_and_dict(tmp_path):
    torch.save(torch.from_numpy(POINTS), tmp_path / "t.pt")
    torch.save(
        {"train": torch.from_numpy(POINTS[:20]), "test": torch.ones(3, 3)}, tmp_path / "d.pt"
    )
    assert load_file(tmp_path / "t.pt").train.shape == (40, 3)
    d = load_file(tmp_path / "d.pt")
    assert d.train.shape == (20, 3) and torch.equal(d.test, torch.ones(3, 3))


def test_tensors_from_python():
    s = load_dataset("tensors", train=torch.from_numpy(POINTS), seed=3, m=8)
    assert s.train.shape == (8, 3) and s.test.shape == (10, 3)
    t = load_dataset("tensors", train=POINTS, test=POINTS[:5])
    assert t.train.shape == (50, 3) and t.test.shape == (5, 3)


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_image_folder_grayscale_rgb_and_sizes(tmp_path):
    gray = tmp_path / "gray"
    gray.mkdir()
    levels = RNG.integers(0, 256, size=(5, 12, 12), dtype=np.uint8)
    for i, a in enumerate(levels):
        _png(gray / f"{i}.png", a)
    (gray / "notes.txt").write_text("ignored")
    s = load_file(gray, test_fraction=0)
    assert s.train.shape == (5, 1, 12, 12) and s.info["color"] == "grayscale"
    # pixels k/255, in file order of the permutation: the same multiset of images
    got = sorted((s.train[:, 0] * 255).round().to(torch.uint8).numpy().sum(axis=(1, 2)).tolist())
    assert got == sorted(levels.astype(np.int64).sum(axis=(1, 2)).tolist())

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _png(mixed / "a.png", levels[0])
    Image.fromarray(RNG.integers(0, 256, size=(16, 8, 3), dtype=np.uint8)).save(mixed / "b.jpg")
    with pytest.raises(DataFileError, match=r"2 sizes \(12x12 to 16x8\).*image_size = 16"):
        load_file(mixed)
    r = load_file(mixed, image_size=8, test_fraction=0)
    assert r.train.shape == (2, 3, 8, 8) and r.info["color"] == "rgb"
    p = load_file(mixed, image_size=[16, 12], fit="pad", test_fraction=0)
    assert p.train.shape == (2, 3, 16, 12)
    # padding keeps the pixels: the 12x12 gray image sits in the middle of a black 16x12 canvas
    idx = [i for i in range(2) if p.train[i, :, :2].sum() == 0]
    assert len(idx) == 1
    np.testing.assert_allclose((p.train[idx[0], 0, 2:14] * 255).round().numpy(), levels[0], atol=0)


def test_rgba_png_loses_alpha(tmp_path):
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"{i}.png", RNG.integers(0, 256, size=(4, 4, 4), dtype=np.uint8))
    assert load_file(folder, test_fraction=0).train.shape == (3, 3, 4, 4)


# ----------------------------------------------------------------------------- bad files


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    out["missing"] = (tmp / "nope.npy", "not found")
    p = tmp / "corrupt.npy"
    p.write_bytes(b"\x93NUMPY garbage")
    out["unreadable"] = (p, "not a readable .npy file")
    p = tmp / "vector.npy"
    np.save(p, np.arange(5.0))
    out["wrong shape"] = (p, r"shape \(5,\); expected \[n, d\]")
    p = tmp / "nan.npy"
    x = POINTS.copy()
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    np.save(p, x)
    out["nan"] = (p, r"NaN or infinite values in 2 point\(s\) \(first rows \[3, 7\]\)")
    p = tmp / "one.npy"
    np.save(p, POINTS[:1])
    out["one point"] = (p, r"1 point\(s\); at least 2")
    p = tmp / "strings.csv"
    p.write_text("a,b\n1,2\n3,x\n")
    out["csv text"] = (p, "row 3")
    p = tmp / "ragged.csv"
    p.write_text("1,2\n3,4,5\n")
    out["csv ragged"] = (p, "row 2 has 3 columns")
    p = tmp / "notrain.npz"
    np.savez(p, data=POINTS)
    out["npz no train"] = (p, "no 'train'")
    p = tmp / "pickle.pt"
    torch.save({"train": torch.ones(3, 2), "extra": Path("x")}, p)
    out["pt pickle"] = (p, "not a readable .pt file")
    p = tmp / "docs"
    p.mkdir()
    (p / "a.txt").write_text("x")
    out["no images"] = (p, "folder without PNG or JPEG images")
    p = tmp / "broken"
    p.mkdir()
    (p / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out["broken image"] = (p, "a.png is not a readable image")
    p = tmp / "x.txt"
    p.write_text("1,2")
    out["suffix"] = (p, "unknown file type '.txt'")
    return out


def test_bad_files_raise_one_line(tmp_path):
    for what, (path, pattern) in _bad_files(tmp_path).items():
        with pytest.raises(DataFileError, match=pattern) as e:
            load_file(path)
        assert "\n" not in str(e.value), what
    with pytest.raises(DataFileError, match="choose 2 <= m <= 40"):
        load_file(_write(tmp_path / "ok.npy"), m=41)
    with pytest.raises(DataFileError, match="leaves 1 training point"):
        load_file(_write(tmp_path / "two.npy", POINTS[:2]), test_fraction=0.5)


def _write(path: Path, x: np.ndarray = POINTS) -> Path:
    np.save(path, x)
    return path


SPEC = """
[study]
name = "own"
n_trials = 2
[data]
path = "{path}"
{extra}
[search]
T = {{ grid = [0.3, 0.6] }}
[training]
steps = 10
batch_size = 16
width = 8
checkpoints = 0
[bound]
N = 5
max_sample_scale = 1000.0  # tiny models sampled in a few steps spread their samples
n_paths = 4
train_draws = 2
[sampler]
type = "grid"
[pruner]
type = "none"
"""


def _spec(tmp_path: Path, path: str, extra: str = "", name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(SPEC.format(path=path, extra=extra)))
    return p


def test_spec_path_relative_to_spec_file(tmp_path):
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "x.npy")
    spec = load_spec(_spec(tmp_path, "data/x.npy", "test_fraction = 0.4\nm = 10"))
    assert spec.data["path"] == str((tmp_path / "data" / "x.npy").resolve())
    from bound_tuner.objectives.factory import load_data

    split = load_data(spec)
    assert split.train.shape == (10, 3) and split.test.shape == (20, 3)
    for bad, msg in (
        ('name = "swiss_roll"', "both name and path"),
        ("test_size = 5", "test_fraction"),
        ("test_fraction = 1.0", r"must be in \[0, 1\)"),
        ('fit = "pad"', "fit needs data.image_size"),
        ('fit = "stretch"\nimage_size = 8', "choose one of resize, pad"),
        ("image_size = [8, 0]", "positive integer or"),
    ):
        with pytest.raises(SpecError, match=msg):
            load_spec(_spec(tmp_path, "data/x.npy", bad))


def test_cli_bad_file_exit_2_and_no_study(tmp_path, capsys):
    db = tmp_path / "s.db"
    for what, (path, _) in _bad_files(tmp_path).items():
        spec = _spec(tmp_path, str(path))
        assert main(["run", str(spec), "--storage", f"sqlite:///{db}", "--quiet"]) == 2, what
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("bound-tuner: error:"), (what, err)
    assert not db.exists()  # nothing written
    folder = tmp_path / "sizes"
    folder.mkdir()
    _png(folder / "a.png", np.zeros((8, 8), np.uint8))
    _png(folder / "b.png", np.zeros((12, 8), np.uint8))
    assert main(["run", str(_spec(tmp_path, str(folder))), "--storage", f"sqlite:///{db}"]) == 2
    assert "data.image_size = 12" in capsys.readouterr().err
    assert not db.exists()


# ----------------------------------------------------------------------------- one pipeline


def test_python_and_spec_get_the_same_image_data(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    levels = RNG.integers(0, 256, size=(10, 8, 8), dtype=np.uint8)
    for i, a in enumerate(levels):
        _png(folder / f"{i:02d}.png", a)
    from bound_tuner.objectives.diffusion import DiffusionObjective
    from bound_tuner.objectives.factory import load_data
    from bound_tuner.training.config import DiffusionConfig

    raw = load_dataset("file", path=folder, seed=0)
    assert 0 <= raw.train.min() and raw.train.max() <= 1  # pixels as read
    obj = DiffusionObjective(raw, search={"T": 0.5}, base=DiffusionConfig(width=8, steps=2))
    spec_split = load_data(load_spec(_spec(tmp_path, "imgs")))
    assert torch.equal(obj.data.train, spec_split.train)
    assert torch.equal(obj.data.test, spec_split.test)
    # pixel k -> the centre of its bin, (2k + 1)/256 - 1: held-out bits per dim count 8-bit pixels
    k = (raw.train * 255).round()
    assert torch.allclose(obj.data.train, (2 * k + 1) / 256 - 1)
    assert prepare_for(obj.data, "diffusion") is obj.data  # idempotent
    with pytest.raises(ValueError, match="prepared for a diffusion model"):
        prepare_for(obj.data, "vae")
    # the UNet needs sides divisible by 4
    odd = load_dataset("tensors", train=torch.rand(4, 1, 6, 6))
    with pytest.raises(ValueError, match="divisible by 4"):
        prepare_for(odd, "diffusion")
    vae = prepare_for(raw, "vae")
    assert vae.train.shape == (8, 64) and vae.info["image_shape"] == [1, 8, 8]


def test_fixed_binarization_of_a_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        _png(folder / f"{i}.png", np.full((4, 4), 128, np.uint8))
    a = load_file(folder, binarize="fixed", seed=0, test_fraction=0)
    b = load_file(folder, binarize="fixed", seed=0, test_fraction=0)
    assert set(a.train.unique().tolist()) == {0.0, 1.0} and torch.equal(a.train, b.train)
    assert 0.3 < float(a.train.mean()) < 0.7


def test_help_does_not_import_torch():
    """--help stays quick because it never imports torch or scikit-learn (what it costs is a
    matter for benchmarks, not for a timed test on a shared machine)."""
    code = (
        "import sys\n"
        "from bound_tuner.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['sample', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    torch_loaded, sklearn_loaded = out.stdout.strip().splitlines()[-1].split()
    assert (torch_loaded, sklearn_loaded) == ("False", "False"), out.stderr


def test_images_scaled_by_hand_are_not_scaled_again():
    from bound_tuner.data.preprocess import to_symmetric

    split = load_dataset("tensors", train=torch.rand(6, 1, 4, 4), test_fraction=0)
    assert split.info["pixels"] == "[0, 1]"
    split.train = to_symmetric(split.train)  # as a script may do before the objective
    assert torch.equal(prepare_for(split, "diffusion").train, split.train)
