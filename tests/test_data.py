"""Tests for normlab.data: folder/tarball/IDX sources, cache, splits, augmentation, normalisation.

The fast part generates its data in tmp_path; the `slow` tests use the real Fashion-MNIST (Debian's
package) and the CIFAR-10 JPEG tarball, and FAIL instead of skipping when that data is missing under CI.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlab.config import TrainConfig
from normlab.data import augment_batch, load_data, normalize
from normlab.data import images as data_images
from normlab.data.splits import stratified_holdout, stratified_subset
from normlab.errors import NormlabError

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NORMLAB_CACHE", str(cache))
    return cache


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


# ------------------------------------------------------------------------------------------ helpers

def _rng_img(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.convert("P")
    return rgb.convert(mode)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def make_folder(root: Path) -> dict:
    """train/{cat,dog} with many modes/sizes, a nested folder and 3 bad files + 1 text file; val/, test/."""
    t = root / "train"
    _save(_rng_img("RGB", (20, 30), 0), t / "cat" / "rgb.png")
    _save(_rng_img("L", (40, 40), 1), t / "cat" / "gray.png")
    _save(_rng_img("RGBA", (25, 25), 2), t / "cat" / "nested" / "deeper" / "rgba.png")
    _save(_rng_img("CMYK", (33, 17), 3), t / "cat" / "cmyk.jpg")
    _save(_rng_img("P", (16, 16), 4), t / "dog" / "pal.png", transparency=0)
    _save(_rng_img("I;16", (24, 20), 5), t / "dog" / "deep.png")
    _save(_rng_img("LA", (18, 18), 6), t / "dog" / "la.png")
    _save(_rng_img("RGB", (64, 48), 7), t / "dog" / "big.bmp")
    _save(_rng_img("RGB", (16, 16), 8), t / "dog" / "UPPER.JPG")
    buf = io.BytesIO()
    _rng_img("RGB", (64, 64), 9).save(buf, "JPEG")
    (t / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (t / "dog" / "zero.jpg").write_bytes(b"")
    (t / "cat" / "fake.png").write_text("not an image\n")
    (t / "cat" / "notes.txt").write_text("ignored\n")
    for split, n in (("val", 2), ("test", 1)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                _save(_rng_img("RGB", (16, 16), 100 + 10 * c + i), root / split / cls / f"{i}.png")
    return {"train": 9, "val": 4, "test": 2, "bad": {"truncated.jpg", "zero.jpg", "fake.png"}}


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def encoded_images(n: int, size: int = 28, channels: int | None = None) -> np.ndarray:
    """Images whose first two pixels encode their index (to check disjointness after splits)."""
    rng = np.random.default_rng(n)
    shape = (n, size, size) if channels is None else (n, size, size, channels)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    idx = np.arange(n)
    if channels is None:
        x[:, 0, 0], x[:, 0, 1] = idx % 256, idx // 256
    else:
        x[:, 0, 0, 0], x[:, 0, 1, 0] = idx % 256, idx // 256
    return x


def make_fmnist(root: Path, n_train: int = 500, n_test: int = 100, per_class_uneven: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    y_train = np.arange(n_train) % 10
    if per_class_uneven:  # class 0 three times as frequent
        y_train = np.concatenate([np.zeros(n_train // 4, dtype=int), np.arange(n_train - n_train // 4) % 10])
    write_idx(root / "train-images-idx3-ubyte.gz", encoded_images(n_train))
    write_idx(root / "train-labels-idx1-ubyte.gz", y_train)
    write_idx(root / "t10k-images-idx3-ubyte.gz", encoded_images(n_test))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return root


def ids(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist())


def make_cifar_folder(root: Path, n_train: int = 20, n_test: int = 4, classes=("a", "b", "c")) -> Path:
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            for i in range(n):
                _save(_rng_img("RGB", (32, 32), k), root / split / cls / f"{i:04d}.png")
                k += 1
    return root


# ------------------------------------------------------------------------------------- image folders

def test_folder_modes_shapes_and_skips(tmp_path):
    exp = make_folder(tmp_path / "ds")
    b = load_data(cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16))
    assert b.classes == ["cat", "dog"] and b.num_classes == 2 and b.in_channels == 3 and b.image_size == 16
    assert b.train_x.shape == (exp["train"], 3, 16, 16) and b.train_x.dtype == torch.uint8
    assert b.train_x.is_contiguous() and b.train_y.dtype == torch.int64
    assert b.val_x.shape == (exp["val"], 3, 16, 16) and b.test_x.shape == (exp["test"], 3, 16, 16)
    assert b.train_y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert b.val_y.tolist() == [0, 0, 1, 1]
    assert b.info["num_skipped"] == 3 and {Path(p).name for p, _ in b.info["skipped"]} == exp["bad"]
    assert all(reason for _, reason in b.info["skipped"])
    assert b.info["num_ignored"] == 1 and b.info["val_held_out"] is False
    assert len(b.mean) == 3 and len(b.std) == 3 and all(s > 0 for s in b.std)
    assert "DataBundle(" in repr(b)


def test_folder_default_size_and_grayscale_is_rgb(tmp_path):
    make_cifar_folder(tmp_path / "ds", n_train=1, n_test=0, classes=("a",))
    (tmp_path / "ds" / "val" / "a").mkdir(parents=True)
    _save(_rng_img("L", (300, 200), 1), tmp_path / "ds" / "val" / "a" / "x.png")
    b = load_data(cfg(dataset="folder", data_root=str(tmp_path / "ds")))
    assert b.train_x.shape == (1, 3, 256, 256) and b.val_x.shape == (1, 3, 256, 256) and b.test_x is None
    v = b.val_x[0]
    assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])  # gray replicated to RGB


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 40000, dtype=np.uint16)
    _save(Image.fromarray(arr), tmp_path / "x.png")
    out = data_images.decode_image(str(tmp_path / "x.png"), 8)
    assert out.shape == (8, 8, 3) and int(out[0, 0, 0]) == 40000 // 257


def test_bad_image_error_names_file(tmp_path):
    make_folder(tmp_path / "ds")
    c = cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16, on_bad_image="error")
    with pytest.raises(NormlabError, match=r"(truncated|zero)\.jpg|fake\.png") as e:
        load_data(c)
    assert "--on-bad-image skip" in str(e.value) and "\n" not in str(e.value)


def test_bad_image_error_also_from_cache(tmp_path):
    make_folder(tmp_path / "ds")
    load_data(cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16))
    with pytest.raises(NormlabError, match="--on-bad-image skip"):
        load_data(cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16, on_bad_image="error"))


def test_val_class_not_in_train(tmp_path):
    make_folder(tmp_path / "ds")
    _save(_rng_img("RGB", (16, 16), 0), tmp_path / "ds" / "val" / "bird" / "0.png")
    with pytest.raises(NormlabError, match="bird"):
        load_data(cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16))


def test_train_class_missing_in_val_warns(tmp_path):
    make_folder(tmp_path / "ds")
    _save(_rng_img("RGB", (16, 16), 0), tmp_path / "ds" / "train" / "emu" / "0.png")
    with pytest.warns(UserWarning, match="emu"):
        b = load_data(cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16))
    assert b.classes == ["cat", "dog", "emu"] and b.info["missing_classes"]["val"] == ["emu"]


@pytest.mark.parametrize("problem, match", [
    ("no_root", "does not exist"),
    ("no_val", "no val/"),
    ("no_train", "no train/"),
    ("no_classes", "no class folders"),
    ("empty_class", "holds no images"),
    ("all_bad_class", "no readable image"),
    ("not_tar", "not a tar"),
    ("no_data_root", "needs --data-root"),
])
def test_folder_errors(tmp_path, problem, match):
    root = tmp_path / "ds"
    if problem not in ("no_root", "no_data_root"):
        make_cifar_folder(root, n_train=1, n_test=0, classes=("a",))
        (root / "val").mkdir()
        _save(_rng_img("RGB", (8, 8), 0), root / "val" / "a" / "0.png")
    if problem == "no_val":
        import shutil
        shutil.rmtree(root / "val")
    elif problem == "no_train":
        import shutil
        shutil.rmtree(root / "train")
    elif problem == "no_classes":
        import shutil
        shutil.rmtree(root / "train" / "a")
    elif problem == "empty_class":
        (root / "train" / "b").mkdir()
    elif problem == "all_bad_class":
        (root / "train" / "b").mkdir()
        (root / "train" / "b" / "x.jpg").write_bytes(b"")
    elif problem == "not_tar":
        root = tmp_path / "junk.tar.gz"
        root.write_bytes(b"this is not a tarball")
    data_root = None if problem == "no_data_root" else str(root)
    with pytest.raises(NormlabError, match=match) as e:
        load_data(cfg(dataset="folder" if problem != "not_tar" else "cifar10", data_root=data_root, image_size=8))
    assert "\n" not in str(e.value)


def test_tarball_without_train(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    tar = tmp_path / "stuff.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(tmp_path / "stuff", arcname="stuff")
    with pytest.raises(NormlabError, match=r"stuff\.tar\.gz holds no folder with train/"):
        load_data(cfg(dataset="cifar10", data_root=str(tar)))


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    make_folder(tmp_path / "ds")
    paths = sorted(str(p) for p in (tmp_path / "ds").rglob("*") if data_images.is_image_name(p.name))
    serial = data_images.decode_files(paths, 16, workers=1)
    monkeypatch.setattr(data_images, "PARALLEL_MIN_FILES", 0)
    par = data_images.decode_files(paths * 3, 16, workers=2)
    assert np.array_equal(par[0][: len(paths)], serial[0]) and np.array_equal(par[0][len(paths):2 * len(paths)], serial[0])
    assert [i for i, _ in par[1]] == [i + k * len(paths) for k in range(3) for i, _ in serial[1]]


def test_fmnist_not_found_and_no_internet(tmp_path, monkeypatch):
    import torchvision.datasets

    from normlab.data import loader

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(loader, "DEBIAN_FMNIST", tmp_path / "nope")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(NormlabError, match="apt-get install dataset-fashion-mnist") as e:
        load_data(cfg(dataset="fashion-mnist"))
    assert "--data-root" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(NormlabError, match="--data-root.*tar.gz"):
        load_data(cfg(dataset="cifar10"))


def test_unknown_dataset():
    with pytest.raises(NormlabError, match="unknown dataset"):
        load_data(cfg(dataset="imagenet"))


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    make_folder(tmp_path / "ds")
    c = cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16)
    first = load_data(c)
    assert first.info["cache_hit"] is False and Path(first.info["cache_file"]).is_file()

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_images, "decode_files", boom)
    second = load_data(c)
    assert second.info["cache_hit"] is True and torch.equal(first.train_x, second.train_x)
    assert second.info["skipped"] == first.info["skipped"]
    monkeypatch.undo()
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    _save(_rng_img("RGB", (16, 16), 99), tmp_path / "ds" / "train" / "cat" / "new.png")  # content changed
    third = load_data(c)
    assert third.info["cache_hit"] is False and len(third.train_x) == len(first.train_x) + 1
    other_size = load_data(cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=8))
    assert other_size.info["cache_hit"] is False and other_size.image_size == 8


def test_corrupt_cache_is_rebuilt(tmp_path):
    make_folder(tmp_path / "ds")
    c = cfg(dataset="folder", data_root=str(tmp_path / "ds"), image_size=16)
    first = load_data(c)
    Path(first.info["cache_file"]).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load_data(c)
    assert again.info["cache_hit"] is False and torch.equal(again.train_x, first.train_x)
    assert load_data(c).info["cache_hit"] is True


# ---------------------------------------------------------------------------------------- CIFAR-10

def test_cifar_folder_tarball_holdout(tmp_path):
    src = make_cifar_folder(tmp_path / "src" / "mycifar", n_train=20, n_test=4)
    tar = tmp_path / "mycifar.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(src, arcname="mycifar")
    b = load_data(cfg(dataset="cifar10", data_root=str(tar)))
    assert b.classes == ["a", "b", "c"] and b.train_x.shape == (54, 3, 32, 32)
    assert len(b.val_y) == 6 and torch.bincount(b.val_y).tolist() == [2, 2, 2]
    assert b.test_x.shape == (12, 3, 32, 32) and b.info["val_held_out"] and b.info["tarball"] == str(tar)
    again = load_data(cfg(dataset="cifar10", data_root=str(tar)))
    assert again.info["cache_hit"] and torch.equal(again.val_x, b.val_x)
    # the unpacked folder (and the original one) give the same pixels
    direct = load_data(cfg(dataset="cifar10", data_root=str(src)))
    assert torch.equal(direct.train_x, b.train_x) and torch.equal(direct.test_x, b.test_x)
    resized = load_data(cfg(dataset="cifar10", data_root=str(src), image_size=16))
    assert resized.train_x.shape == (54, 3, 16, 16)


def test_cifar_binary_broken_is_clear(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(b"nope")
    with pytest.raises(NormlabError, match="cifar-10-batches-py"):
        load_data(cfg(dataset="cifar10", data_root=str(tmp_path)))


def test_cifar_missing_root():
    with pytest.raises(NormlabError, match="does not exist"):
        load_data(cfg(dataset="cifar10", data_root="/nonexistent/cifar"))


# ----------------------------------------------------------------------------------- Fashion-MNIST

def test_fmnist_idx_holdout_is_stratified_disjoint_and_seed_independent(tmp_path):
    make_fmnist(tmp_path / "fm", n_train=500, n_test=100)
    b = load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path / "fm")))
    assert b.train_x.shape == (450, 1, 28, 28) and b.val_x.shape == (50, 1, 28, 28)
    assert b.test_x.shape == (100, 1, 28, 28) and b.in_channels == 1 and b.num_classes == 10
    assert b.classes[0] == "T-shirt/top" and b.classes[-1] == "Ankle boot"
    assert torch.bincount(b.val_y, minlength=10).tolist() == [5] * 10
    assert torch.bincount(b.train_y, minlength=10).tolist() == [45] * 10
    assert ids(b.train_x).isdisjoint(ids(b.val_x)) and len(ids(b.train_x) | ids(b.val_x)) == 500
    other = load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path / "fm"), seed=7))
    assert torch.equal(other.val_x, b.val_x) and torch.equal(other.train_y, b.train_y)
    frac = load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path / "fm"), val_fraction=0.2))
    assert len(frac.val_y) == 100 and torch.bincount(frac.val_y).tolist() == [10] * 10


def test_fmnist_torchvision_layout_resize_and_subset(tmp_path):
    make_fmnist(tmp_path / "root" / "FashionMNIST" / "raw", n_train=400, n_test=50, per_class_uneven=True)
    b = load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path / "root"), image_size=16, train_subset=90))
    assert b.train_x.shape == (90, 1, 16, 16) and b.image_size == 16
    counts = torch.bincount(b.train_y, minlength=10).tolist()
    full = load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path / "root"), image_size=16))
    full_counts = torch.bincount(full.train_y, minlength=10).tolist()
    expect = [90 * c / sum(full_counts) for c in full_counts]
    assert all(abs(c - e) < 1 for c, e in zip(counts, expect)) and counts[0] > 2 * counts[1]
    assert torch.equal(full.val_x, b.val_x)  # val stays complete and identical
    capped = load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path / "root")), max_eval=20)
    assert len(capped.val_y) == 20 and len(capped.test_y) == 20


def test_fmnist_bad_files(tmp_path):
    with pytest.raises(NormlabError, match="no Fashion-MNIST IDX files"):
        load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path)))
    make_fmnist(tmp_path / "fm", n_train=20, n_test=10)
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01junk"))
    with pytest.raises(NormlabError, match="not a valid IDX file"):
        load_data(cfg(dataset="fashion-mnist", data_root=str(tmp_path / "fm")))


# ------------------------------------------------------------------------------------------ splits

def test_stratified_holdout_and_subset():
    y = torch.tensor([0] * 300 + [1] * 100 + [2] * 50)[torch.randperm(450, generator=torch.Generator().manual_seed(3))]
    keep, held = stratified_holdout(y, 3, 0.1)
    assert torch.bincount(y[held], minlength=3).tolist() == [30, 10, 5]
    assert set(keep.tolist()).isdisjoint(held.tolist()) and len(keep) + len(held) == 450
    keep2, held2 = stratified_holdout(y, 3, 0.1)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    _, held3 = stratified_holdout(y, 3, 0.1, seed=1)
    assert not torch.equal(held, held3)
    sub = stratified_subset(y, 3, 45)
    assert len(sub) == 45 and torch.bincount(y[sub], minlength=3).tolist() == [30, 10, 5]
    assert len(set(sub.tolist())) == 45 and torch.equal(sub, stratified_subset(y, 3, 45))
    assert len(stratified_subset(y, 3, 1000)) == 450


# ---------------------------------------------------------------------------------- augmentation

def reference_augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image python loop with the same draw order as augment_batch."""
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    out = torch.empty_like(x)
    for i in range(n):
        p = torch.nn.functional.pad(x[i], (pad, pad, pad, pad))
        crop = p[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_matches_per_image_reference(dtype):
    x = torch.randint(0, 256, (64, 3, 12, 10)).to(dtype)
    got = augment_batch(x, torch.Generator().manual_seed(5))
    ref = reference_augment(x, torch.Generator().manual_seed(5))
    assert got.shape == x.shape and got.dtype == dtype and torch.equal(got, ref)


def test_augment_per_image_randomness_determinism_and_flip_rate():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(512, -1, -1, -1).contiguous()
    a = augment_batch(x, torch.Generator().manual_seed(0))
    distinct = {bytes(a[i].numpy().tobytes()) for i in range(len(a))}
    assert len(distinct) > 100  # each image draws its own crop/flip (81 offsets x 2 flips)
    assert torch.equal(a, augment_batch(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment_batch(x, torch.Generator().manual_seed(1)))
    # flip rate: with offsets fixed at the centre (pad=0) the only change is the flip
    f = augment_batch(x, torch.Generator().manual_seed(2), pad=0)
    flipped = (f != x).flatten(1).any(1).float().mean().item()
    assert 0.4 < flipped < 0.6
    # zero padding shows up at the borders for shifted crops
    ones = torch.full((256, 1, 8, 8), 7, dtype=torch.uint8)
    o = augment_batch(ones, torch.Generator().manual_seed(3))
    assert set(o.unique().tolist()) == {0, 7} and (o == 7).flatten(1).sum(1).min() >= 0


def test_augment_channels_last_and_generator_device():
    x = torch.rand(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    g = torch.Generator(device="cpu").manual_seed(0)
    out = augment_batch(x, g)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference_augment(x.contiguous(), torch.Generator().manual_seed(0)))
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        assert torch.equal(augment_batch(x.cuda(), torch.Generator().manual_seed(0)).cpu(), out)


# --------------------------------------------------------------------------------- normalisation

def test_normalize_train_stats(tmp_path):
    make_cifar_folder(tmp_path / "ds", n_train=30, n_test=2)
    b = load_data(cfg(dataset="cifar10", data_root=str(tmp_path / "ds")))
    z = normalize(b.train_x, b.mean, b.std)
    assert z.dtype == torch.float32 and z.shape == b.train_x.shape
    m, s = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(m, torch.zeros(3), atol=1e-4) and torch.allclose(s, torch.ones(3), atol=1e-4)
    ref = (b.train_x.double() / 255 - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)
    assert torch.allclose(z.double(), ref, atol=1e-5)
    cl = normalize(b.train_x.contiguous(memory_format=torch.channels_last), b.mean, b.std, dtype=torch.float64)
    assert cl.dtype == torch.float64 and cl.is_contiguous(memory_format=torch.channels_last)
    xf = b.train_x.float()
    assert torch.allclose(normalize(xf, b.mean, b.std), z) and torch.equal(xf, b.train_x.float())  # not in place


# ------------------------------------------------------------------------------------- real data

def _need(path: Path, what: str) -> None:
    if path.exists():
        return
    msg = f"{what} not found at {path}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " (required under CI)")
    pytest.skip(msg)


@pytest.mark.slow
def test_real_fashion_mnist():
    _need(FMNIST_DIR / "train-images-idx3-ubyte.gz", "Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    b = load_data(cfg(dataset="fashion-mnist"))
    assert (len(b.train_y), len(b.val_y), len(b.test_y)) == (54000, 6000, 10000)
    assert b.train_x.shape[1:] == (1, 28, 28) and b.num_classes == 10 and b.in_channels == 1
    assert torch.bincount(b.val_y).tolist() == [600] * 10
    assert abs(b.mean[0] - 0.286) < 0.01 and abs(b.std[0] - 0.353) < 0.01
    assert load_data(cfg(dataset="fashion-mnist")).info["cache_hit"]


@pytest.mark.slow
def test_real_cifar10_tarball():
    import time

    _need(CIFAR_TARBALL, "the CIFAR-10 JPEG tarball")
    c = cfg(dataset="cifar10", data_root=str(CIFAR_TARBALL))
    b = load_data(c)
    assert (len(b.train_y), len(b.val_y), len(b.test_y)) == (45000, 5000, 10000)
    assert b.train_x.shape[1:] == (3, 32, 32) and b.info["num_skipped"] == 0
    assert b.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(b.val_y).tolist() == [500] * 10 and torch.bincount(b.test_y).tolist() == [1000] * 10
    assert all(abs(m - r) < 0.02 for m, r in zip(b.mean, (0.491, 0.482, 0.447)))
    t = time.perf_counter()
    again = load_data(c)
    assert again.info["cache_hit"] and time.perf_counter() - t < 10
    assert torch.equal(again.val_x, b.val_x)
