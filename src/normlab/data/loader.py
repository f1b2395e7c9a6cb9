"""`load_data(cfg)`: find the data, decode it once into a uint8 cache, split, subset, compute statistics.

Sources
  fashion-mnist  the four IDX files (``train-images-idx3-ubyte.gz`` ...; ``.gz`` or extracted) in
                 ``--data-root`` itself or ``<root>/FashionMNIST/raw``; without a root: Debian's
                 ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``), then
                 a torchvision download into the cache (needs internet).
  cifar10        ``--data-root`` = torchvision's binary release (a folder holding ``cifar-10-batches-py``
                 or that folder), an image folder with ``train/`` and ``test/`` (optional ``val/``) of class
                 folders (the root itself or its single sub-folder), or a ``.tar.gz`` of such a folder
                 (unpacked once into the cache). Without a root: a torchvision download (needs internet).
  folder         ``--data-root`` with ``train/`` and ``val/`` (optional ``test/``) of class folders;
                 images of any size/mode become RGB ``image_size`` squares (default 256): shorter side
                 resized, centre crop (see ``normlab.data.images``).
  Fashion-MNIST (1x28x28), the binary CIFAR-10 and CIFAR-10 image folders (3x32x32) keep their native
  size unless ``image_size`` is set.

Folders: class list = sorted sub-folders of ``train/``; a class of val/test missing from train is an
error, a train class missing from val is a warning (``info["warnings"]``). Images are found
recursively inside a class folder; files without an image extension are ignored and counted
(``info["num_ignored"]``; so are symlinked folders that loop back, which are not walked twice; an
unreadable folder is an error); unreadable images (corrupt, truncated, empty, not an image) are skipped and
listed in ``info["skipped"]`` as (path, reason) with ``on_bad_image="skip"``, or raise with ``"error"``.
Every class folder must hold at least one readable image.

Splits: without a val split in the source, a stratified ``val_fraction`` (default 0.1) of train is
held out with the fixed seed ``splits.SPLIT_SEED`` (the same val set for every training seed).
``train_subset`` keeps a stratified subset of the remaining train images (fixed seed too); val and
test stay complete unless ``load_data(cfg, max_eval=N)`` caps each to a stratified N.
mean/std are computed on the final train split.

Cache: decoded splits (before hold-out/subset) are stored as one torch file in
``$NORMLAB_CACHE/data`` (default ``~/.cache/normlab/data``), written atomically, loaded with
``weights_only=True``. The key hashes the data set, the source format, the target image size and the
source's identity: for image folders (relative path, size, mtime_ns) of every file; for IDX files,
binary batches and tarballs their name, size and mtime_ns (cheap for big files; touching a file
rebuilds). A corrupt cache file is ignored with a warning and rebuilt. With ``on_bad_image="error"``
a cached source that had skipped files raises just as a fresh decode would.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from normlab.data import images
from normlab.data.bundle import DataBundle, channel_stats
from normlab.data.splits import EVAL_SUBSET_SEED, SPLIT_SEED, SUBSET_SEED, stratified_holdout, stratified_subset
from normlab.errors import NormlabError
from normlab.io import cache_dir, save_torch

CACHE_VERSION = 1
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_FOLDER_SIZE = 256
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]  # = torchvision.datasets.FashionMNIST.classes
CIFAR10_BATCHES = "cifar-10-batches-py"
CIFAR10_NATIVE = 32


def _warn(msg: str, notes: list[str]) -> None:
    notes.append(msg)
    # one line ("normlab:0: UserWarning: ..."): a source line of normlab's code tells a user nothing about their data
    warnings.warn_explicit(msg, UserWarning, filename="normlab", lineno=0, module="normlab.data")


# ------------------------------------------------------------------------------------------- cache

def _cache_path(dataset: str, fmt: str, key_data: dict[str, Any]) -> Path:
    blob = json.dumps({"v": CACHE_VERSION, "dataset": dataset, "format": fmt, **key_data}, sort_keys=True)
    return cache_dir() / "data" / f"{dataset}-{fmt}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.pt"


def _valid_raw(raw: Any) -> bool:
    try:
        ok = raw["version"] == CACHE_VERSION and isinstance(raw["classes"], list) and "train" in raw["splits"]
        for x, y in raw["splits"].values():
            ok = ok and x.dtype == torch.uint8 and x.dim() == 4 and y.dtype == torch.int64 and len(x) == len(y)
        return bool(ok) and isinstance(raw["meta"], dict)
    except Exception:  # noqa: BLE001
        return False


def _cached(path: Path, build, notes: list[str]) -> tuple[dict, bool]:
    """Load the decoded source from ``path`` or build it with ``build()`` and save it atomically."""
    if path.is_file():
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if _valid_raw(raw):
                return raw, True
            problem = "has an unexpected layout"
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
            problem = f"is unreadable ({type(exc).__name__})"
        _warn(f"data cache {path} {problem}; rebuilding it", notes)
    raw = build()
    raw["version"] = CACHE_VERSION
    raw["splits"] = {k: (x.contiguous(), y.contiguous()) for k, (x, y) in raw["splits"].items()}
    try:
        save_torch(path, raw)
    except OSError as exc:
        _warn(f"could not write the data cache {path} ({exc.strerror or exc}); set NORMLAB_CACHE to a "
              "writable folder to make the next load fast", notes)
    return raw, False


# ---------------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
            raise ValueError("bad magic number (expected unsigned-byte IDX)")
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        start = 4 + 4 * ndim
        if len(data) != start + int(np.prod(dims)):
            raise ValueError(f"{len(data) - start} data bytes for shape {dims}")
        return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        raise NormlabError(f"{path} is not a valid IDX file ({exc}): re-install dataset-fashion-mnist or "
                           "replace the file") from None


def _find_fmnist(base: Path) -> dict[str, Path] | None:
    for d in (base, base / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in FMNIST_FILES.items():
            for name in (stem + ".gz", stem):
                if (d / name).is_file():
                    found[key] = d / name
                    break
        if len(found) == 4:
            return found
    return None


def _torchvision_download(cls_name: str, root: Path, what: str) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            for train in (True, False):
                cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - no internet, mirror down, ...
        raise NormlabError(f"{what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _fmnist_source(cfg, notes: list[str]) -> tuple[dict, bool, dict]:
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
        if not root.exists():
            raise NormlabError(f"data root {root} does not exist: pass the folder with the Fashion-MNIST IDX files "
                               "as --data-root (or omit it to use /usr/share/datasets/fashion-mnist)")
        files = _find_fmnist(root)
        if files is None:
            raise NormlabError(f"data root {root} has no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) "
                               "in it or in FashionMNIST/raw/: pass the folder that holds them as --data-root")
    else:
        files = _find_fmnist(DEBIAN_FMNIST) or _find_fmnist(cache_dir() / "torchvision")
        if files is None:
            _torchvision_download("FashionMNIST", cache_dir() / "torchvision",
                                  "Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` or pass "
                                  "--data-root with the IDX files (download failed")
            files = _find_fmnist(cache_dir() / "torchvision")
            assert files is not None
    size = cfg.image_size or 28
    key = {"files": sorted(images.file_fingerprint(p) for p in files.values()), "size": size}

    def build() -> dict:
        arrays = {k: _read_idx(p) for k, p in files.items()}
        splits = {}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise NormlabError(f"{files[split + '_x']} and {files[split + '_y']} do not match "
                                   f"(shapes {x.shape} and {y.shape}): re-install the Fashion-MNIST files")
            splits[split] = (_resize(torch.from_numpy(x.copy()).unsqueeze(1), size),
                             torch.from_numpy(y.astype(np.int64)))
        return {"classes": list(FMNIST_CLASSES), "splits": splits,
                "meta": {"source": str(files["train_x"].parent), "format": "idx", "skipped": [], "num_ignored": 0}}

    raw, hit = _cached(_cache_path("fashion-mnist", "idx", key), build, notes)
    return raw, hit, {"cache_file": str(_cache_path("fashion-mnist", "idx", key))}


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 N x C x H x W batch to size x size (antialiased bilinear), in chunks."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(x), 2048):
        part = F.interpolate(x[i:i + 2048].float(), size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
        out[i:i + 2048] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------ CIFAR-10

def _cifar_binary_dir(root: Path) -> Path | None:
    if root.name == CIFAR10_BATCHES and root.is_dir():
        return root
    if (root / CIFAR10_BATCHES).is_dir():
        return root / CIFAR10_BATCHES
    return None


def _cifar_binary(batches: Path, cfg, notes: list[str]) -> tuple[dict, bool, dict]:
    import torchvision.datasets as tvd

    size = cfg.image_size or CIFAR10_NATIVE
    key = {"files": sorted(images.file_fingerprint(p) for p in batches.iterdir() if p.is_file()), "size": size}
    path = _cache_path("cifar10", "binary", key)

    def build() -> dict:
        splits = {}
        classes: list[str] = []
        for split, train in (("train", True), ("test", False)):
            try:
                ds = tvd.CIFAR10(str(batches.parent), train=train, download=False)
            except Exception as exc:  # noqa: BLE001 - missing/corrupt batch files
                raise NormlabError(f"{batches} is not a complete CIFAR-10 binary release ({str(exc).splitlines()[0]}): "
                                   "re-download it or pass an image folder / the cifar10-jpg.tar.gz as --data-root") from None
            x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
            splits[split] = (_resize(x, size), torch.tensor(ds.targets, dtype=torch.int64))
            classes = list(ds.classes)
        return {"classes": classes, "splits": splits,
                "meta": {"source": str(batches), "format": "cifar-binary", "skipped": [], "num_ignored": 0}}

    raw, hit = _cached(path, build, notes)
    return raw, hit, {"cache_file": str(path)}


def _cifar_source(cfg, notes: list[str]) -> tuple[dict, bool, dict]:
    if not cfg.data_root:
        tv_root = cache_dir() / "torchvision"
        if _cifar_binary_dir(tv_root) is None:
            _torchvision_download("CIFAR10", tv_root,
                                  "CIFAR-10 not found: pass --data-root with an image folder (train/, test/), the "
                                  "cifar10-jpg.tar.gz tarball or the cifar-10-batches-py folder (download failed")
        return _cifar_binary(tv_root / CIFAR10_BATCHES, cfg, notes)
    root = Path(cfg.data_root).expanduser()
    if not root.exists():
        raise NormlabError(f"data root {root} does not exist: pass an existing image folder, .tar.gz or "
                           "cifar-10-batches-py folder as --data-root")
    if root.is_file():
        return _folder_source(cfg, root, "cifar10", notes)
    batches = _cifar_binary_dir(root)
    if batches is not None:
        return _cifar_binary(batches, cfg, notes)
    return _folder_source(cfg, root, "cifar10", notes)


# ------------------------------------------------------------------------------------- image folders

def _folder_root(root: Path, dataset: str) -> Path:
    """``root`` if it has train/, else its single sub-folder that has train/."""
    if (root / "train").is_dir():
        return root
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    if len(subs) == 1 and (subs[0] / "train").is_dir():
        return subs[0]
    need = "train/ and val/" if dataset == "folder" else "train/ and test/"
    extra = "" if dataset == "folder" else " (or pass the cifar10-jpg.tar.gz tarball or a cifar-10-batches-py folder)"
    raise NormlabError(f"data root {root} has no train/ folder: pass a folder with {need} sub-folders of class "
                       f"folders as --data-root{extra}")


def _folder_source(cfg, given: Path, dataset: str, notes: list[str]) -> tuple[dict, bool, dict]:
    size = cfg.image_size or (CIFAR10_NATIVE if dataset == "cifar10" else DEFAULT_FOLDER_SIZE)
    tarball = None
    if given.is_file():
        if not images.is_tar_name(given):
            raise NormlabError(f"data root {given} is a file but not a tar archive (.tar.gz/.tgz/.tar): pass an "
                               "image folder or a tarball of one as --data-root")
        tarball = given
        key = {"tarball": images.file_fingerprint(given), "size": size}
        path = _cache_path(dataset, "tarball", key)
        if path.is_file():  # fast path: no need to unpack (or even stat the unpacked files)
            raw, hit = _cached(path, lambda: _decode_folder(_folder_root(images.unpack_tarball(given, cache_dir()),
                                                                         dataset), dataset, size, cfg), notes)
            return raw, hit, {"cache_file": str(path), "tarball": str(given)}
        try:
            root = _folder_root(images.unpack_tarball(given, cache_dir()), dataset)
        except NormlabError as exc:
            if "no train/ folder" not in str(exc):
                raise
            raise NormlabError(f"tarball {given} holds no folder with train/ at its top (or one level down): "
                               "pack the image folder (train/, test/ of class folders) itself") from None
    else:
        root = _folder_root(given, dataset)
        path = None
    scan = _scan_folder(root, dataset)
    if path is None:
        all_files = [p for files, ignored in scan.values() for lst in files.values() for p in lst]
        all_files += [p for files, ignored in scan.values() for p in ignored]
        key = {"folder": images.fingerprint_files(root, all_files), "size": size}
        path = _cache_path(dataset, "folder", key)
    raw, hit = _cached(path, lambda: _decode_folder(root, dataset, size, cfg, scan), notes)
    extra = {"cache_file": str(path)}
    if tarball is not None:
        extra["tarball"] = str(tarball)
    return raw, hit, extra


def _scan_folder(root: Path, dataset: str) -> dict[str, tuple[dict[str, list[str]], list[str]]]:
    splits = ["train", "val", "test"]
    if dataset == "folder" and not (root / "val").is_dir():
        raise NormlabError(f"data root {root} has no val/ folder: add val/ with the same class folders as train/ "
                           "(or use --dataset cifar10 to hold out part of train)")
    scan = {s: images.scan_split(root / s) for s in splits if (root / s).is_dir()}
    train_classes = list(scan["train"][0])
    if not train_classes:
        raise NormlabError(f"{root / 'train'} has no class folders: put each class's images in train/<class>/")
    for split, (files, _) in scan.items():
        if split != "train":
            unknown = [c for c in files if c not in scan["train"][0]]
            if unknown:
                raise NormlabError(f"{root / split / unknown[0]}: class {unknown[0]!r} is not in {root / 'train'}; "
                                   f"add train/{unknown[0]}/ or remove it from {split}/")
        for cls, lst in files.items():
            if not lst:
                raise NormlabError(f"class folder {root / split / cls} holds no images "
                                   f"({', '.join(images.IMG_EXTENSIONS)}): add images or remove the folder")
    return scan


def _decode_folder(root: Path, dataset: str, size: int, cfg, scan=None) -> dict:
    scan = scan if scan is not None else _scan_folder(root, dataset)
    classes = list(scan["train"][0])
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    where: list[tuple[str, str]] = []
    for split, (files, _) in scan.items():
        for cls, lst in files.items():
            paths += lst
            labels += [index[cls]] * len(lst)
            where += [(split, cls)] * len(lst)
    arr, bad = images.decode_files(paths, size)
    skipped = [(paths[i], reason) for i, reason in bad]
    if skipped and cfg.on_bad_image == "error":
        _raise_bad(skipped)
    ok = np.ones(len(paths), dtype=bool)
    ok[[i for i, _ in bad]] = False
    counts: dict[tuple[str, str], int] = {}
    for i in np.flatnonzero(ok):
        counts[where[i]] = counts.get(where[i], 0) + 1
    for split, (files, _) in scan.items():
        for cls in files:
            if not counts.get((split, cls)):
                raise NormlabError(f"class folder {root / split / cls} has no readable image (all "
                                   f"{len(files[cls])} skipped as unreadable): replace them or remove the folder")
    x_all = torch.from_numpy(arr).permute(0, 3, 1, 2)
    y_all = torch.tensor(labels, dtype=torch.int64)
    split_of = np.array([s for s, _ in where]) if where else np.array([], dtype=str)
    splits = {}
    for split in scan:
        sel = torch.from_numpy(np.flatnonzero(ok & (split_of == split)))
        splits[split] = (x_all[sel].contiguous(), y_all[sel])
    ignored = [p for _, ign in scan.values() for p in ign]
    missing = {s: [c for c in classes if c not in files] for s, (files, _) in scan.items() if s != "train"}
    return {"classes": classes, "splits": splits,
            "meta": {"source": str(root), "format": "image-folder", "skipped": skipped, "num_ignored": len(ignored),
                     "ignored_examples": ignored[:10], "missing_classes": {s: m for s, m in missing.items() if m}}}


def _raise_bad(skipped: list[tuple[str, str]]) -> None:
    path, reason = skipped[0]
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    raise NormlabError(f"unreadable image {path} ({reason}){more}: delete it or pass --on-bad-image skip")


# ------------------------------------------------------------------------------------------ public

def load_data(cfg, max_eval: int | None = None) -> DataBundle:
    """Decode (or load from the cache) the data set of ``cfg`` and return its train/val/test splits.

    ``max_eval`` (not a config setting; for quick tests) caps val and test to a stratified subset of
    that many images each.
    """
    t0 = time.perf_counter()
    notes: list[str] = []
    dataset = cfg.dataset
    if dataset == "fashion-mnist":
        raw, hit, extra = _fmnist_source(cfg, notes)
    elif dataset == "cifar10":
        raw, hit, extra = _cifar_source(cfg, notes)
    elif dataset == "folder":
        if not cfg.data_root:
            raise NormlabError("dataset 'folder' needs --data-root: a folder with train/ and val/ sub-folders of "
                               "class folders")
        root = Path(cfg.data_root).expanduser()
        if not root.exists():
            raise NormlabError(f"data root {root} does not exist: pass a folder with train/ and val/ sub-folders "
                               "of class folders as --data-root")
        raw, hit, extra = _folder_source(cfg, root, "folder", notes)
    else:
        raise NormlabError(f"unknown dataset {dataset!r}: use fashion-mnist, cifar10 or folder")
    meta = raw["meta"]
    skipped = [tuple(s) for s in meta.get("skipped", [])]
    if skipped and cfg.on_bad_image == "error":
        _raise_bad(skipped)
    decode_s = time.perf_counter() - t0
    classes = list(raw["classes"])
    k = len(classes)
    train_x, train_y = raw["splits"]["train"]
    test = raw["splits"].get("test")
    info: dict[str, Any] = {"source": meta["source"], "format": meta["format"], **extra, "cache_hit": hit}
    fraction = cfg.val_fraction if cfg.val_fraction is not None else DEFAULT_VAL_FRACTION
    if "val" in raw["splits"]:
        val_x, val_y = raw["splits"]["val"]
        info.update(val_held_out=False)
    else:
        keep, held = stratified_holdout(train_y, k, fraction, SPLIT_SEED)
        val_x, val_y = train_x[held], train_y[held]
        train_x, train_y = train_x[keep], train_y[keep]
        info.update(val_held_out=True, val_fraction=fraction, split_seed=SPLIT_SEED)
    if cfg.train_subset is not None:
        if cfg.train_subset < len(train_y):
            sel = stratified_subset(train_y, k, cfg.train_subset, SUBSET_SEED)
            train_x, train_y = train_x[sel], train_y[sel]
        info.update(train_subset=int(cfg.train_subset), subset_seed=SUBSET_SEED)
    if max_eval is not None:
        if len(val_y) > max_eval:
            sel = stratified_subset(val_y, k, max_eval, EVAL_SUBSET_SEED)
            val_x, val_y = val_x[sel], val_y[sel]
        if test is not None and len(test[1]) > max_eval:
            sel = stratified_subset(test[1], k, max_eval, EVAL_SUBSET_SEED)
            test = (test[0][sel], test[1][sel])
        info["max_eval"] = int(max_eval)
    if len(val_y) == 0:
        raise NormlabError(f"the validation split of {meta['source']} is empty: raise --val-fraction or add images")
    for s in meta.get("missing_classes", {}).get("val", []):
        _warn(f"class {s!r} has no folder in {Path(meta['source']) / 'val'}: its validation accuracy is undefined",
              notes)
    mean, std = channel_stats(train_x)
    test_x, test_y = (test[0].contiguous(), test[1].contiguous()) if test is not None else (None, None)
    info.update(
        counts={"train": len(train_y), "val": len(val_y), "test": 0 if test_y is None else len(test_y)},
        train_class_counts=torch.bincount(train_y, minlength=k).tolist(),
        skipped=skipped, num_skipped=len(skipped), num_ignored=int(meta.get("num_ignored", 0)),
        ignored_examples=list(meta.get("ignored_examples", [])),
        missing_classes=dict(meta.get("missing_classes", {})), warnings=notes,
        decode_seconds=round(decode_s, 3), load_seconds=round(time.perf_counter() - t0, 3),
    )
    return DataBundle(name=dataset, classes=classes, train_x=train_x.contiguous(), train_y=train_y.contiguous(),
                      val_x=val_x.contiguous(), val_y=val_y.contiguous(), test_x=test_x, test_y=test_y,
                      mean=mean, std=std, info=info)
